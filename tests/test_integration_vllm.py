"""heterospec_ext.integrations.vllm: vLLM's published rejection-sampler facts, agreement with a
float64 oracle of vLLM's semantics on hundreds of random chains, top-k / top-p masking, seeded
reproducibility, a chi-square test against the exact target law that rejects a planted bug,
malformed input and install()."""
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from heterospec_ext.integrations import reference as ref
from heterospec_ext.integrations import vllm as vl
from heterospec_ext.testing import (TokenPathTarget, assert_matches_exact_law, chi_square,
                                    joint_counts)

PLACEHOLDER = vl.PLACEHOLDER_TOKEN_ID


def metadata_for(spec_tokens, device):
    """vLLM's SpecDecodeMetadata fields for per-request draft lists."""
    num = [len(s) for s in spec_tokens]
    cu = torch.cumsum(torch.tensor(num, dtype=torch.int32), 0).to(torch.int32)
    return SimpleNamespace(
        draft_token_ids=torch.tensor([t for s in spec_tokens for t in s], dtype=torch.int32,
                                     device=device),
        num_draft_tokens=num, max_spec_len=max(num, default=0), cu_num_draft_tokens=cu.to(device),
        bonus_logits_indices=(cu.to(torch.int64) + torch.arange(len(num))).to(device))


def sampling(bs, device, temperature=None, top_k=None, top_p=None, generators=None):
    return SimpleNamespace(all_greedy=temperature is None, all_random=temperature is not None,
                           temperature=None if temperature is None else temperature.to(device),
                           top_k=None if top_k is None else top_k.to(device),
                           top_p=None if top_p is None else top_p.to(device),
                           generators=generators or {}, no_penalties=True,
                           bad_words_token_ids={}, allowed_token_ids_mask=None,
                           max_num_logprobs=None)


def argmax_logits(output_tokens, device, vocab=100):
    """[T + bs, V] rows whose argmax is each request's output token at that position (the last
    row of a request is its bonus row), as vLLM's create_logits_tensor builds them."""
    rows = [t for tokens in output_tokens for t in tokens]
    logits = torch.full((len(rows), vocab), -100.0, device=device)
    logits[torch.arange(len(rows)), torch.tensor(rows)] = 100.0
    return logits


# vLLM tests/v1/sample/test_rejection_sampler.py (greedy): (drafts, target argmax per position
# with the bonus last, expected output).
VLLM_GREEDY_CASES = {
    "perfect_match": ([[1, 2, 3]], [[1, 2, 3, 4]], [[1, 2, 3, 4]]),
    "early_mismatch": ([[1, 2, 3]], [[1, 5, 3, 4]], [[1, 5, PLACEHOLDER, PLACEHOLDER]]),
    "multiple_sequences": ([[1, 2], [3]], [[1, 2, 5], [3, 4]], [[1, 2, 5], [3, 4, PLACEHOLDER]]),
    "single_token": ([[1]], [[1, 2]], [[1, 2]]),
    "empty_sequence": ([[]], [[5]], [[5]]),
    "multiple_mismatches": ([[1, 2, 3], [4, 5, 6]], [[1, 2, 7, 6], [4, 8, 6, 9]],
                            [[1, 2, 7, PLACEHOLDER], [4, 8, PLACEHOLDER, PLACEHOLDER]]),
    "param_perfect": ([[1, 2]], [[1, 2, 3]], [[1, 2, 3]]),
    "param_first_mismatch": ([[1]], [[2, 3]], [[2, PLACEHOLDER]]),
    "param_mixed": ([[1, 2], [3, 4]], [[1, 5, 6], [3, 4, 7]], [[1, 5, PLACEHOLDER], [3, 4, 7]]),
}


