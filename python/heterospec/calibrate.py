"""Fit HeteroSpec's stratifier: run the static tree on calibration prompts, record per cycle
x = H(P*) (the cumulative top-K entropy of the most confident full-depth path) and y = TCR (the
1-based rank, among the verified nodes ordered by cumulative draft score, of the deepest accepted
node), on cycles that accepted at least one draft token; fit a depth-3 CART regression tree
(scikit-learn ``DecisionTreeRegressor``) and keep its split points as the 7 thresholds."""
from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

import torch

import heterospec_ext as hx

from .errors import DataError
from .generate import SpeculativeGenerator
from .policy import POLICY_THRESHOLDS, HeteroSpec, StaticTree

NUM_THRESHOLDS = POLICY_THRESHOLDS


def _tcr(cycle) -> int:
    tree, pool = cycle["tree"], cycle["pool"]
    n = cycle["nodes"]
    selected = tree.selected[0, 1:n]
    scores = pool.scores[0, selected]
    deepest = int(tree.selected[0, cycle["accepted_nodes"][-1]])
    s = float(pool.scores[0, deepest])
    better = (scores > s) | ((scores == s) & (selected < deepest))
    return 1 + int(better.sum())


def collect(gen: SpeculativeGenerator, prompts: Iterable[torch.Tensor], max_new_tokens: int,
            progress=None) -> List[Tuple[float, int]]:
    """(H(P*), TCR) for every cycle with >= 1 accepted draft token."""
    one = torch.tensor([1e30], dtype=torch.float32)
    pol = torch.tensor([[0, gen.policy.total_tokens]] * 2, dtype=torch.int64)
    samples: List[Tuple[float, int]] = []

    def on_cycle(c):
        if c["accepted"] < 1:
            return
        pool = c["pool"]
        s = hx.stratify(pool.step_entropy, pool.confidence(), pool.parents, one, pol)
        samples.append((float(s.path_entropy[0]), _tcr(c)))

    gen.on_cycle = on_cycle
    try:
        for ids in prompts:
            gen.generate(ids, max_new_tokens)
            if progress is not None:
                progress.update(1)
    finally:
        gen.on_cycle = None
    return samples


