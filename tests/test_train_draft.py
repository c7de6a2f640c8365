"""``heterospec train-draft`` on a tiny random Llama: the training-time-test unroll computes what
the inference drafter computes along a tree chain, a few training steps lower the loss, and the
saved checkpoint loads into Eagle3Drafter and decodes exactly like the target."""
import json
import os

import pytest
import torch

import heterospec as hs
from heterospec import train_draft as td
from heterospec.eagle3 import Eagle3Drafter, Eagle3Head, eagle3_config
from heterospec.testing import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, LAYERS = 48, 8  # 8 layers: EAGLE-3's default capture layers (2, 4, 5) are distinct


class CharTokenizer:
    """Character-level tokenizer without a chat template (train_draft joins turns with blank
    lines then). Ids 3..VOCAB-1; 0/1/2 are special."""

    chat_template = None
    all_special_ids = [0, 1, 2]
    eos_token_id = 1

    def __call__(self, text):
        class Out:
            pass

        out = Out()
        out.input_ids = [3 + (ord(c) % (VOCAB - 3)) for c in text]
        return out

    def get_vocab(self):
        return {f"t{i}": i for i in range(VOCAB)}


def _target(seed=0, logit_scale=1.0):
    # a large logit scale makes the random target confident, so its distributions carry
    # little entropy and the soft-label loss has room to fall
    return hs.CausalLM(tiny_llama(vocab=VOCAB, layers=LAYERS, seed=seed, logit_scale=logit_scale),
                       CharTokenizer(), name="tiny target")


def _conversations(n, seed=0):
    """Repetitive ShareGPT-shaped conversations: patterns a draft head can learn quickly."""
    g = torch.Generator().manual_seed(seed)
    words = ["abc", "hello", "xyz", "spec", "tree", "draft", "verify", "token"]
    convs = []
    for i in range(n):
        pick = torch.randint(0, len(words), (12,), generator=g).tolist()
        text = " ".join(words[p] for p in pick)
        convs.append({"id": str(i), "conversations": [{"from": "human", "value": "q " + text},
                                                      {"from": "gpt", "value": text + " " + text}]})
    return convs


