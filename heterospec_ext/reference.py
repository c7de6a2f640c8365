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
    # The float32 quotient logit / float32(temperature), as the op computes it: the float64
    # quotient rounded to float32 is the correctly rounded float32 quotient (53 >= 2 * 24 + 2
    # bits, so the double rounding is harmless), whatever torch does with a scalar divisor.
    temperature_f32 = torch.tensor(temperature, dtype=torch.float32).double()
    z = (logits.double() / temperature_f32).float().double()
    bad = (torch.isnan(z) | (z == float("inf"))).any(dim=1) | (z == float("-inf")).all(dim=1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"logits row {row} is invalid")
    # Shift by the row maximum before anything else: with |z| ~ 1e30 (a tiny temperature),
    # z - logsumexp(z) keeps none of the digits below the ulp of z, so log-probabilities of
    # order 1 (and the entropy) would vanish; (z - max) - logsumexp(z - max) keeps them.
    row_max = z.max(dim=1, keepdim=True).values
    shifted = z - row_max
    log_sum = torch.logsumexp(shifted, dim=1, keepdim=True)
    logp = shifted - log_sum
    logsumexp = (row_max + log_sum).squeeze(1)
    p = logp.exp()
    # 0 * log 0 = 0 for -inf logits.
    entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(dim=1)

    # Top-k by (value desc, id asc): a stable sort of the negated values keeps equal values in
    # ascending id order.
    order = torch.sort(-z, dim=1, stable=True).indices[:, :k]
    top_logp = torch.log_softmax(torch.gather(shifted, 1, order), dim=1)
    top_p = top_logp.exp()
    topk_entropy = -torch.where(top_p > 0, top_p * top_logp, torch.zeros_like(top_p)).sum(dim=1)
    return (
        torch.gather(logp, 1, order).float(),
        order.to(torch.int64),
        topk_entropy.float(),
        entropy.float(),
        logsumexp.float(),
    )


# ----------------------------------------------------------------------------- stratify


def _tree_defect(parents_row):
    """Lowest malformed node of one parent row (a list) as ``(node, parent, why)``, or None for
    a valid tree; ``why`` words the defect as ``core::tree_defect_message`` does."""
    for i, p in enumerate(parents_row):
        if i == 0:
            if p != -1:
                return i, p, "the root (node 0) must have parent -1"
        elif p < -1 or p >= i:
            return i, p, "a node's parent must be -1 (padding) or a lower node index"
        elif p > 0 and parents_row[p] == -1:
            return i, p, "a real node's parent is a padding slot"
    return None


def _check_tree_row(parents_row, name, op, b):
    """Raise the kernels' ValueError for a malformed parent row (a list) of request ``b``."""
    defect = _tree_defect(parents_row)
    if defect is not None:
        node, parent, why = defect
        raise ValueError(f"{op}: {name} of request {b} is not a valid tree: node {node} has "
                         f"parent {parent} ({why})")


def _check_tree(parents, name, op):
    for b, row in enumerate(parents.tolist()):
        _check_tree_row(row, name, op, b)


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
    _check_tree_row(parents_row.tolist(), "parents", "fused_verify", b)
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


# Rounding model of the kernels. The oracle computes in float64; the kernels compute each
# softmax weight exp(z), z = (logit - max) / T, in float32 (rounding z costs |z| * 2^-23
# relative, expf 2^-23; CUDA: ~3 |z| * 2^-24 and ex2.approx's ~2^-22, with flush-to-zero) and
# sum in double (CPU) or float (CUDA), where the top-p threshold and the final draw use 40-bit
# fixed-point masses relative to the largest weight. Bounds, with the largest weight 1:
KERNEL_EXP_REL = 2.0 ** -20  # a weight exp(z) is off by at most (1 + |z|) * this, relative
KERNEL_WEIGHT_ABS = 2.0 ** -125  # a weight below this may be 0 (CUDA flushes subnormals)
KERNEL_MASS_QUANTUM = 2.0 ** -40  # per-token error of the fixed-point masses (CUDA)
KERNEL_SUM_REL = 1e-6  # relative error of a sum (and never more than all but its largest term)
KERNEL_DIVISION_REL = 2.0 ** -22  # relative error of a normalised weight
# A decision whose two sides are closer than these bounds allow is "within rounding": a kernel
# may take either branch. `fused_verify_outcomes` enumerates every branch such decisions allow.


class _Unconstrained(Exception):
    """Rounding could change a request's walk in a way the oracle does not enumerate (a top-p
    set with near-ties, a real-q residual whose mass may round to zero)."""


