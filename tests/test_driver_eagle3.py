"""EAGLE-3 drafter on tiny random Llama targets: official checkpoint layout, loading errors, the
head computation against an independent reference, tree expansion, exact greedy decoding and the
draft KV cache after compaction."""
import json
import math

import pytest
import torch

import heterospec as hs
from heterospec.eagle3 import Eagle3Drafter
from heterospec.testing import (assert_cache_matches_fresh, greedy_by_full_forwards,
                                official_eagle3_config, random_eagle3_state, save_eagle3_head,
                                tiny_llama)

pytestmark = pytest.mark.usefixtures("one_thread")

# The defaults of official_eagle3_config: target vocabulary, hidden size, draft vocabulary.
VOCAB, HIDDEN, LAYERS, DRAFT_VOCAB = 64, 32, 8, 48

@pytest.fixture(scope="module")
def target():
    return hs.CausalLM(tiny_llama(VOCAB, seed=1, layers=LAYERS, hidden=HIDDEN, logit_scale=30.0),
                       name="tiny target")


@pytest.fixture(scope="module")
def random_head_dir(tmp_path_factory):
    cfg = official_eagle3_config()
    state = random_eagle3_state(cfg, seed=3)
    return save_eagle3_head(tmp_path_factory.mktemp("eagle3_random"), cfg, state), cfg, state


# ----------------------------------------------------------------------------- bigram oracle


@pytest.fixture(scope="module")
def oracle():
    """A target whose greedy next token depends on the current token only (every layer's
    o_proj and down_proj zeroed) and a head that reproduces it: attention focuses on the entry
    of the same token, copies its normalised embedding and the lm_head is the target's over the
    draft vocabulary. High acceptance, so multi-token acceptance and deep trees get exercised."""
    model = tiny_llama(VOCAB, seed=4, layers=LAYERS, hidden=HIDDEN, logit_scale=30.0)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        normed = emb * torch.rsqrt(emb.pow(2).mean(-1, keepdim=True) + 1e-6)
        bigram = (model.lm_head(model.model.norm(normed))).argmax(-1)
    tgt = hs.CausalLM(model, name="bigram target")
    # the draft vocabulary holds every bigram successor, then other ids up to DRAFT_VOCAB
    succ = sorted(set(bigram.tolist()))
    rest = [t for t in range(VOCAB) if t not in succ][:DRAFT_VOCAB - len(succ)]
    draft_ids = torch.tensor(sorted(succ + rest))
    cfg = official_eagle3_config(kv_heads=4)
    state = random_eagle3_state(cfg, seed=5, draft_ids=draft_ids)
    h, scale = HIDDEN, 3.0
    eye = torch.eye(h)
    zero = torch.zeros(h, h)
    with torch.no_grad():
        for name in ("midlayer.hidden_norm.weight", "midlayer.input_layernorm.weight",
                     "midlayer.post_attention_layernorm.weight"):
            state[name] = torch.ones(h)
        state["midlayer.self_attn.q_proj.weight"] = torch.cat((scale * eye, zero), 1)
        state["midlayer.self_attn.k_proj.weight"] = torch.cat((scale * eye, zero), 1)
        state["midlayer.self_attn.v_proj.weight"] = torch.cat((eye, zero), 1)
        state["midlayer.self_attn.o_proj.weight"] = 50.0 * eye
        state["midlayer.mlp.down_proj.weight"].zero_()
        state["fc.weight"] = 0.1 * state["fc.weight"]
        state["norm.weight"] = model.model.norm.weight.detach().clone()
        state["lm_head.weight"] = model.lm_head.weight.detach()[draft_ids].clone()
    return tgt, cfg, state


# ----------------------------------------------------------------------------- reference


def target_states(lm, tokens, layers):
    """Inputs of decoder layers ``layers`` from HF's own output_hidden_states (independent of
    the driver's capture hooks), concatenated: ``[len(tokens), 3H]``."""
    with torch.no_grad():
        out = lm.model(input_ids=torch.tensor([tokens]), output_hidden_states=True)
    return torch.cat([out.hidden_states[i][0] for i in sorted(layers)], dim=-1)