def _head(target, draft_ids, seed=1, head_layers=1):
    layers = [2, LAYERS // 2, LAYERS - 3]
    head = Eagle3Head(eagle3_config(td.head_config(target, int(draft_ids.numel()), layers,
                                                   head_layers)))
    td.init_head(head, target, draft_ids)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every weight matters in the comparison, not only the init
        for p in head.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return head, layers


def _pass(target, seqs, layers, directory, **kw):
    """The target pass of ``seqs`` as one shard's tensors."""
    shards = td.target_pass(target, seqs, layers, str(directory), **kw)
    assert len(shards.shards) == 1
    return shards.load(0)


def test_ttt_unroll_matches_inference_tree_chain(tmp_path):
    target = _target()
    g = torch.Generator().manual_seed(3)
    seq = torch.randint(3, VOCAB, (23,), generator=g).tolist()
    draft_ids = torch.arange(3, VOCAB, 2)
    head, layers = _head(target, draft_ids)
    data = _pass(target, [seq], layers, tmp_path / "cache")
    tokens = data["tokens"].long()[None]
    states = data["states"].float()[None]
    embed = target.model.get_input_embeddings()
    steps = 3
    with torch.no_grad():
        train_logits = td.ttt_forward(head.eval(), embed.weight, tokens, states, steps)
    head.embed = embed
    t = tokens.shape[1]
    for j in (0, 5, t - steps - 1):
        # the committed entries 0..j, then a chain of tree nodes with the true next tokens
        cache = head.new_cache()
        pos = torch.arange(j + 1)
        vis = torch.ones((j + 1, j + 1), dtype=torch.bool).tril_()
        out = head(tokens[0, 1:j + 2], states[0, :j + 1], pos, vis, cache, from_target=True)
        torch.testing.assert_close(head.logits(out), train_logits[0][0, :j + 1],
                                   rtol=1e-4, atol=1e-4)
        state = out[-1:]
        for k in range(1, steps):
            vis = torch.ones((1, cache.length + 1), dtype=torch.bool)
            state = head(tokens[0, j + k + 1: j + k + 2], state, torch.tensor([j + k]), vis,
                         cache, from_target=False)
            torch.testing.assert_close(head.logits(state)[0], train_logits[k][0, j],
                                       rtol=1e-4, atol=1e-4)


def test_ttt_unroll_rejects_a_wrong_chain(tmp_path):
    """The comparison above can fail: feeding the step-k node the token one step early differs."""
    target = _target()
    seq = torch.randint(3, VOCAB, (15,), generator=torch.Generator().manual_seed(4)).tolist()
    head, layers = _head(target, torch.arange(3, VOCAB))
    data = _pass(target, [seq], layers, tmp_path / "cache")
    tokens, states = data["tokens"].long()[None], data["states"].float()[None]
    embed = target.model.get_input_embeddings()
    with torch.no_grad():
        train_logits = td.ttt_forward(head.eval(), embed.weight, tokens, states, 2)
    head.embed = embed
    j = 4
    cache = head.new_cache()
    out = head(tokens[0, 1:j + 2], states[0, :j + 1], torch.arange(j + 1),
               torch.ones((j + 1, j + 1), dtype=torch.bool).tril_(), cache, from_target=True)
    wrong = head(tokens[0, j + 1: j + 2], out[-1:], torch.tensor([j + 1]),
                 torch.ones((1, cache.length + 1), dtype=torch.bool), cache, from_target=False)
    assert not torch.allclose(head.logits(wrong)[0], train_logits[1][0, j], atol=1e-3)


def _masked_attention_chain(head, embed_w, tokens, states, j, steps):
    """Readable reference for a stacked head's unroll at entry ``j``: the nodes are the step-0
    entries 0..j, then one chain node per later step; every layer runs over all nodes at once
    with an explicit visibility mask (a chain node sees entries 0..j and the chain up to
    itself), recomputed from scratch for each step since a chain node's input is the previous
    node's output. Returns the logits of steps 0..steps-1 at entry j ``[steps, Vd]``."""
    import math

    def run(inputs, toks, pos, visible):
        g = inputs[None]
        emb = torch.nn.functional.embedding(toks, embed_w)[None]
        attn = head.midlayer.self_attn
        rep, scale = attn.heads // attn.kv_heads, 1.0 / math.sqrt(attn.head_dim)

        def attend(q, k, v):
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            s = (q @ k.transpose(2, 3)) * scale
            return torch.softmax(s.masked_fill(~visible, float("-inf")), -1) @ v

        g = head.residual_update(g, attend(*head.attention_inputs(emb, g, pos[None])))
        for layer in head.layers:
            g = layer.residual_update(g, attend(*layer.attention_inputs(g, head.rotary,
                                                                         pos[None])))
        return g[0]

    t = tokens.shape[0]
    base_in = head.fc(states[: j + 1])
    base_tok = tokens[1: j + 2]
    out = []
    chain_in, chain_tok, chain_pos = [], [], []
    for k in range(steps):
        n = j + 1 + k
        visible = torch.zeros((n, n), dtype=torch.bool)
        visible[: j + 1, : j + 1] = torch.ones((j + 1, j + 1), dtype=torch.bool).tril_()
        for c in range(k):
            visible[j + 1 + c, : j + 1] = True
            visible[j + 1 + c, j + 1: j + 2 + c] = True
        inputs = torch.cat([base_in] + chain_in) if chain_in else base_in
        toks = torch.cat([base_tok] + chain_tok) if chain_tok else base_tok
        pos = torch.cat([torch.arange(j + 1)] + chain_pos) if chain_pos else torch.arange(j + 1)
        states_out = run(inputs, toks, pos, visible)
        last = states_out[-1]
        out.append(head.lm_head(head.norm(last)))
        chain_in.append(last[None])
        chain_tok.append(tokens[min(j + k + 2, t - 1)][None])
        chain_pos.append(torch.tensor([j + k + 1]))
    return torch.stack(out)


def test_ttt_unroll_of_a_two_layer_head_matches_a_masked_reference(tmp_path):
    """With a stacked layer (train-draft --head-layers 2), each layer attends to its own keys
    along the chain, as the explicit-mask reference computes; a chain fed one token early
    differs (the comparison can fail)."""
    target = _target()
    seq = torch.randint(3, VOCAB, (18,), generator=torch.Generator().manual_seed(7)).tolist()
    head, layers = _head(target, torch.arange(3, VOCAB), head_layers=2)
    assert len(head.layers) == 1
    data = _pass(target, [seq], layers, tmp_path / "cache")
    tokens, states = data["tokens"].long()[None], data["states"].float()[None]
    embed_w = target.model.get_input_embeddings().weight
    steps = 3
    with torch.no_grad():
        train_logits = td.ttt_forward(head.eval(), embed_w, tokens, states, steps)
        t = tokens.shape[1]
        for j in (0, 6, t - steps - 1):
            want = _masked_attention_chain(head, embed_w, tokens[0], states[0], j, steps)
            for k in range(steps):
                torch.testing.assert_close(train_logits[k][0, j], want[k], rtol=1e-4, atol=1e-4)
        shifted = torch.cat([tokens[0, :1], tokens[0, :-1]])
        wrong = _masked_attention_chain(head, embed_w, shifted, states[0], 6, steps)
        assert not torch.allclose(wrong[1], train_logits[1][0, 6], atol=1e-3)


def test_a_stacked_layer_starts_as_the_one_layer_head(tmp_path):
    """Growing a one-layer head by a stacked layer (zero residual branches) keeps its function,
    so --head-layers 2 --init-from a 1-layer head starts where that head is."""
    target = _target()
    seq = torch.randint(3, VOCAB, (14,), generator=torch.Generator().manual_seed(8)).tolist()
    one, layers = _head(target, torch.arange(3, VOCAB))
    draft_ids = torch.arange(3, VOCAB)
    two = Eagle3Head(eagle3_config(td.head_config(target, int(draft_ids.numel()), layers, 2)))
    td.init_head(two, target, draft_ids)  # what train_draft does before loading --init-from
    with torch.no_grad():
        for name, p in one.named_parameters():
            dict(two.named_parameters())[name].copy_(p)
        # the stacked layer's other weights are random; only its residual branches are zero
        for p in two.layers[0].parameters():
            if p.dim() == 2 and p.abs().sum() == 0:
                continue
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(9)))
    data = _pass(target, [seq], layers, tmp_path / "cache")
    tokens, states = data["tokens"].long()[None], data["states"].float()[None]
    embed_w = target.model.get_input_embeddings().weight
    with torch.no_grad():
        a = td.ttt_forward(one.eval(), embed_w, tokens, states, 3)
        b = td.ttt_forward(two.eval(), embed_w, tokens, states, 3)
        for x, y in zip(a, b):
            assert torch.equal(x, y)
        two.layers[0].mlp.down_proj.weight.add_(0.01)  # a live branch changes the logits
        c = td.ttt_forward(two, embed_w, tokens, states, 3)
    assert not torch.allclose(a[0], c[0], atol=1e-4)
    # drafting has no stacked-layer path: refused, never silently run as one layer
    from heterospec.errors import DraftCheckpointError

    with pytest.raises(DraftCheckpointError, match="2 decoder layers"):
        Eagle3Drafter(two, target)
    with pytest.raises(NotImplementedError, match="one-layer heads"):
        two(tokens[0, :2], states[0, :2], torch.arange(2), torch.ones(2, 2, dtype=torch.bool),
            two.new_cache(), from_target=True)


