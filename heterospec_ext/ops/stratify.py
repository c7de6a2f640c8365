"""stratify: cumulative meta-path top-K entropy H(P*) and the HeteroSpec stratum policy."""
import math
from typing import NamedTuple, Sequence

import torch

from ._fake_checks import check_tensor

_OP = torch.ops.heterospec.stratify.default
_OP_OUT = torch.ops.heterospec.stratify_out.default


class Stratum(NamedTuple):
    path_entropy: torch.Tensor  # [B] float32, H(P*)
    pstar: torch.Tensor  # [B] int64
    stratum: torch.Tensor  # [B] int64
    extra_depth: torch.Tensor  # [B] int64
    top_n: torch.Tensor  # [B] int64


def stratify(
    step_entropy: torch.Tensor,
    confidence: torch.Tensor,
    parents: torch.Tensor,
    thresholds: torch.Tensor,
    policy: torch.Tensor,
) -> Stratum:
    """Per request: H(P*), the stratum it falls in, and that stratum's (extra_depth, top_n).

    Tree convention (shared with :func:`build_tree` and :func:`fused_verify`): node 0 is the root
    (``parents[b, 0] == -1``); for ``i > 0``, ``0 <= parents[b, i] < i`` for a real node and
    ``-1`` for a padding slot. A real node whose parent is a padding slot is malformed.

    Args:
        step_entropy: ``[B, M]`` float32. ``step_entropy[b, i]`` is the entropy term that node i adds
            to its path: the renormalised top-K entropy of the draft distribution node i was drawn
            from (``draft_topk_entropy(...).topk_entropy`` of its parent). The root's is ignored.
        confidence: ``[B, M]`` float32. P* is the real non-root node with the highest confidence
            (ties to the lowest index; NaN counts as ``-inf``). Put ``-inf`` on ineligible nodes.
        parents: ``[B, M]`` int64.
        thresholds: ``[S-1]`` float32, sorted ascending (``S >= 1``).
        policy: ``[S, 2]`` int64; row s = ``(extra_depth, top_n)`` for stratum s, where ``top_n``
            counts tree nodes including the root, as :func:`build_tree` takes it.

    Returns (:class:`Stratum`, each ``[B]``):
        path_entropy float32: ``H(P*)``, the sum of ``step_entropy`` over the non-root nodes of the
            root-to-P* path, accumulated in float32 from the root down (``H(i) = H(parent) + e_i``).
            0 for a root-only tree.
        pstar int64: P*'s node index (0 for a root-only tree).
        stratum int64: the number of thresholds ``<= H(P*)``; ``S-1`` if ``H(P*)`` is NaN.
        extra_depth, top_n int64: ``policy[stratum]``.

    Malformed trees: on CPU a ``ValueError`` names ``parents`` and the request; on CUDA that
    request gets ``stratum = pstar = -1``, ``path_entropy = NaN``, ``extra_depth = top_n = 0``.
    Unsorted (or NaN) thresholds raise a ``ValueError`` on CPU; CUDA does not check them and
    still returns the count of thresholds ``<= H(P*)``. ``M >= 1`` (the root) is required;
    ``-0.0`` and ``0.0`` confidences tie. CPU and CUDA results are bit-identical.
    """
    return Stratum(*_OP(step_entropy, confidence, parents, thresholds, policy))


def stratify_out(step_entropy, confidence, parents, thresholds, policy,
                 path_entropy, pstar, stratum, extra_depth, top_n) -> None:
    """:func:`stratify` writing into preallocated contiguous ``[B]`` buffers (CUDA-graph
    capture): ``path_entropy`` float32, the others int64, on the inputs' device."""
    _OP_OUT(step_entropy, confidence, parents, thresholds, policy,
            path_entropy, pstar, stratum, extra_depth, top_n)


