"""``heterospec bench``'s Table 1: aggregation over prompts, repeats, sets and temperatures, the
markdown table, the figure, and the DED ablation policy."""
import pytest

import heterospec as hs
from heterospec import bench
from heterospec.policy import HeteroSpec, StaticTree
from heterospec.testing import tiny_llama


def _run(t, s, p, m, rep, wall, new=10, cycles=5, accepted=5, verified=40, strata=None,
         identical=True):
    return {"temperature": t, "set": s, "prompt": p, "method": m, "repeat": rep,
            "wall_time_s": wall, "prefill_time_s": 0.0, "new_tokens": new, "cycles": cycles,
            "accepted_tokens": accepted, "verified_tokens": verified, "draft_time_s": 0.2 * wall,
            "verify_time_s": 0.7 * wall, "overhead_time_s": 0.1 * wall,
            "stratum_counts": strata or [], "identical_to_ar": identical}


def test_aggregate_medians_speedups_and_mean_row():
    runs = []
    for rep, (w_ar, w_sp) in enumerate([(2.0, 1.0), (4.0, 0.9), (2.2, 5.0)]):
        # medians: AR 2.2, HeteroSpec 1.0 on prompt a (the slow repeat is ignored)
        runs.append(_run(0.0, "x", "a", "ar", rep, w_ar, cycles=10, accepted=0, verified=10))
        runs.append(_run(0.0, "x", "a", "heterospec", rep, w_sp, strata=[1, 0, 2]))
    runs.append(_run(0.0, "y", "b", "ar", 0, 3.0, cycles=10, accepted=0, verified=10))
    runs.append(_run(0.0, "y", "b", "heterospec", 0, 1.0, cycles=4, accepted=6, verified=20,
                     strata=[0, 4, 0], identical=False))
    rows = bench.aggregate(runs, ["ar", "heterospec"], ["x", "y"], [0.0])
    get = {(r["set"], r["method"]): r for r in rows}
    x = get[("x", "heterospec")]
    assert x["speedup"] == pytest.approx(2.2)
    assert x["tau"] == pytest.approx(2.0)  # (5 accepted + 5 cycles) / 5
    assert x["calls"] == 5 and x["tokens"] == 40 and x["tokens_per_call"] == pytest.approx(8.0)
    assert x["stratum_counts"] == [1, 0, 2]
    assert x["draft_share"] == pytest.approx(0.2) and x["overhead_share"] == pytest.approx(0.1)
    y = get[("y", "heterospec")]
    assert y["speedup"] == pytest.approx(3.0) and y["tau"] == pytest.approx(2.5)
    mean = get[("mean", "heterospec")]
    assert mean["speedup"] == pytest.approx(2.6)  # mean over sets, as the paper averages
    assert mean["tokens"] == 60 and mean["calls"] == 9
    assert mean["identical_to_ar"] == 1  # prompt b was not identical
    assert mean["stratum_counts"] == [1, 4, 2]
    assert get[("mean", "ar")]["speedup"] == pytest.approx(1.0)
    table = bench.format_table(rows)
    assert "| mean | HeteroSpec | 2.60× |" in table