def test_target_pass_labels_states_and_resume(tmp_path):
    """Shards hold the target's top-k next-token log-probs and the captured states of every
    position; an interrupted pass resumes from its last finished shard with the same result."""
    target = _target(logit_scale=5.0)
    layers = [2, LAYERS // 2, LAYERS - 3]
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (9, 14, 6, 11, 8)]
    whole = td.target_pass(target, seqs, layers, str(tmp_path / "whole"), topk=5, shard_tokens=10)
    assert len(whole.shards) >= 3 and whole.tokens == sum(map(len, seqs))
    first = whole.load(0)
    s0 = torch.tensor(seqs[0])
    with torch.no_grad():
        out = target.model(input_ids=s0[None], output_hidden_states=True)
    logp = torch.log_softmax(out.logits[0].float(), -1)
    top = torch.topk(logp, 5)
    n0 = len(seqs[0])
    assert torch.equal(first["top_ids"][:n0].long(), top.indices)
    torch.testing.assert_close(first["top_logp"][:n0].float(), top.values, atol=2e-3, rtol=1e-3)
    want_states = torch.cat([out.hidden_states[i][0] for i in layers], -1)
    torch.testing.assert_close(first["states"][:n0].float(), want_states, atol=1e-4, rtol=1e-4)
    # interrupt after the first shard: a progress callback that raises
    seen = []

    def stop_after_first_shard(n):
        seen.append(n)
        if sum(seen) > 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        td.target_pass(target, seqs, layers, str(tmp_path / "split"), topk=5, shard_tokens=10,
                       progress=stop_after_first_shard)
    before = target.forward_calls
    split = td.target_pass(target, seqs, layers, str(tmp_path / "split"), topk=5,
                           shard_tokens=10)
    assert 0 < target.forward_calls - before < len(seqs)  # the finished shard is not recomputed
    for i in range(len(whole.shards)):
        a, b = whole.load(i), split.load(i)
        for name in a:
            assert torch.equal(a[name], b[name]), name
    with pytest.raises(ValueError, match="other data"):
        td.target_pass(target, seqs[:2], layers, str(tmp_path / "split"), topk=5,
                       shard_tokens=20)