class _Decisions:
    """The choices taken at decisions that rounding could flip.

    ``_Decisions()`` takes the float64 choice everywhere (plain :func:`fused_verify`).
    ``_Decisions(script)`` also records every decision within rounding and replays ``script``
    (a list of choices, one per such decision in walk order; the float64 choice after its
    end), so that :func:`fused_verify_outcomes` can try every branch.
    """

    def __init__(self, script=None):
        self.enumerating = script is not None
        self.script = list(script or ())
        self.made = []  # (choice, number of options) of every decision within rounding

    def pick(self, exact: int, options: int) -> int:
        if not self.enumerating or options <= 1:
            return exact
        i = len(self.made)
        choice = self.script[i] if i < len(self.script) else exact
        self.made.append((choice, options))
        return choice

    def unconstrained_if(self, condition: bool) -> None:
        if self.enumerating and condition:
            raise _Unconstrained


def _fv_total(weights, err):
    """Sum of a row and its error bound: the errors of the terms plus the summation's
    rounding, at most KERNEL_SUM_REL of the total and at most all but the largest term (each
    addition loses at most its smaller operand, so a sum of one nonzero term is exact)."""
    total = weights.sum()
    rounding = torch.minimum(KERNEL_SUM_REL * total, total - weights.max())
    return total, err.sum() + rounding


def _fv_normalised(weights, err):
    """``weights / sum`` and its error bound, given the bound ``err`` of each weight: to first
    order, p_i = w_i / (w_i + rest) moves by (err_i * rest + w_i * err_rest) / total^2 (so a
    single nonzero weight normalises to exactly 1, as in the kernels)."""
    total, total_err = _fv_total(weights, err)
    p = weights / total
    division = KERNEL_DIVISION_REL * p if int((weights > 0).sum()) > 1 else 0.0  # w/w exact
    return p, (err * (1.0 - p) + p * (total_err - err)) / total + division


def _fv_top_p(p, err, top_p: float, decisions: _Decisions):
    """Top-p filter of a normalised row: keep ``p >= tau``, tau the probability at which the
    descending cumulative mass first reaches top_p (0 if it never does); renormalise."""
    desc, order = torch.sort(p, descending=True)
    cum = torch.cumsum(desc, 0)
    reached = torch.nonzero(cum >= top_p)
    taus = [float(desc[reached[0, 0]]) if reached.numel() else 0.0]
    if decisions.enumerating:
        # Crossing points a kernel's running sum could take: j may be the first index to
        # reach top_p if cum[j] may reach it and cum[j - 1] may fall short.
        cum_err = torch.cumsum(err[order] + KERNEL_MASS_QUANTUM, 0) + KERNEL_SUM_REL * cum
        may_reach = cum + cum_err >= top_p
        may_fall_short = cum - cum_err < top_p
        first = may_reach & torch.cat([torch.tensor([True]), may_fall_short[:-1]])
        possible = {float(desc[j]) for j in torch.nonzero(first)[:, 0].tolist()}
        if bool(may_fall_short[-1]):
            possible.add(0.0)  # the running sum may never reach top_p: keep everything
        taus += sorted(possible - {taus[0]})
        for tau in taus:  # a weight within rounding of tau (but not equal) may go either way
            if tau > 0.0:  # (tau = 0 keeps everything)
                near = (p != tau) & ((p - tau).abs() <= err + float(err[p == tau].max()))
                decisions.unconstrained_if(bool(near.any()))
    tau = taus[decisions.pick(0, len(taus))]
    keep = p >= tau  # ties with tau kept
    return _fv_normalised(torch.where(keep, p, 0.0), torch.where(keep, err, 0.0))


def _fv_processed(x, temperature: float, top_k: int, top_p: float, decisions: _Decisions):
    """Processed target distribution of one row (float64, sums to 1): temperature, top-k,
    softmax, top-p; and a bound on how far a kernel's version of each entry may be from it."""
    vocab = x.numel()
    keep = ~torch.isneginf(x)
    if 0 < top_k < vocab:
        kth_largest = torch.topk(x, top_k).values[-1]
        keep &= x >= kth_largest  # boundary ties all kept
    z = (x - x.max()) / temperature
    w = torch.where(keep, torch.exp(z), torch.zeros_like(z))
    # exp(0) = 1 is exact in every kernel: the maximal logits carry no error
    err = torch.where(keep & (z < 0), (1.0 - z) * KERNEL_EXP_REL * w + KERNEL_WEIGHT_ABS,
                      torch.zeros_like(z))
    p, err = _fv_normalised(w, err)
    if top_p < 1.0:
        p, err = _fv_top_p(p, err, top_p, decisions)
    return p, err


