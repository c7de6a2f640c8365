"""Driver tests on small randomly initialised Llamas: exact greedy, KV caches, sampling
distribution (chi-square, with a planted bug it must catch), seeds and bad input."""
import itertools
import json

import pytest
import torch

import heterospec as hs
import heterospec_ext as hx
from heterospec.testing import (FakeTokenizer, IgnoresMask, NoPositions,
                                assert_cache_matches_fresh, greedy_by_full_forwards,
                                processed_probs, run_cli, tiny_llama)

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 32  # the tiny_pair fixture's vocabulary


POLICIES = [
    hs.StaticTree(depth=1, top_k=1, total_tokens=2),  # a chain of one
    hs.StaticTree(depth=3, top_k=3, total_tokens=8),
    hs.StaticTree(depth=5, top_k=4, total_tokens=30),
    hs.HeteroSpec(depth=3, top_k=3, total_tokens=10, thresholds=[0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0]),
    hs.HeteroSpec(depth=2, top_k=2, total_tokens=6, thresholds=[1e9] * 7),  # always stratum 0
    hs.HeteroSpec(depth=2, top_k=2, total_tokens=6, thresholds=[-1.0] * 7),  # always the last
]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: str(p.describe()))
def test_greedy_lossless_and_caches(tiny_pair, policy):
    target, draft = tiny_pair
    drafter = hs.ModelDrafter(draft, top_k=policy.top_k)
    gen = hs.SpeculativeGenerator(target, drafter, policy)
    for prompt in ([5], [3, 9, 27, 4, 4, 11, 2]):
        want = greedy_by_full_forwards(target, prompt, 24)
        ar = hs.autoregressive_generate(target, prompt, 24)
        assert ar.token_ids == want
        res = gen.generate(prompt, 24)
        assert res.token_ids == want
        st = res.stats
        assert st.new_tokens == 24 and st.cycles >= 1
        assert st.verified_tokens >= st.cycles and st.tau == pytest.approx(
            (st.accepted_tokens + st.cycles) / st.cycles)
        assert st.accepted_tokens + st.cycles >= 24  # every cycle emits accepted + 1
        if policy.adaptive:
            assert sum(st.stratum_counts) == st.cycles
        # both caches equal a plain forward over the committed tokens
        assert gen.cache.get_seq_length() == len(gen.committed) - 1
        assert_cache_matches_fresh(target, gen.cache, gen.committed)
        assert_cache_matches_fresh(draft, drafter.cache, gen.committed)


def test_forced_strata_shape_the_tree(tiny_pair):
    target, draft = tiny_pair
    low = hs.HeteroSpec(depth=2, top_k=2, total_tokens=6, thresholds=[1e9] * 7)
    high = hs.HeteroSpec(depth=2, top_k=2, total_tokens=6, thresholds=[-1.0] * 7)
    seen = {}
    for name, pol in (("low", low), ("high", high)):
        gen = hs.SpeculativeGenerator(target, hs.ModelDrafter(draft, top_k=2), pol)
        sizes = []
        gen.on_cycle = lambda c: sizes.append((c["pool"].levels, c["nodes"], c["stratum"]))
        gen.generate([7, 8], 12)
        seen[name] = sizes
    extra0, n0 = low.policy_t[0].tolist()
    assert all(lv == 3 + extra0 and s == 0 for lv, _, s in seen["low"]), seen["low"]
    assert all(nodes <= n0 for _, nodes, _ in seen["low"])
    assert all(lv == 3 and s == 7 and nodes <= 6 for lv, nodes, s in seen["high"]), seen["high"]


def test_draft_is_target_accepts_nearly_everything(tiny_pair):
    target, _ = tiny_pair
    gen = hs.SpeculativeGenerator(target, hs.ModelDrafter(target, top_k=2),
                                  hs.StaticTree(depth=3, top_k=2, total_tokens=6))
    res = gen.generate([4, 5, 6], 30)
    assert res.token_ids == greedy_by_full_forwards(target, [4, 5, 6], 30)
    assert res.stats.tau > 4.0  # max 5 with 4 levels; fp ties may cost a little