def test_choose_draft_vocab_frequency_ties_and_specials():
    counts = torch.bincount(torch.tensor([5, 5, 5, 7, 7, 9, 9, 2, 11]), minlength=16)
    ids = td.choose_draft_vocab(counts, 3, always=[0])
    # 0 forced; then 5 (3x); then 7 and 9 tie (2x) -> the lower id 7
    assert ids.tolist() == [0, 5, 7]
    assert td.choose_draft_vocab(counts, 40).numel() == 16
    cov = td.vocab_coverage(counts, torch.bincount(torch.tensor([5, 9]), minlength=16), sizes=(2,))
    assert cov[2] == {"train": round(5 / 9, 4), "heldout": 0.5}


def _small_cfg(**kw):
    base = dict(max_tokens=1500, regenerate_tokens=300, regenerate_max_new=12,
                regenerate_batch=8, regenerate_prompt_max=64, max_len=64, offset=0,
                heldout_offset=50, heldout_conversations=6, heldout_prompts=6, topk_labels=8,
                shard_tokens=400, draft_vocab=32, epochs=3, ttt_steps=2, batch_tokens=256,
                lr=3e-3, warmup_steps=4, save_dtype="float32", checkpoint_every=5)
    base.update(kw)
    return td.TrainConfig(**base)


