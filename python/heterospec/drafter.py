"""Drafters: produce an EAGLE-2-style candidate pool for each cycle.

Pool layout (the tree convention of the heterospec ops, batch 1): node 0 is the root (the last
committed token), then level 0 (the root's ``top_k`` children), then ``top_k**2`` children per
further level, in expansion order, so every parent precedes its children.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import List, Optional

import torch

import heterospec_ext as hx

from .errors import TokenizerMismatchError
from .target import CausalLM, cache_length, compact_cache

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


class Drafter:
    """Interface the decode loop drives, once per cycle:

    ``reset(prompt_ids)`` once per request; ``draft(root, levels)`` -> pool; optionally
    ``extend(extra_levels)`` -> enlarged pool; ``commit(path_pool_nodes, new_tokens)`` after
    verification (``path_pool_nodes``: pool indices of root and accepted nodes; ``new_tokens``:
    accepted tokens then the bonus)."""

    top_k: int
    vocab_size: int
    tokenizer = None
    draft_time = 0.0
    forward_calls = 0
    # True for drafters fed by the target's captured hidden states (EAGLE-3): ``reset`` and
    # ``commit`` then also receive ``target_hidden``, the target rows of the new tokens' contexts
    uses_target_hidden = False

    def reset(self, prompt_ids: torch.Tensor) -> None:
        raise NotImplementedError

    def draft(self, root: int, levels: int) -> CandidatePool:
        raise NotImplementedError

    def extend(self, extra_levels: int) -> CandidatePool:
        raise NotImplementedError

    def commit(self, path_pool_nodes: List[int], new_tokens: List[int]) -> None:
        raise NotImplementedError


@dataclass
class _PoolBuilder:
    tokens: List[torch.Tensor] = field(default_factory=list)
    parents: List[torch.Tensor] = field(default_factory=list)
    scores: List[torch.Tensor] = field(default_factory=list)
    step_entropy: List[torch.Tensor] = field(default_factory=list)
    logprob: List[torch.Tensor] = field(default_factory=list)
    level: List[torch.Tensor] = field(default_factory=list)
    size: int = 0

    def add(self, tokens, parents, scores, step_entropy, logprob, level):
        self.tokens.append(tokens)
        self.parents.append(parents)
        self.scores.append(scores)
        self.step_entropy.append(step_entropy)
        self.logprob.append(logprob)
        self.level.append(torch.full_like(tokens, level))
        start = self.size
        self.size += tokens.numel()
        return start

    def build(self, levels) -> CandidatePool:
        cat = lambda xs: torch.cat(xs)[None]  # noqa: E731
        return CandidatePool(cat(self.tokens), cat(self.parents), cat(self.scores),
                             cat(self.step_entropy), cat(self.logprob), cat(self.level), levels)


class ModelDrafter(Drafter):
    """Tree drafter over any causal LM sharing the target's vocabulary.

    Level by level: every frontier node proposes its ``top_k`` most likely children (one
    ``draft_topk_entropy`` launch per level); all children enter the pool and the ``top_k`` with
    the best cumulative log-prob become the next frontier. The drafter keeps its own KV cache:
    frontier nodes are appended with a tree mask, and after verification the cache keeps the
    committed prefix plus the accepted nodes it already processed (the rest is dropped and
    re-fed as committed tokens in the next level-0 forward)."""

    def __init__(self, model: CausalLM, top_k: int = 10):
        if top_k < 1 or top_k > hx.ops.draft_topk_entropy.MAX_TOPK:
            raise ValueError(f"top_k must be in [1, 64], got {top_k}")
        self.lm = model
        self.top_k = top_k
        self.tokenizer = model.tokenizer
        self.vocab_size = model.vocab_size
        self.device = model.device
        self.cache = None
        self._calls_at_reset = 0

    @property
    def forward_calls(self):
        """Draft forwards since the last ``reset``."""
        return self.lm.forward_calls - self._calls_at_reset

    # -- per request
    def reset(self, prompt_ids: torch.Tensor) -> None:
        self.cache = self.lm.new_cache()
        # everything but the root waits to be fed in the first level-0 forward
        self._pending = [int(t) for t in prompt_ids[:-1].tolist()]
        self._calls_at_reset = self.lm.forward_calls

    # -- per cycle
    def draft(self, root: int, levels: int) -> CandidatePool:
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        k, dev = self.top_k, self.device
        feed = torch.tensor(self._pending + [int(root)], dtype=torch.int64, device=dev)
        logits = self.lm.causal_forward(feed, self.cache, last_only=True)
        self._pending = []
        self._prefix = cache_length(self.cache) - 1  # committed tokens before the root
        stats = hx.draft_topk_entropy(logits, k, 1.0)
        b = _PoolBuilder()
        zero = torch.zeros(1, dtype=torch.float32, device=dev)
        b.add(torch.tensor([int(root)], device=dev), torch.tensor([-1], device=dev), zero,
              zero, zero, -1)
        ids, lp = stats.topk_ids[0], stats.topk_logprobs[0]
        start = b.add(ids, torch.zeros(k, dtype=torch.int64, device=dev), lp,
                      stats.topk_entropy.expand(k).clone(), lp, 0)
        self._builder = b
        # per pool node: its draft-cache slot (-1 = not processed); the root sits at the prefix
        self._slot = {0: self._prefix}
        self._depth = {0: 0}
        # tree-region rows (slots after the root) each processed node may attend to
        self._anc_rows = {0: torch.zeros(0, dtype=torch.bool, device=dev)}
        self._frontier = list(range(start, start + k))
        for i in self._frontier:
            self._depth[i] = 1
        self._parent_of = {i: 0 for i in self._frontier}
        self._levels = 1
        return self.extend(levels - 1)

    def extend(self, extra_levels: int) -> CandidatePool:
        k, dev = self.top_k, self.device
        for _ in range(extra_levels):
            frontier = self._frontier
            f = len(frontier)
            tree_slots = cache_length(self.cache) - self._prefix - 1
            anc = torch.zeros((f, tree_slots + f), dtype=torch.bool, device=dev)
            for r, node in enumerate(frontier):
                row = self._anc_rows[self._parent_of[node]]
                anc[r, :row.numel()] = row
                anc[r, tree_slots + r] = True
            # full mask over the cached tree region + the new block
            toks = self._builder_tokens(frontier)
            depth = torch.tensor([self._depth[i] for i in frontier], device=dev)
            prefix = self._prefix + 1
            full = torch.zeros((f, prefix + tree_slots + f), dtype=torch.bool, device=dev)
            full[:, :prefix] = True
            full[:, prefix:] = anc
            mask = torch.zeros((1, 1, f, full.shape[1]), dtype=self.lm.dtype, device=dev)
            mask[0, 0].masked_fill_(~full, torch.finfo(self.lm.dtype).min)
            logits = self.lm.forward(toks, self.cache, self._prefix + depth, mask)
            for r, node in enumerate(frontier):
                self._slot[node] = self._prefix + 1 + tree_slots + r
                self._anc_rows[node] = anc[r]
            stats = hx.draft_topk_entropy(logits, k, 1.0)
            parent_scores = self._scores_of(frontier)
            child_scores = (parent_scores[:, None] + stats.topk_logprobs).reshape(-1)
            parents = torch.tensor(frontier, dtype=torch.int64, device=dev).repeat_interleave(k)
            step_h = stats.topk_entropy.repeat_interleave(k)
            start = self._builder.add(stats.topk_ids.reshape(-1), parents, child_scores, step_h,
                                      stats.topk_logprobs.reshape(-1), self._levels)
            # next frontier: best k children by cumulative score, ties to the lower index
            order = torch.sort(-child_scores, stable=True).indices[:k].tolist()
            new_frontier = []
            for j in order:
                node = start + j
                new_frontier.append(node)
                self._parent_of[node] = frontier[j // k]
                self._depth[node] = self._depth[frontier[j // k]] + 1
            self._frontier = new_frontier
            self._levels += 1
        self._pool = self._builder.build(self._levels)
        return self._pool

    def _builder_tokens(self, nodes):
        flat = torch.cat(self._builder.tokens)
        return flat[torch.tensor(nodes, device=self.device)]

    def _scores_of(self, nodes):
        flat = torch.cat(self._builder.scores)
        return flat[torch.tensor(nodes, device=self.device)]

    def commit(self, path_pool_nodes: List[int], new_tokens: List[int]) -> None:
        """Keep root + the accepted nodes this drafter already processed; queue the rest."""
        keep = []
        for node in path_pool_nodes[1:]:
            slot = self._slot.get(int(node))
            if slot is None:
                break
            keep.append(slot)
        tail = torch.tensor(keep, dtype=torch.int64, device=self.device)
        compact_cache(self.cache, self._prefix + 1, tail)
        # new_tokens = accepted draft tokens, then the bonus (next root, not fed yet)
        self._pending = [int(t) for t in new_tokens[len(keep):-1]]


def quantize_int8(model):
    """A dynamically int8-quantised copy of ``model`` (``nn.Linear`` weights, per-tensor qint8).
    CPU only: quantised linear kernels exist for CPU."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).cpu(),
                                                      {torch.nn.Linear}, dtype=torch.qint8).eval()


