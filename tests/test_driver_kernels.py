"""The driver runs on the compiled heterospec kernels (not on a Python fallback)."""
import torch

import heterospec_ext as hx


def test_driver_runs_on_the_compiled_kernels():
    assert all(torch._C._dispatch_has_kernel_for_dispatch_key(f"heterospec::{op}", "CPU")
               for op in hx.OPS)
