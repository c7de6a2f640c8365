"""build_tree vs the EAGLE-style vectorised PyTorch code it replaces.

CPU: pytest-benchmark, B in {1, 8}, an EAGLE pool of M = 1 + 10 + 7 * 100 = 711 nodes (root, k = 10,
depth 7), n_max = 64, top_n = 60 (EAGLE's total_token). GPU: ``gpu_cases(device)``, B in {1, 8, 64}.
"""
import pytest
import torch

import heterospec_ext as hx
from heterospec_ext.testing import eagle_pool

K, DEPTH = 10, 7
POOL = 1 + K + DEPTH * K * K  # 711
LEVELS = DEPTH + 1  # deepest node is DEPTH + 1 edges below the root
N_MAX, TOP_N = 64, 60


def eagle_inputs(batch, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    parents, scores = eagle_pool(batch, K, DEPTH, gen)
    tokens = torch.randint(0, 128256, (batch, POOL), generator=gen)
    top_n = torch.full((batch,), TOP_N, dtype=torch.int64)
    return [t.to(device) for t in (parents, scores, tokens, top_n)]


def composition(pool_parents, pool_scores, pool_tokens, top_n, n_max=N_MAX, n=TOP_N,
                levels=LEVELS):
    """EAGLE-2 rerank + tree description in vectorised torch (fixed n per batch, as EAGLE).

    topk over scores, sort, gather; parents by searchsorted; the ancestor mask by one gather per
    depth level; packbits by shifts; child lists by scatter_reduce; retrieve rows by scatter.
    """
    del top_n  # EAGLE uses one total_token for the whole batch
    batch = pool_parents.shape[0]
    dev = pool_parents.device
    scores = pool_scores[:, 1:].nan_to_num(nan=float("-inf"))
    picked = torch.topk(scores, n - 1, dim=1).indices + 1
    sel = torch.cat([torch.zeros(batch, 1, dtype=torch.int64, device=dev),
                     picked.sort(dim=1).values], dim=1)  # [B, n]
    tokens = pool_tokens.gather(1, sel)
    parent = torch.searchsorted(sel, pool_parents.gather(1, sel).clamp_min(0))
    parent[:, 0] = -1
    node = torch.arange(n, device=dev).expand(batch, n)
    mask = torch.zeros(batch, n, n, dtype=torch.bool, device=dev)
    mask.scatter_(2, node[:, :, None], True)
    ancestor = node
    for _ in range(levels):
        ancestor = torch.where(ancestor > 0, parent.gather(1, ancestor.clamp_min(0)), -1)
        mask.scatter_(2, torch.where(ancestor >= 0, ancestor, node)[:, :, None], True)
    depth = mask.sum(-1) - 1
    words = (n_max + 31) // 32
    full_mask = torch.eye(n_max, dtype=torch.bool, device=dev).repeat(batch, 1, 1)
    full_mask[:, :n, :n] = mask
    bits = torch.zeros(batch, n_max, words * 32, dtype=torch.int64, device=dev)
    bits[..., :n_max] = full_mask
    shifts = torch.arange(32, device=dev)
    packed = (bits.view(batch, n_max, words, 32) << shifts).sum(-1).to(torch.int32)
    # Child lists: first child = smallest child index; next sibling via a stable sort by parent.
    first_child = torch.full((batch, n + 1), n, dtype=torch.int64, device=dev)
    first_child.scatter_reduce_(1, parent[:, 1:].clamp_min(0), node[:, 1:], reduce="amin")
    first_child = torch.where(first_child[:, :n] == n, -1, first_child[:, :n])
    order = torch.sort(parent, dim=1, stable=True).indices
    sorted_parent = parent.gather(1, order)
    nxt = torch.where(sorted_parent[:, 1:] == sorted_parent[:, :-1], order[:, 1:], -1)
    next_sibling = torch.full((batch, n), -1, dtype=torch.int64, device=dev)
    next_sibling.scatter_(1, order[:, :-1], nxt)
    next_sibling[:, 0] = -1
    # Retrieve: row r = r-th leaf; entry depth(a) = a for every ancestor-or-self a of the leaf.
    is_leaf = first_child < 0
    rank = torch.where(is_leaf, is_leaf.cumsum(1) - 1, n_max)  # non-leaves go to a spill row
    paths = torch.full((batch, n, n_max + 1), -1, dtype=torch.int64, device=dev)
    at_depth = torch.where(mask, depth[:, None, :], n_max)
    paths.scatter_(2, at_depth, torch.where(mask, node[:, None, :], -1))
    retrieve = torch.full((batch, n_max + 1, n_max), -1, dtype=torch.int64, device=dev)
    retrieve.scatter_(1, rank[:, :, None].expand(batch, n, n_max), paths[:, :, :n_max])
    pad = torch.full((batch, n_max - n), -1, dtype=torch.int64, device=dev)
    return (torch.cat([sel, pad], 1), torch.cat([tokens, pad], 1), torch.cat([parent, pad], 1),
            torch.cat([depth, torch.zeros_like(pad)], 1), full_mask, packed,
            torch.cat([first_child, pad], 1), torch.cat([next_sibling, pad], 1),
            retrieve[:, :n_max], torch.full((batch,), n, dtype=torch.int64, device=dev))


def io_bytes(batch, n_max=N_MAX):
    words = (n_max + 31) // 32
    inputs = batch * (POOL * (8 + 4) + n_max * 8 + 8)  # parents, scores, the selected tokens, top_n
    outputs = batch * (6 * n_max * 8 + n_max * n_max + n_max * words * 4 + n_max * n_max * 8 + 8)
    return inputs + outputs


def test_composition_agrees_with_op():
    args = eagle_inputs(8, "cpu")
    for name, got, want in zip(hx.Tree._fields, composition(*args), hx.build_tree(*args, N_MAX)):
        assert torch.equal(got, want), name


@pytest.mark.parametrize("impl", ["fused", "composition"])
@pytest.mark.parametrize("batch", [1, 8])
def test_build_tree_cpu(benchmark, batch, impl):
    torch.set_num_threads(2)
    args = eagle_inputs(batch, "cpu")
    benchmark.group = f"build_tree B={batch} M={POOL} n_max={N_MAX}"
    if impl == "fused":
        benchmark(hx.build_tree, *args, N_MAX)
    else:
        benchmark(composition, *args)


def gpu_cases(device):
    cases = []
    for batch in (1, 8, 64):
        args = eagle_inputs(batch, device)
        cases.append({
            "name": f"build_tree B={batch} M={POOL} N={N_MAX}",
            "fused": lambda args=args: hx.build_tree(*args, N_MAX),
            "composition": lambda args=args: composition(*args),
            "bytes": io_bytes(batch),
        })
    return cases
