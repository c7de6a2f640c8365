"""The decode-layer ops vs the torch compositions they replace, at the sizes of SmolLM2-135M's
layers and the shipped EAGLE-3 head's (hidden 576, intermediate 1536, 9 heads of 64, 3 KV heads)
in bfloat16 on CPU.

Rows: 6 (a draft level at top_k 6) and, for attention, 1 (an AR step), 6, 8 and 16 (a tree
verify; both the head and the lean target use the fused attention up to 16 rows,
``FUSED_ATTENTION_MAX_ROWS``) over 200 cached rows. pytest-benchmark;
``test_compositions_agree_with_ops`` checks that both sides compute the same thing.
"""
import pytest
import torch
import torch.nn.functional as F

import heterospec_ext as hx

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 576, 1536, 9, 3, 64, 49152
EPS = 1e-5
DT = torch.bfloat16
CACHED = 200


def _norm(x, w):
    return F.rms_norm(x, (x.shape[-1],), w, EPS).to(DT)


def norm_inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, VOCAB, (n,), generator=g),
            torch.randn(VOCAB, HIDDEN, generator=g).to(DT), torch.randn(n, HIDDEN, generator=g),
            torch.rand(HIDDEN, generator=g) + 0.5, torch.rand(HIDDEN, generator=g) + 0.5)


def norm_composition(ids, embed, hidden, w1, w2):
    return torch.cat((_norm(embed[ids].float(), w1), _norm(hidden, w2)), dim=-1)


def add_norm_composition(residual, delta, w):
    residual = residual + delta
    return residual, _norm(residual, w)


def silu_composition(gate_up):
    i = gate_up.shape[1] // 2
    return F.silu(gate_up[:, :i]) * gate_up[:, i:]


def attention_inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(n, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=g).to(DT)
    angles = torch.rand(CACHED + n, HEAD_DIM // 2, generator=g)
    rope = torch.stack((torch.cat((angles.cos(), angles.cos()), -1),
                        torch.cat((-angles.sin(), angles.sin()), -1)), dim=1)
    positions = torch.full((n,), CACHED, dtype=torch.int64)
    k = torch.randn(KV_HEADS, CACHED + n, HEAD_DIM, generator=g).to(DT)
    v = torch.randn(KV_HEADS, CACHED + n, HEAD_DIM, generator=g).to(DT)
    visible = torch.ones(n, CACHED + n, dtype=torch.bool)
    visible[:, CACHED:] = torch.eye(n, dtype=torch.bool)  # one tree level: each node sees itself
    return qkv, rope, positions, k, v, CACHED, visible, HEADS, KV_HEADS


def attention_composition(qkv, rope, positions, k_cache, v_cache, cache_len, visible, heads,
                          kv_heads):
    """What the head ran before: RoPE from the table, cache append, SDPA."""
    n, hd = qkv.shape[0], HEAD_DIM
    x = qkv.view(n, heads + 2 * kv_heads, hd)
    rows = rope[positions]
    qk = x[:, :heads + kv_heads].float()
    qk = torch.addcmul(qk * rows[:, 0:1], qk.roll(hd // 2, -1), rows[:, 1:2]).to(DT)
    k_cache[:, cache_len:cache_len + n] = qk[:, heads:].transpose(0, 1)
    v_cache[:, cache_len:cache_len + n] = x[:, heads + kv_heads:].transpose(0, 1)
    out = F.scaled_dot_product_attention(
        qk[:, :heads].transpose(0, 1)[None], k_cache[None, :, :cache_len + n],
        v_cache[None, :, :cache_len + n],
        attn_mask=None if visible is None else visible[None, None], enable_gqa=True)
    return out[0].transpose(0, 1).reshape(n, heads * hd)


def test_compositions_agree_with_ops():
    args = norm_inputs(6)
    torch.testing.assert_close(hx.embed_hidden_rms_norm(*args, EPS).float(),
                               norm_composition(*args).float(), rtol=1e-2, atol=1e-2)
    residual, delta, w = torch.randn(6, HIDDEN), torch.randn(6, HIDDEN).to(DT), args[3]
    new_residual, normed = add_norm_composition(residual, delta, w)
    torch.testing.assert_close(hx.fused_add_rms_norm(residual, delta, w, EPS).float(),
                               normed.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(residual, new_residual)
    gate_up = torch.randn(6, 2 * INTERMEDIATE).to(DT)
    torch.testing.assert_close(hx.silu_and_mul(gate_up).float(),
                               silu_composition(gate_up).float(), rtol=2e-2, atol=2e-2)
    a = attention_inputs(6)
    b = attention_inputs(6)
    torch.testing.assert_close(hx.rope_cache_attention(*a).float(),
                               attention_composition(*b).float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(a[3].float(), b[3].float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("impl", ["fused", "composition"])
def test_embed_hidden_rms_norm_cpu(benchmark, impl):
    args = norm_inputs(6)
    benchmark.group = "embed_hidden_rms_norm n=6 H=576 bf16"
    if impl == "fused":
        benchmark(hx.embed_hidden_rms_norm, *args, EPS)
    else:
        benchmark(norm_composition, *args)


@pytest.mark.parametrize("impl", ["fused", "composition"])
def test_fused_add_rms_norm_cpu(benchmark, impl):
    residual, delta, w = torch.randn(6, HIDDEN), torch.randn(6, HIDDEN).to(DT), torch.rand(HIDDEN)
    benchmark.group = "fused_add_rms_norm n=6 H=576 bf16"
    if impl == "fused":
        benchmark(hx.fused_add_rms_norm, residual, delta, w, EPS)
    else:
        benchmark(add_norm_composition, residual, delta, w)


@pytest.mark.parametrize("impl", ["fused", "composition"])
def test_silu_and_mul_cpu(benchmark, impl):
    gate_up = torch.randn(6, 2 * INTERMEDIATE).to(DT)
    benchmark.group = "silu_and_mul n=6 I=1536 bf16"
    benchmark(hx.silu_and_mul if impl == "fused" else silu_composition, gate_up)


@pytest.mark.parametrize("impl", ["fused", "composition"])
@pytest.mark.parametrize("n", [1, 6, 8, 16])
def test_rope_cache_attention_cpu(benchmark, impl, n):
    args = attention_inputs(n)
    benchmark.group = f"rope_cache_attention n={n} cached={CACHED} 9/3 heads bf16"
    benchmark(hx.rope_cache_attention if impl == "fused" else attention_composition, *args)