def _fv_target_probs(x, temperature: float, top_k: int, top_p: float):
    """Processed target distribution of one row (float64): temperature, top-k, softmax, top-p."""
    return _fv_processed(x, temperature, top_k, top_p, _Decisions())[0]


def _fv_inverse_cdf(weights, u: float) -> int:
    """Smallest id whose cumulative mass exceeds u * total; rounding past the end falls back
    to the last id with mass > 0."""
    cum = torch.cumsum(weights, 0)
    crossed = torch.nonzero(cum > u * cum[-1])
    if crossed.numel():
        return int(crossed[0, 0])
    return int(torch.nonzero(weights > 0)[-1, 0])


def _fv_possible_draws(weights, err, u: float) -> set:
    """Every id a kernel's inverse-CDF draw could return given the error bounds: id i if it may
    have mass, the running sum through i may exceed u * total and the sum before i may not."""
    cum = torch.cumsum(weights, 0)
    total = cum[-1]
    token_err = torch.where(weights > 0, err + KERNEL_MASS_QUANTUM, err)
    cum_err = torch.cumsum(token_err, 0) + KERNEL_SUM_REL * cum
    target = u * total
    target_err = u * cum_err[-1]
    may_have_mass = weights + err > 0
    before_low = torch.cat([torch.zeros(1, dtype=cum.dtype), (cum - cum_err)[:-1]])
    possible = may_have_mass & (cum + cum_err > target - target_err) & (
        before_low <= target + target_err)
    ids = set(torch.nonzero(possible)[:, 0].tolist())
    if float(cum[-1] - cum_err[-1]) <= float(target + target_err):  # may run past the end
        ids.add(int(torch.nonzero(may_have_mass)[-1, 0]))
    return ids


def _fv_draw(weights, err, u: float, decisions: _Decisions):
    """The final draw: (the float64 pick, every pick rounding allows)."""
    exact = _fv_inverse_cdf(weights, u)
    if not decisions.enumerating:
        return exact, {exact}
    return exact, _fv_possible_draws(weights, err, u) | {exact}


def _fv_accepts(gap: float, slack: float, decisions: _Decisions) -> bool:
    """An accept test ``gap < 0`` whose sides a kernel knows only to within ``slack``."""
    return bool(decisions.pick(int(gap < 0.0), 2 if 0.0 < slack and abs(gap) <= slack else 1))


def _fv_walk(b, logits, cands, pars, t, k, top_p_b, us, qs, decisions):
    """One request's walk from the root: (accepted path from the root, the float64 emitted
    token, every token the kernels may emit at that path's end). Raises ValueError on invalid
    data, like the CPU op."""
    greedy = t == 0.0
    path, v = [0], 0
    while True:
        x = _fv_checked_row(logits[b, v], b, v)
        children = _fv_children(pars[b], v)
        accepted = None
        if greedy:  # no rounding: logits are compared as they are
            best = int(torch.argmax(x))  # first (lowest) id among ties
            accepted = next((c for c in children if int(cands[b, c]) == best), None)
            emitted = (best, {best})
        elif qs is None:
            # Deterministic drafts: accept x iff u < r(x) = residual(x) / remaining mass;
            # a rejected token's residual becomes 0. Duplicate siblings are skipped.
            residual, err = _fv_processed(x, t, k, top_p_b, decisions)
            rejected = set()
            for c in children:
                tok = int(cands[b, c])
                if tok in rejected:
                    continue  # duplicate sibling: already rejected, residual 0
                u = float(us[b, c])
                remaining, remaining_err = _fv_total(residual, err)
                if rejected:  # the kernels subtract rejected weights from the total
                    remaining_err = remaining_err + KERNEL_SUM_REL
                if _fv_accepts(float(u * remaining - residual[tok]),
                               float(u * remaining_err + err[tok]), decisions):
                    accepted = c
                    break
                rejected.add(tok)
                residual[tok], err[tok] = 0.0, 0.0
            if accepted is None:
                if not bool((residual > 0).any()):  # only on a branch within rounding: the
                    residual, err = _fv_processed(x, t, k, top_p_b, decisions)  # kernels use p
                emitted = _fv_draw(residual, err, float(us[b, 0]), decisions)
        else:
            # Real draft probabilities q: accept x iff u < p'(x) / q(x), i.e. u * q(x) < p'(x)
            # (q(x) = 0 < p'(x) always accepts); on rejection p' = norm(max(p' - q, 0)), kept
            # when that is all zero. Duplicates are tested.
            residual, err = _fv_processed(x, t, k, top_p_b, decisions)
            if children:
                q = qs[b, v].double()
                if not bool((torch.isfinite(q) & (q >= 0)).all()):
                    raise ValueError(f"draft_probs: request {b} node {v}: values must be "
                                     f"finite and >= 0")
            for c in children:
                tok = int(cands[b, c])
                if _fv_accepts(float(us[b, c]) * float(q[tok]) - float(residual[tok]),
                               float(err[tok]), decisions):
                    accepted = c
                    break
                diff = torch.clamp(residual - q, min=0.0)
                diff_err = torch.where(residual + err > q, err + KERNEL_SUM_REL * diff, 0.0)
                mass, mass_err = map(float, _fv_total(diff, diff_err))
                # the kernel's mass may round to zero (keeping p') where ours does not, or not
                decisions.unconstrained_if(mass - mass_err <= 0.0 < mass + mass_err)
                if mass > 0.0:
                    residual, err = _fv_normalised(diff, diff_err)
            if accepted is None:
                emitted = _fv_draw(residual, err, float(us[b, 0]), decisions)
        if accepted is None:
            return path, emitted[0], emitted[1]
        path.append(accepted)
        v = accepted


