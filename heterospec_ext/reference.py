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


def _fv_children(parents_row, v: int):
    """Children of node v in increasing index order: nodes c > v with parents[c] == v."""
    return [c for c in range(v + 1, parents_row.numel()) if int(parents_row[c]) == v]


def _fv_validate_tree(parents_row, candidates_row, vocab: int, b: int):
    n = parents_row.numel()
    if int(parents_row[0]) != -1:
        raise ValueError(f"parents: request {b}: the root's parent (node 0) must be -1, "
                         f"got {int(parents_row[0])}")
    for i in range(1, n):
        p = int(parents_row[i])
        if p == -1:
            continue
        if not 0 <= p < i or (p > 0 and int(parents_row[p]) == -1):
            raise ValueError(f"parents: request {b}: node {i} has invalid parent {p} "
                             f"(need -1 or a real node in [0, {i}))")
    for i in range(1, n):
        if int(parents_row[i]) >= 0 and not 0 <= int(candidates_row[i]) < vocab:
            raise ValueError(f"candidates: request {b}: node {i} has token "
                             f"{int(candidates_row[i])} outside [0, {vocab})")


def _fv_checked_row(row, b: int, v: int):
    x = row.double()
    if torch.isnan(x).any() or torch.isposinf(x).any():
        raise ValueError(f"target_logits: request {b} node {v}: NaN or +inf logits")
    if torch.isneginf(x).all():
        raise ValueError(f"target_logits: request {b} node {v}: every logit is -inf")
    return x


def _fv_target_probs(x, temperature: float, top_k: int, top_p: float):
    """Processed target distribution of one row (float64): temperature, top-k, softmax, top-p."""
    vocab = x.numel()
    keep = torch.ones_like(x, dtype=torch.bool)
    if 0 < top_k < vocab:
        kth_largest = torch.topk(x, top_k).values[-1]
        keep = x >= kth_largest  # boundary ties all kept
    z = (x - x.max()) / temperature
    w = torch.where(keep & ~torch.isneginf(x), torch.exp(z), torch.zeros_like(z))
    p = w / w.sum()
    if top_p < 1.0:
        desc = torch.sort(p, descending=True).values
        reached = torch.nonzero(torch.cumsum(desc, 0) >= top_p)
        tau = desc[reached[0, 0]] if reached.numel() else torch.zeros((), dtype=p.dtype)
        p = torch.where(p >= tau, p, torch.zeros_like(p))  # ties with tau kept
        p = p / p.sum()
    return p


def _fv_inverse_cdf(weights, u: float) -> int:
    """Smallest id whose cumulative mass exceeds u * total; rounding past the end falls back
    to the last id with mass > 0."""
    cum = torch.cumsum(weights, 0)
    crossed = torch.nonzero(cum > u * cum[-1])
    if crossed.numel():
        return int(crossed[0, 0])
    return int(torch.nonzero(weights > 0)[-1, 0])


def fused_verify(target_logits, candidates, parents, temperature, top_k, top_p, uniforms,
                 draft_probs: Optional[torch.Tensor] = None):
    """Reference for :func:`heterospec_ext.fused_verify` (``[B]`` tensors for the parameters).

    Walks each request's tree from the root exactly as the docstring of the op says, with the
    same uniforms columns (column c for node c's test, column 0 for the final draw), in float64.
    Raises ``ValueError`` naming the argument on invalid data (CPU semantics).
    """
    batch, nodes, vocab = target_logits.shape
    out_tokens = torch.full((batch, nodes), -1, dtype=torch.int64)
    accepted_nodes = torch.full((batch, nodes), -1, dtype=torch.int64)
    num_accepted = torch.zeros((batch,), dtype=torch.int64)
    logits = target_logits.detach().cpu()
    cands, pars = candidates.cpu(), parents.cpu()
    temps, ks, ps = temperature.cpu(), top_k.cpu(), top_p.cpu()
    us = uniforms.cpu()
    qs = draft_probs.detach().cpu() if draft_probs is not None else None
    for b in range(batch):
        _fv_validate_tree(pars[b], cands[b], vocab, b)
        t, k, top_p_b = float(temps[b]), int(ks[b]), float(ps[b])
        if not 0.0 <= t < float("inf"):  # NaN fails too
            raise ValueError(f"temperature: request {b}: must be finite and >= 0, got {t}")
        if not 0.0 < top_p_b <= 1.0:
            raise ValueError(f"top_p: request {b}: must lie in (0, 1], got {top_p_b}")
        greedy = t == 0.0
        if not greedy and not bool(((us[b] >= 0) & (us[b] < 1)).all()):
            raise ValueError(f"uniforms: request {b}: every value must lie in [0, 1)")
        path, v = [0], 0
        while True:
            x = _fv_checked_row(logits[b, v], b, v)
            children = _fv_children(pars[b], v)
            accepted = None
            if greedy:
                best = int(torch.argmax(x))  # first (lowest) id among ties
                accepted = next((c for c in children if int(cands[b, c]) == best), None)
                emitted = best
            elif qs is None:
                residual = _fv_target_probs(x, t, k, top_p_b)
                rejected = set()
                for c in children:
                    tok = int(cands[b, c])
                    if tok in rejected:
                        continue  # duplicate sibling: already rejected, residual 0
                    if float(us[b, c]) < float(residual[tok]):
                        accepted = c
                        break
                    rejected.add(tok)
                    residual[tok] = 0.0
                    residual = residual / residual.sum()
                if accepted is None:
                    emitted = _fv_inverse_cdf(residual, float(us[b, 0]))
            else:
                residual = _fv_target_probs(x, t, k, top_p_b)
                if children:
                    q = qs[b, v].double()
                    if not bool((torch.isfinite(q) & (q >= 0)).all()):
                        raise ValueError(f"draft_probs: request {b} node {v}: values must be "
                                         f"finite and >= 0")
                for c in children:
                    tok = int(cands[b, c])
                    p_x, q_x = float(residual[tok]), float(q[tok])
                    if (p_x > 0.0) if q_x == 0.0 else (float(us[b, c]) < p_x / q_x):
                        accepted = c
                        break
                    diff = torch.clamp(residual - q, min=0.0)
                    if float(diff.sum()) > 0.0:
                        residual = diff / diff.sum()
                if accepted is None:
                    emitted = _fv_inverse_cdf(residual, float(us[b, 0]))
            if accepted is None:
                break
            path.append(accepted)
            v = accepted
        num = len(path) - 1
        accepted_nodes[b, : num + 1] = torch.tensor(path, dtype=torch.int64)
        if num:
            out_tokens[b, :num] = cands[b, path[1:]]
        out_tokens[b, num] = emitted
        num_accepted[b] = num
    dev = target_logits.device
    return out_tokens.to(dev), accepted_nodes.to(dev), num_accepted.to(dev)