def make_policy(
    depth: int,
    top_n_default: int,
    *,
    alpha: int | None = None,
    gammas: Sequence[float] = (0.3, 0.6, 1.0),
    num_strata: int = 8,
    pool_size: int | None = None,
) -> torch.Tensor:
    """HeteroSpec's per-stratum policy as a ``[num_strata, 2]`` int64 tensor for :func:`stratify`.

    Stratum ``i < len(gammas)`` (the low-entropy ones) drafts ``alpha - i`` extra levels and
    verifies ``N_i = round_half_up(gammas[i] * top_n_default + alpha - i)`` draft nodes; the rest
    keep ``(0, top_n_default)``. ``alpha`` defaults to ``ceil(depth / 2)``. ``top_n_default`` counts
    draft nodes without the root (EAGLE's ``total_token - 1``); the returned ``top_n`` column adds
    the root back, as :func:`build_tree` counts it. ``N_i`` is clamped to ``[1, pool_size]``.
    """
    if depth < 1 or top_n_default < 1 or num_strata < len(gammas):
        raise ValueError(
            f"make_policy needs depth >= 1, top_n_default >= 1 and num_strata >= {len(gammas)}; "
            f"got depth={depth}, top_n_default={top_n_default}, num_strata={num_strata}"
        )
    alpha = math.ceil(depth / 2) if alpha is None else alpha
    rows = []
    for i in range(num_strata):
        if i < len(gammas):
            extra = max(alpha - i, 0)
            n = math.floor(gammas[i] * top_n_default + (alpha - i) + 0.5)
        else:
            extra, n = 0, top_n_default
        n = max(n, 1)
        if pool_size is not None:
            n = min(n, pool_size)
        rows.append((extra, n + 1))
    return torch.tensor(rows, dtype=torch.int64)


def _check_args(step_entropy, confidence, parents, thresholds, policy):
    """The metadata checks of csrc/stratify_checks.h, for the fakes."""
    check_tensor(parents, "parents", dim=2, dtypes=(torch.int64,))
    batch, num_nodes = parents.shape
    torch._check(num_nodes >= 1, lambda: "parents must have at least one node per request "
                                         f"(node 0 is the root), got shape {list(parents.shape)}")
    torch._check(num_nodes < 2**31, lambda: f"parents.size(1) must be < 2^31, got {num_nodes}")
    on_parents_device = (parents, "parents")
    for t, name in ((step_entropy, "step_entropy"), (confidence, "confidence")):
        check_tensor(t, name, dim=2, dtypes=(torch.float32,), sizes=((0, batch), (1, num_nodes)),
                     same_device_as=on_parents_device)
    check_tensor(thresholds, "thresholds", dim=1, dtypes=(torch.float32,),
                 same_device_as=on_parents_device)
    check_tensor(policy, "policy", dim=2, dtypes=(torch.int64,),
                 sizes=((0, thresholds.shape[0] + 1), (1, 2)), same_device_as=on_parents_device)


@torch.library.register_fake("heterospec::stratify")
def _fake(step_entropy, confidence, parents, thresholds, policy):
    _check_args(step_entropy, confidence, parents, thresholds, policy)
    b = parents.shape[0]
    f = parents.new_empty((b,), dtype=torch.float32)
    i = [parents.new_empty((b,), dtype=torch.int64) for _ in range(4)]
    return (f, *i)


@torch.library.register_fake("heterospec::stratify_out")
def _fake_out(step_entropy, confidence, parents, thresholds, policy,
              path_entropy, pstar, stratum, extra_depth, top_n):
    _check_args(step_entropy, confidence, parents, thresholds, policy)
    batch = parents.shape[0]
    for out, name, dtype in ((path_entropy, "path_entropy", torch.float32),
                             (pstar, "pstar", torch.int64), (stratum, "stratum", torch.int64),
                             (extra_depth, "extra_depth", torch.int64),
                             (top_n, "top_n", torch.int64)):
        check_tensor(out, name, dim=1, dtypes=(dtype,), sizes=((0, batch),),
                     same_device_as=(parents, "parents"), contiguous=True)
    return None
