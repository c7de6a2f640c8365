"""The decode-layer ops: the steps between the GEMMs of a Llama-style decoder layer at decode
sizes (a few rows), each one CPU kernel instead of a composition of small torch ops.

They are what the lean CPU path's EAGLE-3 head runs per draft level (``heterospec.eagle3.
PackedEagle3Head``); any engine running a small Llama-style layer on CPU can use them. CPU
kernels only: on other devices run the torch composition (the oracles in
:mod:`heterospec_ext.reference` spell it out) or capture it in a CUDA graph.

Activations are float32 or bfloat16; norm weights and RoPE tables float32; all arithmetic is
float32 with one rounding to the output dtype.
"""
from typing import Optional

import torch

from ._fake_checks import check_tensor

DECODE_LAYER_DTYPES = (torch.float32, torch.bfloat16)
# rope_cache_attention's limit on num_heads / num_kv_heads (csrc/decode_layer_checks.h)
MAX_HEADS_PER_KV_HEAD = 64

_EMBED_HIDDEN_RMS_NORM = torch.ops.heterospec.embed_hidden_rms_norm.default
_FUSED_ADD_RMS_NORM = torch.ops.heterospec.fused_add_rms_norm.default
_SILU_AND_MUL = torch.ops.heterospec.silu_and_mul.default
_ROPE_CACHE_ATTENTION = torch.ops.heterospec.rope_cache_attention.default


def embed_hidden_rms_norm(token_ids: torch.Tensor, embed: torch.Tensor, hidden: torch.Tensor,
                          embed_weight: torch.Tensor, hidden_weight: torch.Tensor,
                          eps: float) -> torch.Tensor:
    """EAGLE-3's layer input: ``cat(rms_norm(embed[token_ids]) * embed_weight,
    rms_norm(hidden) * hidden_weight)``.

    Args:
        token_ids: ``[n]`` int64, rows of ``embed`` (out of range: ``ValueError``).
        embed: ``[V, H]`` float32 or bfloat16, the embedding table.
        hidden: ``[n, H]`` float32 or ``embed``'s dtype.
        embed_weight, hidden_weight: ``[H]`` float32.
        eps: finite, ``>= 0``.

    Returns ``[n, 2H]`` in ``embed``'s dtype.
    """
    return _EMBED_HIDDEN_RMS_NORM(token_ids, embed, hidden, embed_weight, hidden_weight, eps)


