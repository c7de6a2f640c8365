"""CUDA graphs of the target's tree-verify forward, one per tree size a policy can produce.

A verify forward of an 8B target launches hundreds of small kernels, so at tree sizes of 10-60
tokens host launch cost is a large share of it. Over a
:class:`~heterospec.static_cache.StaticTreeCache` every buffer has a fixed address and the
prefix length is a device scalar, so one graph per tree size ``N`` replays for any prefix.
HeteroSpec yields a handful of sizes (``policy.shapes()``), the static tree one.

Only the target is captured. The draft step (the EAGLE-3 head or a draft model, expanded
level by level with host-side bookkeeping in ``Eagle3Drafter.extend``) runs eagerly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Optional

import torch

from .errors import GenerationConfigError
from .policy import StaticTree
from .static_cache import StaticTreeCache
from .target import CausalLM


def tree_sizes(policy: StaticTree) -> list:
    """The verified-node counts (root included) ``policy`` can ask ``build_tree`` for."""
    if policy.adaptive:
        return sorted({int(n) for _, n in policy.shapes()})
    return [int(policy.total_tokens)]


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    tokens: torch.Tensor  # [N] int64 static input
    depth: torch.Tensor  # [N] int64 static input
    ancestors: torch.Tensor  # [N, N] bool static input
    logits: torch.Tensor  # [N, V] static output
    hidden: Optional[torch.Tensor]  # [N, 3H] static output when the target captures layers


class GraphedTarget:
    """Tree verification of a CUDA target over a static cache, replaying captured graphs.

    Same interface as :class:`StaticTreeCache` (``reset``, ``prefill``, ``tree_forward``,
    ``compact``, and ``cache`` is that object): a tree of a captured size replays its graph,
    any other size (a pool smaller than the policy's N, say) runs the same code eagerly.
    Prefill and compaction always run eagerly; neither reads device values on the host.

    ``tree_forward`` returns the graph's static logits buffer ``[N, V]``: valid until the next
    call, which the decode loop respects (it verifies and commits before the next forward).
    """

    def __init__(self, target: CausalLM, max_len: int, sizes: Iterable[int], warmup: int = 2):
        if target.device.type != "cuda":
            raise GenerationConfigError(
                f"cuda_graphs=True needs the target on a CUDA device, but it is on "
                f"{target.device}; on CPU leave cuda_graphs off (the eager path)")
        sizes = sorted({int(n) for n in sizes})
        if not sizes or sizes[0] < 1 or sizes[-1] > max_len:
            raise GenerationConfigError(
                f"graph tree sizes must be in [1, max_len={max_len}], got {sizes}")
        self.target = target
        self.cache = StaticTreeCache(target, max_len)
        self.max_len = max_len
        self.graphs: Dict[int, _Captured] = {}
        self.replays = 0
        self.eager_calls = 0
        self._pool = None
        calls, toks = target.forward_calls, target.forward_tokens
        try:
            for n in sizes:
                self.graphs[n] = self._capture(n, warmup)
        finally:  # warm-up and capture forwards are not the caller's forwards
            target.forward_calls, target.forward_tokens = calls, toks

    @torch.inference_mode()
    def _capture(self, n: int, warmup: int) -> _Captured:
        dev = self.target.device
        tokens = torch.zeros(n, dtype=torch.int64, device=dev)
        depth = torch.arange(n, dtype=torch.int64, device=dev)
        ancestors = torch.ones((n, n), dtype=torch.bool, device=dev).tril_()
        # Warm-up and capture write rows length .. length + n - 1, which hold no committed
        # entry, and leave ``length`` alone: capturing never disturbs a cache in use.
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # lazy cuBLAS / allocator setup stays out of the graph
            for _ in range(warmup):
                self.cache.tree_forward(tokens, depth, ancestors)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # One pool for all sizes: replays never overlap, so scratch memory is shared. One size's
        # static output may then sit in another size's scratch, so an output is valid only
        # until the next replay of any size (the decode loop reads it before that).
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.cache.tree_forward(tokens, depth, ancestors)
            hidden = self.target.captured_hidden if self.target.capture_layer_ids else None
        if self._pool is None:
            self._pool = graph.pool()
        return _Captured(graph, tokens, depth, ancestors, logits, hidden)

    # -- the StaticTreeCache interface
    def reset(self) -> None:
        self.cache.reset()

    def prefill(self, ids: torch.Tensor, last_only: bool = True) -> torch.Tensor:
        return self.cache.prefill(ids, last_only=last_only)

    def compact(self, accepted_nodes: torch.Tensor, num_accepted: torch.Tensor) -> None:
        self.cache.compact(accepted_nodes, num_accepted)

    def get_seq_length(self) -> int:
        return self.cache.get_seq_length()

    def committed(self):
        return self.cache.committed()

    @torch.inference_mode()
    def tree_forward(self, tokens: torch.Tensor, depth: torch.Tensor,
                     ancestors: torch.Tensor) -> torch.Tensor:
        """``tokens``/``depth`` ``[n]`` int64, ``ancestors`` ``[n, n]`` bool on the target's
        device. Returns logits ``[n, V]`` (see the class note on the buffer's lifetime)."""
        n = tokens.numel()
        g = self.graphs.get(n)
        if g is None:
            self.eager_calls += 1
            return self.cache.tree_forward(tokens, depth, ancestors)
        g.tokens.copy_(tokens)
        g.depth.copy_(depth)
        g.ancestors.copy_(ancestors)
        g.graph.replay()
        self.replays += 1
        self.target.forward_calls += 1
        self.target.forward_tokens += n
        if g.hidden is not None:
            self.target.captured_hidden = g.hidden
        return g.logits