def test_train_draft_learns_evaluates_and_decodes_exactly(tmp_path):
    target = _target(logit_scale=30.0)
    cfg = _small_cfg()
    out = tmp_path / "head"
    prov = td.train_draft(target, _conversations(60), str(out), cfg, str(tmp_path / "work"),
                          "tiny")
    assert prov["steps"] >= 20 and prov["complete"]
    assert prov["data"]["target_answers"] > 0 and prov["data"]["heldout_self"]["answers"] > 0
    saved = json.loads((out / "TRAINING.json").read_text())
    assert saved["data"]["train_tokens"] == prov["data"]["train_tokens"]
    evals = saved["evaluations"]
    assert [e["epoch"] for e in evals] == [1, 2, 3]
    for e in evals:
        for name in ("heldout_sharegpt", "heldout_self"):
            accs = e[name]["acceptance_per_step"]
            assert len(accs) == 2 and all(0.0 <= a <= 1.0 for a in accs)
    # learning shows on held-out data: the loss falls from the first epoch to the last
    assert evals[-1]["heldout_self"]["loss"] < evals[0]["heldout_self"]["loss"]
    assert prov["draft_vocab"] == 32

    drafter = Eagle3Drafter.from_pretrained(str(out), target, top_k=3)
    policy = hs.StaticTree(depth=3, top_k=3, total_tokens=8)
    gen = hs.SpeculativeGenerator(target, drafter, policy)
    prompt = target.tokenizer("q hello tree draft").input_ids
    ref = hs.autoregressive_generate(target, prompt, 24).token_ids
    res = gen.generate(prompt, 24)
    assert res.token_ids == ref
    assert res.stats.cycles < 24


def test_interrupted_training_resumes_to_the_same_head(tmp_path):
    """Stop mid-epoch (after a checkpoint), rerun the same command: the run continues from the
    checkpoint and data cursor and ends with exactly the head of an uninterrupted run."""
    target = _target(logit_scale=30.0)
    convs = _conversations(60)
    straight = td.train_draft(target, convs, str(tmp_path / "a"), _small_cfg(),
                              str(tmp_path / "work-a"), "tiny")
    cfg = _small_cfg()

    class Stop(Exception):
        pass

    def log(msg):
        if msg.startswith("step 10/"):
            raise Stop

    with pytest.raises(Stop):
        td.train_draft(target, convs, str(tmp_path / "b"), cfg, str(tmp_path / "work-b"),
                       "tiny", log=log)
    messages = []
    resumed = td.train_draft(target, convs, str(tmp_path / "b"), _small_cfg(),
                             str(tmp_path / "work-b"), "tiny", log=messages.append)
    assert any(m.startswith("resuming at step 10") for m in messages), messages
    assert resumed["steps"] == straight["steps"]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_max_steps_budget_and_a_stacked_head_grown_from_a_trained_one(tmp_path):
    """--max-steps ends training (one evaluation, head written) after that many steps; a
    two-layer head warm-starts from a one-layer checkpoint, is written with its stacked layer,
    and is refused by the drafter and by a one-layer --init-from with errors that say why."""
    from safetensors.torch import load_file

    from heterospec.errors import DataError, DraftCheckpointError

    target = _target(logit_scale=30.0)
    convs = _conversations(60)
    one = tmp_path / "one"
    td.train_draft(target, convs, str(one), _small_cfg(epochs=1), str(tmp_path / "w1"), "tiny")
    two = tmp_path / "two"
    cfg = _small_cfg(epochs=2, max_steps=4, head_layers=2, init_from=str(one))
    prov = td.train_draft(target, convs, str(two), cfg, str(tmp_path / "w2"), "tiny")
    assert prov["steps"] == 4 and prov["complete"] and prov["steps_per_epoch"] > 4
    assert [e["step"] for e in prov["evaluations"]] == [4]
    assert json.loads((two / "config.json").read_text())["num_hidden_layers"] == 2
    tensors = load_file(str(two / "model.safetensors"))
    assert tensors["layers.0.mlp.down_proj.weight"].abs().sum() > 0  # trained from zero
    assert torch.equal(tensors["d2t"], load_file(str(one / "model.safetensors"))["d2t"])
    with pytest.raises(DraftCheckpointError, match="one-layer heads"):
        Eagle3Drafter.from_pretrained(str(two), target)
    # rerunning the finished command trains nothing more
    again = td.train_draft(target, convs, str(two), cfg, str(tmp_path / "w2"), "tiny")
    assert again["steps"] == 4
    with pytest.raises(DataError, match="--head-layers 1"):
        td.train_draft(target, convs, str(tmp_path / "three"), _small_cfg(init_from=str(two)),
                       str(tmp_path / "w3"), "tiny")


