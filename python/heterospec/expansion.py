"""EAGLE-2 dynamic-tree expansion, the part every tree drafter shares.

One cycle (batch 1): the root's distribution gives level 0 (its ``k`` most likely children).
Each further level feeds the current frontier (``k`` nodes) through the drafter in one batched
pass; every frontier node proposes its ``k`` most likely children, all ``k * k`` children enter
the pool, and the ``k`` with the best cumulative log-prob (ties to the lower pool index) become
the next frontier.

Pool layout (the heterospec ops' tree convention): node 0 is the root, level 0 sits at
``1 .. k``, level ``i >= 1`` at ``1 + k + (i - 1) k^2 + f k + c`` (frontier slot ``f``, child rank
``c``), so every parent precedes its children.

Draft-side slots: the drafter appends each fed frontier to its own KV cache after the committed
context, so frontier ``s`` (0-based feeding step) occupies tree slots ``s k .. s k + k - 1``. A
fed node sees the committed context, its own slot and the slots of its fed ancestors;
:meth:`TreeExpansion.frontier_visibility` gives those rows.

The bookkeeping is vectorised over the level (no per-node Python) and kept in host NumPy arrays:
a level touches a few dozen numbers, and on a CPU each torch call on a tensor that small costs
10-30 us once the level's GEMMs have streamed the head's weights through the caches, which
made the bookkeeping a sixth of a draft level (bench/RESULTS.md). What the drafter consumes
(frontier tokens, parent slots, visibility rows, the pool) is handed back as torch tensors on
the drafter's device. Float32 sums and the stable sort give the same results as torch's.

The drafter supplies the model side (:class:`~heterospec.drafter.ModelDrafter`,
:class:`~heterospec.eagle3.Eagle3Drafter`); this class does only the bookkeeping.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

NEG_INF = float("-inf")


@dataclass
class CandidatePool:
    """One cycle's draft candidates, each ``[1, M]`` (batch 1).

    tokens int64, parents int64 (root -1), scores float32 cumulative draft log-prob (root 0),
    step_entropy float32 (renormalised top-K entropy of the distribution the node was drawn
    from), logprob float32 (the node's own draft log-prob), level int64 (root -1, level 0 = the
    root's children). ``confidence(level)`` gives stratify's confidence input."""

    tokens: torch.Tensor
    parents: torch.Tensor
    scores: torch.Tensor
    step_entropy: torch.Tensor
    logprob: torch.Tensor
    level: torch.Tensor
    levels: int

    @property
    def size(self) -> int:
        return int(self.tokens.shape[1])

    def confidence(self, level: Optional[int] = None) -> torch.Tensor:
        """Own-token log-prob on the nodes of ``level`` (default: the deepest), ``-inf`` on the
        rest: P* is then the deepest-level node with the highest own-token draft probability."""
        level = self.levels - 1 if level is None else level
        return torch.where(self.level == level, self.logprob,
                           torch.full_like(self.logprob, NEG_INF))


def _host(t) -> np.ndarray:
    """A host NumPy view (CPU tensors) or copy (other devices) of ``t``."""
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


class TreeExpansion:
    """The pool and frontier of one cycle (see the module docstring).

    ``start`` takes the root's top-k; then, while more levels are wanted, the drafter reads
    ``frontier_tokens`` / ``frontier_parent_slots`` / ``frontier_visibility``, runs its model on
    the frontier, and hands the frontier's top-k children to ``grow``. Inputs are torch tensors
    on any device; outputs are torch tensors on ``device``."""

    def __init__(self, top_k: int, device, levels_hint: int = 8):
        self.k = int(top_k)
        self.device = torch.device(device)
        self._on_cpu = self.device.type == "cpu"
        self._capacity_levels = 0
        self._reserve(max(1, int(levels_hint)))

    def _torch(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t if self._on_cpu else t.to(self.device)

    def _reserve(self, levels: int) -> None:
        """Buffers for a pool of ``levels`` levels (grown, keeping the contents)."""
        if levels <= self._capacity_levels:
            return
        k = self.k
        size = 1 + k + (levels - 1) * k * k
        slots = max(0, levels - 1) * k

        def grow(old, shape, dtype, fill=0):
            new = np.full(shape, fill, dtype=dtype)
            if old is not None:
                new[tuple(slice(0, s) for s in old.shape)] = old
            return new

        first = self._capacity_levels == 0
        self.tokens = grow(None if first else self.tokens, (size,), np.int64)
        self.parents = grow(None if first else self.parents, (size,), np.int64, -1)
        self.scores = grow(None if first else self.scores, (size,), np.float32)
        self.step_entropy = grow(None if first else self.step_entropy, (size,), np.float32)
        self.logprob = grow(None if first else self.logprob, (size,), np.float32)
        self.level = grow(None if first else self.level, (size,), np.int64, -1)
        # slot of each pool node in the drafter's tree region (-1: never fed)
        self.slot = grow(None if first else self.slot, (size,), np.int64, -1)
        # visible[s, t]: fed node in slot s sees slot t (itself and its fed ancestors)
        self.visible = grow(None if first else self.visible, (slots, slots), np.bool_, False)
        self._capacity_levels = levels

    # -- per cycle
    def start(self, root: int, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
              topk_entropy: torch.Tensor) -> None:
        """Level 0 from the root's distribution: ``topk_ids`` ``[k]`` int64 target ids,
        ``topk_logprobs`` ``[k]`` float32, ``topk_entropy`` scalar (renormalised top-k)."""
        k = self.k
        self.tokens[0] = int(root)
        self.parents[0] = -1
        self.scores[0] = self.step_entropy[0] = self.logprob[0] = 0.0
        self.level[0] = -1
        self.tokens[1:1 + k] = _host(topk_ids).reshape(k)
        self.parents[1:1 + k] = 0
        lp = _host(topk_logprobs).reshape(k).astype(np.float32)
        self.scores[1:1 + k] = lp
        self.logprob[1:1 + k] = lp
        self.step_entropy[1:1 + k] = _host(topk_entropy).reshape(())
        self.level[1:1 + k] = 0
        self.slot.fill(-1)
        self.size = 1 + k
        self.levels = 1
        self.fed = 0  # frontiers fed so far = tree slots used / k
        self._set_frontier(np.arange(1, 1 + k), lp.copy())

    def _set_frontier(self, frontier: np.ndarray, scores: np.ndarray) -> None:
        """The next nodes to feed and their cumulative scores. Their visibility rows are built
        on first use and kept until the frontier changes: the drafter reads them to feed the
        frontier, and ``grow`` records the same rows."""
        self.frontier = frontier
        self._frontier_scores = scores
        self._rows = None

    @property
    def tree_slots(self) -> int:
        """Tree slots the drafter holds after its committed context."""
        return self.fed * self.k

    def frontier_tokens(self) -> torch.Tensor:
        """``[k]`` int64: the tokens to feed."""
        return self._torch(self.tokens[self.frontier])

    def _parent_slots(self) -> np.ndarray:
        return self.slot[self.parents[self.frontier]]

    def frontier_parent_slots(self) -> torch.Tensor:
        """``[k]`` int64: the tree slot of each frontier node's parent (-1: the root)."""
        return self._torch(self._parent_slots())

    def _frontier_rows(self) -> np.ndarray:
        if self._rows is None:
            k, used = self.k, self.tree_slots
            self._reserve(self.levels + 1)
            rows = np.zeros((k, used + k), dtype=np.bool_)
            # level 0 hangs from the root (no tree slot); every deeper frontier node's parent
            # was fed in the previous step, so either no row or every row has a parent slot
            if used:
                rows[:, :used] = self.visible[self._parent_slots(), :used]
            rows[:, used:] = np.eye(k, dtype=np.bool_)
            self._rows = rows
        return self._rows

    def frontier_visibility(self, context: int = 0) -> torch.Tensor:
        """``[k, context + tree_slots + k]`` bool: what each frontier node sees when fed now:
        ``context`` committed entries (all visible), then its fed ancestors and itself in the
        tree region."""
        rows = self._frontier_rows()
        if context:
            rows = np.concatenate((np.ones((self.k, context), dtype=np.bool_), rows), axis=1)
        return self._torch(rows)

    def grow(self, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
             topk_entropy: torch.Tensor) -> None:
        """Record the fed frontier and its children: ``topk_ids`` / ``topk_logprobs`` ``[k, k]``
        (row f: the children of frontier node f), ``topk_entropy`` ``[k]``."""
        k = self.k
        rows = self._frontier_rows()  # reserves room for one more level
        used = self.tree_slots
        frontier = self.frontier
        self.slot[frontier] = np.arange(used, used + k)
        self.visible[used:used + k, :used + k] = rows
        self.fed += 1
        start = self.size
        stop = start + k * k
        child_lp = _host(topk_logprobs).reshape(k, k).astype(np.float32, copy=False)
        child_scores = (self._frontier_scores[:, None] + child_lp).reshape(-1)
        self.tokens[start:stop] = _host(topk_ids).reshape(-1)
        self.parents[start:stop] = np.repeat(frontier, k)
        self.scores[start:stop] = child_scores
        self.logprob[start:stop] = child_lp.reshape(-1)
        self.step_entropy[start:stop] = np.repeat(_host(topk_entropy).reshape(k), k)
        self.level[start:stop] = self.levels
        self.size = stop
        self.levels += 1
        # next frontier: the k best children by cumulative score, ties to the lower index
        best = np.argsort(-child_scores, kind="stable")[:k]
        self._set_frontier(start + best, child_scores[best])

    def pool(self) -> CandidatePool:
        """The pool so far, each field ``[1, size]`` (copies: the buffers are reused)."""
        n = self.size

        def field(a):
            return self._torch(a[None, :n].copy())

        return CandidatePool(field(self.tokens), field(self.parents), field(self.scores),
                             field(self.step_entropy), field(self.logprob), field(self.level),
                             self.levels)

    def fed_prefix(self, path_nodes) -> torch.Tensor:
        """Tree slots of the leading fed nodes of ``path_nodes`` (pool indices, root first): the
        accepted path's entries the drafter may keep. ``[m]`` int64."""
        nodes = _host(path_nodes).astype(np.int64).reshape(-1)[1:]
        slots = self.slot[nodes]
        unfed = np.flatnonzero(slots < 0)
        m = int(unfed[0]) if unfed.size else slots.size
        return self._torch(slots[:m].copy())