def _fv_requests(target_logits, candidates, parents, temperature, top_k, top_p, uniforms,
                 draft_probs):
    """Validates each request's walk-independent data (tree, candidates, temperature, top_p,
    uniforms) and yields ``(b, arguments of _fv_walk but the decisions)``."""
    batch, nodes, vocab = target_logits.shape
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
        if t != 0.0 and not bool(((us[b] >= 0) & (us[b] < 1)).all()):
            raise ValueError(f"uniforms: request {b}: every value must lie in [0, 1)")
        yield b, (b, logits, cands, pars, t, k, top_p_b, us, qs)


def fused_verify(target_logits, candidates, parents, temperature, top_k, top_p, uniforms,
                 draft_probs: Optional[torch.Tensor] = None):
    """Reference for :func:`heterospec_ext.fused_verify` (``[B]`` tensors for the parameters).

    Walks each request's tree from the root exactly as the docstring of the op says, with the
    same uniforms columns (column c for node c's test, column 0 for the final draw), in float64.
    Raises ``ValueError`` naming the argument on invalid data (CPU semantics).
    """
    batch, nodes, _ = target_logits.shape
    out_tokens = torch.full((batch, nodes), -1, dtype=torch.int64)
    accepted_nodes = torch.full((batch, nodes), -1, dtype=torch.int64)
    num_accepted = torch.zeros((batch,), dtype=torch.int64)
    cands = candidates.cpu()
    for b, walk_args in _fv_requests(target_logits, candidates, parents, temperature, top_k,
                                     top_p, uniforms, draft_probs):
        path, emitted, _ = _fv_walk(*walk_args, _Decisions())
        num = len(path) - 1
        accepted_nodes[b, : num + 1] = torch.tensor(path, dtype=torch.int64)
        if num:
            out_tokens[b, :num] = cands[b, path[1:]]
        out_tokens[b, num] = emitted
        num_accepted[b] = num
    dev = target_logits.device
    return out_tokens.to(dev), accepted_nodes.to(dev), num_accepted.to(dev)


def fused_verify_outcomes(target_logits, candidates, parents, temperature, top_k, top_p,
                          uniforms, draft_probs: Optional[torch.Tensor] = None,
                          max_walks: int = 64):
    """What each request of :func:`fused_verify` may return from a kernel that rounds as
    float32 does (the ``KERNEL_*`` bounds above).

    Returns a list with one entry per request: a set of ``(accepted_nodes, emitted_token)``
    pairs (``accepted_nodes`` a tuple from the root), one pair when no decision is within
    rounding; or ``None`` when rounding could change the walk in a way not enumerated here
    (top-p near-ties, a real-q residual mass within rounding of 0, or more than
    ``max_walks`` branches). Every branch of every accept test within rounding is walked;
    a final draw within rounding contributes every token it may return. A branch that reaches
    invalid data (a NaN row the float64 walk never visits) adds ``("raises", message)``.
    Greedy requests have exactly one outcome. Raises ``ValueError`` when the float64 walk
    meets invalid data, as :func:`fused_verify` does.
    """
    outcomes = []
    for _, walk_args in _fv_requests(target_logits, candidates, parents, temperature, top_k,
                                     top_p, uniforms, draft_probs):
        allowed, scripts, walks = set(), [[]], 0
        try:
            while scripts:
                walks += 1
                if walks > max_walks:
                    raise _Unconstrained
                decisions = _Decisions(scripts.pop())
                try:
                    path, _, emitted = _fv_walk(*walk_args, decisions)
                    allowed |= {(tuple(path), token) for token in emitted}
                except ValueError as exc:
                    if walks == 1:
                        raise  # the float64 walk itself
                    allowed.add(("raises", str(exc)))
                # branch on every decision past the replayed prefix
                for i in range(len(decisions.script), len(decisions.made)):
                    prefix = [choice for choice, _ in decisions.made[:i]]
                    choice, options = decisions.made[i]
                    scripts += [prefix + [alt] for alt in range(options) if alt != choice]
        except _Unconstrained:
            _fv_walk(*walk_args, _Decisions())  # still raises if the float64 walk does
            allowed = None
        outcomes.append(allowed)
    return outcomes


