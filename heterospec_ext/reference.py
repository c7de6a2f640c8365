"""Pure-PyTorch oracles for every heterospec op: readable, slow, float64 where it matters.

Each function takes the same arguments as the op of the same name and returns the same tuple
(as plain tensors on the input's device). Tests compare the kernels against these.
"""
from typing import Optional

import torch


# ----------------------------------------------------------------------------- draft_topk_entropy


def draft_topk_entropy(logits: torch.Tensor, k: int, temperature: float = 1.0):
    """Reference for :func:`heterospec_ext.draft_topk_entropy`.

    ``logits`` ``[N, V]`` (any float dtype) -> ``(topk_logprobs [N, k] f32, topk_ids [N, k] i64,
    topk_entropy [N] f32, entropy [N] f32, logsumexp [N] f32)``. The logits are divided by the
    temperature in float32 (as the op does), everything after that is float64. Raises ValueError
    for an invalid row (all ``-inf``, or a NaN / ``+inf`` after scaling), like the CPU op.
    """
    if not 1 <= k <= min(logits.shape[1], 64):
        raise ValueError(f"k must satisfy 1 <= k <= min(V, 64), got k = {k}")
    z = (logits.float() / temperature).double()
    bad = (torch.isnan(z) | (z == float("inf"))).any(dim=1) | (z == float("-inf")).all(dim=1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"logits row {row} is invalid")
    logsumexp = torch.logsumexp(z, dim=1)
    logp = z - logsumexp[:, None]
    p = logp.exp()
    # 0 * log 0 = 0 for -inf logits.
    entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(dim=1)

    # Top-k by (value desc, id asc): a stable sort of the negated values keeps equal values in
    # ascending id order.
    order = torch.sort(-z, dim=1, stable=True).indices[:, :k]
    top_z = torch.gather(z, 1, order)
    top_logp = torch.log_softmax(top_z, dim=1)
    top_p = top_logp.exp()
    topk_entropy = -torch.where(top_p > 0, top_p * top_logp, torch.zeros_like(top_p)).sum(dim=1)
    return (
        (top_z - logsumexp[:, None]).float(),
        order.to(torch.int64),
        topk_entropy.float(),
        entropy.float(),
        logsumexp.float(),
    )


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