# ----------------------------------------------------------------------------- sampling

SAMPLE_VOCAB = 8
SAMPLING = dict(temperature=0.8, top_k=6, top_p=0.95)


def exact_first_three(lm, prompt, temperature, top_k, top_p):
    """Exact distribution of the first three sampled tokens, by enumeration."""
    def dist(prefixes):
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor(prefixes)).logits[:, -1]
        return [processed_probs(row, temperature, top_k, top_p) for row in logits]

    v = lm.vocab_size
    probs = {}
    p1 = dist([prompt])[0]
    firsts = list(range(v))
    p2 = dist([prompt + [a] for a in firsts])
    pairs = list(itertools.product(range(v), repeat=2))
    p3 = dist([prompt + list(ab) for ab in pairs])
    for i, (a, b) in enumerate(pairs):
        for c in range(v):
            probs[(a, b, c)] = float(p1[a] * p2[a][b] * p3[i][c])
    return probs


def chi_square_pvalue(counts, probs, runs):
    from scipy.stats import chisquare

    keys = sorted(probs, key=lambda k: -probs[k])
    obs, exp, rest_o, rest_e = [], [], 0, 0.0
    for key in keys:
        e = probs[key] * runs
        if e >= 5:
            obs.append(counts.get(key, 0))
            exp.append(e)
        else:
            rest_o += counts.get(key, 0)
            rest_e += e
    if rest_e > 0:
        obs.append(rest_o)
        exp.append(rest_e)
    # a sequence with zero exact probability must never appear
    assert all(probs.get(k, 0.0) > 0 for k in counts), "sampled a zero-probability sequence"
    return chisquare(obs, exp).pvalue, len(obs)


def _sample_counts(gen, prompt, runs):
    counts = {}
    for seed in range(runs):
        res = gen.generate(prompt, 3, sampling=hs.SamplingParams(seed=seed, **SAMPLING))
        key = tuple(res.token_ids)
        counts[key] = counts.get(key, 0) + 1
    return counts


@pytest.fixture(scope="module")
def sampling_setup():
    # logit scale 6: ~45 three-token sequences with >= 5 expected counts in 800 runs
    target = hs.CausalLM(tiny_llama(SAMPLE_VOCAB, seed=11, logit_scale=6.0), name="t")
    draft = hs.CausalLM(tiny_llama(SAMPLE_VOCAB, seed=12, logit_scale=6.0), name="d")
    prompt = [2, 5, 3]
    probs = exact_first_three(target, prompt, **SAMPLING)
    return target, draft, prompt, probs


RUNS = 800


SAMPLING_POLICIES = [
    hs.StaticTree(depth=2, top_k=3, total_tokens=8),
    # always stratum 0: one extra level and a pruned tree, both chosen from draft data only
    hs.HeteroSpec(depth=2, top_k=3, total_tokens=8, thresholds=[1e9] * 7),
]


@pytest.mark.slow
@pytest.mark.parametrize("policy", SAMPLING_POLICIES, ids=lambda p: p.name)
def test_sampling_matches_exact_ancestral_distribution(sampling_setup, policy):
    target, draft, prompt, probs = sampling_setup
    gen = hs.SpeculativeGenerator(target, hs.ModelDrafter(draft, top_k=3), policy)
    counts = _sample_counts(gen, prompt, RUNS)
    pvalue, bins = chi_square_pvalue(counts, probs, RUNS)
    assert bins >= 20
    assert pvalue > 1e-3, (pvalue, bins)


_REAL_FUSED_VERIFY = hx.fused_verify


def _bonus_from_p_not_residual(target_logits, candidates, parents, **kw):
    """Planted bug: after rejections, draw the emitted token from p instead of the residual."""
    res = _REAL_FUSED_VERIFY(target_logits, candidates, parents, **kw)
    a = int(res.num_accepted[0])
    last = int(res.accepted_nodes[0, a])
    p = processed_probs(target_logits[0, last], float(kw["temperature"][0]),
                        int(kw["top_k"][0]), float(kw["top_p"][0]))
    u = float(kw["uniforms"][0, 0])
    tok = int(torch.searchsorted(torch.cumsum(p, 0), u, right=True).clamp(max=p.numel() - 1))
    out = res.out_tokens.clone()
    out[0, a] = tok
    return hx.VerifyResult(out, res.accepted_nodes, res.num_accepted)


