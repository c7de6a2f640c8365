"""Calibration: the CART thresholds, counterfactual acceptance of smaller trees (checked against
what the decode itself accepted), the cost-aware per-stratum choice (against brute force), and
policy tables in policy JSON."""
import itertools
import json

import pytest
import torch

import heterospec as hs
from heterospec import calibrate as cal
from heterospec.testing import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 32


def test_fit_thresholds_finds_the_step():
    # TCR jumps from 1 to 9 at H = 2: the first split of the regression tree sits between
    samples = [(h / 10, 1) for h in range(0, 20)] + [(h / 10, 9) for h in range(21, 40)]
    cuts = cal.fit_thresholds(samples, min_samples_leaf=1)
    assert len(cuts) == cal.NUM_THRESHOLDS and cuts == sorted(cuts)
    assert any(1.9 <= c <= 2.1 for c in cuts)
    with pytest.raises(ValueError, match="at least 8"):
        cal.fit_thresholds(samples[:5])


def test_accepted_path_follows_matching_children():
    #        0
    #      /   \\
    #   1(a)   2(b)
    #    |      |
    #   3(c)   4(d)
    tokens = torch.tensor([9, 1, 2, 3, 4])
    parents = torch.tensor([-1, 0, 0, 1, 2])
    assert cal.accepted_path(tokens, parents, 5, [2, 4, 7]) == (2, 4)
    assert cal.accepted_path(tokens, parents, 5, [1, 4]) == (1, 1)
    assert cal.accepted_path(tokens, parents, 5, [5]) == (0, 0)
    assert cal.accepted_path(tokens, parents, 3, [1, 3]) == (1, 1)  # node 3 not in a 3-node tree


def test_counterfactual_acceptance_equals_the_decodes_own():
    """For the tree the decode actually verified, the counterfactual count must equal what
    fused_verify accepted, cycle by cycle; smaller trees never accept more than bigger ones
    drawn from the same pool."""
    target = hs.CausalLM(tiny_llama(VOCAB, seed=1, logit_scale=30.0), name="t")
    draft = hs.CausalLM(tiny_llama(VOCAB, seed=1, logit_scale=30.0), name="d")  # = target
    draft.model.lm_head.weight.data.add_(0.3 * torch.randn_like(draft.model.lm_head.weight))
    base = hs.StaticTree(depth=2, top_k=3, total_tokens=8)
    alpha = 2
    deep = hs.SpeculativeGenerator(target, hs.ModelDrafter(draft, top_k=3),
                                   hs.StaticTree(depth=base.depth + alpha, top_k=3,
                                                 total_tokens=8))
    grid = (2, 3, 4, 6, 8)
    records = cal.collect_counterfactual(deep, [[3, 9, 27, 4], [5, 1]], 30, base.levels, alpha,
                                         base.total_tokens, grid)
    assert len(records) >= 5
    assert any(r["actual"] > 0 for r in records)
    for r in records:
        assert r["accepted"][(alpha, 8)] == r["actual"]
        for e in range(alpha + 1):
            values = [r["accepted"][(e, n)] for n in grid if (e, n) in r["accepted"]]
            assert values == sorted(values)  # more nodes never accept less
            assert all(v <= base.levels + e for v in values)
        assert (r["tcr"] is None) == (r["accepted"][(0, 8)] == 0)


def _brute_force(records, thresholds, costs, base_levels, configs):
    import bisect

    strata = sorted({bisect.bisect_left(thresholds, r["H"]) for r in records})
    best, best_rate = None, -1.0
    for choice in itertools.product(configs, repeat=len(strata)):
        table = {s: c for s, c in zip(strata, choice)}
        tokens = seconds = 0.0
        for r in records:
            e, n = table[bisect.bisect_left(thresholds, r["H"])]
            tokens += r["accepted"][(e, n)] + 1
            seconds += cal.cycle_seconds(costs, base_levels + e, n, 1e-3)
        if tokens / seconds > best_rate:
            best, best_rate = table, tokens / seconds
    return best, best_rate


