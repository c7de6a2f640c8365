"""CPU benchmarks run on 2 threads, like CI."""
import torch


def pytest_configure(config):
    torch.set_num_threads(2)