def test_sampling_rows_have_no_identity_column_and_figure_is_written(tmp_path):
    runs = [_run(1.0, "x", "a", "ar", 0, 2.0), _run(1.0, "x", "a", "static", 0, 1.0),
            _run(0.0, "x", "a", "ar", 0, 2.0), _run(0.0, "x", "a", "static", 0, 1.5)]
    rows = bench.aggregate(runs, ["ar", "static"], ["x"], [0.0, 1.0])
    assert all(r["identical_to_ar"] is None for r in rows if r["temperature"] == 1.0)
    out = tmp_path / "fig.png"
    bench.plot(rows, str(out), title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ded_ablation_keeps_depths_and_verifies_the_static_n():
    full = HeteroSpec(depth=5, top_k=6, total_tokens=30)
    ded = HeteroSpec(depth=5, top_k=6, total_tokens=30, prune_top_n=False)
    assert ded.policy_t[:, 0].tolist() == full.policy_t[:, 0].tolist()
    assert ded.policy_t[:, 1].tolist() == [30] * 8
    assert full.policy_t[0, 1] < 30  # the full policy prunes the lowest stratum


def test_run_bench_end_to_end_on_a_tiny_model(tmp_path):
    """run_bench with every kind of method on a tiny Llama: our methods decode exactly like AR
    in float32, the HF generate baselines run, the best one is picked and every row gets its
    ratio to it, and only the best HF configuration runs at T > 0."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(64)}, unk_token="w2"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w2")
    target = hs.CausalLM(tiny_llama(64, seed=1, logit_scale=20.0), tokenizer, name="tiny")
    drafter = hs.ModelDrafter(hs.CausalLM(tiny_llama(64, seed=2, logit_scale=20.0), tokenizer,
                                          name="d"), top_k=2)
    policy = HeteroSpec(depth=2, top_k=2, total_tokens=5, thresholds=[0.5 * i for i in range(7)])
    cost = HeteroSpec(depth=2, top_k=2, total_tokens=5, thresholds=policy.thresholds,
                      table=[[1, 4]] * 3 + [[0, 5]] * 5)
    cfg = bench.BenchConfig(sets=["gsm8k", "mtbench"], prompts_per_set=1, max_new_tokens=6,
                            repeats=2, temperatures=[0.0, 1.0], ablation=True, cost_policy=cost,
                            tuned_static=StaticTree(depth=1, top_k=2, total_tokens=4,
                                                    name="tuned"),
                            hf_configs=["float32:eager", "float32:sdpa"],
                            labels={"model": "tiny"})
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = bench.run_bench(target, drafter, policy, cfg)
    finally:
        torch.set_num_threads(before)
    methods = {r["method"] for r in res.rows}
    assert methods == {"ar", "static", "tuned", "ded", "heterospec", "cost", "hf:float32:eager",
                       "hf:float32:sdpa"}
    assert res.meta["tuned_static"]["depth"] == 1 and res.meta["tuned_static"]["total_tokens"] == 4
    best = res.meta["best_hf"]
    assert best in ("hf:float32:eager", "hf:float32:sdpa")
    at = {(r["temperature"], r["set"], r["method"]): r for r in res.rows}
    for m in ("static", "tuned", "ded", "heterospec", "cost"):
        assert at[(0.0, "mean", m)]["identical_to_ar"] == 2  # both prompts, float32: exact
    assert at[(0.0, "mean", "tuned")]["tokens_per_call"] == 4
    assert at[(0.0, "mean", best)]["speedup_vs_hf"] == pytest.approx(1.0)
    assert all(r["speedup_vs_hf"] is not None for r in res.rows)
    # at T = 1 only the best HF configuration ran
    hf_t1 = {m for (t, s, m) in at if t == 1.0 and m.startswith("hf:")}
    assert hf_t1 == {best}
    assert len(res.runs) == 2 * 2 * (8 + 7)  # prompts x repeats x (methods at T=0 + at T=1)
    # the repeats are interleaved: per prompt, one round of every method, then the reverse round
    assert sorted(r["run_index"] for r in res.runs) == list(range(len(res.runs)))
    for t in (0.0, 1.0):
        for prompt in {r["prompt"] for r in res.runs}:
            mine = sorted((r for r in res.runs if r["temperature"] == t and r["prompt"] == prompt),
                          key=lambda r: r["run_index"])
            first = [r["method"] for r in mine if r["repeat"] == 0]
            assert [r["repeat"] for r in mine] == [0] * len(first) + [1] * len(first)
            assert [r["method"] for r in mine if r["repeat"] == 1] == first[::-1]
    table = bench.format_table(res.rows)
    assert "HF generate fp32 eager" in table and "HeteroSpec cost-aware" in table
    assert "static tree, tuned" in table


def test_tuned_static_tree_must_share_the_drafter_top_k():
    from heterospec.errors import GenerationConfigError

    target = hs.CausalLM(tiny_llama(32, seed=1), name="tiny")
    drafter = hs.ModelDrafter(hs.CausalLM(tiny_llama(32, seed=2), name="d"), top_k=2)
    policy = HeteroSpec(depth=2, top_k=2, total_tokens=5, thresholds=[0.5 * i for i in range(7)])
    cfg = bench.BenchConfig(no_hf=True, tuned_static=StaticTree(depth=2, top_k=3, total_tokens=5))
    with pytest.raises(GenerationConfigError, match="top_k=3"):
        bench.run_bench(target, drafter, policy, cfg)