@pytest.mark.parametrize("case", list(VLLM_GREEDY_CASES))
def test_vllm_greedy_published_cases(device, case):
    spec, argmax, expected = VLLM_GREEDY_CASES[case]
    logits = argmax_logits(argmax, device)
    out = vl.RejectionSampler()(metadata_for(spec, device), None, logits,
                                sampling(len(spec), device))
    assert out.sampled_token_ids.dtype == torch.int32
    assert out.sampled_token_ids.tolist() == expected
    # vLLM's convention of a bonus sampled outside: same result when it is passed in
    md = metadata_for(spec, device)
    bonus = torch.tensor([a[-1] for a in argmax], device=device)
    got = vl.rejection_sample(md.draft_token_ids, md.num_draft_tokens, md.max_spec_len,
                              md.cu_num_draft_tokens, None, logits, sampling(len(spec), device),
                              bonus_token_ids=bonus)
    assert got.tolist() == expected
    # and the passed-in bonus really is what a fully accepted request emits
    shifted = [row[:] for row in expected]
    for b, drafts in enumerate(spec):
        if shifted[b][:len(drafts)] == drafts:
            shifted[b][len(drafts)] += 1
    assert vl.rejection_sample(md.draft_token_ids, md.num_draft_tokens, md.max_spec_len,
                               md.cu_num_draft_tokens, None, logits, sampling(len(spec), device),
                               bonus_token_ids=bonus + 1).tolist() == shifted


# ----------------------------------------------------------------------------- oracle agreement


def rational_rows(count, vocab, boost_tokens, gen, total=64):
    """[count, V] probabilities k / total (exact in float32), heavier on ``boost_tokens``."""
    weights = torch.randint(0, 2, (count, vocab), generator=gen).double()
    for row, token in boost_tokens:
        weights[row, token] += float(torch.randint(2, 30, (1,), generator=gen))
    weights[:, 0] += 1
    weights = torch.floor(weights / weights.sum(-1, keepdim=True) * total)
    weights[:, 0] += total - weights.sum(-1)
    return weights / total


def random_batch(gen, dtype, *, with_q, equal_lengths=False):
    """Chains with vLLM's layout: ragged draft counts (0 allowed), drafts mostly the target's
    favourite tokens or samples from q, per-request greedy / sampled parameters."""
    bs = 1 + int(torch.randint(0, 8, (1,), generator=gen))
    max_spec_len = 1 + int(torch.randint(0, 6, (1,), generator=gen))
    vocab = 11
    num = [max_spec_len] * bs if equal_lengths else \
        torch.randint(0, max_spec_len + 1, (bs,), generator=gen).tolist()
    total = sum(num)
    q = rational_rows(max(total, 1), vocab, [], gen, total=16)[:total] if with_q else None
    drafts, boost, row = [], [], 0
    for b, d in enumerate(num):
        for pos in range(d):
            if q is not None:
                token = int(torch.multinomial(q[len(drafts)], 1, generator=gen))
            else:
                token = int(torch.randint(0, vocab, (1,), generator=gen))
            drafts.append(token)
            boost.append((row + pos, token))
        row += d + 1
    probs = rational_rows(total + bs, vocab, boost, gen)
    # float32: log of rational probabilities; half types: small integer logits (exact)
    logits = probs.log().float() if dtype == torch.float32 else \
        torch.log2(probs * 64 + 0.5).round().to(dtype)
    pick = torch.randint(0, 5, (3, bs), generator=gen)
    temperature = torch.tensor([[0.0, -1.0, 1.0, 0.5, 1.3][i] for i in pick[0]])
    top_k = torch.tensor([[0, 3, 100, 5, 0][i] for i in pick[1]])
    top_p = torch.tensor([[1.0, 0.77, 1.0, 0.58, 1.0][i] for i in pick[2]])
    uniforms = (2 * torch.randint(0, 128, (bs, max_spec_len + 1), generator=gen) + 1).float() / 256
    return dict(drafts=torch.tensor(drafts, dtype=torch.int64), num=num, max_spec_len=max_spec_len,
                q=None if q is None else q.float(), logits=logits, temperature=temperature,
                top_k=top_k, top_p=top_p, uniforms=uniforms)


