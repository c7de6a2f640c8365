"""Fixtures shared by the test modules. Helpers live in ``heterospec_ext.testing`` (kernel tests)
and ``heterospec.testing`` (driver tests); every test runs on CPU, and on CUDA too when a GPU is
present (the ``device`` fixture)."""
import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls only lose from intra-op threads (and CI's 2 cores are shared). A module
    applies it to all its tests with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_pair():
    """A tiny random Llama target and draft (vocabulary 32, peaked logits) as ``CausalLM``s."""
    import heterospec as hs
    from heterospec.testing import tiny_llama

    target = hs.CausalLM(tiny_llama(32, seed=1, logit_scale=30.0), name="tiny target")
    draft = hs.CausalLM(tiny_llama(32, seed=2, logit_scale=30.0), name="tiny draft")
    return target, draft