# ----------------------------------------------------------------------------- decode-layer ops
# float64 arithmetic; each returns the float64 result before the kernel's final rounding to its
# output dtype (tests compare within that rounding), and rounds to the cache dtype exactly
# where the kernel does (keys, values and queries after RoPE).

def _rms_norm64(x, weight, eps):
    x = x.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight.double()


def embed_hidden_rms_norm(token_ids, embed, hidden, embed_weight, hidden_weight, eps):
    """``cat(rms_norm(embed[token_ids]) * embed_weight, rms_norm(hidden) * hidden_weight)``,
    float64 ``[n, 2H]``."""
    return torch.cat((_rms_norm64(embed[token_ids], embed_weight, eps),
                      _rms_norm64(hidden, hidden_weight, eps)), dim=-1)


def fused_add_rms_norm(residual, delta, weight, eps):
    """``(residual + delta, rms_norm(residual + delta) * weight)``: the new float32 residual
    (the kernel adds in float32) and the float64 normed rows."""
    new_residual = residual.float() + delta.float()
    return new_residual, _rms_norm64(new_residual, weight, eps)


def silu_and_mul(gate_up):
    """``silu(gate) * up`` of ``[gate | up]`` rows, float64 ``[n, I]``."""
    gate, up = gate_up.double().chunk(2, dim=-1)
    return gate / (1 + torch.exp(-gate)) * up


def _rope64(x, cos, signed_sin):
    """RoPE of ``x`` ``[..., head_dim]``: ``x * cos + roll(x, head_dim / 2) * signed_sin``."""
    half = x.shape[-1] // 2
    rolled = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return x.double() * cos.double() + rolled.double() * signed_sin.double()


def rope_cache_attention(qkv, rope, positions, k_cache, v_cache, cache_len, visible,
                         num_heads, num_kv_heads):
    """``(out, keys, values)``: the float64 attention output ``[n, num_heads * head_dim]``, and
    the cache rows ``[num_kv_heads, n, head_dim]`` the kernel writes at ``cache_len`` (keys
    after RoPE, in the cache dtype). One query, one head at a time, as the definition reads."""
    n = qkv.shape[0]
    head_dim = qkv.shape[1] // (num_heads + 2 * num_kv_heads)
    dtype = k_cache.dtype
    rows = qkv.view(n, num_heads + 2 * num_kv_heads, head_dim)
    table = rope[positions]  # [n, 2, head_dim]
    cos, signed_sin = table[:, None, 0], table[:, None, 1]
    q = _rope64(rows[:, :num_heads], cos, signed_sin).to(dtype).double()
    new_k = _rope64(rows[:, num_heads:num_heads + num_kv_heads], cos, signed_sin).to(dtype)
    new_v = rows[:, num_heads + num_kv_heads:]
    keys = torch.cat((k_cache[:, :cache_len], new_k.transpose(0, 1)), dim=1).double()
    values = torch.cat((v_cache[:, :cache_len], new_v.transpose(0, 1)), dim=1).double()
    group = num_heads // num_kv_heads
    out = torch.zeros((n, num_heads, head_dim), dtype=torch.float64)
    for i in range(n):
        for h in range(num_heads):
            seen = torch.ones(cache_len + n, dtype=torch.bool) if visible is None else visible[i]
            if not bool(seen.any()):
                continue  # no visible row: a zero output row
            scores = keys[h // group, seen] @ q[i, h] / head_dim ** 0.5
            weights = torch.softmax(scores, dim=0)
            out[i, h] = weights @ values[h // group, seen]
    return out.reshape(n, num_heads * head_dim), new_k.transpose(0, 1), new_v.transpose(0, 1)
