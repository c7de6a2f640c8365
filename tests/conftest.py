"""Shared fixtures: every test runs on CPU, and on CUDA too when a GPU is present."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

# Test helpers (pipeline.py) live next to the tests; importlib mode does not add this folder.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


_ERROR_CASE_RUNNER = """
import faulthandler, json, sys
faulthandler.enable()
import torch
import heterospec_ext as hx
device = torch.device(sys.argv[1])
cases = json.loads(sys.stdin.read())
out = {}
for name, code in cases:
    print(f"case {name}: start", file=sys.stderr, flush=True)
    out[name] = run_case(code, device)
    print(f"case {name}: {out[name][0] or 'no error'}", file=sys.stderr, flush=True)
print("@@RESULT@@" + json.dumps(out), flush=True)
"""

_RUN_CASE = """
def run_case(code, device):
    try:
        exec(code, {"torch": torch, "hx": hx, "device": device})
        if device.type == "cuda":
            torch.cuda.synchronize()
        return [None, ""]
    except Exception as exc:  # noqa: BLE001
        return [type(exc).__name__, str(exc)]
"""


def run_error_cases(cases, device="cpu", timeout=300):
    """Run each ``(name, code)`` snippet in one fresh Python process and report what it raised.

    Each snippet runs with ``torch``, ``heterospec_ext as hx`` and ``device`` defined. Returns
    ``{name: (exception_type_name or None, message)}``. A crash (segfault, abort) of the child
    process fails the calling test, which is the point of running these out of process; the
    child's stderr names the case it was running. ``HX_ERROR_CASES_INPROCESS=1`` runs the
    snippets in this process instead (for diagnosing a child that dies for reasons of its own).
    """
    cases = [(n, textwrap.dedent(c)) for n, c in cases]
    if os.environ.get("HX_ERROR_CASES_INPROCESS") == "1":
        import heterospec_ext as hx

        scope = {"torch": torch, "hx": hx}
        exec(_RUN_CASE, scope)
        return {n: tuple(scope["run_case"](c, torch.device(device))) for n, c in cases}
    proc = subprocess.run(
        [sys.executable, "-c", _RUN_CASE + _ERROR_CASE_RUNNER, str(device)],
        input=json.dumps(cases), capture_output=True, text=True, timeout=timeout,
        env=dict(os.environ),
    )
    assert proc.returncode == 0, (
        f"error-case subprocess died with code {proc.returncode}\n{proc.stderr[-4000:]}"
    )
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT@@")]
    assert line, f"no result from subprocess\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return {k: tuple(v) for k, v in json.loads(line[-1][len("@@RESULT@@"):]).items()}
