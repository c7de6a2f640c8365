"""Smoke test of bench/tools/bench_cycle_graphs.py: its --small mode (tiny config, CPU, eager)
runs the same model building, driver modes and table code as the GPU run. The script runs as a
script (in a subprocess): it is a tool, not an importable module."""
import json
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "bench" / "tools" / "bench_cycle_graphs.py"


def test_bench_cycle_graphs_small_runs_on_cpu(tmp_path):
    out = tmp_path / "cycle.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--small", "--cycles", "2", "--warmup",
                           "1", "--max-len", "128", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text())
    shapes = [(r["levels"], r["N"]) for r in data["rows"]]
    assert shapes == [tuple(s) for s in data["policy"]["shapes"]]
    for row in data["rows"]:
        # the forced static tree verifies exactly the shape's N nodes every cycle
        assert row["dynamic_mean_verified"] == row["static_mean_verified"] == row["N"]
        assert row["dynamic_cycle_ms"] > 0 and row["static_verify_ms"] > 0
    assert "| N | draft levels |" in data["table"]
