"""build_tree: top-N subtree of an EAGLE-2 candidate pool plus masks, positions and paths."""
from typing import NamedTuple

import torch

from ._fake_checks import check_tensor

_OP = torch.ops.heterospec.build_tree.default
_OP_OUT = torch.ops.heterospec.build_tree_out.default


class Tree(NamedTuple):
    selected: torch.Tensor  # [B, n_max] int64 pool index, -1 padded
    tokens: torch.Tensor  # [B, n_max] int64, -1 padded
    parents: torch.Tensor  # [B, n_max] int64 index in the selection, -1 root/padding
    depth: torch.Tensor  # [B, n_max] int64, root 0 (position offset)
    mask: torch.Tensor  # [B, n_max, n_max] bool ancestor-or-self mask
    packed_mask: torch.Tensor  # [B, n_max, ceil(n_max/32)] int32, little-endian bits
    first_child: torch.Tensor  # [B, n_max] int64, -1 none
    next_sibling: torch.Tensor  # [B, n_max] int64, -1 none
    retrieve: torch.Tensor  # [B, n_max, n_max] int64 root-to-leaf paths, -1 padded
    num_nodes: torch.Tensor  # [B] int64


def build_tree(
    pool_parents: torch.Tensor,
    pool_scores: torch.Tensor,
    pool_tokens: torch.Tensor,
    top_n: torch.Tensor,
    n_max: int,
) -> Tree:
    """Select the root plus the best ``top_n[b] - 1`` pool nodes as a subtree and describe it.

    Args:
        pool_parents: ``[B, M]`` int64, the tree convention of :func:`stratify`: pool node 0 is the
            root (``-1``); for ``i > 0`` the parent is in ``[0, i)`` or ``-1`` for a padding slot.
        pool_scores: ``[B, M]`` float32 cumulative draft log-probs (root's ignored; NaN = ``-inf``).
        pool_tokens: ``[B, M]`` int64 token ids (root: the last committed token).
        top_n: ``[B]`` int64 nodes to keep including the root, clamped to
            ``[1, min(n_max, valid pool nodes)]``.
        n_max: output node capacity, ``>= 1``.

    Selection is best-first: starting from the root, repeatedly take the highest-scoring pool node
    whose parent is already taken (ties to the lower pool index). With scores that never rise
    from parent to child this is exactly the global top-(top_n-1) by (score desc, index asc), and
    a node is never taken without its parent even if scores are not monotone. Selected nodes are
    emitted in ascending pool index, so parents precede children and node 0 is the root.

    Returns (:class:`Tree`): see the field comments. ``mask[b, i, j]`` is True iff j is i or an
    ancestor of i; padding rows attend to themselves only (``mask[b, i, i]``), so attention over
    them stays finite. ``packed_mask`` holds bit ``j % 32`` of word ``j // 32`` = ``mask[b, i, j]``
    (FlashInfer's little-endian order). Children are listed in increasing node index.
    ``retrieve`` row r is the r-th leaf (increasing node index) as root-to-leaf node indices;
    its last dimension is ``n_max``, the deepest a tree of ``n_max`` nodes can be.

    Padding slots ``j >= num_nodes[b]``: ``selected``, ``tokens``, ``parents``, ``first_child``,
    ``next_sibling`` are -1 and ``depth`` 0; ``retrieve`` rows past the number of leaves are all
    -1. Score ties compare by value (``-0.0 == 0.0``; ``+inf`` and ``-inf`` are ordinary values).
    ``M >= 1`` (the root) is required.

    Malformed pools (bad parent index, padding parent): on CPU a ``ValueError`` names
    ``pool_parents`` and the request; on CUDA that request is emitted empty (``num_nodes = 0``,
    ``selected/tokens/parents/first_child/next_sibling/retrieve`` all -1, ``depth`` 0, ``mask``
    self-only). CUDA keeps the pool's selection bitset and five ``[n_max]`` int32 arrays in
    shared memory, ``4 * (ceil(M / 32) + 5 * n_max)`` bytes per request, which must fit the
    device's per-block limit (about 227 KiB on H100/H200); larger shapes raise a RuntimeError.
    """
    return Tree(*_OP(pool_parents, pool_scores, pool_tokens, top_n, n_max))


