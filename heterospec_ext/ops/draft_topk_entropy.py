"""draft_topk_entropy: softmax statistics of draft logits in one pass over each row."""
from typing import NamedTuple

import torch

from ._fake_checks import LOGIT_DTYPES, check_positive_temperature, check_tensor

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


def _check_args(logits, k, temperature):
    """The metadata checks of csrc/draft_topk_entropy_checks.h, for the fakes."""
    check_tensor(logits, "logits", dim=2, dtypes=LOGIT_DTYPES)
    vocab = logits.shape[1]
    torch._check(vocab < 2**31 - 1,
                 lambda: f"logits.size(1) (the vocabulary) must be < 2^31 - 1, got {vocab}")
    torch._check_value(1 <= k, lambda: f"k must satisfy 1 <= k <= min(V, {MAX_TOPK}), got {k}")
    torch._check_value(k <= MAX_TOPK,
                       lambda: f"k must satisfy 1 <= k <= min(V, {MAX_TOPK}), got {k}")
    torch._check_value(k <= vocab, lambda: f"k must satisfy 1 <= k <= min(V, {MAX_TOPK}) with "
                                           f"V = logits.size(1) = {vocab}, got k = {k}")
    check_positive_temperature(temperature)


@torch.library.register_fake("heterospec::draft_topk_entropy")
def _fake(logits, k, temperature=1.0):
    _check_args(logits, k, temperature)
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
    _check_args(logits, k, temperature)
    n = logits.shape[0]
    for out, name, dtype, shape in ((topk_logprobs, "topk_logprobs", torch.float32, (n, k)),
                                    (topk_ids, "topk_ids", torch.int64, (n, k)),
                                    (topk_entropy, "topk_entropy", torch.float32, (n,)),
                                    (entropy, "entropy", torch.float32, (n,)),
                                    (logsumexp, "logsumexp", torch.float32, (n,))):
        check_tensor(out, name, dim=len(shape), dtypes=(dtype,), sizes=enumerate(shape),
                     same_device_as=(logits, "logits"), contiguous=True)
    return None