def fused_add_rms_norm(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> torch.Tensor:
    """``residual += delta`` in place, then ``rms_norm(residual) * weight``.

    Args:
        residual: ``[n, H]`` float32, contiguous; updated in place (the residual stream).
        delta: ``[n, H]`` float32 or bfloat16 (an attention or MLP output).
        weight: ``[H]`` float32.
        eps: finite, ``>= 0``.

    Returns the normed rows ``[n, H]`` in ``delta``'s dtype.
    """
    return _FUSED_ADD_RMS_NORM(residual, delta, weight, eps)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``gate_up = [gate | up]`` ``[n, 2I]`` float32 or bfloat16;
    returns ``[n, I]`` in its dtype."""
    return _SILU_AND_MUL(gate_up)


def rope_cache_attention(qkv: torch.Tensor, rope: torch.Tensor, positions: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor, cache_len: int,
                         visible: Optional[torch.Tensor], num_heads: int,
                         num_kv_heads: int) -> torch.Tensor:
    """One attention step of ``n`` new rows over a KV cache: RoPE, cache append, masked
    softmax attention (grouped-query when ``num_kv_heads < num_heads``).

    Args:
        qkv: ``[n, (num_heads + 2 * num_kv_heads) * head_dim]`` float32 or bfloat16: q, k and v
            side by side (``head_dim`` even).
        rope: ``[P, 2, head_dim]`` float32: per position ``cos`` and the signed ``sin`` (first
            half negated), so that RoPE is ``x * cos + roll(x, head_dim // 2) * signed_sin``
            (``heterospec.lean_target.RopeTable``).
        positions: ``[n]`` int64 rows of ``rope`` (out of range: ``ValueError``).
        k_cache, v_cache: ``[num_kv_heads, capacity, head_dim]`` in ``qkv``'s dtype, rows
            contiguous; the rotated keys and the values of the new rows are written at rows
            ``[cache_len, cache_len + n)`` (``cache_len + n <= capacity``).
        cache_len: rows already in the caches.
        visible: ``[n, cache_len + n]`` bool, which rows each query attends to, or ``None``
            for all of them. A query with no visible row gets a zero output row.
        num_heads, num_kv_heads: ``num_heads`` a multiple of ``num_kv_heads``, at most 64 times
            it.

    Returns ``[n, num_heads * head_dim]`` in ``qkv``'s dtype (heads side by side), with scores
    scaled by ``1 / sqrt(head_dim)``. q and k are rounded to the cache dtype after RoPE.
    """
    return _ROPE_CACHE_ATTENTION(qkv, rope, positions, k_cache, v_cache, cache_len, visible,
                                 num_heads, num_kv_heads)


# ----------------------------------------------------------------------------- fakes
# The metadata checks of csrc/decode_layer_checks.h. Data checks (token ids, positions) need
# the data and happen in the CPU kernel only.

def _check_cpu(t, name):
    torch._check(t.device.type in ("cpu", "meta"),
                 lambda: f"{name} must be a CPU tensor (the decode-layer ops have CPU kernels "
                         f"only), got device {t.device}")


def _check_norm_weight(w, name, width):
    check_tensor(w, name, dim=1, dtypes=(torch.float32,), sizes=((0, width),))
    _check_cpu(w, name)


def _check_eps(eps):
    if isinstance(eps, (int, float)):
        torch._check_value(eps == eps and abs(eps) != float("inf") and eps >= 0,
                           lambda: f"eps must be a finite number >= 0, got {eps!r}")


@torch.library.register_fake("heterospec::embed_hidden_rms_norm")
def _embed_hidden_rms_norm_fake(token_ids, embed, hidden, embed_weight, hidden_weight, eps):
    check_tensor(token_ids, "token_ids", dim=1, dtypes=(torch.int64,))
    _check_cpu(token_ids, "token_ids")
    check_tensor(embed, "embed", dim=2, dtypes=DECODE_LAYER_DTYPES)
    _check_cpu(embed, "embed")
    n, width = token_ids.shape[0], embed.shape[1]
    check_tensor(hidden, "hidden", dim=2, dtypes=(torch.float32, embed.dtype),
                 sizes=((0, n), (1, width)))
    _check_cpu(hidden, "hidden")
    _check_norm_weight(embed_weight, "embed_weight", width)
    _check_norm_weight(hidden_weight, "hidden_weight", width)
    _check_eps(eps)
    return embed.new_empty((n, 2 * width))


@torch.library.register_fake("heterospec::fused_add_rms_norm")
def _fused_add_rms_norm_fake(residual, delta, weight, eps):
    check_tensor(residual, "residual", dim=2, dtypes=(torch.float32,), contiguous=True)
    _check_cpu(residual, "residual")
    n, width = residual.shape
    check_tensor(delta, "delta", dim=2, dtypes=DECODE_LAYER_DTYPES, sizes=((0, n), (1, width)))
    _check_cpu(delta, "delta")
    _check_norm_weight(weight, "weight", width)
    _check_eps(eps)
    return delta.new_empty((n, width))


@torch.library.register_fake("heterospec::silu_and_mul")
def _silu_and_mul_fake(gate_up):
    check_tensor(gate_up, "gate_up", dim=2, dtypes=DECODE_LAYER_DTYPES)
    _check_cpu(gate_up, "gate_up")
    torch._check(gate_up.shape[1] % 2 == 0,
                 lambda: f"gate_up.size(1) must be even ([gate | up]), got {gate_up.shape[1]}")
    return gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))


@torch.library.register_fake("heterospec::rope_cache_attention")
def _rope_cache_attention_fake(qkv, rope, positions, k_cache, v_cache, cache_len, visible,
                               num_heads, num_kv_heads):
    torch._check_value(num_heads >= 1 and num_kv_heads >= 1 and num_heads % num_kv_heads == 0
                       and num_heads // num_kv_heads <= MAX_HEADS_PER_KV_HEAD,
                       lambda: "num_heads must be a positive multiple of num_kv_heads >= 1, at "
                               f"most {MAX_HEADS_PER_KV_HEAD} times it, got num_heads = "
                               f"{num_heads} and num_kv_heads = {num_kv_heads}")
    check_tensor(qkv, "qkv", dim=2, dtypes=DECODE_LAYER_DTYPES)
    _check_cpu(qkv, "qkv")
    columns = num_heads + 2 * num_kv_heads
    torch._check(qkv.shape[1] % columns == 0 and (qkv.shape[1] // columns) % 2 == 0,
                 lambda: "qkv.size(1) must be (num_heads + 2 * num_kv_heads) * head_dim with an "
                         f"even head_dim, got {qkv.shape[1]} for {num_heads} + 2 * "
                         f"{num_kv_heads} heads")
    head_dim = qkv.shape[1] // columns
    n = qkv.shape[0]
    check_tensor(rope, "rope", dim=3, dtypes=(torch.float32,), sizes=((1, 2), (2, head_dim)))
    _check_cpu(rope, "rope")
    check_tensor(positions, "positions", dim=1, dtypes=(torch.int64,), sizes=((0, n),))
    _check_cpu(positions, "positions")
    for cache, name in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        torch._check(cache.dim() == 3, lambda: f"{name} must be a 3-D tensor, got {cache.dim()}-D "
                                               f"with shape {list(cache.shape)}")
        torch._check(cache.dtype == qkv.dtype,
                     lambda: f"{name} must have qkv's dtype {qkv.dtype}, got {cache.dtype}")
        torch._check(cache.shape[0] == num_kv_heads and cache.shape[2] == head_dim,
                     lambda: f"{name} must be [num_kv_heads = {num_kv_heads}, capacity, head_dim "
                             f"= {head_dim}], got {list(cache.shape)}")
        _check_cpu(cache, name)
        torch._check(cache.stride(2) == 1 and cache.stride(1) == head_dim,
                     lambda: f"{name} must have contiguous rows of head_dim (strides [any, "
                             f"head_dim, 1]), got strides {list(cache.stride())}")
    torch._check(v_cache.shape[1] == k_cache.shape[1],
                 lambda: f"v_cache.size(1) must be {k_cache.shape[1]}, got {v_cache.shape[1]} "
                         f"(shape {list(v_cache.shape)})")
    torch._check(k_cache.stride(0) == v_cache.stride(0),
                 lambda: f"k_cache and v_cache must have the same strides, got "
                         f"{list(k_cache.stride())} and {list(v_cache.stride())}")
    torch._check_value(0 <= cache_len <= k_cache.shape[1] - n,
                       lambda: f"cache_len must be in [0, capacity - n] = [0, "
                               f"{k_cache.shape[1] - n}] (k_cache holds {k_cache.shape[1]} rows "
                               f"and qkv adds {n}), got {cache_len}")
    if visible is not None:
        check_tensor(visible, "visible", dim=2, dtypes=(torch.bool,),
                     sizes=((0, n), (1, cache_len + n)))
        _check_cpu(visible, "visible")
    return qkv.new_empty((n, num_heads * head_dim))
