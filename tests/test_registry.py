"""Every op and its _out twin has a schema, a CPU kernel, a fake, and a CUDA kernel in CUDA builds;
every decode-layer op (CPU only) a schema, a CPU kernel and a fake."""
import pytest
import torch
from torch._library import simple_registry

import heterospec_ext as hx

OP_NAMES = [name for op in hx.OPS for name in (op, f"{op}_out")]


def test_namespace_holds_exactly_the_documented_ops():
    registered = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith("heterospec::")}
    assert registered == set(OP_NAMES) | set(hx.DECODE_LAYER_OPS)


@pytest.mark.parametrize("name", hx.DECODE_LAYER_OPS)
def test_decode_layer_op_has_cpu_kernel_and_fake(name):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"heterospec::{name}", "CPU")
    entry = simple_registry.singleton.find(f"heterospec::{name}")
    assert entry.fake_impl.kernel is not None, f"heterospec::{name} has no fake kernel"


@pytest.mark.parametrize("name", OP_NAMES)
def test_cpu_kernel_registered(name):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"heterospec::{name}", "CPU")


@pytest.mark.parametrize("name", OP_NAMES)
def test_fake_registered(name):
    entry = simple_registry.singleton.find(f"heterospec::{name}")
    assert entry.fake_impl.kernel is not None, f"heterospec::{name} has no fake kernel"


@pytest.mark.parametrize("name", OP_NAMES)
def test_cuda_kernel_registered_in_cuda_builds(name):
    if not hx.build_info()["with_cuda"]:
        pytest.skip("CPU-only build: no CUDA kernels to look for")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"heterospec::{name}", "CUDA")


@pytest.mark.parametrize("name", [n for n in OP_NAMES if n.endswith("_out")])
def test_out_variants_declare_every_written_tensor(name):
    schema = getattr(torch.ops.heterospec, name).default._schema
    written = [a for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert written, f"{name} must mark its outputs Tensor(a!)"
    assert len(schema.returns) == 0


def test_build_info_is_consistent():
    info = hx.build_info()
    assert info["version"] == hx.__version__
    assert isinstance(info["with_cuda"], bool)
    assert info["built_with_torch"].split("+")[0] == torch.__version__.split("+")[0]
    if info["with_cuda"]:
        assert info["cuda_arch_list"], "a CUDA build must report its arch list"