def fit_thresholds(samples: List[Tuple[float, int]], min_samples_leaf: Optional[int] = None,
                   max_depth: int = 3) -> List[float]:
    """Split points of a depth-3 regression tree of TCR on H(P*), ascending, padded to 7 by
    repeating the largest (empty strata), so fewer leaves keep the three lowest-entropy ones."""
    from sklearn.tree import DecisionTreeRegressor

    if len(samples) < 8:
        raise DataError(f"calibration needs at least 8 accepted cycles, got {len(samples)}; "
                        "use more prompts or more tokens (--prompts, --max-new-tokens)")
    x = torch.tensor([[h] for h, _ in samples], dtype=torch.float64).numpy()
    y = torch.tensor([r for _, r in samples], dtype=torch.float64).numpy()
    leaf = min_samples_leaf or max(1, len(samples) // 100)
    reg = DecisionTreeRegressor(max_depth=max_depth, min_samples_leaf=leaf, random_state=0)
    reg.fit(x, y)
    t = reg.tree_
    cuts = sorted(float(t.threshold[i]) for i in range(t.node_count) if t.children_left[i] != -1)
    if not cuts:
        raise DataError("the regression tree found no split: the calibration data has a single "
                        "entropy value or constant ranks")
    while len(cuts) < POLICY_THRESHOLDS:
        cuts.append(cuts[-1])
    return cuts[:POLICY_THRESHOLDS]


def calibrate(gen: SpeculativeGenerator, prompts, max_new_tokens: int, progress=None,
              min_samples_leaf: Optional[int] = None) -> Tuple[HeteroSpec, dict]:
    static: StaticTree = gen.policy
    samples = collect(gen, prompts, max_new_tokens, progress)
    thresholds = fit_thresholds(samples, min_samples_leaf)
    policy = HeteroSpec(depth=static.depth, top_k=static.top_k, total_tokens=static.total_tokens,
                        thresholds=thresholds)
    info = {"samples": len(samples), "max_new_tokens": max_new_tokens,
            "mean_path_entropy": sum(h for h, _ in samples) / len(samples),
            "mean_tcr": sum(r for _, r in samples) / len(samples)}
    return policy, info


def calibrate_cost_aware(gen: SpeculativeGenerator, prompts, max_new_tokens: int,
                         progress=None, min_samples_leaf: Optional[int] = None,
                         cost_reps: int = 9) -> Tuple[HeteroSpec, HeteroSpec, dict]:
    """One greedy calibration run giving both rules: the paper's policy (thresholds fitted on
    the base tree's (H(P*), TCR), the gammas) and the cost-aware one (the same thresholds, each
    stratum's (extra depth, top-N) chosen from counterfactual acceptance and this machine's
    measured costs). ``gen.policy`` is the base static tree."""
    from .generate import SpeculativeGenerator as Gen

    static: StaticTree = gen.policy
    paper = HeteroSpec(depth=static.depth, top_k=static.top_k, total_tokens=static.total_tokens,
                       thresholds=[0.0] * NUM_THRESHOLDS)
    alpha = paper.max_extra_depth
    grid = sorted({n for n in TOP_N_GRID} | {int(n) for _, n in paper.policy_t.tolist()})
    deep = Gen(gen.target, gen.drafter, StaticTree(depth=static.depth + alpha, top_k=static.top_k,
                                                   total_tokens=static.total_tokens),
               verifier=gen.verifier_kind)
    prompts = list(prompts)
    records = collect_counterfactual(deep, prompts, max_new_tokens, static.levels, alpha,
                                     static.total_tokens, grid, progress)
    samples = [(r["H"], r["tcr"]) for r in records if r["tcr"] is not None]
    thresholds = fit_thresholds(samples, min_samples_leaf)
    paper = HeteroSpec(depth=static.depth, top_k=static.top_k, total_tokens=static.total_tokens,
                       thresholds=thresholds)
    measured = measure_costs(gen.target, gen.drafter, prompts[0], static.levels + alpha, grid,
                             cost_reps)
    costs = dict(measured, verify_s=monotone_verify_costs(measured["verify_s"]))
    table, _ = choose_cost_aware(records, thresholds, costs, static.levels)
    cost_aware = HeteroSpec(depth=static.depth, top_k=static.top_k,
                            total_tokens=static.total_tokens, thresholds=thresholds, table=table)
    import bisect

    occupancy = [0] * (NUM_THRESHOLDS + 1)
    for r in records:
        occupancy[bisect.bisect_left(thresholds, r["H"])] += 1
    modelled = {name: modelled_tokens_per_s(records, thresholds, pol.policy_t.tolist(), costs,
                                            static.levels)
                for name, pol in (("paper", paper), ("cost_aware", cost_aware))}
    modelled["static"] = modelled_tokens_per_s(
        records, thresholds, [[0, static.total_tokens]] * (NUM_THRESHOLDS + 1), costs,
        static.levels)
    info = {"samples": len(samples), "cycles": len(records), "max_new_tokens": max_new_tokens,
            "mean_path_entropy": sum(h for h, _ in samples) / max(1, len(samples)),
            "mean_tcr": sum(t for _, t in samples) / max(1, len(samples)),
            "stratum_occupancy": occupancy,
            "mean_accepted_per_stratum_base_tree": [
                round(sum(r["accepted"][(0, static.total_tokens)] for r in records
                          if bisect.bisect_left(thresholds, r["H"]) == i) / max(1, occupancy[i]), 3)
                for i in range(NUM_THRESHOLDS + 1)],
            "cost_model": {"draft_root_ms": round(1e3 * costs["draft_root_s"], 3),
                           "draft_level_ms": round(1e3 * costs["draft_level_s"], 3),
                           "verify_ms_measured": {str(k): round(1e3 * v, 3)
                                                  for k, v in measured["verify_s"].items()},
                           "verify_ms": {str(k): round(1e3 * v, 3)
                                         for k, v in costs["verify_s"].items()},
                           "overhead_ms": 1.0},
            "modelled_tokens_per_s": {k: None if v is None else round(v, 2)
                                      for k, v in modelled.items()}}
    return paper, cost_aware, info


# ----------------------------------------------------------------------------- cost-aware rule
#
# The paper's gammas assume a GPU, where verifying 60 tokens costs about what verifying 1 does.
# On a CPU (and on a GPU at large batch) verification cost grows with the tree, so the best
# (extra depth, top-N) per stratum depends on the machine. Calibration at T = 0 can measure, for
# every cycle, how many tokens *any* smaller tree would have accepted: the target's greedy
# continuation is the decode's own output (lossless), and the accepted length of a tree is the
# longest root path whose tokens match it. With the machine's measured cost per draft level and
# per verified-tree size, the per-stratum choice that maximises expected tokens per second
# follows (Dinkelbach's method for the ratio of sums).

TOP_N_GRID = (2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 60, 64)


def accepted_path(tokens: torch.Tensor, parents: torch.Tensor, n: int, future: List[int]):
    """``(accepted draft tokens, deepest accepted tree node)`` of a greedy verify on a tree
    (``tokens``/``parents`` ``[n]``, node 0 the root) when the target's greedy continuation is
    ``future``: the longest root path matching it."""
    node, depth = 0, 0
    children: dict = {}
    for i in range(1, n):
        children.setdefault(int(parents[i]), []).append(i)
    while depth < len(future):
        nxt = next((c for c in children.get(node, []) if int(tokens[c]) == future[depth]), None)
        if nxt is None:
            break
        node, depth = nxt, depth + 1
    return depth, node


def pool_prefix(pool, levels: int):
    """The first ``levels`` levels of a pool (a prefix of its layout), as build_tree inputs."""
    keep = int((pool.level[0] < levels).sum())
    return pool.parents[:, :keep], pool.scores[:, :keep], pool.tokens[:, :keep]


def collect_counterfactual(gen: SpeculativeGenerator, prompts, max_new_tokens: int,
                           base_levels: int, max_extra: int, base_top_n: int,
                           top_ns=TOP_N_GRID, progress=None):
    """Decode ``prompts`` greedily with ``gen`` (a static tree drafting ``base_levels +
    max_extra`` levels) and return per cycle: ``H`` (H(P*) of the first ``base_levels`` levels),
    ``best_path_logprob`` (the highest cumulative draft log-prob among that level's nodes),
    ``accepted[(extra, top_n)]`` for every extra depth ``0..max_extra`` and ``top_n`` of the grid
    (root included) that the pool can fill, ``tcr`` (the base tree's TCR, ``None`` when it
    accepts nothing) and ``actual`` (what the decode's own tree accepted). Cycles too close to the end of a decode to judge the deepest tree are
    left out."""
    one = torch.tensor([1e30], dtype=torch.float32)
    pol = torch.tensor([[0, 2]] * 2, dtype=torch.int64)
    cycles = []

    def on_cycle(c):
        pool = c["pool"]
        s = hx.stratify(pool.step_entropy, pool.confidence(base_levels - 1), pool.parents, one,
                        pol)
        base = pool.level[0] == base_levels - 1
        cycles.append({"H": float(s.path_entropy[0]), "pool": pool, "start": len(out_tokens),
                       "actual": c["accepted"],
                       "best_path_logprob": float(pool.scores[0][base].max())})
        out_tokens.extend(c["tokens"])

    records = []
    gen.on_cycle = on_cycle
    deepest = base_levels + max_extra
    try:
        for ids in prompts:
            out_tokens: List[int] = []
            cycles.clear()
            gen.generate(ids, max_new_tokens)
            for cyc in cycles:
                future = out_tokens[cyc["start"]:]
                if len(future) <= deepest:  # the decode ended before a deep tree could be judged
                    continue
                acc, tcr = {}, None
                for extra in range(max_extra + 1):
                    parents, scores, tokens = pool_prefix(cyc["pool"], base_levels + extra)
                    size = parents.shape[1]
                    for n in top_ns:
                        if n > size:
                            break
                        tree = hx.build_tree(parents, scores, tokens,
                                             torch.tensor([n], dtype=torch.int64), n)
                        depth, node = accepted_path(tree.tokens[0], tree.parents[0], n, future)
                        acc[(extra, n)] = depth
                        if extra == 0 and n == base_top_n and depth > 0:
                            tcr = _tcr({"tree": tree, "pool": cyc["pool"], "nodes": n,
                                        "accepted_nodes": [node]})
                records.append({"H": cyc["H"], "accepted": acc, "tcr": tcr,
                                "actual": cyc["actual"],
                                "best_path_logprob": cyc["best_path_logprob"]})
            if progress is not None:
                progress.update(1)
    finally:
        gen.on_cycle = None
    return records


def measure_costs(target, drafter, prompt_ids, max_levels: int, top_ns, reps: int = 9) -> dict:
    """This machine's costs, medians of ``reps``: ``draft_root_s`` (a cycle's first draft level:
    feeding the last committed token and expanding the root), ``draft_level_s`` (one more
    level), and ``verify_s[N]`` (one target tree verify of ``N`` nodes), after ``prompt_ids``.

    The verify sizes are timed in rounds, each round visiting every size once in a shuffled
    order: on a shared machine a slow spell then lands on all sizes alike instead of on the
    block of sizes timed during it, which would make the cost curve (and the cost-aware choice
    built on it) follow the noise."""
    import random
    import statistics
    import time

    from .verifier import make_verifier

    ver = make_verifier(target)
    ver.reset()
    target.captured_hidden = None
    ver.prefill(prompt_ids[:-1])
    hidden = target.captured_hidden
    root = int(prompt_ids[-1])
    drafter.reset(prompt_ids, target_hidden=hidden)
    drafter.draft(root, 1)  # feeds the prompt
    state = None if hidden is None else hidden[-1:]
    root_s, level_s = [], []
    for _ in range(reps + 1):
        # commit the root alone (nothing accepted), as after a fully rejected cycle
        drafter.commit([0], [root], target_hidden=state)
        t0 = time.perf_counter()
        drafter.draft(root, 1)
        t1 = time.perf_counter()
        for _ in range(max_levels - 1):
            drafter.extend(1)
        t2 = time.perf_counter()
        root_s.append(t1 - t0)
        level_s.append((t2 - t1) / max(1, max_levels - 1))
    g = torch.Generator().manual_seed(0)
    sizes = sorted(set(int(n) for n in top_ns))
    inputs = {n: (torch.randint(0, target.vocab_size, (n,), generator=g), torch.arange(n),
                  torch.ones((n, n), dtype=torch.bool).tril_()) for n in sizes}
    times = {n: [] for n in sizes}
    order = random.Random(0)
    for round_ in range(reps + 1):
        visit = list(sizes)
        order.shuffle(visit)
        for n in visit:
            t0 = time.perf_counter()
            ver.tree_forward(*inputs[n])
            if round_:  # round 0 warms every size up
                times[n].append(time.perf_counter() - t0)
    verify_s = {n: statistics.median(times[n]) for n in sizes}
    return {"draft_root_s": statistics.median(root_s[1:]),
            "draft_level_s": statistics.median(level_s[1:]), "verify_s": verify_s}


def monotone_verify_costs(verify_s: dict) -> dict:
    """The verify-cost curve ``{N: seconds}`` made non-decreasing in N from N = 2 on (least
    squares, pool-adjacent-violators). A tree of N + 1 nodes does all the work of one of N and
    more, so a dip (N = 15 timed below N = 12) is the host's noise, and a cost model that
    believed it would pick tree sizes by that noise. N = 1 is kept as measured: a one-row
    forward takes other GEMM kernels and may cost more than two rows."""
    sizes = sorted(verify_s)
    fit = [n for n in sizes if n >= 2]
    blocks = []  # [mean, count] of pooled runs
    for n in fit:
        blocks.append([verify_s[n], 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            mean, count = blocks.pop()
            prev = blocks[-1]
            prev[0] = (prev[0] * prev[1] + mean * count) / (prev[1] + count)
            prev[1] += count
    values = [mean for mean, count in blocks for _ in range(count)]
    out = {n: verify_s[n] for n in sizes if n < 2}
    out.update(zip(fit, values))
    return out


def cycle_seconds(costs: dict, levels: int, top_n: int, overhead_s: float) -> float:
    """Modelled seconds of one cycle: drafting ``levels`` levels, verifying ``top_n`` nodes, and
    the fixed overhead."""
    return costs["draft_root_s"] + (levels - 1) * costs["draft_level_s"] + \
        costs["verify_s"][top_n] + overhead_s


def choose_cost_aware(records, thresholds: List[float], costs: dict, base_levels: int,
                      overhead_s: float = 1e-3, iterations: int = 30):
    """Per stratum ``[extra_depth, top_n]`` maximising the expected tokens per second over all
    cycles (Dinkelbach), plus the modelled tokens/s of that table."""
    import bisect

    strata = len(thresholds) + 1
    by_stratum = [[] for _ in range(strata)]
    for r in records:
        by_stratum[bisect.bisect_left(thresholds, r["H"])].append(r["accepted"])
    configs = sorted({k for r in records for k in r["accepted"] if k[1] in costs["verify_s"]})
    time_of = {c: cycle_seconds(costs, base_levels + c[0], c[1], overhead_s) for c in configs}
    gain = []
    for rs in by_stratum:
        gain.append({c: sum(r.get(c, 0) + 1 for r in rs) for c in configs
                     if rs and all(c in r for r in rs)})
    lam = 0.0
    best = [None] * strata
    for _ in range(iterations):
        for i, rs in enumerate(by_stratum):
            if not rs:
                continue
            best[i] = max(gain[i], key=lambda c: gain[i][c] - lam * len(rs) * time_of[c])
        tokens = sum(gain[i][best[i]] for i in range(strata) if best[i] is not None)
        seconds = sum(len(by_stratum[i]) * time_of[best[i]] for i in range(strata)
                      if best[i] is not None)
        if abs(tokens / seconds - lam) < 1e-9 * max(lam, 1.0):
            break
        lam = tokens / seconds
    default = max(configs, key=lambda c: sum(g.get(c, 0) for g in gain) /
                  max(1e-12, sum(len(rs) for rs in by_stratum) * time_of[c]))
    table = [list(best[i]) if best[i] is not None else list(default) for i in range(strata)]
    return table, lam


def modelled_tokens_per_s(records, thresholds, table, costs, base_levels,
                          overhead_s: float = 1e-3) -> Optional[float]:
    """Tokens/s the cost model predicts for a per-stratum table on the calibration cycles
    (``None`` when a cycle's pool cannot fill the table's tree)."""
    import bisect

    tokens = seconds = 0.0
    for r in records:
        e, n = table[bisect.bisect_left(thresholds, r["H"])]
        if (e, n) not in r["accepted"] or n not in costs["verify_s"]:
            return None
        tokens += r["accepted"][(e, n)] + 1
        seconds += cycle_seconds(costs, base_levels + e, n, overhead_s)
    return tokens / seconds if seconds else None