def test_cost_aware_choice_is_the_best_table():
    g = torch.Generator().manual_seed(0)
    configs = [(e, n) for e in range(3) for n in (2, 4, 8)]
    records = []
    for i in range(60):
        h = float(torch.rand(1, generator=g)) * 3
        # low entropy: deep, wide trees accept much; high entropy: almost nothing
        skill = max(0.0, 1.0 - h / 2)
        acc = {(e, n): int(round(skill * min(2 + e, n - 1) * float(torch.rand(1, generator=g))))
               for e, n in configs}
        records.append({"H": h, "accepted": acc})
    thresholds = [1.0, 2.0, 9.0, 9.0, 9.0, 9.0, 9.0]  # three occupied strata (brute force: 9^3)
    costs = {"draft_root_s": 2e-3, "draft_level_s": 1.5e-3,
             "verify_s": {2: 20e-3, 4: 21e-3, 8: 26e-3}}
    table, rate = cal.choose_cost_aware(records, thresholds, costs, 2)
    want, want_rate = _brute_force(records, thresholds, costs, 2, configs)
    assert rate == pytest.approx(want_rate, rel=1e-9)
    for s, c in want.items():
        assert tuple(table[s]) == c or cal.modelled_tokens_per_s(
            records, thresholds, table, costs, 2) == pytest.approx(want_rate, rel=1e-9)
    assert cal.modelled_tokens_per_s(records, thresholds, table, costs, 2) == \
        pytest.approx(want_rate, rel=1e-9)
    # empty strata get the overall best single configuration
    assert all(len(row) == 2 for row in table) and len(table) == 8


def test_policy_table_round_trip_and_errors(tmp_path):
    table = [[2, 5], [1, 4], [0, 8], [0, 8], [0, 6], [0, 3], [0, 2], [0, 2]]
    pol = hs.HeteroSpec(depth=2, top_k=3, total_tokens=8, thresholds=[0.1 * i for i in range(7)],
                        table=table)
    assert pol.rule == "cost-aware" and pol.policy_t.tolist() == table
    assert pol.n_max == 8 and pol.max_extra_depth == 2
    path = tmp_path / "p.json"
    hs.save_policy(pol, str(path), calibration={"x": 1})
    data = json.loads(path.read_text())
    assert data["policy_table"] == table and data["rule"] == "cost-aware"
    back = hs.load_policy(str(path))
    assert back.policy_t.tolist() == table and back.rule == "cost-aware"
    with pytest.raises(hs.PolicyFileError, match="policy_table"):
        hs.load_policy(str(path), depth=3)
    with pytest.raises(hs.GenerationConfigError, match="8 rows"):
        hs.HeteroSpec(depth=2, top_k=3, total_tokens=8, thresholds=[0.0] * 7, table=table[:3])
    # and it decodes exactly like the target
    target = hs.CausalLM(tiny_llama(VOCAB, seed=2, logit_scale=30.0))
    gen = hs.SpeculativeGenerator(target, hs.ModelDrafter(target, top_k=3), back)
    want = hs.autoregressive_generate(target, [4, 5, 6], 20).token_ids
    assert gen.generate([4, 5, 6], 20).token_ids == want


def test_monotone_verify_costs_pools_the_dips_and_keeps_one_row():
    """The cost curve handed to the cost-aware choice is non-decreasing from N = 2 on: a dip
    is pooled with the sizes it undercuts (least squares), N = 1 stays as measured."""
    from heterospec.calibrate import monotone_verify_costs

    measured = {1: 30.0, 2: 20.0, 4: 23.6, 5: 21.6, 8: 25.0, 12: 24.4, 15: 21.7, 16: 25.3,
                24: 42.3}
    fit = monotone_verify_costs(measured)
    assert fit[1] == 30.0 and fit[2] == 20.0 and fit[24] == 42.3
    sizes = sorted(n for n in fit if n >= 2)
    assert all(fit[a] <= fit[b] + 1e-12 for a, b in zip(sizes, sizes[1:]))
    # 4 and 5 pool to their mean; 8, 12 and 15 to theirs; 16 stays
    assert fit[4] == pytest.approx((23.6 + 21.6) / 2) and fit[5] == fit[4]
    assert fit[15] == pytest.approx((25.0 + 24.4 + 21.7) / 3)
    assert fit[8] == fit[12] == fit[15] and fit[16] == 25.3
    assert monotone_verify_costs({2: 1.0, 3: 2.0}) == {2: 1.0, 3: 2.0}  # already monotone