@pytest.mark.slow
def test_sampling_test_catches_planted_bug(sampling_setup, monkeypatch):
    target, draft, prompt, probs = sampling_setup
    gen = hs.SpeculativeGenerator(target, hs.ModelDrafter(draft, top_k=3),
                                  hs.StaticTree(depth=2, top_k=3, total_tokens=8))
    monkeypatch.setattr(hx, "fused_verify", _bonus_from_p_not_residual)
    counts = _sample_counts(gen, prompt, RUNS)
    pvalue, _ = chi_square_pvalue(counts, probs, RUNS)
    assert pvalue < 1e-6, pvalue


def test_seed_reproducible_and_ar_sampling_distribution_shape(tiny_pair):
    target, draft = tiny_pair
    gen = hs.SpeculativeGenerator(target, hs.ModelDrafter(draft, top_k=3),
                                  hs.HeteroSpec(depth=2, top_k=3, total_tokens=8))
    sp = hs.SamplingParams(temperature=1.0, top_k=10, top_p=0.9, seed=123)
    a = gen.generate([1, 2, 3], 20, sampling=sp).token_ids
    b = gen.generate([1, 2, 3], 20, sampling=sp).token_ids
    assert a == b
    others = {tuple(gen.generate([1, 2, 3], 20, sampling=hs.SamplingParams(
        temperature=1.0, seed=s)).token_ids) for s in range(4)}
    assert len(others) > 1
    ar1 = hs.autoregressive_generate(target, [1, 2, 3], 10, hs.SamplingParams(temperature=1.0, seed=5))
    ar2 = hs.autoregressive_generate(target, [1, 2, 3], 10, hs.SamplingParams(temperature=1.0, seed=5))
    assert ar1.token_ids == ar2.token_ids


def test_stop_token_ends_generation(tiny_pair):
    target, draft = tiny_pair
    gen = hs.SpeculativeGenerator(target, hs.ModelDrafter(draft, top_k=2),
                                  hs.StaticTree(depth=3, top_k=2, total_tokens=6))
    full = gen.generate([9, 9], 20).token_ids
    stop = full[5]
    cut = full.index(stop)
    res = gen.generate([9, 9], 20, stop_token_ids=[stop])
    assert res.token_ids == full[:cut + 1] and res.stats.stopped_on_eos


# ----------------------------------------------------------------------------- bad input


def test_model_without_4d_mask_support_is_rejected():
    with pytest.raises(hs.UnsupportedModelError, match="4D attention mask"):
        hs.CausalLM(IgnoresMask(tiny_llama(VOCAB, seed=3)))
    with pytest.raises(hs.UnsupportedModelError, match="position_ids"):
        hs.CausalLM(NoPositions(tiny_llama(VOCAB, seed=3)))


def test_tokenizer_mismatch_is_rejected(tiny_pair):
    target, draft = tiny_pair
    other = hs.CausalLM(tiny_llama(VOCAB + 8, seed=4), name="other")
    with pytest.raises(hs.TokenizerMismatchError, match="vocabulary size"):
        hs.SpeculativeGenerator(target, hs.ModelDrafter(other, top_k=2), hs.StaticTree(2, 2, 4))
    t2 = hs.CausalLM(target.model, FakeTokenizer({"a": 0, "b": 1}), check_tree_attention=False)
    d2 = hs.CausalLM(draft.model, FakeTokenizer({"a": 1, "b": 0}), check_tree_attention=False)
    with pytest.raises(hs.TokenizerMismatchError, match="tokenizers differ"):
        hs.SpeculativeGenerator(t2, hs.ModelDrafter(d2, top_k=2), hs.StaticTree(2, 2, 4))


