"""Fit HeteroSpec's stratifier: run the static tree on calibration prompts, record per cycle
x = H(P*) (the cumulative top-K entropy of the most confident full-depth path) and y = TCR (the
1-based rank, among the verified nodes ordered by cumulative draft score, of the deepest accepted
node), on cycles that accepted at least one draft token; fit a depth-3 CART regression tree
(scikit-learn ``DecisionTreeRegressor``) and keep its split points as the 7 thresholds."""
from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

import torch

import heterospec_ext as hx

from .generate import SpeculativeGenerator
from .errors import DataError
from .policy import POLICY_THRESHOLDS, HeteroSpec, StaticTree


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