def oracle(batch, bonus=None):
    return ref.vllm_rejection_sample(batch["drafts"], batch["num"], batch["max_spec_len"],
                                     batch["q"], batch["logits"], batch["temperature"],
                                     batch["top_k"], batch["top_p"], batch["uniforms"], bonus)


def run(batch, device, *, num_as_tensor=False, bonus=None):
    d = lambda t: None if t is None else t.to(device)  # noqa: E731
    cu = torch.cumsum(torch.tensor(batch["num"], dtype=torch.int64), 0)
    num = torch.tensor(batch["num"]).to(device) if num_as_tensor else batch["num"]
    md = sampling(len(batch["num"]), device, batch["temperature"], batch["top_k"],
                  batch["top_p"])
    return vl.rejection_sample(d(batch["drafts"]), num, batch["max_spec_len"], d(cu),
                               d(batch["q"]), d(batch["logits"]), md, uniforms=d(
                                   batch["uniforms"]), bonus_token_ids=d(bonus))


@pytest.mark.parametrize("with_q", [False, True], ids=["no_draft_probs", "draft_probs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_oracle(device, with_q, dtype):
    gen = torch.Generator().manual_seed(7 + 2 * with_q + (dtype == torch.bfloat16))
    requests = accepted = 0
    for trial in range(60):
        batch = random_batch(gen, dtype, with_q=with_q, equal_lengths=trial % 5 == 0)
        want = oracle(batch)
        got = run(batch, device, num_as_tensor=trial % 2 == 1)
        assert got.tolist() == want, trial
        requests += len(batch["num"])
        accepted += sum(sum(1 for x in row if x >= 0) - 1 for row in want)
    assert requests >= 200 and accepted >= requests // 2


def test_bonus_token_override_matches_oracle(device):
    gen = torch.Generator().manual_seed(17)
    for trial in range(20):
        batch = random_batch(gen, torch.float32, with_q=trial % 2 == 0)
        bonus = torch.randint(50, 60, (len(batch["num"]), 1), generator=gen)
        assert run(batch, device, bonus=bonus).tolist() == oracle(batch, bonus), trial


def test_gather_and_view_paths_agree(device):
    """Equal draft counts given as a list take the no-copy view; as a tensor the rows are
    gathered. Same outputs."""
    gen = torch.Generator().manual_seed(19)
    for _ in range(10):
        batch = random_batch(gen, torch.float32, with_q=True, equal_lengths=True)
        assert torch.equal(run(batch, device), run(batch, device, num_as_tensor=True))


# ----------------------------------------------------------------------------- vLLM's masking facts


def masked_run(device, target_logits, top_k=None, top_p=None, seed=0):
    """vLLM's _test_masked_logits shape: 100 requests x 3 drafts sampled from random q."""
    gen = torch.Generator().manual_seed(seed)
    bs, k, vocab = 100, 3, target_logits.shape[1]
    q = torch.softmax(torch.rand(bs * k, vocab, generator=gen), -1)
    drafts = torch.multinomial(q, 1, generator=gen)[:, 0]
    cu = torch.arange(1, bs + 1) * k
    md = sampling(bs, device, torch.ones(bs), top_k, top_p)
    out = vl.rejection_sample(drafts.to(device), [k] * bs, k, cu.to(device), q.to(device),
                              target_logits.to(device), md)
    return out.cpu()


@pytest.mark.parametrize("top_k", [1, 5, 99])
def test_top_k_never_emits_masked_tokens(device, top_k):
    gen = torch.Generator().manual_seed(top_k)
    bs, k, vocab = 100, 3, 100
    allowed = torch.stack([torch.randperm(vocab, generator=gen)[:top_k]
                           for _ in range(bs * (k + 1))])
    logits = torch.zeros(bs * (k + 1), vocab)
    logits.scatter_(1, allowed, 0.1)
    out = masked_run(device, logits, top_k=torch.full((bs,), top_k))
    rows = out.view(-1)
    emitted = rows >= 0
    assert int(emitted.sum()) >= bs
    index = torch.arange(bs * (k + 1))[emitted]
    assert all(int(t) in allowed[i].tolist() for i, t in zip(index, rows[emitted]))


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
def test_top_p_never_emits_masked_tokens(device, top_p):
    gen = torch.Generator().manual_seed(int(top_p * 100))
    bs, k, vocab = 100, 3, 100
    logits = torch.randn(bs * (k + 1), vocab, generator=gen)
    sorted_logits, order = logits.sort(dim=-1)  # vLLM's rule: ascending cumsum <= 1 - p masked
    masked = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
    masked[:, -1] = False
    allowed = [set(order[i][~masked[i]].tolist()) for i in range(bs * (k + 1))]
    out = masked_run(device, logits, top_p=torch.full((bs,), top_p), seed=1)
    rows = out.view(-1)
    emitted = rows >= 0
    index = torch.arange(bs * (k + 1))[emitted]
    assert all(int(t) in allowed[i] for i, t in zip(index, rows[emitted]))


def test_seeded_requests_repeat(device):
    """vLLM's test_deterministic_when_seeded: rows of requests with a generator repeat exactly
    (here the generator draws the request's uniforms); the other rows vary."""
    gen = torch.Generator().manual_seed(3)
    bs, k, vocab = 8, 3, 1000
    q = torch.softmax(torch.rand(bs * k, vocab, generator=gen), -1)
    logits = torch.rand(bs * (k + 1), vocab, generator=gen)
    drafts = torch.randint(0, vocab, (bs * k,), generator=gen)
    seeded = [0, 2, 3, 6]
    results = []
    for _ in range(12):
        md = sampling(bs, device, torch.ones(bs),
                      generators={i: torch.Generator(device=device).manual_seed(i)
                                  for i in seeded})
        results.append(vl.rejection_sample(drafts.to(device), [k] * bs, k,
                                           (torch.arange(1, bs + 1) * k).to(device),
                                           q.to(device), logits.to(device), md))
    for r in results[1:]:
        assert torch.equal(r[seeded], results[0][seeded])
    unseeded = [i for i in range(bs) if i not in seeded]
    assert any(not torch.equal(r[unseeded], results[0][unseeded]) for r in results[1:])


# ----------------------------------------------------------------------------- statistics
# Chains of two drafts over 7 tokens; the target's logits after a token path are fixed, so the
# first two emitted tokens have the exact law p0(y1) * p1(y2 | y1). A request that emits one
# token draws y2 exactly from p1(. | y1).

STAT_TRIALS, STAT_CHUNK, STAT_VOCAB = 100_000, 25_000, 7


class ChainModel(TokenPathTarget):
    """The target plus draft distributions q0 (first draft) and q1[a] (after a)."""

    def __init__(self, seed, temperature, top_k, top_p):
        super().__init__(seed, STAT_VOCAB, temperature, top_k, top_p)
        v, g = STAT_VOCAB, self.gen
        self.q0 = torch.softmax(self.l0 + torch.randn(v, generator=g), -1)
        self.q1 = torch.softmax(self.l1 + torch.randn(v, v, generator=g), -1)


def sample_chains(model, batch, gen, with_q):
    v = STAT_VOCAB
    if with_q:
        x1 = torch.multinomial(model.q0.expand(batch, v), 1, generator=gen)[:, 0]
        x2 = torch.multinomial(model.q1[x1], 1, generator=gen)[:, 0]
        q = torch.stack([model.q0.expand(batch, v), model.q1[x1]], 1).reshape(-1, v)
    else:  # deterministic drafts: the draft's favourite tokens
        x1 = torch.full((batch,), int(model.q0.argmax()))
        x2 = model.q1[x1].argmax(-1)
        q = None
    logits = torch.stack([model.l0.expand(batch, v), model.l1[x1], model.l2[x1, x2]], 1)
    t, k, p = model.params
    md = sampling(batch, "cpu", torch.full((batch,), t), torch.full((batch,), k),
                  torch.full((batch,), p))
    with torch.random.fork_rng():  # the function draws its uniforms from the global generator
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
        out = vl.rejection_sample(torch.stack([x1, x2], 1).reshape(-1), [2] * batch, 2,
                                  torch.arange(1, batch + 1) * 2, q, logits.reshape(-1, v), md)
    y1, y2 = out[:, 0].long(), out[:, 1].long()
    fresh = y2 < 0
    y2[fresh] = torch.multinomial(model.p1[y1[fresh]], 1, generator=gen)[:, 0]
    return y1, y2, out[:, 2] >= 0


def chain_counts(model, seed, with_q):
    """Joint counts of the first two tokens and how many requests accepted both drafts."""
    return joint_counts(lambda batch, gen: sample_chains(model, batch, gen, with_q), STAT_VOCAB,
                        STAT_TRIALS, STAT_CHUNK, seed)


STAT_CASES = {"T1": (11, 1.0, 0, 1.0), "T08_topk_topp": (12, 0.8, 5, 0.9)}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(STAT_CASES))
@pytest.mark.parametrize("with_q", [False, True], ids=["no_draft_probs", "draft_probs"])
def test_matches_exact_target_law(case, with_q):
    model = ChainModel(*STAT_CASES[case])
    joint, full = chain_counts(model, 900, with_q)
    assert_matches_exact_law(joint, model.joint(), STAT_TRIALS)
    assert full > STAT_TRIALS // 50, "whole chains must be accepted, or the bonus goes untested"


@pytest.mark.slow
@pytest.mark.parametrize("with_q", [False, True], ids=["no_draft_probs", "draft_probs"])
def test_planted_coin_reuse_is_rejected(monkeypatch, with_q):
    """Planted bug: the recovered / bonus draw reuses the first draft's acceptance uniform."""
    original = vl._draw_uniforms

    def reuse(sampling_metadata, bs, nodes, dev):
        u = original(sampling_metadata, bs, nodes, dev)
        u[:, 0] = u[:, 1]
        return u

    monkeypatch.setattr(vl, "_draw_uniforms", reuse)
    model = ChainModel(*STAT_CASES["T1"])
    joint, _ = chain_counts(model, 901, with_q)
    p_value = chi_square(joint, model.joint(), STAT_TRIALS)
    assert p_value < 1e-6, f"planted bug not detected: p = {p_value}"


# ----------------------------------------------------------------------------- malformed input


def valid_args(**changes):
    spec, argmax, _ = VLLM_GREEDY_CASES["multiple_mismatches"]
    md = metadata_for(spec, "cpu")
    args = dict(draft_token_ids=md.draft_token_ids, num_draft_tokens=md.num_draft_tokens,
                max_spec_len=md.max_spec_len, cu_num_draft_tokens=md.cu_num_draft_tokens,
                draft_probs=None, target_logits=argmax_logits(argmax, "cpu"),
                sampling_metadata=sampling(2, "cpu", torch.ones(2)))
    args.update(changes)
    return args


def test_bad_input_raises():
    logits = argmax_logits(VLLM_GREEDY_CASES["multiple_mismatches"][1], "cpu")
    cases = [
        (dict(draft_token_ids=torch.tensor([1.0, 2, 3, 4, 5, 6])), TypeError,
         "draft_token_ids must have dtype int32 or int64"),
        (dict(draft_token_ids=torch.tensor([1, 2, 3, 4, 100, 6])), ValueError,
         r"draft_token_ids\[4\] = 100 is outside \[0, 100\)"),
        (dict(num_draft_tokens=[2, 4], max_spec_len=4), ValueError,
         r"cu_num_draft_tokens \[3, 6\] is not the running sum of num_draft_tokens \[2, 4\]"),
        (dict(num_draft_tokens=[3, 3, 0]), ValueError, "num_draft_tokens has 3 entries"),
        (dict(max_spec_len=2), ValueError, r"num_draft_tokens holds 3, outside \[0, "
                                           r"max_spec_len = 2\]"),
        (dict(target_logits=logits[:-1]), ValueError, r"target_logits must have shape \[8, \*\]"),
        (dict(target_logits=torch.cat([logits[:5], torch.full((1, 100), float("nan")),
                                       logits[6:]])), ValueError,
         r"target_logits: row 5 \(request 1, draft position 1\): the row holds NaN"),
        (dict(draft_probs=torch.full((6, 100), 0.01, dtype=torch.float64)), TypeError,
         "draft_probs must have dtype float32"),
        (dict(draft_probs=with_row(torch.full((6, 100), 0.01), 4, float("nan"))), ValueError,
         r"draft_probs: row 4 \(request 1\)"),
        (dict(sampling_metadata=sampling(2, "cpu", torch.ones(3))), ValueError,
         r"sampling_metadata.temperature must have shape \[2\]"),
        (dict(sampling_metadata=sampling(2, "cpu", torch.ones(2), top_p=torch.tensor([0.5,
                                                                                      0.0]))),
         ValueError, r"top_p: request 1 must lie in \(0, 1\]"),
    ]
    for changes, error, message in cases:
        with pytest.raises(error, match=message):
            vl.rejection_sample(**valid_args(**changes))
    with pytest.raises(ValueError, match=r"uniforms\[0, 2\] = 1.0 must lie in \[0, 1\)"):
        vl.rejection_sample(**valid_args(), uniforms=with_row(torch.zeros(2, 4), (0, 2), 1.0))


def with_row(t, index, value):
    t = t.clone()
    t[index] = value
    return t


def test_sampler_refuses_what_it_does_not_apply():
    spec, argmax, _ = VLLM_GREEDY_CASES["multiple_mismatches"]
    md, logits = metadata_for(spec, "cpu"), argmax_logits(argmax, "cpu")
    for field, value, name in (("no_penalties", False, "penalties"),
                               ("bad_words_token_ids", {0: [[2]]}, "bad words"),
                               ("allowed_token_ids_mask", torch.zeros(2, 100, dtype=torch.bool),
                                "allowed_token_ids"),
                               ("max_num_logprobs", 5, "logprobs")):
        s = sampling(2, "cpu")
        setattr(s, field, value)
        with pytest.raises(NotImplementedError, match=name):
            vl.RejectionSampler()(md, None, logits, s)
    md.bonus_logits_indices = torch.tensor([2, 7])
    with pytest.raises(ValueError, match="bonus_logits_indices"):
        vl.RejectionSampler()(md, None, logits, sampling(2, "cpu"))
    with pytest.raises(NotImplementedError, match="synthetic"):
        vl.RejectionSampler(None, SimpleNamespace(rejection_sample_method="synthetic"))


def test_empty_batch():
    out = vl.rejection_sample(torch.empty(0, dtype=torch.int64), [], 0,
                              torch.empty(0, dtype=torch.int64), None, torch.empty(0, 9),
                              sampling(0, "cpu"))
    assert out.shape == (0, 1)


# ----------------------------------------------------------------------------- install


def test_install_replaces_and_restores(monkeypatch):
    fake = types.ModuleType("vllm.v1.sample.rejection_sampler")

    class VllmSampler:
        pass

    fake.RejectionSampler = VllmSampler
    runner = types.ModuleType("vllm.v1.worker.fake_runner")
    runner.RejectionSampler = VllmSampler
    monkeypatch.setitem(sys.modules, runner.__name__, runner)
    handle = vl.install(fake)
    assert fake.RejectionSampler is vl.RejectionSampler
    assert runner.RejectionSampler is vl.RejectionSampler
    spec, argmax, expected = VLLM_GREEDY_CASES["param_mixed"]
    sampler = runner.RejectionSampler(object())  # vLLM passes its Sampler
    out = sampler(metadata_for(spec, "cpu"), None, argmax_logits(argmax, "cpu"),
                  sampling(2, "cpu"))
    assert out.sampled_token_ids.tolist() == expected
    handle.uninstall()
    assert fake.RejectionSampler is VllmSampler and runner.RejectionSampler is VllmSampler


def test_install_without_vllm_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match="'vllm.v1.sample.rejection_sampler' is not importable"):
        vl.install()
