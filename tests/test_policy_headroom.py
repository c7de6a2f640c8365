"""bench/tools/tree_policy_headroom.py: its per-cycle oracle and its best split of the cycles into
ranges of a signal are the true optima, checked by brute force on small random cycle sets."""
import importlib.util
import itertools
import os
import random

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tool():
    path = os.path.join(ROOT, "bench", "tools", "tree_policy_headroom.py")
    spec = importlib.util.spec_from_file_location("tree_policy_headroom", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CONFIGS = [(0, 2), (0, 8), (1, 16)]
SECONDS = {(0, 2): 0.030, (0, 8): 0.034, (1, 16): 0.040}


def _cycles(n, seed):
    """Cycles with a signal ``H`` and what each tree would accept: bigger trees accept at least
    as much, and a low signal means more (so splits by the signal matter)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        h = rng.random()
        small = int(rng.random() < 0.6 - 0.4 * h)
        mid = small + int(rng.random() < 0.5 - 0.3 * h)
        big = mid + rng.choice([0, 0, 1, 2]) * int(h < 0.5)
        out.append({"H": h, "accepted": {(0, 2): small, (0, 8): mid, (1, 16): big}})
    return out


def _brute_split(tool, records, strata):
    rs = sorted(records, key=lambda r: r["H"])
    n, best = len(rs), float("-inf")
    for k in range(1, strata + 1):
        for cuts in itertools.combinations(range(1, n), k - 1):
            thresholds = [rs[c]["H"] for c in cuts]
            for table in itertools.product(CONFIGS, repeat=k):
                best = max(best, tool.split_rate(records, "H", (thresholds, list(table)),
                                                 SECONDS))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_best_split_is_the_brute_force_optimum(tool, seed):
    records = _cycles(9, seed)
    static = tool.rate(records, [(1, 16)] * len(records), SECONDS)
    for strata, start in itertools.product((1, 2, 3), (0.0, static)):
        split = tool.best_split(records, "H", strata, CONFIGS, SECONDS, start)
        assert len(split[1]) <= strata and len(split[0]) == len(split[1]) - 1
        got = tool.split_rate(records, "H", split, SECONDS)
        assert got == pytest.approx(_brute_split(tool, records, strata), rel=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_oracle_is_the_best_per_cycle_choice(tool, seed):
    records = _cycles(8, seed)
    brute = max(tool.rate(records, list(choice), SECONDS)
                for choice in itertools.product(CONFIGS, repeat=len(records)))
    static = tool.rate(records, [(1, 16)] * len(records), SECONDS)
    for start in (0.0, static, 10 * static):  # Dinkelbach converges from any starting ratio
        assert tool.oracle(records, CONFIGS, SECONDS, start) == pytest.approx(brute, rel=1e-12)
    # one range can do no better than the best single tree, the oracle no worse than any split
    one = tool.best_split(records, "H", 1, CONFIGS, SECONDS, static)
    single = max(tool.rate(records, [c] * len(records), SECONDS) for c in CONFIGS)
    assert tool.split_rate(records, "H", one, SECONDS) == pytest.approx(single, rel=1e-12)
    assert brute >= tool.split_rate(
        records, "H", tool.best_split(records, "H", 3, CONFIGS, SECONDS, static), SECONDS) - 1e-12


def test_tau_table_stops_where_a_pool_cannot_fill_the_tree(tool):
    records = [{"accepted": {(0, 2): 1, (0, 4): 2, (1, 2): 1}},
               {"accepted": {(0, 2): 0, (1, 2): 0, (1, 4): 3}}]
    assert tool.tau_table(records, 3, 1) == {3: {2: 1.5}, 4: {2: 1.5}}
