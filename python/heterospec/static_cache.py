"""A preallocated target KV cache for tree verification with fixed shapes (CUDA-graph ready).

The dynamic path (``target.py``) grows a ``DynamicCache`` and sizes each forward's mask to the
prefix, so every cycle has new shapes and the host must know the prefix length. Here every
buffer has a fixed address and shape: per-layer K/V ``[1, kv_heads, max_len, head_dim]``, the
committed length is a device scalar, a forward of ``n`` tree nodes writes slots
``prefix .. prefix + n - 1`` under a ``[1, 1, n, max_len]`` mask, and compaction moves the
accepted entries into place with index ops. Nothing reads a device value on the host, so one
captured graph per ``n`` serves every prefix (``cuda_graphs.py``); on CPU the same code runs
eagerly.
"""
from __future__ import annotations

from typing import Optional

import torch

from .errors import GenerationConfigError, UnsupportedModelError
from .target import CausalLM

try:
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError:  # transformers < 5: no layered cache API; StaticTreeCache refuses below
    Cache = CacheLayerMixin = None


def _attention_geometry(config):
    """(layers, kv_heads, head_dim) of a full-attention decoder config."""
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layer_types = getattr(cfg, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise UnsupportedModelError(
            f"the static KV cache needs full attention in every layer; this model has layer types "
            f"{sorted(set(layer_types))}")
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return int(cfg.num_hidden_layers), kv_heads, head_dim


if CacheLayerMixin is not None:
    class _SlotLayer(CacheLayerMixin):
        """One layer's view of the shared buffers; ``update`` writes the new entries at the
        owner's ``write_slots`` and returns the whole ``max_len`` buffer (the mask hides the
        unused columns)."""

        is_compileable = True
        is_sliding = False

        def __init__(self, owner: "StaticTreeCache", index: int):
            super().__init__()
            self._owner = owner
            self.keys = owner.k[index]
            self.values = owner.v[index]
            self.device = owner.k.device
            self.is_initialized = True

        def lazy_initialization(self, key_states, value_states):
            pass  # preallocated

        def update(self, key_states, value_states, *args, **kwargs):
            slots = self._owner.write_slots
            if slots is None or slots.numel() != key_states.shape[-2]:
                raise RuntimeError("StaticTreeCache: a forward must go through "
                                   "StaticTreeCache.tree_forward (write slots unset or stale)")
            self.keys.index_copy_(2, slots, key_states)
            self.values.index_copy_(2, slots, value_states)
            return self.keys, self.values

        def get_mask_sizes(self, query_length: int):
            return self._owner.max_len, 0

        def get_seq_length(self):
            return self._owner.length  # a device tensor, like HF's StaticLayer: no host sync

        def get_max_length(self) -> int:
            return self._owner.max_len

        get_max_cache_shape = get_max_length  # the name earlier 5.x releases ask for
else:
    _SlotLayer = None


class StaticTreeCache(Cache if Cache is not None else object):
    """Preallocated KV cache of one request (batch 1) for a HF full-attention decoder.

    ``k``/``v``: ``[layers, 1, kv_heads, max_len, head_dim]`` in the model dtype (layer ``l``'s
    HF view is ``k[l]``). ``length``: int64 device scalar, the committed entries (the prefix of
    the next tree forward). Rows past ``length`` hold stale tree entries that masks never show.

    Use through :meth:`prefill` / :meth:`tree_forward` / :meth:`compact`; a forward elsewhere
    (HF ``generate``) is rejected because it would not set the write slots."""

    def __init__(self, target: CausalLM, max_len: int):
        if Cache is None:
            raise UnsupportedModelError("the static KV cache needs transformers >= 5 "
                                        "(transformers.cache_utils.CacheLayerMixin)")
        if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 2:
            raise GenerationConfigError(f"max_len must be an integer >= 2, got {max_len!r}")
        layers, kv_heads, head_dim = _attention_geometry(target.config)
        self.target = target
        self.max_len = max_len
        self.dtype = target.dtype
        dev = target.device
        # Inference tensors: every later write runs under inference_mode (CausalLM.forward).
        with torch.inference_mode():
            self.k = torch.zeros((layers, 1, kv_heads, max_len, head_dim), dtype=self.dtype,
                                 device=dev)
            self.v = torch.zeros_like(self.k)
            self.length = torch.zeros((), dtype=torch.int64, device=dev)
            self._cols = torch.arange(max_len, device=dev)
        self.write_slots: Optional[torch.Tensor] = None
        super().__init__(layers=[_SlotLayer(self, i) for i in range(layers)])

    @property
    def cache(self) -> "StaticTreeCache":
        """Itself: the interface :class:`~heterospec.cuda_graphs.GraphedTarget` shares."""
        return self

    # -- host-side inspection (these sync; the decode loop never calls them)
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.length)

    def committed(self):
        """``(keys, values)`` lists of ``[1, kv_heads, length, head_dim]`` per layer (syncs)."""
        n = int(self.length)
        return [k[..., :n, :] for k in self.k], [v[..., :n, :] for v in self.v]

    # -- the three steps of a cycle
    @torch.inference_mode()
    def reset(self) -> None:
        self.length.zero_()

    @torch.inference_mode()
    def tree_inputs(self, depth: torch.Tensor, ancestors: torch.Tensor):
        """Fixed-shape inputs of a tree forward on top of the committed prefix.

        ``depth`` ``[n]`` int64 (root 0), ``ancestors`` ``[n, n]`` bool (row i sees column j iff
        j is i or an ancestor). Returns ``positions`` ``[n]`` int64 (prefix + depth), ``slots``
        ``[n]`` int64 (prefix + i) and ``mask`` ``[1, 1, n, max_len]`` in the model dtype: 0 on
        the prefix columns and on tree columns the ancestor mask allows, the dtype's minimum
        elsewhere (later tree rows, stale rows, unused rows)."""
        n = depth.shape[0]
        prefix = self.length
        rel = self._cols - prefix  # column j holds tree node j - prefix when 0 <= rel < n
        tree_cols = torch.index_select(ancestors, 1, rel.clamp(0, n - 1))
        visible = (rel < 0) | ((rel < n) & tree_cols)
        mask = torch.zeros((1, 1, n, self.max_len), dtype=self.dtype, device=depth.device)
        mask.masked_fill_(~visible, torch.finfo(self.dtype).min)
        slots = prefix + self._cols[:n]
        return prefix + depth, slots, mask

    def tree_forward(self, tokens: torch.Tensor, depth: torch.Tensor, ancestors: torch.Tensor,
                     last_only: bool = False) -> torch.Tensor:
        """Score ``n`` tree nodes (``tokens`` ``[n]`` int64) on top of the prefix; their entries
        land in slots ``prefix .. prefix + n - 1`` and ``length`` is left unchanged (see
        :meth:`compact`). Returns logits ``[n, V]`` (``[1, V]`` with ``last_only``); the
        target's ``captured_hidden`` is ``[n, ...]`` when it captures layers."""
        positions, slots, mask = self.tree_inputs(depth, ancestors)
        self.write_slots = slots
        return self.target.forward(tokens, self, positions, mask, last_only=last_only,
                                   cache_position=slots)

    def prefill(self, ids: torch.Tensor, last_only: bool = True) -> torch.Tensor:
        """Causal forward of ``ids`` ``[n]`` appended to the committed entries (all kept)."""
        n = ids.numel()
        if n == 0:
            raise GenerationConfigError("prefill needs at least one token")
        dev = ids.device
        anc = torch.ones((n, n), dtype=torch.bool, device=dev).tril_()
        logits = self.tree_forward(ids, torch.arange(n, device=dev), anc, last_only=last_only)
        with torch.inference_mode():
            self.length.add_(n)
        return logits

    @torch.inference_mode()
    def compact(self, accepted_nodes: torch.Tensor, num_accepted: torch.Tensor) -> None:
        """Keep the prefix, then the tree entries of ``accepted_nodes`` in order, and commit them.

        ``accepted_nodes`` ``[N]`` int64: tree indices, root first, ``-1`` padded (fused_verify's
        row); ``num_accepted`` int64 device scalar or ``[1]``: accepted draft nodes (the kept
        entries are ``num_accepted + 1``). All ``N`` rows move (fixed shape, no host read of the
        count); the padded ones land past the new length, where masks never look."""
        prefix = self.length
        src = prefix + accepted_nodes.clamp(min=0)
        dst = prefix + self._cols[:accepted_nodes.numel()]
        # index_select copies before index_copy_ writes, so overlapping rows cannot alias
        self.k.index_copy_(3, dst, self.k.index_select(3, src))
        self.v.index_copy_(3, dst, self.v.index_select(3, src))
        self.length.add_(num_accepted.reshape(()) + 1)
