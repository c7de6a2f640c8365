"""The decode-layer ops (embed_hidden_rms_norm, fused_add_rms_norm, silu_and_mul,
rope_cache_attention) against their float64 oracles in heterospec_ext.reference: odd sizes,
extreme values, both activation dtypes, masks and grouped-query heads; argument errors;
fakes, opcheck and torch.compile."""
import math

import pytest
import torch

import heterospec_ext as hx
from heterospec_ext import reference as ref

DTYPES = (torch.float32, torch.bfloat16)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def assert_close_to_oracle(out, oracle, dtype, what):
    """``out`` is the oracle rounded once to ``dtype``, up to float32 arithmetic: within one
    unit in the last place of ``dtype`` (bfloat16: 2^-8 relative; float32: a few 2^-24), NaNs
    in the same places."""
    out = out.double()
    assert torch.equal(out.isnan(), oracle.isnan()), f"{what}: NaNs differ"
    ok = ~oracle.isnan()
    rel = 2.0 ** -8 if dtype == torch.bfloat16 else 1e-5
    err = (out[ok] - oracle[ok]).abs()
    bound = rel * oracle[ok].abs() + 1e-6
    assert bool((err <= bound).all()), \
        f"{what}: max error {float(err.max())} beyond bound ({float((err - bound).max())} over)"


# ----------------------------------------------------------------------------- norms

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,width,vocab", [(1, 576, 9), (7, 37, 50), (300, 64, 1000), (0, 8, 3)])
@pytest.mark.parametrize("hidden_dtype", ["float32", "same"])
def test_embed_hidden_rms_norm_matches_oracle(dtype, n, width, vocab, hidden_dtype):
    g = gen(n * width)
    ids = torch.randint(0, vocab, (n,), generator=g)
    embed = (torch.randn(vocab, width, generator=g) * 3).to(dtype)
    hidden = torch.randn(n, width, generator=g) * 50
    if hidden_dtype == "same":
        hidden = hidden.to(dtype)
    w1, w2 = torch.rand(width, generator=g) + 0.5, torch.randn(width, generator=g)
    out = hx.embed_hidden_rms_norm(ids, embed, hidden, w1, w2, 1e-5)
    assert out.dtype == dtype and out.shape == (n, 2 * width)
    assert_close_to_oracle(out, ref.embed_hidden_rms_norm(ids, embed, hidden, w1, w2, 1e-5),
                           dtype, "embed_hidden_rms_norm")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_extreme_rows(dtype):
    """Tiny, huge and zero rows: eps keeps a zero row at 0; eps = 0 makes it NaN (0 / 0) in the
    oracle and the kernel alike; values near float32's range do not overflow the mean of
    squares in float32 only where the oracle's float64 would not either."""
    width = 33
    rows = torch.stack([torch.full((width,), 1e-20), torch.full((width,), 1e15),
                        torch.zeros(width), torch.linspace(-1e3, 1e3, width)])
    w = torch.linspace(0.5, 2.0, width)
    for eps in (1e-6, 0.0):
        residual = torch.zeros_like(rows)
        out = hx.fused_add_rms_norm(residual, rows.to(dtype), w, eps)
        _, oracle = ref.fused_add_rms_norm(torch.zeros_like(rows), rows.to(dtype), w, eps)
        assert_close_to_oracle(out, oracle, dtype, f"eps={eps}")
    assert bool(out[2].isnan().all())  # eps = 0 on the zero row


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,width", [(1, 576), (6, 13), (129, 100)])
def test_fused_add_rms_norm_updates_residual_and_norms(dtype, n, width):
    g = gen(7 * n + width)
    residual = torch.randn(n, width, generator=g) * 4
    delta = (torch.randn(n, width, generator=g) * 2).to(dtype)
    w = torch.randn(width, generator=g)
    new_residual, oracle = ref.fused_add_rms_norm(residual.clone(), delta, w, 1e-6)
    out = hx.fused_add_rms_norm(residual, delta, w, 1e-6)
    assert out.dtype == dtype
    assert torch.equal(residual, new_residual)  # the float32 sum, bit for bit
    assert_close_to_oracle(out, oracle, dtype, "fused_add_rms_norm")


