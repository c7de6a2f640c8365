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


def _tree_defect(parents_row):
    """Lowest malformed node of one parent row as ``(node, parent)``, or None for a valid tree."""
    for i, p in enumerate(parents_row):
        if i == 0:
            bad = p != -1
        else:
            bad = p < -1 or p >= i or (p > 0 and parents_row[p] == -1)
        if bad:
            return i, p
    return None


def _check_tree(parents, name, op):
    for b, row in enumerate(parents.tolist()):
        defect = _tree_defect(row)
        if defect is not None:
            raise ValueError(f"{op}: {name} of request {b} is not a valid tree: node {defect[0]} "
                             f"has parent {defect[1]}")


def stratify(step_entropy, confidence, parents, thresholds, policy):
    """Reference for :func:`heterospec_ext.stratify`."""
    _check_tree(parents, "parents", "stratify")
    thr = thresholds.tolist()
    if any(not (a <= b) for a, b in zip(thr, thr[1:])):
        raise ValueError("stratify: thresholds must be sorted ascending")
    batch, num_nodes = parents.shape
    real = parents >= 0
    real[:, 0] = True
    # H(i) = H(parent(i)) + e_i in float32, in index order (the contract's rounding order).
    h = torch.zeros(batch, num_nodes, dtype=torch.float32, device=parents.device)
    for i in range(1, num_nodes):
        parent_h = h.gather(1, parents[:, i:i + 1].clamp_min(0)).squeeze(1)
        h[:, i] = torch.where(real[:, i], parent_h + step_entropy[:, i], torch.zeros_like(parent_h))
    # P*: highest confidence among real non-root nodes, NaN as -inf, ties to the lowest index.
    eligible = real.clone()
    eligible[:, 0] = False
    conf = torch.where(confidence.isnan(), float("-inf"), confidence)
    best = torch.where(eligible, conf, torch.full_like(conf, float("-inf"))).amax(dim=1)
    is_best = eligible & (conf == best[:, None])
    pstar = torch.where(eligible.any(dim=1), is_best.to(torch.int8).argmax(dim=1),
                        torch.zeros(batch, dtype=torch.int64, device=parents.device))
    path_entropy = h.gather(1, pstar[:, None]).squeeze(1)
    num_thresholds = thresholds.numel()
    stratum = (thresholds[None, :] <= path_entropy[:, None]).sum(dim=1)
    stratum = torch.where(path_entropy.isnan(), torch.full_like(stratum, num_thresholds), stratum)
    chosen = policy[stratum]
    return path_entropy, pstar, stratum, chosen[:, 0].contiguous(), chosen[:, 1].contiguous()


# ----------------------------------------------------------------------------- build_tree


import heapq  # noqa: E402  (kept inside the build_tree section)
import math  # noqa: E402


def _selection_order(score, index):
    """Heap key: pops the highest score first (NaN as -inf, -0.0 == 0.0), ties to the lower index."""
    if math.isnan(score):
        score = float("-inf")
    return (-score, index)


def build_tree(pool_parents, pool_scores, pool_tokens, top_n, n_max: int):
    """Reference for :func:`heterospec_ext.build_tree`."""
    if n_max < 1:
        raise ValueError(f"n_max must be >= 1, got {n_max}")
    _check_tree(pool_parents, "pool_parents", "build_tree")
    batch, num_pool = pool_parents.shape
    words = (n_max + 31) // 32
    dev = pool_parents.device
    selected = torch.full((batch, n_max), -1, dtype=torch.int64)
    tokens = torch.full((batch, n_max), -1, dtype=torch.int64)
    parents = torch.full((batch, n_max), -1, dtype=torch.int64)
    depth = torch.zeros((batch, n_max), dtype=torch.int64)
    mask = torch.eye(n_max, dtype=torch.bool).repeat(batch, 1, 1)
    first_child = torch.full((batch, n_max), -1, dtype=torch.int64)
    next_sibling = torch.full((batch, n_max), -1, dtype=torch.int64)
    retrieve = torch.full((batch, n_max, n_max), -1, dtype=torch.int64)
    num_nodes = torch.zeros(batch, dtype=torch.int64)
    all_parents = pool_parents.tolist()
    all_scores = pool_scores.tolist()
    all_tokens = pool_tokens.tolist()
    for b in range(batch):
        par, score = all_parents[b], all_scores[b]
        children = [[] for _ in range(num_pool)]
        for i in range(1, num_pool):
            if par[i] >= 0:
                children[par[i]].append(i)
        valid = 1 + sum(1 for p in par[1:] if p >= 0)
        n = max(1, min(int(top_n[b]), n_max, valid))
        # Best-first: the best node whose parent is already taken.
        taken = [0]
        frontier = [_selection_order(score[c], c) for c in children[0]]
        heapq.heapify(frontier)
        while len(taken) < n:
            _, node = heapq.heappop(frontier)
            taken.append(node)
            for c in children[node]:
                heapq.heappush(frontier, _selection_order(score[c], c))
        taken.sort()
        position = {node: j for j, node in enumerate(taken)}
        num_nodes[b] = n
        for j, node in enumerate(taken):
            selected[b, j] = node
            tokens[b, j] = all_tokens[b][node]
            if j > 0:
                p = position[par[node]]
                parents[b, j] = p
                depth[b, j] = depth[b, p] + 1
                mask[b, j] = mask[b, p]
                mask[b, j, j] = True
        for j in range(1, n):
            p = int(parents[b, j])
            if first_child[b, p] == -1:
                first_child[b, p] = j
            else:
                k = int(first_child[b, p])
                while next_sibling[b, k] != -1:
                    k = int(next_sibling[b, k])
                next_sibling[b, k] = j
        leaves = [j for j in range(n) if first_child[b, j] == -1]
        for r, leaf in enumerate(leaves):
            path = [leaf]
            while path[-1] != 0:
                path.append(int(parents[b, path[-1]]))
            retrieve[b, r, :len(path)] = torch.tensor(path[::-1])
    bit_values = torch.tensor([1 << (j % 32) for j in range(n_max)], dtype=torch.int64)
    packed = torch.zeros((batch, n_max, words), dtype=torch.int64)
    packed.index_add_(2, torch.arange(n_max) // 32, mask.to(torch.int64) * bit_values)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    outs = (selected, tokens, parents, depth, mask, packed, first_child, next_sibling, retrieve,
            num_nodes)
    return tuple(t.to(dev) for t in outs)


# ----------------------------------------------------------------------------- fused_verify


def fused_verify(target_logits, candidates, parents, temperature, top_k, top_p, uniforms,
                 draft_probs: Optional[torch.Tensor] = None):
    """Reference for :func:`heterospec_ext.fused_verify` (``[B]`` tensors for the parameters)."""
    raise NotImplementedError("fused_verify reference: owned by the fused_verify work")
