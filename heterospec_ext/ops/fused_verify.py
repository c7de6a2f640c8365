"""fused_verify: tree acceptance fused with temperature, top-k, top-p and the target softmax."""
from typing import NamedTuple, Optional, Union

import torch

from ._fake_checks import LOGIT_DTYPES, check_tensor

_OP = torch.ops.heterospec.fused_verify.default
_OP_OUT = torch.ops.heterospec.fused_verify_out.default

Scalar = Union[float, int, torch.Tensor]


class VerifyResult(NamedTuple):
    out_tokens: torch.Tensor  # [B, N] int64: accepted draft tokens, then the bonus; -1 padded
    accepted_nodes: torch.Tensor  # [B, N] int64: root, then accepted nodes; -1 padded
    num_accepted: torch.Tensor  # [B] int64: accepted draft tokens (bonus excluded)


def _per_request(value: Scalar, batch: int, dtype: torch.dtype, device, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return value.to(device=device, dtype=dtype).expand(batch).contiguous()
        return value
    return torch.full((batch,), value, dtype=dtype, device=device)


def sampling_params(target_logits, temperature: Scalar = 0.0, top_k: Scalar = 0,
                    top_p: Scalar = 1.0):
    """``temperature``, ``top_k`` and ``top_p`` as the ``[B]`` tensors the op takes."""
    b, dev = target_logits.shape[0], target_logits.device
    return (
        _per_request(temperature, b, torch.float32, dev, "temperature"),
        _per_request(top_k, b, torch.int64, dev, "top_k"),
        _per_request(top_p, b, torch.float32, dev, "top_p"),
    )


def fused_verify(
    target_logits: torch.Tensor,
    candidates: torch.Tensor,
    parents: torch.Tensor,
    *,
    temperature: Scalar = 0.0,
    top_k: Scalar = 0,
    top_p: Scalar = 1.0,
    uniforms: Optional[torch.Tensor] = None,
    draft_probs: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> VerifyResult:
    """Accept the longest valid path of each request's draft tree, exactly as the target samples.

    Args:
        target_logits: ``[B, N, V]`` float32 / float16 / bfloat16; row i is the target's logits
            after node i (the distribution of node i's children and of the bonus token). Read in
            its own dtype; no probability tensor is materialised.
        candidates: ``[B, N]`` int64 token of each node (the root's is ignored; padding may be -1).
            A real non-root node's token must lie in ``[0, V)``.
        parents: ``[B, N]`` int64, the tree convention of :func:`stratify`.
        temperature: float or ``[B]`` float32, ``>= 0``; 0 means greedy for that request.
        top_k: int or ``[B]`` int64; ``<= 0`` or ``>= V`` disables it.
        top_p: float or ``[B]`` float32 in ``(0, 1]``; 1 disables it.
        uniforms: ``[B, N]`` float32 in ``[0, 1)``: column i (i >= 1) is node i's acceptance test,
            column 0 the final draw. ``None`` draws them with ``torch.rand`` (``generator``).
        draft_probs: optional ``[B, N, V]`` float32; row i is the distribution q that node i's
            children were drawn from, i.i.d. (after the draft's own processing).

    Target processing, identical for acceptance, residual and bonus: ``z = logits / T``;
    top-k keeps tokens with ``z >=`` the k-th largest ``z`` (boundary ties all kept); softmax;
    top-p keeps tokens with ``p >=`` the probability at which the descending cumulative mass first
    reaches ``top_p`` (boundary ties kept); renormalise.

    Modes, walking from the root and trying children in increasing node index:
        greedy (T = 0): accept the first child whose token is ``argmax z`` (lowest id on ties);
            the bonus is the argmax at the last accepted node. Only visited rows are read.
        sampling, no ``draft_probs``: with residual r (initially p), accept child x iff
            ``u < r(x)``; on rejection set ``r(x) = 0`` and renormalise. Duplicate sibling
            tokens are skipped. If no child is accepted, draw the emitted token from r.
        sampling with ``draft_probs``: accept x iff ``u < p'(x) / q(x)`` (always if ``q(x) = 0 <
            p'(x)``); on rejection ``p' = norm(max(p' - q, 0))`` (kept if that is all zero).
            Duplicates are tested, as i.i.d. drafting requires. A chain reduces to standard
            speculative sampling.
        The final draw is the inverse CDF over token ids: the smallest id whose cumulative mass
        exceeds ``u0 * total``; rounding past the end falls back to the last id with mass > 0.

    Returns (:class:`VerifyResult`): ``out_tokens[b, :A]`` the accepted draft tokens and
    ``out_tokens[b, A]`` the bonus/corrected token; ``accepted_nodes[b, :A+1]`` the root and the
    accepted nodes; ``num_accepted[b] = A``. Everything else is -1.

    Invalid data (NaN logits, a malformed tree, an out-of-range candidate, uniforms outside
    [0, 1), bad sampling parameters): on CPU a ``ValueError`` naming the argument and the
    lowest invalid request (the tree, candidate, parameter and uniform checks of every request
    come first, then the rows met while walking), whatever the thread count; on CUDA the
    request emits nothing (``num_accepted = 0``, all -1) rather than syncing to raise.
    Precisely: ``parents``, the candidates of real non-root nodes, ``temperature`` (finite,
    ``>= 0``) and ``top_p`` are checked for every request; ``uniforms`` (all N columns) for
    sampling requests only (greedy requests ignore ``uniforms`` and ``draft_probs``). Only rows
    that are read are checked: a visited row of ``target_logits`` holding NaN or ``+inf``, or
    only ``-inf``, is invalid; in real-q mode the ``draft_probs`` row of a visited node with
    children must be finite and ``>= 0`` (it is used as given, not renormalised).

    Numerics: top-k compares logits (the same set as comparing ``z`` for ``T > 0``); if the
    top-p running sum never reaches ``top_p`` through rounding, every token is kept; if rounding
    leaves the deterministic-draft residual without mass, the final draw uses p. Backends
    differ only in summation order, so decisions can differ only when a uniform lies within
    rounding distance of a threshold. The shared scalar rules live in
    ``csrc/core/fused_verify.h``. Weights are float32 relative to the largest (1): a token
    whose weight underflows (CPU: below float32's smallest subnormal, 2^-149; CUDA: below
    2^-126, and below 2^-40 in the fixed-point masses of top-p and the final draw) weighs 0,
    so with a uniform of exactly 0 such a token is rejected (a draw with ``u0 = 0`` skips it)
    where the float64 reference, in which its probability is positive, accepts (draws) it.
    That is a decision within rounding of its threshold like the others;
    ``reference.fused_verify_outcomes`` lists every result such decisions allow. The CPU
    kernel forms ``logit - max`` in double where float32 would overflow (logits more than
    3.4e38 below the row max, possible only near +-3.4e38); the CUDA kernel does not yet and
    gives such tokens weight 0.

    CUDA limits (a ``RuntimeError`` beyond them): ``N <= 4096`` tree nodes and ``V <= 2**23``.
    """
    temperature, top_k, top_p = sampling_params(target_logits, temperature, top_k, top_p)
    if uniforms is None:
        b, n = candidates.shape[0], candidates.shape[1]
        uniforms = torch.rand((b, n), dtype=torch.float32, device=target_logits.device,
                              generator=generator)
    return VerifyResult(*_OP(target_logits, candidates, parents, temperature, top_k, top_p,
                             uniforms, draft_probs))


def fused_verify_out(target_logits, candidates, parents, temperature, top_k, top_p, uniforms,
                     draft_probs, out_tokens, accepted_nodes, num_accepted) -> None:
    """:func:`fused_verify` writing into preallocated buffers; every argument is a tensor (or
    ``draft_probs=None``), as captured CUDA graphs need."""
    _OP_OUT(target_logits, candidates, parents, temperature, top_k, top_p, uniforms, draft_probs,
            out_tokens, accepted_nodes, num_accepted)


def _check_args(target_logits, candidates, parents, temperature, top_k, top_p, uniforms,
                draft_probs):
    """The metadata checks of csrc/fused_verify_checks.h, for the fakes."""
    check_tensor(target_logits, "target_logits", dim=3, dtypes=LOGIT_DTYPES)
    batch, nodes, vocab = target_logits.shape
    torch._check(nodes >= 1, lambda: "target_logits.size(1) (tree nodes N) must be >= 1 (the "
                                     f"root), got {nodes}")
    torch._check(vocab >= 1, lambda: f"target_logits.size(2) (vocab V) must be >= 1, got {vocab}")
    on_logits_device = (target_logits, "target_logits")
    for t, name, dtype, sizes in ((candidates, "candidates", torch.int64, (batch, nodes)),
                                  (parents, "parents", torch.int64, (batch, nodes)),
                                  (temperature, "temperature", torch.float32, (batch,)),
                                  (top_k, "top_k", torch.int64, (batch,)),
                                  (top_p, "top_p", torch.float32, (batch,)),
                                  (uniforms, "uniforms", torch.float32, (batch, nodes))):
        check_tensor(t, name, dim=len(sizes), dtypes=(dtype,), sizes=enumerate(sizes),
                     same_device_as=on_logits_device)
    if draft_probs is not None:
        check_tensor(draft_probs, "draft_probs", dim=3, dtypes=(torch.float32,),
                     sizes=enumerate((batch, nodes, vocab)), same_device_as=on_logits_device)


@torch.library.register_fake("heterospec::fused_verify")
def _fake(target_logits, candidates, parents, temperature, top_k, top_p, uniforms,
          draft_probs=None):
    _check_args(target_logits, candidates, parents, temperature, top_k, top_p, uniforms,
                draft_probs)
    b, n = target_logits.shape[0], target_logits.shape[1]
    return (
        target_logits.new_empty((b, n), dtype=torch.int64),
        target_logits.new_empty((b, n), dtype=torch.int64),
        target_logits.new_empty((b,), dtype=torch.int64),
    )


@torch.library.register_fake("heterospec::fused_verify_out")
def _fake_out(target_logits, candidates, parents, temperature, top_k, top_p, uniforms,
              draft_probs, out_tokens, accepted_nodes, num_accepted):
    _check_args(target_logits, candidates, parents, temperature, top_k, top_p, uniforms,
                draft_probs)
    b, n = target_logits.shape[0], target_logits.shape[1]
    # Any strides: the kernels copy back into non-contiguous buffers.
    for out, name, sizes in ((out_tokens, "out_tokens", (b, n)),
                             (accepted_nodes, "accepted_nodes", (b, n)),
                             (num_accepted, "num_accepted", (b,))):
        check_tensor(out, name, dim=len(sizes), dtypes=(torch.int64,), sizes=enumerate(sizes),
                     same_device_as=(target_logits, "target_logits"))
    return None