def test_train_draft_cli_rejects_bad_sizes(tmp_path, capsys):
    from heterospec.cli import main

    rc = main(["train-draft", "--out", str(tmp_path / "h"), "--epochs", "0",
               "--model", str(tmp_path / "missing.gguf")])  # argparse: before anything loads
    assert rc == 2
    assert "--epochs: must be >= 1, got 0" in capsys.readouterr().err
    # sizes that only the training config can judge: no data at all
    rc = main(["train-draft", "--out", str(tmp_path / "h"), "--max-tokens", "0",
               "--regenerate-tokens", "0", "--model", str(tmp_path / "missing.gguf")])
    assert rc == 2
    assert "--max-tokens must be > 0" in capsys.readouterr().err
    rc = main(["train-draft", "--out", str(tmp_path / "h"), "--head-layers", "3",
               "--model", str(tmp_path / "missing.gguf")])
    assert rc == 2
    assert "--head-layers: must be <= 2, got 3" in capsys.readouterr().err


def test_answer_pass_is_greedy_ar_with_exact_labels_and_resumes(tmp_path):
    """Self-distillation data: each record is the prompt plus the target's own greedy answer
    (the AR loop's, EOS included), its labels and states are those of a full forward of the
    sequence, the token budget stops new prompts, and an interrupted pass resumes."""
    target = _target(logit_scale=30.0)
    layers = [2, LAYERS // 2, LAYERS - 3]
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (4, 9, 2, 6, 5, 3)]
    shards = td.answer_pass(target, prompts, layers, str(tmp_path / "a"), max_tokens=10 ** 6,
                            max_new=12, batch=4, topk=6, shard_tokens=30)
    seen = set()
    for i in range(len(shards.shards)):
        shard = shards.load(i)
        for r, ref in enumerate(shards.shards[i]["refs"]):
            a, b = int(shard["offsets"][r]), int(shard["offsets"][r + 1])
            toks = shard["tokens"][a:b].tolist()
            prompt = prompts[ref]
            want = hs.autoregressive_generate(target, prompt, 12, stop_token_ids=[1]).token_ids
            assert toks == prompt + want
            with torch.no_grad():
                out = target.model(input_ids=torch.tensor([toks]), output_hidden_states=True)
            top = torch.topk(torch.log_softmax(out.logits[0].float(), -1), 6)
            assert torch.equal(shard["top_ids"][a:b].long(), top.indices)
            torch.testing.assert_close(shard["top_logp"][a:b].float(), top.values, atol=2e-3,
                                       rtol=1e-3)
            states = torch.cat([out.hidden_states[i][0] for i in layers], -1)
            torch.testing.assert_close(shard["states"][a:b].float(), states, atol=1e-4,
                                       rtol=1e-4)
            seen.add(ref)
    assert seen == set(range(len(prompts)))
    # a budget of 1 answer token: the first batch's prompts only (read lazily)
    few = td.answer_pass(target, prompts, layers, str(tmp_path / "b"), max_tokens=1, max_new=12,
                         batch=2, topk=6, shard_tokens=30)
    assert sum(len(s["refs"]) for s in few.shards) == 2

    class Stop(Exception):
        pass

    calls = []

    def stop_late(n):
        calls.append(n)
        if len(calls) == 4:
            raise Stop

    with pytest.raises(Stop):
        td.answer_pass(target, prompts, layers, str(tmp_path / "c"), max_tokens=10 ** 6,
                       max_new=12, batch=2, topk=6, shard_tokens=1, progress=stop_late)
    done = {r for s in json.loads((tmp_path / "c" / "manifest.json").read_text())["shards"]
            for r in s["refs"]}
    assert len(done) == 3  # shards of one record each: written before the interruption
    before = target.forward_calls
    resumed = td.answer_pass(target, prompts, layers, str(tmp_path / "c"), max_tokens=10 ** 6,
                             max_new=12, batch=2, topk=6, shard_tokens=1)
    assert {r for s in resumed.shards for r in s["refs"]} == set(range(len(prompts)))
    assert target.forward_calls - before < sum(12 + 1 for _ in prompts)  # 3 prompts skipped