def _rms(x, w, eps=1e-5):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def reference_head(state, cfg, embed_w, tokens, states, from_target):
    """Plain causal EAGLE-3 head pass: entry i pairs ``states[i]`` with ``tokens[i]`` at position
    i. Returns (output states [n, H], draft logits [n, Vd])."""
    h, heads, kvh = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = h // heads
    eps = cfg["rms_norm_eps"]
    n = len(tokens)
    e = embed_w[torch.tensor(tokens)]
    g = torch.stack([s @ state["fc.weight"].T if ft else s for s, ft in zip(states, from_target)])
    x = torch.cat((_rms(e, state["midlayer.input_layernorm.weight"], eps),
                   _rms(g, state["midlayer.hidden_norm.weight"], eps)), -1)
    q = (x @ state["midlayer.self_attn.q_proj.weight"].T).view(n, heads, hd)
    k = (x @ state["midlayer.self_attn.k_proj.weight"].T).view(n, kvh, hd)
    v = (x @ state["midlayer.self_attn.v_proj.weight"].T).view(n, kvh, hd)
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.arange(n).float()[:, None] * inv[None]
    cos, sin = torch.cat((ang, ang), -1).cos()[:, None], torch.cat((ang, ang), -1).sin()[:, None]
    rot = lambda t: torch.cat((-t[..., hd // 2:], t[..., :hd // 2]), -1)  # noqa: E731
    q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
    k, v = k.repeat_interleave(heads // kvh, 1), v.repeat_interleave(heads // kvh, 1)
    scores = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(hd)
    scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    att = torch.einsum("hij,jhd->ihd", scores.softmax(-1), v).reshape(n, heads * hd)
    g = g + att @ state["midlayer.self_attn.o_proj.weight"].T
    m = _rms(g, state["midlayer.post_attention_layernorm.weight"], eps)
    mlp = (torch.nn.functional.silu(m @ state["midlayer.mlp.gate_proj.weight"].T)
           * (m @ state["midlayer.mlp.up_proj.weight"].T)) @ state["midlayer.mlp.down_proj.weight"].T
    g = g + mlp
    return g, _rms(g, state["norm.weight"], eps) @ state["lm_head.weight"].T


def draft_cache_matches_reference(drafter, lm, state, cfg, committed, atol=1e-4):
    """After a fresh ``draft(root, 1)`` the head's cache holds one entry per committed pair; it
    must equal a plain causal head pass over (target state of token j, token j + 1)."""
    drafter.draft(committed[-1], 1)
    n = drafter.cache.length
    assert n == len(committed) - 1
    hs_ = target_states(lm, committed[:-1], drafter.capture_layers)
    fresh = drafter.head.new_cache()
    pos = torch.arange(n)
    visible = torch.ones(n, n, dtype=torch.bool).tril()
    drafter.head(torch.tensor(committed[1:]), hs_, pos, visible, fresh, from_target=True)
    torch.testing.assert_close(drafter.cache.keys, fresh.keys, atol=atol, rtol=1e-4)
    torch.testing.assert_close(drafter.cache.values, fresh.values, atol=atol, rtol=1e-4)
    # and the head's output for those entries equals the independent reference
    ref_states, _ = reference_head(state, cfg, lm.model.get_input_embeddings().weight.detach(),
                                   committed[1:], list(hs_), [True] * n)
    return ref_states


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_load_official_layout(target, tmp_path, fmt):
    cfg = official_eagle3_config()
    state = random_eagle3_state(cfg, seed=7)
    path = save_eagle3_head(tmp_path / fmt, cfg, state, fmt)
    drafter = Eagle3Drafter.from_pretrained(path, target, top_k=3)
    head = drafter.head
    sd = head.state_dict()
    for name, tensor in state.items():
        assert tuple(sd[name].shape) == tuple(tensor.shape), name
        assert torch.equal(sd[name].to(tensor.dtype), tensor), name
    assert head.d2t.dtype == torch.int64 and head.t2d.dtype == torch.bool
    assert drafter.capture_layers == [2, LAYERS // 2, LAYERS - 3]
    assert target.capture_layer_ids == (2, 4, 5)
    assert drafter.vocab_size == VOCAB and drafter.uses_target_hidden
    # the head's embedding is the target's own (frozen, not stored in the checkpoint)
    assert head.embed is target.model.get_input_embeddings()
    # the capture hook records exactly HF's hidden_states[i] (inputs of layers 2, 4, 5)
    toks = [3, 9, 27, 4]
    target.causal_forward(torch.tensor(toks), target.new_cache())
    torch.testing.assert_close(target.captured_hidden, target_states(target, toks, [2, 4, 5]))


def test_head_matches_independent_reference(target, random_head_dir):
    """Level 0 and a level-1 expansion against a from-scratch EAGLE-3 computation."""
    path, cfg, state = random_head_dir
    drafter = Eagle3Drafter.from_pretrained(path, target, top_k=4)
    prompt = [5, 17, 2, 40, 33, 8]
    hs_ = target_states(target, prompt[:-1], drafter.capture_layers)
    drafter.reset(torch.tensor(prompt), target_hidden=hs_)
    pool = drafter.draft(prompt[-1], 2)
    embed_w = target.model.get_input_embeddings().weight.detach()
    d2t = state["d2t"]
    # level 0: the root entry pairs the state of token n-2 with the root
    states, logits = reference_head(state, cfg, embed_w, prompt[1:], list(hs_), [True] * 5)
    lp = torch.log_softmax(logits[-1], -1)
    top = torch.topk(lp, 4)
    lvl0 = pool.level[0] == 0
    assert torch.equal(pool.tokens[0, lvl0], top.indices + d2t[top.indices])
    torch.testing.assert_close(pool.scores[0, lvl0], top.values, atol=1e-4, rtol=1e-4)
    # level 1: the children of level-0 node j = a causal pass with (root output state, child j)
    # appended at the next position
    for j in range(4):
        child = int(pool.tokens[0, 1 + j])
        _, lg = reference_head(state, cfg, embed_w, prompt[1:] + [child],
                               list(hs_) + [states[-1]], [True] * 5 + [False])
        lp1 = torch.log_softmax(lg[-1], -1)
        top1 = torch.topk(lp1, 4)
        kids = (pool.parents[0] == 1 + j).nonzero().flatten()
        assert torch.equal(pool.tokens[0, kids], top1.indices + d2t[top1.indices])
        torch.testing.assert_close(pool.logprob[0, kids], top1.values, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(pool.scores[0, kids], top.values[j] + top1.values,
                                   atol=1e-4, rtol=1e-4)


def test_tree_expansion_pool_structure(target, random_head_dir):
    path, _, state = random_head_dir
    k = 3
    drafter = Eagle3Drafter.from_pretrained(path, target, top_k=k)
    prompt = torch.tensor([7, 1, 22, 63, 5])
    target.causal_forward(prompt[:-1], target.new_cache())
    drafter.reset(prompt, target_hidden=target.captured_hidden)
    pool = drafter.draft(int(prompt[-1]), 3)
    assert pool.size == 1 + k + 2 * k * k and pool.levels == 3
    allowed = set((torch.arange(DRAFT_VOCAB) + state["d2t"]).tolist())
    toks, parents, level = pool.tokens[0], pool.parents[0], pool.level[0]
    assert int(toks[0]) == 5 and int(parents[0]) == -1 and int(level[0]) == -1
    assert set(toks[1:].tolist()) <= allowed and int(toks.max()) < VOCAB
    for i in range(1, pool.size):
        p = int(parents[i])
        assert 0 <= p < i and int(level[i]) == int(level[p]) + 1
        torch.testing.assert_close(pool.scores[0, i], pool.scores[0, p] + pool.logprob[0, i])
    assert torch.isfinite(pool.step_entropy).all() and (pool.step_entropy >= 0).all()
    assert (pool.step_entropy[0, 1:] <= math.log(k) + 1e-5).all()
    # each level's parents are the k best of the previous level by cumulative score
    lvl1 = (level == 1).nonzero().flatten()
    prev = (level == 0).nonzero().flatten()
    assert len(set(parents[lvl1].tolist())) == k and set(parents[lvl1].tolist()) <= set(prev.tolist())
    lvl2_parents = set(parents[level == 2].tolist())
    best = lvl1[torch.sort(-pool.scores[0, lvl1], stable=True).indices[:k]]
    assert lvl2_parents == set(best.tolist())
    # the tree entries sit after the committed ones; extend adds one more level
    assert drafter.cache.length == 4 + 2 * k
    bigger = drafter.extend(2)
    assert bigger.size == pool.size + 2 * k * k and bigger.levels == 5
    assert torch.equal(bigger.tokens[0, :pool.size], pool.tokens[0])


POLICIES = [
    hs.StaticTree(depth=1, top_k=1, total_tokens=2),
    hs.StaticTree(depth=3, top_k=3, total_tokens=8),
    hs.StaticTree(depth=5, top_k=4, total_tokens=30),
    hs.HeteroSpec(depth=3, top_k=3, total_tokens=10, thresholds=[0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0]),
    hs.HeteroSpec(depth=2, top_k=2, total_tokens=6, thresholds=[1e9] * 7),  # always stratum 0
]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: str(p.describe()))
def test_greedy_lossless_random_head(target, random_head_dir, policy):
    path, cfg, state = random_head_dir
    drafter = Eagle3Drafter.from_pretrained(path, target, top_k=policy.top_k)
    gen = hs.SpeculativeGenerator(target, drafter, policy)
    for prompt in ([5], [3, 9, 27, 4, 4, 11, 2]):
        want = greedy_by_full_forwards(target, prompt, 16)
        res = gen.generate(prompt, 16)
        assert res.token_ids == want
        assert res.stats.draft_forwards >= res.stats.cycles
        assert_cache_matches_fresh(target, gen.cache, gen.committed)
        if len(prompt) > 1:  # a one-token prompt's first entry holds a zero stand-in state
            draft_cache_matches_reference(drafter, target, state, cfg, gen.committed)


@pytest.mark.parametrize("policy", [hs.StaticTree(depth=4, top_k=3, total_tokens=12),
                                    hs.HeteroSpec(depth=4, top_k=3, total_tokens=12,
                                                  thresholds=[1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0])],
                         ids=["static", "heterospec"])
def test_greedy_lossless_with_real_acceptance(oracle, policy, tmp_path):
    tgt, cfg, state = oracle
    drafter = Eagle3Drafter.from_pretrained(save_eagle3_head(tmp_path, cfg, state), tgt,
                                            top_k=policy.top_k)
    gen = hs.SpeculativeGenerator(tgt, drafter, policy)
    cache_lengths = []
    gen.on_cycle = lambda info: cache_lengths.append((drafter.cache.length, info["accepted"]))
    prompt = [3, 9, 27, 4, 4, 11, 2]
    want = greedy_by_full_forwards(tgt, prompt, 40)
    res = gen.generate(prompt, 40)
    assert res.token_ids == want
    # the head predicts the bigram target: many tokens accepted per cycle
    assert res.stats.tau > 2.0, res.stats
    if policy.adaptive:  # several strata, so extend() and cut trees both run
        assert sum(c > 0 for c in res.stats.stratum_counts) >= 3, res.stats.stratum_counts
    assert max(a for _, a in cache_lengths) >= 3
    # after each commit the cache holds only committed entries: prompt pairs + earlier cycles
    expected = len(prompt) - 1
    for length, accepted in cache_lengths:
        assert length == expected
        expected += accepted + 1
    assert_cache_matches_fresh(tgt, gen.cache, gen.committed)
    ref_states = draft_cache_matches_reference(drafter, tgt, state, cfg, gen.committed)
    assert torch.isfinite(ref_states).all()


# ----------------------------------------------------------------------------- errors


def _expect_error(path, target, *needles, exc=hs.DraftCheckpointError):
    with pytest.raises(exc) as info:
        Eagle3Drafter.from_pretrained(path, target, top_k=2)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_malformed_checkpoints(target, tmp_path):
    cfg = official_eagle3_config()
    good = random_eagle3_state(cfg, seed=9)
    missing = {k: v for k, v in good.items() if k != "midlayer.hidden_norm.weight"}
    _expect_error(save_eagle3_head(tmp_path / "missing", cfg, missing), target,
                  "lacks tensor", "midlayer.hidden_norm.weight")
    wrong = dict(good)
    wrong["midlayer.self_attn.q_proj.weight"] = good["midlayer.self_attn.q_proj.weight"][:, :HIDDEN]
    _expect_error(save_eagle3_head(tmp_path / "shape", cfg, wrong), target,
                  "midlayer.self_attn.q_proj.weight", "[32, 32]", "[32, 64]")
    transposed = dict(good, **{"fc.weight": good["fc.weight"].T.contiguous()})
    _expect_error(save_eagle3_head(tmp_path / "fc", cfg, transposed), target, "'fc.weight'",
                  "[96, 32]")
    bad_d2t = dict(good, d2t=good["d2t"] + VOCAB)
    _expect_error(save_eagle3_head(tmp_path / "d2t", cfg, bad_d2t), target, "d2t", "outside")
    no_d2t = {k: v for k, v in good.items() if k != "d2t"}
    _expect_error(save_eagle3_head(tmp_path / "nod2t", cfg, no_d2t), target, "lacks 'd2t'")
    bad_cfg = tmp_path / "badcfg"
    save_eagle3_head(bad_cfg, cfg, good)
    (bad_cfg / "config.json").write_text("{not json")
    _expect_error(str(bad_cfg), target, "not valid JSON")
    no_field = tmp_path / "nofield"
    save_eagle3_head(no_field, {k: v for k, v in cfg.items() if k != "hidden_size"}, good)
    _expect_error(str(no_field), target, "hidden_size")
    _expect_error(str(tmp_path / "nowhere"), target, "does not exist", exc=hs.ModelLoadError)
    empty = tmp_path / "noweights"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(cfg))
    _expect_error(str(empty), target, "model.safetensors", exc=hs.ModelLoadError)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text(json.dumps(cfg))
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 16)
    _expect_error(str(corrupt), target, "could not read")
    # layer counts: two is train-draft's experiment (not drafted), others are no head's
    stacked = tmp_path / "stacked"
    save_eagle3_head(stacked, dict(cfg, num_hidden_layers=2), good)
    _expect_error(str(stacked), target, "num_hidden_layers 2", "one-layer heads")
    for bad in (3, 0, "1"):
        d = tmp_path / f"layers{bad}"
        save_eagle3_head(d, dict(cfg, num_hidden_layers=bad), good)
        _expect_error(str(d), target, "num_hidden_layers must be 1", repr(bad))
    # a config.json without num_hidden_layers is a one-layer head (not LlamaConfig's 32)
    unstated = tmp_path / "unstated"
    save_eagle3_head(unstated, {k: v for k, v in cfg.items() if k != "num_hidden_layers"}, good)
    assert len(Eagle3Drafter.from_pretrained(str(unstated), target).head.layers) == 0


def test_head_for_another_target_is_rejected(target, tmp_path):
    cfg = official_eagle3_config(h=48, inter=96)
    _expect_error(save_eagle3_head(tmp_path / "h48", cfg, random_eagle3_state(cfg)), target,
                  "hidden size 48", "32")
    cfg = official_eagle3_config(vocab=VOCAB + 8)
    _expect_error(save_eagle3_head(tmp_path / "v72", cfg, random_eagle3_state(cfg)), target,
                  "vocab_size 72", "64")


def test_capture_layers_for_shallow_targets(tmp_path):
    shallow = hs.CausalLM(tiny_llama(VOCAB, seed=6, layers=4, hidden=HIDDEN), name="4 layers")
    cfg = official_eagle3_config()
    path = save_eagle3_head(tmp_path / "default", cfg, random_eagle3_state(cfg))
    # (2, L//2, L-3) = (2, 2, 1) collapses to two layers, as in the official code
    _expect_error(path, shallow, "three distinct", "eagle_aux_hidden_state_layer_ids")
    cfg = official_eagle3_config(eagle_config={"eagle_aux_hidden_state_layer_ids": [3, 0, 1]})
    path = save_eagle3_head(tmp_path / "override", cfg, random_eagle3_state(cfg))
    drafter = Eagle3Drafter.from_pretrained(path, shallow, top_k=2)
    assert drafter.capture_layers == [0, 1, 3]
    gen = hs.SpeculativeGenerator(shallow, drafter, hs.StaticTree(depth=2, top_k=2, total_tokens=5))
    want = greedy_by_full_forwards(shallow, [4, 8, 15], 10)
    assert gen.generate([4, 8, 15], 10).token_ids == want


def test_cli_generate_with_eagle3(tmp_path, capsys, random_head_dir):
    """``heterospec generate --draft eagle3:DIR`` on a local HF directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from heterospec import cli

    model_dir = tmp_path / "target"
    tiny_llama(VOCAB, seed=1, layers=LAYERS, hidden=HIDDEN, logit_scale=30.0).save_pretrained(
        model_dir)
    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w2"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w2").save_pretrained(model_dir)
    path, _, _ = random_head_dir
    base = ["generate", "--model", str(model_dir), "--policy", "static", "--depth", "2",
            "--tree-top-k", "2", "--total-tokens", "5", "--max-new-tokens", "8",
            "--prompt", "w5 w9 w30", "--json"]
    assert cli.main(base + ["--draft", f"eagle3:{path}"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 8
    target = hs.CausalLM(tiny_llama(VOCAB, seed=1, layers=LAYERS, hidden=HIDDEN, logit_scale=30.0))
    ids = PreTrainedTokenizerFast.from_pretrained(model_dir)("w5 w9 w30")["input_ids"]
    assert out["token_ids"] == greedy_by_full_forwards(target, ids, 8)
    assert cli.main(base + ["--draft", f"eagle3:{tmp_path / 'missing'}"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_packed_head_decode_layer_ops_match_torch_composition(target, random_head_dir):
    """PackedEagle3Head on CPU runs the decode-layer ops; its torch composition (the path off
    CPU) must compute the same: a prompt pass of more than FUSED_ATTENTION_MAX_ROWS rows (torch
    attention inside the fused path), then a tree level (rope_cache_attention), float32."""
    from heterospec.eagle3 import FUSED_ATTENTION_MAX_ROWS

    path, _, _ = random_head_dir
    drafter = Eagle3Drafter.from_pretrained(path, target, top_k=4)
    packed = drafter.packed
    assert packed.fused  # CPU, float32, SiLU
    n = FUSED_ATTENTION_MAX_ROWS + 5
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, VOCAB, (n,), generator=gen)
    hidden = torch.randn(n, 3 * HIDDEN, generator=gen)
    level = torch.randint(0, VOCAB, (4,), generator=gen)
    visible = torch.zeros(4, n + 4, dtype=torch.bool)
    visible[:, :n - 3] = True  # the level sees part of the prompt, and itself
    visible[:, n:] = torch.eye(4, dtype=torch.bool)
    outputs = {}
    for fused in (True, False):
        packed.fused = fused
        cache = drafter.head.new_cache()
        first = packed(prompt, hidden, torch.arange(n),
                       torch.ones(n, n, dtype=torch.bool).tril_(), cache, from_target=True)
        states = first[0][-4:].clone()
        before = states.clone()
        second = packed(level, states, n, visible, cache, from_target=False)
        # the fused residual updates work on a copy, never on the caller's states
        assert torch.equal(states, before)
        outputs[fused] = first + second + (cache.keys.clone(), cache.values.clone())
    packed.fused = True
    for got, want in zip(outputs[True], outputs[False]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
