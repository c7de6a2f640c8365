"""Pure-PyTorch oracles for every heterospec op: readable, slow, float64 where it matters.

Each function takes the same arguments as the op of the same name and returns the same tuple
(as plain tensors on the input's device). Tests compare the kernels against these.
"""
from typing import Optional

import torch


# ----------------------------------------------------------------------------- draft_topk_entropy


def draft_topk_entropy(logits: torch.Tensor, k: int, temperature: float = 1.0):
    """Reference for :func:`heterospec_ext.draft_topk_entropy`."""
    raise NotImplementedError("draft_topk_entropy reference: owned by the draft_topk_entropy work")


# ----------------------------------------------------------------------------- stratify


def stratify(step_entropy, confidence, parents, thresholds, policy):
    """Reference for :func:`heterospec_ext.stratify`."""
    raise NotImplementedError("stratify reference: owned by the stratify work")


# ----------------------------------------------------------------------------- build_tree


def build_tree(pool_parents, pool_scores, pool_tokens, top_n, n_max: int):
    """Reference for :func:`heterospec_ext.build_tree`."""
    raise NotImplementedError("build_tree reference: owned by the build_tree work")


# ----------------------------------------------------------------------------- fused_verify


def fused_verify(target_logits, candidates, parents, temperature, top_k, top_p, uniforms,
                 draft_probs: Optional[torch.Tensor] = None):
    """Reference for :func:`heterospec_ext.fused_verify` (``[B]`` tensors for the parameters)."""
    raise NotImplementedError("fused_verify reference: owned by the fused_verify work")
