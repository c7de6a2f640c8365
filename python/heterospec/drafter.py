"""Drafters: produce an EAGLE-2-style candidate pool for each cycle.

Pool layout (the tree convention of the heterospec ops, batch 1): node 0 is the root (the last
committed token), then level 0 (the root's ``top_k`` children), then ``top_k**2`` children per
further level, in expansion order, so every parent precedes its children.
"""
from __future__ import annotations

import copy
from typing import List

import torch

import heterospec_ext as hx

from .errors import TokenizerMismatchError
from .expansion import CandidatePool, TreeExpansion
from .target import CausalLM, cache_length, compact_cache


class Drafter:
    """Interface the decode loop drives, once per cycle:

    ``reset(prompt_ids, target_hidden)`` once per request; ``draft(root, levels)`` -> pool;
    optionally ``extend(extra_levels)`` -> enlarged pool; ``commit(path_pool_nodes, new_tokens,
    target_hidden)`` after verification (``path_pool_nodes``: pool indices of root and accepted
    nodes; ``new_tokens``: accepted tokens then the bonus).

    ``target_hidden`` is what the target's last forward captured for those tokens
    (``target.captured_hidden`` rows: the prompt's all but last, or the root and accepted nodes),
    ``None`` when the target captures nothing. Drafters fed by the target's states (EAGLE-3) ask
    for layers with ``target.capture_hidden_states``; the others ignore it."""

    top_k: int
    vocab_size: int
    tokenizer = None
    forward_calls = 0

    def reset(self, prompt_ids: torch.Tensor, target_hidden=None) -> None:
        raise NotImplementedError

    def draft(self, root: int, levels: int) -> CandidatePool:
        raise NotImplementedError

    def extend(self, extra_levels: int) -> CandidatePool:
        raise NotImplementedError

    def commit(self, path_pool_nodes: List[int], new_tokens: List[int],
               target_hidden=None) -> None:
        raise NotImplementedError


class ModelDrafter(Drafter):
    """Tree drafter over any causal LM sharing the target's vocabulary.

    The expansion is :class:`~heterospec.expansion.TreeExpansion` (EAGLE-2, shared with
    :class:`~heterospec.Eagle3Drafter`): each level is one forward of the ``top_k`` frontier
    nodes and one ``draft_topk_entropy`` launch. The drafter keeps its own KV cache: frontier
    nodes are appended with a tree mask, and after verification the cache keeps the committed
    prefix plus the accepted nodes it already processed (the rest is dropped and re-fed as
    committed tokens in the next level-0 forward)."""

    def __init__(self, model: CausalLM, top_k: int = 10):
        if top_k < 1 or top_k > hx.ops.draft_topk_entropy.MAX_TOPK:
            raise ValueError(f"top_k must be in [1, 64], got {top_k}")
        self.lm = model
        self.top_k = top_k
        self.tokenizer = model.tokenizer
        self.vocab_size = model.vocab_size
        self.device = model.device
        self.cache = None
        self.expansion = TreeExpansion(top_k, self.device)
        self._calls_at_reset = 0

    @property
    def forward_calls(self):
        """Draft forwards since the last ``reset``."""
        return self.lm.forward_calls - self._calls_at_reset

    # -- per request
    def reset(self, prompt_ids: torch.Tensor, target_hidden=None) -> None:
        self.cache = self.lm.new_cache()
        # everything but the root waits to be fed in the first level-0 forward
        self._pending = [int(t) for t in prompt_ids[:-1].tolist()]
        self._calls_at_reset = self.lm.forward_calls

    # -- per cycle
    def draft(self, root: int, levels: int) -> CandidatePool:
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        feed = torch.tensor(self._pending + [int(root)], dtype=torch.int64, device=self.device)
        logits = self.lm.causal_forward(feed, self.cache, last_only=True)
        self._pending = []
        self._prefix = cache_length(self.cache) - 1  # committed tokens before the root
        stats = hx.draft_topk_entropy(logits, self.top_k, 1.0)
        self.expansion.start(root, stats.topk_ids[0], stats.topk_logprobs[0],
                             stats.topk_entropy[0])
        return self.extend(levels - 1)

    def extend(self, extra_levels: int) -> CandidatePool:
        k, dev, exp, lm = self.top_k, self.device, self.expansion, self.lm
        context = self._prefix + 1  # committed entries, root included
        for _ in range(extra_levels):
            tree = exp.frontier_visibility()
            mask = torch.zeros((1, 1, k, context + tree.shape[1]), dtype=lm.dtype, device=dev)
            mask[0, 0, :, context:].masked_fill_(~tree, torch.finfo(lm.dtype).min)
            pos = torch.full((k,), self._prefix + exp.levels, dtype=torch.int64, device=dev)
            logits = lm.forward(exp.frontier_tokens(), self.cache, pos, mask)
            stats = hx.draft_topk_entropy(logits, k, 1.0)
            exp.grow(stats.topk_ids, stats.topk_logprobs, stats.topk_entropy)
        return exp.pool()

    def commit(self, path_pool_nodes: List[int], new_tokens: List[int],
               target_hidden=None) -> None:
        """Keep root + the accepted nodes this drafter already processed; queue the rest."""
        slots = self.expansion.fed_prefix(path_pool_nodes)
        context = self._prefix + 1
        compact_cache(self.cache, context, context + slots)
        # new_tokens = accepted draft tokens, then the bonus (next root, not fed yet)
        self._pending = [int(t) for t in new_tokens[slots.numel():-1]]


def quantize_int8(model):
    """A dynamically int8-quantised copy of ``model`` (``nn.Linear`` weights, per-tensor qint8).
    CPU only: quantised linear kernels exist for CPU."""
    import warnings

    # dynamic int8 linears take float32 activations: quantise a float32 copy whatever the
    # target's dtype (a bfloat16 copy would hand them bfloat16 inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        copy_ = copy.deepcopy(model).cpu()
        # nn.Module._apply: HF's .float() refuses models flagged quantised (GGUF-loaded ones)
        copy_._apply(lambda t: t.float() if t.is_floating_point() else t)
        return torch.ao.quantization.quantize_dynamic(copy_, {torch.nn.Linear},
                                                      dtype=torch.qint8).eval()


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
