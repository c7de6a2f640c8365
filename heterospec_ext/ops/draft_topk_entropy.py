"""draft_topk_entropy: softmax statistics of draft logits in one pass over each row."""
from typing import NamedTuple

import torch

_OP = torch.ops.heterospec.draft_topk_entropy.default
_OP_OUT = torch.ops.heterospec.draft_topk_entropy_out.default

MAX_TOPK = 64


class DraftTopK(NamedTuple):
    topk_logprobs: torch.Tensor  # [N, k] float32
    topk_ids: torch.Tensor  # [N, k] int64
    topk_entropy: torch.Tensor  # [N] float32
    entropy: torch.Tensor  # [N] float32
    logsumexp: torch.Tensor  # [N] float32


def draft_topk_entropy(logits: torch.Tensor, k: int, temperature: float = 1.0) -> DraftTopK:
    """Top-k, entropies and logsumexp of ``softmax(logits / temperature)``, one launch for all rows.

    Args:
        logits: ``[N, V]`` float32, float16 or bfloat16 on CPU or CUDA. Any strides.
        k: ``1 <= k <= min(V, 64)``.
        temperature: ``> 0``; logits are divided by it in float32 before everything else.

    Returns (:class:`DraftTopK`, all on ``logits.device``):
        topk_logprobs ``[N, k]`` float32: ``z[id] - logsumexp`` with ``z = logits / temperature``,
            sorted by descending probability; ties go to the lowest token id.
        topk_ids ``[N, k]`` int64.
        topk_entropy ``[N]`` float32: entropy (nats) of the top-k probabilities renormalised to
            sum to one, the per-step term of HeteroSpec's Eq. 1.
        entropy ``[N]`` float32: entropy (nats) of the full distribution.
        logsumexp ``[N]`` float32.

    ``-inf`` logits are probability 0 (``0 log 0 = 0``). If a row has fewer than k finite logits,
    the trailing slots hold ``-inf`` log-probs with the lowest remaining ids.
    A row that is all ``-inf`` or holds a NaN or ``+inf`` (checked on ``z``, so a finite logit that
    overflows when divided by a small temperature counts as ``+inf``) is invalid: on CPU the op
    raises a ``ValueError`` naming ``logits`` and the row; on CUDA (which never syncs to raise)
    that row's outputs are NaN and its ids ``-1``.

    Argument errors: a ``logits`` that is not 2-D or not float32/float16/bfloat16 raises
    ``RuntimeError``; ``k`` or ``temperature`` out of range raises ``ValueError``. ``V`` must be
    below ``2**31 - 1``. Results are deterministic (same inputs and device, same bits).
    """
    return DraftTopK(*_OP(logits, k, temperature))


def draft_topk_entropy_out(
    logits: torch.Tensor,
    k: int,
    temperature: float,
    topk_logprobs: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_entropy: torch.Tensor,
    entropy: torch.Tensor,
    logsumexp: torch.Tensor,
) -> None:
    """:func:`draft_topk_entropy` writing into preallocated, contiguous buffers of the documented
    shapes and dtypes on ``logits.device`` (for CUDA-graph capture). Returns None."""
    _OP_OUT(logits, k, temperature, topk_logprobs, topk_ids, topk_entropy, entropy, logsumexp)


@torch.library.register_fake("heterospec::draft_topk_entropy")
def _fake(logits, k, temperature=1.0):
    torch._check(logits.dim() == 2, lambda: f"logits must be 2-D [N, V], got {logits.dim()}-D")
    torch._check(
        logits.dtype in (torch.float32, torch.float16, torch.bfloat16),
        lambda: f"logits must be float32, float16 or bfloat16, got {logits.dtype}",
    )
    n = logits.shape[0]
    return (
        logits.new_empty((n, k), dtype=torch.float32),
        logits.new_empty((n, k), dtype=torch.int64),
        logits.new_empty((n,), dtype=torch.float32),
        logits.new_empty((n,), dtype=torch.float32),
        logits.new_empty((n,), dtype=torch.float32),
    )


@torch.library.register_fake("heterospec::draft_topk_entropy_out")
def _fake_out(logits, k, temperature, topk_logprobs, topk_ids, topk_entropy, entropy, logsumexp):
    return None