# ----------------------------------------------------------------------------- silu_and_mul

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,width", [(1, 1536), (5, 21), (3, 1), (64, 9)])
def test_silu_and_mul_matches_oracle(dtype, n, width):
    g = gen(n * 1000 + width)
    gate_up = (torch.randn(n, 2 * width, generator=g) * 6).to(dtype)
    out = hx.silu_and_mul(gate_up)
    assert out.shape == (n, width) and out.dtype == dtype
    assert_close_to_oracle(out, ref.silu_and_mul(gate_up), dtype, "silu_and_mul")


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_extreme_gates(dtype):
    """exp of -|gate| never overflows: huge negative gates give -0 * up, huge positive ones
    gate * up; NaN propagates."""
    gates = torch.tensor([-1e4, -100.0, -88.0, -20.0, -1e-30, 0.0, 1e-30, 20.0, 88.0, 100.0, 1e4,
                          float("nan")])
    gate_up = torch.cat((gates, torch.full_like(gates, 3.0)))[None].to(dtype)
    out = hx.silu_and_mul(gate_up)
    assert_close_to_oracle(out, ref.silu_and_mul(gate_up), dtype, "silu_and_mul extremes")


# ----------------------------------------------------------------------------- attention

def attention_inputs(dtype, n, heads, kv_heads, head_dim, cache_len, capacity, seed,
                     mask="causal"):
    g = gen(seed)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    positions_table = 3 * (cache_len + n) + 5
    angles = torch.rand(positions_table, head_dim // 2, generator=g) * 6.3
    cos = torch.cat((angles.cos(), angles.cos()), dim=-1)
    sin = torch.cat((-angles.sin(), angles.sin()), dim=-1)
    rope = torch.stack((cos, sin), dim=1)
    positions = torch.randint(0, positions_table, (n,), generator=g)
    k_cache = torch.randn(kv_heads, capacity, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(kv_heads, capacity, head_dim, generator=g).to(dtype)
    keys = cache_len + n
    if mask is None:
        visible = None
    elif mask == "causal":  # each new row sees the cache and the new rows up to itself
        visible = torch.ones(n, keys, dtype=torch.bool).tril_(cache_len)
    else:  # random, one row fully masked
        visible = torch.rand(n, keys, generator=g) < 0.6
        visible[n // 2] = False
    return qkv, rope, positions, k_cache, v_cache, cache_len, visible, heads, kv_heads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,heads,kv_heads,head_dim,cache_len", [
    (1, 9, 3, 64, 0), (6, 9, 3, 64, 157), (5, 4, 4, 6, 11), (3, 8, 1, 10, 1), (40, 6, 2, 32, 75),
    # several blocks of 128 keys plus 7 vectors of 16, and a head_dim of 128
    (16, 9, 3, 64, 350), (17, 4, 2, 128, 200)])
@pytest.mark.parametrize("mask", [None, "causal", "random"])
def test_rope_cache_attention_matches_oracle(dtype, n, heads, kv_heads, head_dim, cache_len, mask):
    args = attention_inputs(dtype, n, heads, kv_heads, head_dim, cache_len, cache_len + n + 3,
                            seed=n * 97 + head_dim + cache_len, mask=mask)
    qkv, rope, positions, k_cache, v_cache = args[:5]
    before_k, before_v = k_cache.clone(), v_cache.clone()
    out_ref, new_k, new_v = ref.rope_cache_attention(qkv, rope, positions, before_k.clone(),
                                                     before_v.clone(), *args[5:])
    out = hx.rope_cache_attention(*args)
    assert out.shape == (n, heads * head_dim) and out.dtype == dtype
    assert_close_to_oracle(out, out_ref, dtype, "rope_cache_attention")
    rows = slice(cache_len, cache_len + n)
    # keys: RoPE in float32 against float64, then one rounding to the cache dtype
    assert_close_to_oracle(k_cache[:, rows], new_k.double(), dtype, "written keys")
    assert torch.equal(v_cache[:, rows], new_v)
    untouched = torch.ones(k_cache.shape[1], dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(k_cache[:, untouched], before_k[:, untouched])
    assert torch.equal(v_cache[:, untouched], before_v[:, untouched])
    if mask == "random":
        assert bool((out[n // 2] == 0).all())  # the fully masked query


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_cache_attention_masked_keys_never_enter(dtype):
    """A key no row sees may hold NaN keys and infinite values: the outputs are those of any
    finite contents there (a softmax weight of 0 times inf would be NaN), up to the order of
    the float32 sums (the kernel takes another path when some value is not finite)."""
    n, cache_len = 12, 290
    args = list(attention_inputs(dtype, n, 9, 3, 64, cache_len, cache_len + n, seed=21,
                                 mask="random"))
    hidden = [3, 150, 200]
    args[6][:, hidden] = False
    clean = hx.rope_cache_attention(*[a.clone() if torch.is_tensor(a) else a for a in args])
    args[3][:, hidden] = float("nan")
    args[4][:, hidden] = float("inf")
    got = hx.rope_cache_attention(*args)
    assert bool(got.isfinite().all())
    torch.testing.assert_close(got.float(), clean.float(), atol=1e-6,
                               rtol=2.0 ** -7 if dtype == torch.bfloat16 else 1e-5)


def test_rope_cache_attention_is_the_same_on_any_thread_count():
    """Rows are split into blocks by the thread count; every query's arithmetic is the same."""
    args = attention_inputs(torch.bfloat16, 16, 9, 3, 64, 300, 316, seed=5, mask="random")
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(hx.rope_cache_attention(*[a.clone() if torch.is_tensor(a) else a
                                                  for a in args]))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_rope_cache_attention_is_sdpa_with_rope():
    """Independent of the oracle: the op equals HF-style RoPE (rotate_half) followed by
    torch's scaled_dot_product_attention with a boolean mask and grouped-query heads."""
    n, heads, kv_heads, hd, cache_len = 4, 6, 2, 16, 9
    args = attention_inputs(torch.float32, n, heads, kv_heads, hd, cache_len, cache_len + n,
                            seed=3)
    qkv, rope, positions, k_cache, v_cache, _, visible = args[:7]
    old_k, old_v = k_cache[:, :cache_len].clone(), v_cache[:, :cache_len].clone()
    out = hx.rope_cache_attention(*args)
    x = qkv.view(n, heads + 2 * kv_heads, hd)
    cos, signed_sin = rope[positions, 0][:, None], rope[positions, 1][:, None]
    sin = torch.cat((-signed_sin[..., :hd // 2], signed_sin[..., hd // 2:]), dim=-1)

    def rotate_half(t):
        return torch.cat((-t[..., hd // 2:], t[..., :hd // 2]), dim=-1)

    q = x[:, :heads] * cos + rotate_half(x[:, :heads]) * sin
    k = x[:, heads:heads + kv_heads] * cos + rotate_half(x[:, heads:heads + kv_heads]) * sin
    keys = torch.cat((old_k, k.transpose(0, 1)), dim=1)
    values = torch.cat((old_v, x[:, heads + kv_heads:].transpose(0, 1)), dim=1)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None], keys[None], values[None], attn_mask=visible[None, None],
        enable_gqa=True)[0].transpose(0, 1).reshape(n, heads * hd)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_rope_cache_attention_on_cache_views():
    """The driver passes views of a [1, kv_heads, capacity, head_dim] buffer; rows beyond the
    capacity it was given are never touched."""
    args = list(attention_inputs(torch.bfloat16, 3, 4, 2, 8, 5, 8, seed=11))
    buffer = torch.zeros(1, 2, 12, 8, dtype=torch.bfloat16)
    buffer[0, :, :8] = args[3]
    values = torch.zeros_like(buffer)
    values[0, :, :8] = args[4]
    expected = hx.rope_cache_attention(*args)
    args[3], args[4] = buffer[0], values[0]
    assert torch.equal(hx.rope_cache_attention(*args), expected)
    assert bool((buffer[0, :, 8:] == 0).all()) and bool((values[0, :, 8:] == 0).all())


# ----------------------------------------------------------------------------- errors

def _norm_args():
    return (torch.tensor([1, 2]), torch.randn(5, 4), torch.randn(2, 4), torch.ones(4),
            torch.ones(4), 1e-6)


@pytest.mark.parametrize("change,exc,words", [
    (lambda a: (torch.tensor([1, 5]),) + a[1:], ValueError, "token_ids[1] = 5"),
    (lambda a: (torch.tensor([-1, 0]),) + a[1:], ValueError, "token_ids[0] = -1"),
    (lambda a: (a[0].int(),) + a[1:], RuntimeError, "token_ids must have dtype"),
    (lambda a: a[:1] + (a[1].half(),) + a[2:], RuntimeError, "embed must be float32 or bfloat16"),
    (lambda a: a[:2] + (torch.randn(3, 4),) + a[3:], RuntimeError, "hidden.size(0) must be 2"),
    (lambda a: a[:3] + (torch.ones(5),) + a[4:], RuntimeError, "embed_weight.size(0) must be 4"),
    (lambda a: a[:4] + (torch.ones(4, dtype=torch.bfloat16),) + a[5:], RuntimeError,
     "hidden_weight must have dtype"),
    (lambda a: a[:5] + (float("nan"),), ValueError, "eps must be a finite number"),
    (lambda a: a[:5] + (-1.0,), ValueError, "eps must be a finite number"),
])
def test_embed_hidden_rms_norm_errors_name_the_argument(change, exc, words):
    with pytest.raises(exc, match=None) as info:
        hx.embed_hidden_rms_norm(*change(_norm_args()))
    assert words in str(info.value)


def test_fused_add_rms_norm_errors_name_the_argument():
    with pytest.raises(RuntimeError, match="residual must have dtype"):
        hx.fused_add_rms_norm(torch.zeros(2, 4, dtype=torch.bfloat16), torch.randn(2, 4),
                              torch.ones(4), 1e-6)
    with pytest.raises(RuntimeError, match="residual must be contiguous"):
        hx.fused_add_rms_norm(torch.zeros(4, 2).t(), torch.randn(2, 4), torch.ones(4), 1e-6)
    with pytest.raises(RuntimeError, match=r"delta.size\(1\) must be 4"):
        hx.fused_add_rms_norm(torch.zeros(2, 4), torch.randn(2, 5), torch.ones(4), 1e-6)
    with pytest.raises(RuntimeError, match="gate_up.size\\(1\\) must be even"):
        hx.silu_and_mul(torch.randn(2, 5))
    with pytest.raises(RuntimeError, match="gate_up must be float32 or bfloat16"):
        hx.silu_and_mul(torch.randn(2, 4, dtype=torch.float64))


@pytest.mark.parametrize("index,value,exc,words", [
    (2, torch.tensor([0, 1, 10**6]), ValueError, "positions[2] = 1000000"),
    (5, 100, ValueError, "cache_len must be in [0, capacity - n]"),
    (5, -1, ValueError, "cache_len must be in"),
    (8, 3, ValueError, "num_heads must be a positive multiple of num_kv_heads"),
    (7, 130, ValueError, "at most 64 times it"),
    (0, torch.randn(3, 7), RuntimeError, "qkv.size(1) must be"),
    (3, torch.zeros(2, 20, 8), RuntimeError, "k_cache must have qkv's dtype"),
    (4, torch.zeros(2, 19, 8, dtype=torch.bfloat16), RuntimeError, "v_cache.size(1) must be 20"),
    (3, torch.zeros(2, 8, 20, dtype=torch.bfloat16).transpose(1, 2), RuntimeError,
     "k_cache must have contiguous rows"),
    (6, torch.ones(3, 5, dtype=torch.bool), RuntimeError, "visible.size(1) must be 15"),
    (6, torch.ones(3, 15), RuntimeError, "visible must have dtype"),
    (1, torch.zeros(50, 2, 6), RuntimeError, "rope.size(2) must be 8"),
])
def test_rope_cache_attention_errors_name_the_argument(index, value, exc, words):
    args = list(attention_inputs(torch.bfloat16, 3, 4, 2, 8, 12, 20, seed=5))
    args[index] = value
    with pytest.raises(exc) as info:
        hx.rope_cache_attention(*args)
    assert words in str(info.value)


# ----------------------------------------------------------------------------- fakes, compile

def _samples():
    norm = _norm_args()
    attention = attention_inputs(torch.bfloat16, 3, 4, 2, 8, 12, 20, seed=5)
    return {
        "embed_hidden_rms_norm": norm,
        "fused_add_rms_norm": (torch.randn(3, 6), torch.randn(3, 6).bfloat16(), torch.ones(6),
                               1e-6),
        "silu_and_mul": (torch.randn(3, 10).bfloat16(),),
        "rope_cache_attention": attention,
    }


def _to_meta(args):
    return tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("name", hx.DECODE_LAYER_OPS)
def test_opcheck(name):
    torch.library.opcheck(getattr(torch.ops.heterospec, name).default, _samples()[name])


@pytest.mark.parametrize("name", hx.DECODE_LAYER_OPS)
def test_meta_call_returns_the_cpu_shapes(name):
    op = getattr(torch.ops.heterospec, name).default
    args = _samples()[name]
    cpu = op(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
    meta = op(*_to_meta(args))
    assert meta.shape == cpu.shape and meta.dtype == cpu.dtype and meta.device.type == "meta"


@pytest.mark.parametrize("name", hx.DECODE_LAYER_OPS)
def test_one_meta_argument_among_cpu_ones_is_checked_like_the_kernel(name):
    """A meta argument routes the call to the fake, which must still reject bad metadata
    (here: the first tensor argument with a wrong rank) instead of returning garbage."""
    op = getattr(torch.ops.heterospec, name).default
    args = list(_samples()[name])
    first = next(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
    args[first] = args[first].to("meta")[None]
    with pytest.raises(RuntimeError, match="must be a"):
        op(*args)


def test_torch_compile_fullgraph_matches_eager():
    def step(residual, delta, weight, gate_up):
        normed = hx.fused_add_rms_norm(residual, delta, weight, 1e-6)
        return normed, hx.silu_and_mul(gate_up)

    args = (torch.randn(3, 6), torch.randn(3, 6), torch.rand(6), torch.randn(3, 8))
    eager_residual = args[0].clone()
    eager = step(eager_residual, *args[1:])
    compiled_residual = args[0].clone()
    got = torch.compile(step, fullgraph=True, backend="eager")(compiled_residual, *args[1:])
    assert torch.equal(got[0], eager[0]) and torch.equal(got[1], eager[1])
    assert torch.equal(compiled_residual, eager_residual)


def test_attention_scale_is_inverse_sqrt_head_dim():
    """One query, two keys, values one-hot: the output is softmax(q.k / sqrt(hd)) exactly."""
    hd = 4
    qkv = torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0]])  # q, k, v (1 head each)
    rope = torch.stack((torch.ones(1, hd), torch.zeros(1, hd)), dim=1)  # identity rotation
    k_cache = torch.tensor([[[2.0, 0, 0, 0], [0, 0, 0, 0]]])
    v_cache = torch.tensor([[[1.0, 0, 0, 0], [0, 0, 0, 0]]])
    out = hx.rope_cache_attention(qkv, rope, torch.tensor([0]), k_cache, v_cache, 1, None, 1, 1)
    s = [2.0 / math.sqrt(hd), 0.0]  # the cached key, then the new key (q.k = 0)
    p0 = math.exp(s[0]) / (math.exp(s[0]) + math.exp(s[1]))
    torch.testing.assert_close(out, torch.tensor([[p0, 1 - p0, 0.0, 0.0]]), rtol=1e-6, atol=1e-7)
