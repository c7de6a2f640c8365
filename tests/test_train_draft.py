"""``heterospec train-draft`` on a tiny random Llama: the training-time-test unroll computes what
the inference drafter computes along a tree chain, a few training steps lower the loss, and the
saved checkpoint loads into Eagle3Drafter and decodes exactly like the target."""
import json
import os

import pytest
import torch

from test_driver_support import one_thread, tiny_llama  # noqa: F401  (one_thread: a fixture)

import heterospec as hs  # noqa: E402
from heterospec import train_draft as td  # noqa: E402
from heterospec.eagle3 import Eagle3Drafter, Eagle3Head, eagle3_config  # noqa: E402

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


def _head(target, draft_ids, seed=1):
    layers = [2, LAYERS // 2, LAYERS - 3]
    head = Eagle3Head(eagle3_config(td.head_config(target, int(draft_ids.numel()), layers)))
    td.init_head(head, target, draft_ids)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every weight matters in the comparison, not only the init
        for p in head.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return head, layers


def test_ttt_unroll_matches_inference_tree_chain(tmp_path):
    target = _target()
    g = torch.Generator().manual_seed(3)
    seq = torch.randint(3, VOCAB, (23,), generator=g).tolist()
    draft_ids = torch.arange(3, VOCAB, 2)
    head, layers = _head(target, draft_ids)
    data = td.target_pass(target, [seq], layers, str(tmp_path / "cache"), "tiny")
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
    data = td.target_pass(target, [seq], layers, str(tmp_path / "cache"), "tiny")
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


def test_choose_draft_vocab_frequency_ties_and_specials():
    tokens = torch.tensor([5, 5, 5, 7, 7, 9, 9, 2, 11], dtype=torch.int32)
    ids = td.choose_draft_vocab(tokens, 16, 3, always=[0])
    # 0 forced; then 5 (3x); then 7 and 9 tie (2x) -> the lower id 7
    assert ids.tolist() == [0, 5, 7]
    assert td.choose_draft_vocab(tokens, 16, 40).numel() == 16


def test_train_draft_loss_falls_and_checkpoint_decodes_exactly(tmp_path):
    target = _target(logit_scale=30.0)
    cfg = td.TrainConfig(max_tokens=2500, max_len=96, draft_vocab=32, epochs=4, ttt_steps=2,
                         batch_tokens=256, lr=3e-3, warmup_steps=4, save_dtype="float32")
    out = tmp_path / "head"
    cache_dir = str(tmp_path / "cache")
    prov = td.train_draft(target, _conversations(60), str(out), cfg, cache_dir, "tiny")
    assert prov["steps"] >= 20
    assert prov["final_loss"] < 0.8 * prov["first_loss"], prov
    assert json.loads((out / "TRAINING.json").read_text())["tokens"] == prov["tokens"]
    assert prov["draft_vocab"] == 32

    # the cached target pass is reused: no target forward the second time
    calls = []
    base = target.model.model
    handle = base.register_forward_hook(lambda *a: calls.append(1))
    try:
        seqs = td.token_sequences(target.tokenizer, _conversations(60), cfg)
        td.target_pass(target, seqs, prov["capture_layers"], cache_dir, "tiny")
    finally:
        handle.remove()
    assert calls == []

    drafter = Eagle3Drafter.from_pretrained(str(out), target, top_k=3)
    policy = hs.StaticTree(depth=3, top_k=3, total_tokens=8)
    gen = hs.SpeculativeGenerator(target, drafter, policy)
    prompt = target.tokenizer("q hello tree draft").input_ids
    ref = hs.autoregressive_generate(target, prompt, 24).token_ids
    res = gen.generate(prompt, 24)
    assert res.token_ids == ref
    assert res.stats.cycles < 24


def test_train_draft_cli_rejects_bad_sizes(tmp_path, capsys):
    from heterospec.cli import main

    rc = main(["train-draft", "--out", str(tmp_path / "h"), "--max-tokens", "0",
               "--model", str(tmp_path / "missing.gguf")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--max-tokens must be > 0" in err