def test_policy_file_errors(tmp_path):
    with pytest.raises(hs.PolicyFileError, match="not found"):
        hs.load_policy(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(hs.PolicyFileError, match="not valid JSON"):
        hs.load_policy(str(bad))
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"thresholds": [1, 2]}))
    with pytest.raises(hs.PolicyFileError, match="not a heterospec policy"):
        hs.load_policy(str(wrong))
    unsorted = tmp_path / "unsorted.json"
    unsorted.write_text(json.dumps({"format": "heterospec-policy", "version": 1,
                                    "thresholds": [3, 2, 1, 0, 0, 0, 0]}))
    with pytest.raises(hs.PolicyFileError, match="ascending"):
        hs.load_policy(str(unsorted))
    good = hs.HeteroSpec(depth=3, top_k=4, total_tokens=16, thresholds=[0.1 * i for i in range(7)])
    path = tmp_path / "good.json"
    hs.save_policy(good, str(path), target="tiny")
    again = hs.load_policy(str(path))
    assert again.thresholds == pytest.approx(good.thresholds)
    assert torch.equal(again.policy_t, good.policy_t)


def test_shipped_default_policy_loads():
    pol = hs.load_policy(hs.DEFAULT_POLICY_FILE)
    assert len(pol.thresholds) == 7 and pol.policy_t.shape == (8, 2)


def test_generation_argument_errors(tiny_pair):
    target, draft = tiny_pair
    gen = hs.SpeculativeGenerator(target, hs.ModelDrafter(draft, top_k=2), hs.StaticTree(2, 2, 4))
    for bad in (0, -3, 2.5, None):
        with pytest.raises(hs.GenerationConfigError, match="max_new_tokens"):
            gen.generate([1, 2], bad)
        with pytest.raises(hs.GenerationConfigError, match="max_new_tokens"):
            hs.autoregressive_generate(target, [1, 2], bad)
    with pytest.raises(hs.GenerationConfigError, match="empty"):
        gen.generate([], 4)
    with pytest.raises(hs.GenerationConfigError, match="top_p"):
        gen.generate([1], 4, sampling=hs.SamplingParams(temperature=1.0, top_p=0.0))
    with pytest.raises(hs.GenerationConfigError, match="temperature"):
        gen.generate([1], 4, sampling=hs.SamplingParams(temperature=-1.0))
    with pytest.raises(hs.GenerationConfigError, match="depth"):
        hs.StaticTree(depth=0)


def test_missing_model_paths(tmp_path):
    with pytest.raises(hs.ModelLoadError, match="does not exist"):
        hs.load_target(str(tmp_path / "nope.gguf"))
    with pytest.raises(hs.ModelLoadError, match="config.json"):
        hs.load_target(str(tmp_path))
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"x")
    with pytest.raises(hs.ModelLoadError, match="gguf"):
        hs.load_target(str(not_gguf))


def test_cli_bad_input_is_one_line_not_a_traceback(tmp_path):
    bad = tmp_path / "policy.json"
    bad.write_text("[1, 2")
    for args, needle in (
        (["generate", "--model", str(tmp_path / "missing.gguf"), "--prompt", "hi"], "does not exist"),
        (["generate", "--policy", str(bad), "--prompt", "hi"], "not valid JSON"),
        (["generate", "--policy", str(tmp_path / "none.json"), "--prompt", "hi"], "not found"),
    ):
        proc = run_cli(*args)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr and needle in proc.stderr, proc.stderr[-2000:]


def test_int8_draft_under_a_bfloat16_target():
    """The int8 self-draft of a bfloat16 target (a float32 copy is quantised, so its dynamic int8
    linears never see bfloat16 activations; this used to raise "expected scalar type Float but
    found BFloat16"). Its drafts are accepted, and on this peaked model the output is the bf16
    AR loop's token for token."""
    target = hs.CausalLM(tiny_llama(vocab=VOCAB, seed=3, logit_scale=6.0).to(torch.bfloat16))
    drafter = hs.int8_drafter(target, top_k=3)
    gen = hs.SpeculativeGenerator(target, drafter, hs.StaticTree(depth=3, top_k=3,
                                                                 total_tokens=8))
    res = gen.generate([1, 2, 3], 24)
    assert res.token_ids == hs.autoregressive_generate(target, [1, 2, 3], 24).token_ids
    assert res.stats.tau > 1.5, res.stats
