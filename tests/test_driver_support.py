"""Shared helpers for the driver tests: a tiny Llama builder, cache comparison, and a check that
the driver runs on the real heterospec kernels."""
import math
import os

import pytest
import torch

import heterospec_ext  # noqa: F401  (registers the schemas)

OPS = ("draft_topk_entropy", "stratify", "build_tree", "fused_verify")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def has_cpu_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"heterospec::{op}", "CPU")


def test_driver_runs_on_the_compiled_kernels():
    assert all(has_cpu_kernel(op) for op in OPS)


def _processed_probs(z_row, temperature, top_k, top_p):
    """The fused_verify contract's target processing of one row, in float64, written
    independently of heterospec_ext.reference for the driver's distribution tests."""
    z = z_row.double() / temperature
    v = z.numel()
    if 0 < top_k < v:
        kth = torch.topk(z, top_k).values[-1]
        z = torch.where(z >= kth, z, torch.full_like(z, -math.inf))
    p = torch.softmax(z, dim=-1)
    if top_p < 1.0:
        sp = torch.sort(p, descending=True).values
        cum = torch.cumsum(sp, 0)
        idx = int(torch.searchsorted(cum, torch.tensor(top_p, dtype=cum.dtype)))
        idx = min(idx, v - 1)
        cut = sp[idx]
        p = torch.where(p >= cut, p, torch.zeros_like(p))
    return p / p.sum()


# ----------------------------------------------------------------------------- models

try:
    import heterospec  # noqa: F401
except ImportError:  # running from a source tree without `pip install -e .`
    import sys

    sys.path.insert(0, os.path.join(REPO_ROOT, "python"))


def tiny_llama(vocab=32, seed=0, layers=2, hidden=32, logit_scale=1.0):
    """A randomly initialised small Llama (eager attention, fp32) for fast exact tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=False,
                      attn_implementation="eager", bos_token_id=0, eos_token_id=1,
                      pad_token_id=None)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls only lose from intra-op threads (and CI's 2 cores are shared). Import it
    into a test module to apply it there (it is autouse within the importing module)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class FakeTokenizer:
    """Just enough tokenizer for the vocabulary check."""

    def __init__(self, vocab):
        self._vocab = dict(vocab)

    def get_vocab(self):
        return dict(self._vocab)


def cache_tensors(cache):
    """Per layer (keys, values) ``[1, kv_heads, length, head_dim]`` of a HF cache or of a
    verifier (anything with ``committed()``)."""
    if hasattr(cache, "committed"):
        keys, values = cache.committed()
        return list(zip(keys, values))
    return [(layer.keys, layer.values) for layer in cache.layers]


def assert_cache_matches_fresh(lm, cache, committed, atol=1e-4):
    """The committed cache equals a plain causal forward over the same tokens."""
    n = cache.get_seq_length()
    fresh = lm.new_cache()
    lm.causal_forward(torch.tensor(committed[:n], dtype=torch.int64), fresh)
    for (k, v), (fk, fv) in zip(cache_tensors(cache), cache_tensors(fresh)):
        assert k.shape == fk.shape, (k.shape, fk.shape)
        torch.testing.assert_close(k, fk, atol=atol, rtol=1e-4)
        torch.testing.assert_close(v, fv, atol=atol, rtol=1e-4)
