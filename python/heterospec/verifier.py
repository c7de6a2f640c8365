"""The target side of a decode loop: one interface, several ways to run the target.

Every verifier holds one request's committed context (the target's KV cache) and offers:

``reset()``
    forget the request.
``prefill(ids, last_only=True) -> logits``
    append committed tokens ``ids`` ``[n]`` causally (the prompt; one AR step); logits ``[1, V]``
    of the last token (``[n, V]`` without ``last_only``).
``tree_forward(tokens, depth, ancestors) -> logits``
    score ``n`` tree nodes after the committed context, positions ``length + depth``, row ``i``
    seeing the context and the nodes ``ancestors[i]`` marks; logits ``[n, V]``. The entries stay
    uncommitted.
``compact(accepted_nodes, num_accepted)``
    commit the entries of ``accepted_nodes[:num_accepted + 1]`` (root first; fused_verify's row).

After every forward ``target.captured_hidden`` holds the captured layer inputs of its rows when
the target captures layers (EAGLE-3).

Kinds (:func:`make_verifier`): ``lean`` (:class:`~heterospec.lean_target.LeanDecoder`, packed
weights, the CPU default for Llama-family targets), ``dynamic`` (the HF module over a
``DynamicCache``; any model that takes 4D masks), ``static`` (the HF module over
:class:`~heterospec.static_cache.StaticTreeCache`, fixed shapes) and ``cuda-graphs`` (``static``
plus CUDA-graph replay of the tree forward).
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from .errors import GenerationConfigError
from .target import CausalLM, cache_length, compact_cache

VERIFIER_KINDS = ("auto", "lean", "dynamic", "static", "cuda-graphs")


class DynamicTreeCache:
    """The HF module over a transformers ``DynamicCache`` (grown per forward, sliced on
    compaction; reads the accepted count on the host)."""

    def __init__(self, target: CausalLM):
        self.target = target
        self.cache = target.new_cache()
        self._prefix = 0

    @property
    def length(self) -> int:
        return cache_length(self.cache)

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        self.cache = self.target.new_cache()

    def prefill(self, ids: torch.Tensor, last_only: bool = True) -> torch.Tensor:
        return self.target.causal_forward(ids, self.cache, last_only=last_only)

    def tree_forward(self, tokens: torch.Tensor, depth: torch.Tensor,
                     ancestors: torch.Tensor) -> torch.Tensor:
        self._prefix = self.length
        return self.target.tree_forward(tokens, depth, ancestors, self.cache)

    def compact(self, accepted_nodes: torch.Tensor, num_accepted) -> None:
        keep = int(num_accepted) + 1
        compact_cache(self.cache, self._prefix, self._prefix + accepted_nodes.reshape(-1)[:keep])

    def committed(self):
        """``(keys, values)``: per layer ``[1, kv_heads, length, head_dim]``."""
        from .target import _dynamic_layers

        layers = _dynamic_layers(self.cache)
        return [layer.keys for layer in layers], [layer.values for layer in layers]


def default_verifier_kind(target: CausalLM) -> str:
    """``lean`` for a Llama-family target on the CPU, ``dynamic`` otherwise."""
    from .lean_target import lean_unsupported_reason

    if target.device.type == "cpu" and lean_unsupported_reason(target.model) is None:
        return "lean"
    return "dynamic"


def make_verifier(target: CausalLM, kind: str = "auto", max_len: int = 2048,
                  tree_sizes: Iterable[int] = ()):
    """A verifier of ``kind`` (see the module docstring) for ``target``. ``max_len``: the
    static cache's size (``static``/``cuda-graphs``; ``lean`` grows on demand);
    ``tree_sizes``: the tree sizes to capture (``cuda-graphs``)."""
    if kind not in VERIFIER_KINDS:
        raise GenerationConfigError(f"verifier must be one of {list(VERIFIER_KINDS)}, got {kind!r}")
    if kind == "auto":
        kind = default_verifier_kind(target)
    if kind == "lean":
        from .lean_target import LeanDecoder

        return LeanDecoder(target)
    if kind == "dynamic":
        return DynamicTreeCache(target)
    if kind == "static":
        from .static_cache import StaticTreeCache

        return StaticTreeCache(target, max_len)
    from .cuda_graphs import GraphedTarget

    return GraphedTarget(target, max_len, tree_sizes)


def fixed_capacity(kind: Optional[str]) -> bool:
    """Whether a verifier kind has a fixed ``max_len`` the request must fit."""
    return kind in ("static", "cuda-graphs")
