"""CPU benchmarks run on 2 threads, like CI (``HX_BENCH_THREADS`` overrides it: on a host whose
other core is busy, 2-thread ops stall while waiting for it). Bench modules import each other's
compositions, so this folder goes on sys.path (importlib mode does not add it)."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    torch.set_num_threads(int(os.environ.get("HX_BENCH_THREADS", "2")))
