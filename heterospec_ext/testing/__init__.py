"""Helpers for testing and benchmarking the ops (and code built on them): synthetic inputs with
the shapes engines produce (:mod:`.inputs`), output comparisons and an exact-error check
(:mod:`.checks`) and statistical checks of sampling (:mod:`.stats`, needs scipy). Import them
from here."""
from .checks import assert_topk_matches, raises_exactly
from .inputs import cycle_inputs, eagle_pool, random_parent_row, random_parents, run_cycle
from .stats import TokenPathTarget, assert_matches_exact_law, chi_square, joint_counts

__all__ = [
    "TokenPathTarget", "assert_matches_exact_law", "assert_topk_matches", "chi_square",
    "cycle_inputs", "eagle_pool", "joint_counts", "raises_exactly", "random_parent_row",
    "random_parents", "run_cycle",
]