def int8_drafter(target: CausalLM, top_k: int = 10) -> ModelDrafter:
    """The shipped self-draft: a dynamically int8-quantised copy of the target."""
    q = quantize_int8(target.model)
    # No tree-attention probe: dynamic int8 picks one activation scale per forward, so a node's
    # logits depend slightly on the other tokens in its forward; the fp32 target passed the probe
    # with the same architecture, and draft inexactness never affects losslessness.
    lm = CausalLM(q, target.tokenizer, check_tree_attention=False, name="int8 draft")
    lm.vocab_size = target.vocab_size
    return ModelDrafter(lm, top_k=top_k)


def check_same_vocab(target: CausalLM, drafter: Drafter) -> None:
    """Raise :class:`TokenizerMismatchError` unless draft and target share one vocabulary."""
    if target.vocab_size != drafter.vocab_size:
        raise TokenizerMismatchError(
            f"draft vocabulary size {drafter.vocab_size} != target vocabulary size "
            f"{target.vocab_size}: the draft must use the target's tokenizer")
    tt, dt = target.tokenizer, getattr(drafter, "tokenizer", None)
    if tt is None or dt is None or tt is dt:
        return
    if tt.get_vocab() != dt.get_vocab():
        raise TokenizerMismatchError(
            "draft and target tokenizers differ (different token-to-id maps); "
            "use a draft trained with the target's tokenizer")
