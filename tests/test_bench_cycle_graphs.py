"""Smoke test of bench/bench_cycle_graphs.py: its --small mode (tiny config, CPU, eager) runs the
same model building, driver modes and table code as the GPU run."""
import importlib.util
import json
import os

import torch

from conftest import REPO_ROOT


def test_bench_cycle_graphs_small_runs_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "bench_cycle_graphs", os.path.join(REPO_ROOT, "bench", "bench_cycle_graphs.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    out = tmp_path / "cycle.json"
    try:
        bench.main(["--small", "--cycles", "2", "--warmup", "1", "--max-len", "128",
                    "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    data = json.loads(out.read_text())
    shapes = [(r["levels"], r["N"]) for r in data["rows"]]
    assert shapes == [tuple(s) for s in data["policy"]["shapes"]]
    for row in data["rows"]:
        # the forced static tree verifies exactly the shape's N nodes every cycle
        assert row["dynamic_mean_verified"] == row["static_mean_verified"] == row["N"]
        assert row["dynamic_cycle_ms"] > 0 and row["static_verify_ms"] > 0
    assert "| N | draft levels |" in data["table"]