def build_tree_out(pool_parents, pool_scores, pool_tokens, top_n, selected, tokens, parents,
                   depth, mask, packed_mask, first_child, next_sibling, retrieve, num_nodes) -> None:
    """:func:`build_tree` writing into preallocated contiguous buffers with the shapes and dtypes
    of :class:`Tree`; ``n_max = selected.size(1)``."""
    _OP_OUT(pool_parents, pool_scores, pool_tokens, top_n, selected, tokens, parents, depth,
            mask, packed_mask, first_child, next_sibling, retrieve, num_nodes)


def _check_args(pool_parents, pool_scores, pool_tokens, top_n, n_max):
    """The metadata checks of csrc/build_tree_checks.h, for the fakes."""
    check_tensor(pool_parents, "pool_parents", dim=2, dtypes=(torch.int64,))
    batch, num_pool = pool_parents.shape
    torch._check(num_pool >= 1,
                 lambda: "pool_parents must have at least one node per request (node 0 is the "
                         f"root), got shape {list(pool_parents.shape)}")
    torch._check(num_pool < 2**31, lambda: f"pool_parents.size(1) must be < 2^31, got {num_pool}")
    on_parents_device = (pool_parents, "pool_parents")
    check_tensor(pool_scores, "pool_scores", dim=2, dtypes=(torch.float32,),
                 sizes=((0, batch), (1, num_pool)), same_device_as=on_parents_device)
    check_tensor(pool_tokens, "pool_tokens", dim=2, dtypes=(torch.int64,),
                 sizes=((0, batch), (1, num_pool)), same_device_as=on_parents_device)
    check_tensor(top_n, "top_n", dim=1, dtypes=(torch.int64,), sizes=((0, batch),),
                 same_device_as=on_parents_device)
    torch._check(n_max >= 1, lambda: f"n_max must be >= 1, got {n_max}")
    torch._check(n_max < 2**31, lambda: f"n_max must be < 2^31, got {n_max}")


@torch.library.register_fake("heterospec::build_tree")
def _fake(pool_parents, pool_scores, pool_tokens, top_n, n_max):
    _check_args(pool_parents, pool_scores, pool_tokens, top_n, n_max)
    b = pool_parents.shape[0]
    i64 = dict(dtype=torch.int64)
    words = (n_max + 31) // 32
    return (
        pool_parents.new_empty((b, n_max), **i64),
        pool_parents.new_empty((b, n_max), **i64),
        pool_parents.new_empty((b, n_max), **i64),
        pool_parents.new_empty((b, n_max), **i64),
        pool_parents.new_empty((b, n_max, n_max), dtype=torch.bool),
        pool_parents.new_empty((b, n_max, words), dtype=torch.int32),
        pool_parents.new_empty((b, n_max), **i64),
        pool_parents.new_empty((b, n_max), **i64),
        pool_parents.new_empty((b, n_max, n_max), **i64),
        pool_parents.new_empty((b,), **i64),
    )


@torch.library.register_fake("heterospec::build_tree_out")
def _fake_out(pool_parents, pool_scores, pool_tokens, top_n, selected, tokens, parents, depth,
              mask, packed_mask, first_child, next_sibling, retrieve, num_nodes):
    torch._check(selected.dim() == 2, lambda: f"selected must be a 2-D tensor, got "
                                              f"{selected.dim()}-D")
    n_max = selected.shape[1]
    _check_args(pool_parents, pool_scores, pool_tokens, top_n, n_max)
    b = pool_parents.shape[0]
    i64 = (torch.int64,)
    words = (n_max + 31) // 32
    for out, name, dtypes, shape in (
            (selected, "selected", i64, (b, n_max)), (tokens, "tokens", i64, (b, n_max)),
            (parents, "parents", i64, (b, n_max)), (depth, "depth", i64, (b, n_max)),
            (mask, "mask", (torch.bool,), (b, n_max, n_max)),
            (packed_mask, "packed_mask", (torch.int32,), (b, n_max, words)),
            (first_child, "first_child", i64, (b, n_max)),
            (next_sibling, "next_sibling", i64, (b, n_max)),
            (retrieve, "retrieve", i64, (b, n_max, n_max)), (num_nodes, "num_nodes", i64, (b,))):
        check_tensor(out, name, dim=len(shape), dtypes=dtypes, sizes=enumerate(shape),
                     same_device_as=(pool_parents, "pool_parents"), contiguous=True)
    return None
