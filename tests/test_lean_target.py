"""The lean CPU target path (heterospec.lean_target.LeanDecoder, heterospec.packed_linear): the
same function as the Hugging Face module, on random Llama-family models, in float32 and bfloat16;
its cache, capture and verifier contract; and which models it refuses."""
import pytest
import torch

import heterospec as hs
from heterospec.lean_target import LeanDecoder, lean_unsupported_reason
from heterospec.packed_linear import PackedLinear
from heterospec.testing import IgnoresMask, tiny_llama
from heterospec.verifier import DynamicTreeCache, make_verifier

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 48


def tiny_qwen2(vocab=VOCAB, seed=0, layers=2, hidden=32):
    """A random Qwen2 (q/k/v biases, tied embeddings): the bias path of the lean forward."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=True,
                      attn_implementation="eager")
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # visible biases (HF initialises them to zero)
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model


def random_norms(model):
    """Every RMSNorm weight drawn from U(0.5, 1.5) (HF initialises them to ones, under which a
    forward using the wrong layer's norm would go unnoticed)."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model


MODELS = {
    "llama-gqa": lambda: random_norms(tiny_llama(VOCAB, seed=3, layers=3, hidden=32,
                                                 logit_scale=10.0)),
    "qwen2-bias-tied": lambda: random_norms(tiny_qwen2(seed=4)),
}


def _hf_logits(model, tokens, positions=None, mask=None, cache=None):
    with torch.no_grad():
        return model(input_ids=tokens[None], position_ids=None if positions is None else
                     positions[None], attention_mask=mask, past_key_values=cache,
                     use_cache=cache is not None).logits[0].float()


def _ancestors(parents):
    anc = torch.eye(len(parents), dtype=torch.bool)
    for i in range(1, len(parents)):
        anc[i] |= anc[parents[i]]
    return anc


def _lean(target, layer_ops):
    """A LeanDecoder running its layers with the decode-layer ops ("fused") or as the torch
    composition ("torch")."""
    lean = LeanDecoder(target)
    lean.w.fused = layer_ops == "fused"
    return lean


LAYER_OPS = ("fused", "torch")


@pytest.mark.parametrize("layer_ops", LAYER_OPS)
@pytest.mark.parametrize("name", MODELS)
def test_lean_forward_equals_hf_float32(name, layer_ops):
    model = MODELS[name]()
    target = hs.CausalLM(model, name=name)
    lean = _lean(target, layer_ops)
    ids = torch.randint(0, VOCAB, (37,), generator=torch.Generator().manual_seed(1))
    full = lean.prefill(ids, last_only=False).float()
    torch.testing.assert_close(full, _hf_logits(model, ids), atol=1e-4, rtol=1e-4)
    assert lean.length == 37
    # one-token steps (the AR loop) take rope_cache_attention on the fused path
    step = lean.prefill(ids[:1]).float()
    torch.testing.assert_close(step, _hf_logits(model, torch.cat([ids, ids[:1]]))[-1:],
                               atol=1e-4, rtol=1e-4)
    # trees after the first 20 tokens: node 0 = token 20, two branches of depth 2 (5 nodes:
    # torch's attention), and one of them alone (3 nodes: rope_cache_attention when fused)
    for tokens, parents, depth in (
            (torch.tensor([ids[20], 5, 9, 7, 11]), [-1, 0, 1, 0, 3], [0, 1, 2, 1, 2]),
            (torch.tensor([ids[20], 7, 11]), [-1, 0, 1], [0, 1, 2])):
        lean.reset()
        lean.prefill(ids[:20])
        tree = lean.tree_forward(tokens, torch.tensor(depth), _ancestors(parents)).float()
        assert lean.length == 20  # uncommitted
        for leaf in range(len(parents)):
            path = [i for i in range(len(parents)) if _ancestors(parents)[leaf, i]]
            seq = torch.cat([ids[:20], tokens[path]])
            ref = _hf_logits(model, seq)[-1]
            torch.testing.assert_close(tree[leaf], ref, atol=1e-4, rtol=1e-4)
    lean.reset()
    lean.prefill(ids[:20])
    tokens = torch.tensor([ids[20], 5, 9, 7, 11])
    lean.tree_forward(tokens, torch.tensor([0, 1, 2, 1, 2]), _ancestors([-1, 0, 1, 0, 3]))
    # commit the second branch: the cache then equals a plain forward of that sequence
    lean.compact(torch.tensor([0, 3, 4, -1, -1]), torch.tensor(2))
    assert lean.length == 23
    fresh = DynamicTreeCache(target)
    fresh.prefill(torch.cat([ids[:20], tokens[[0, 3, 4]]]))
    for (k, v), (fk, fv) in zip(zip(*lean.committed()), zip(*fresh.committed())):
        torch.testing.assert_close(k, fk, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(v, fv, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layer_ops", LAYER_OPS)
@pytest.mark.parametrize("name", MODELS)
def test_lean_forward_bfloat16_is_within_rounding(name, layer_ops):
    """bfloat16 weights: the lean forward is at least as close to the float32 function as the
    HF module in bfloat16 is (it keeps the residual stream in float32)."""
    model = MODELS[name]()
    ids = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(2))
    exact = _hf_logits(model, ids)
    bf16 = MODELS[name]()._apply(lambda t: t.bfloat16() if t.is_floating_point() else t)
    hf_err = (_hf_logits(bf16, ids) - exact).abs().max().item()
    lean = _lean(hs.CausalLM(bf16, name=name, check_tree_attention=False), layer_ops)
    lean_err = (lean.prefill(ids, last_only=False).float() - exact).abs().max().item()
    scale = exact.abs().max().item()
    assert lean_err <= max(1.25 * hf_err, 0.02 * scale), (lean_err, hf_err, scale)
    # one-token steps (rope_cache_attention on the fused path), against HF in bfloat16
    for t in range(3):
        seq = torch.cat([ids, ids[:t + 1]])
        step_err = (lean.prefill(ids[t:t + 1]).float() - _hf_logits(model, seq)[-1:]).abs()
        hf_step_err = (_hf_logits(bf16, seq)[-1:] - _hf_logits(model, seq)[-1:]).abs()
        assert step_err.max() <= max(1.25 * hf_step_err.max(), 0.02 * scale)


@pytest.mark.parametrize("max_rows,max_work", [(4, 12_000), (32, 12_000), (32, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_layer_ops_match_the_torch_composition(dtype, max_rows, max_work, monkeypatch):
    """The fused layer (decode-layer ops) and the torch composition compute the same function:
    prefill, one-token steps and trees of 3 and 9 nodes (the 9-node tree through torch's
    attention or rope_cache_attention, by rows and by rows x keys), with captured states."""
    import heterospec.lean_target as lt

    monkeypatch.setattr(lt, "FUSED_ATTENTION_MAX_ROWS", max_rows)
    monkeypatch.setattr(lt, "FUSED_ATTENTION_MAX_WORK", max_work)
    model = MODELS["llama-gqa"]()._apply(lambda t: t.to(dtype) if t.is_floating_point() else t)
    target = hs.CausalLM(model, check_tree_attention=False)
    target.capture_hidden_states([0, 2])
    ids = torch.randint(0, VOCAB, (30,), generator=torch.Generator().manual_seed(7))
    parents = [-1, 0, 1, 0, 3, 3, 1, 6, 0]
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=0.02)
    outs = {}
    for layer_ops in LAYER_OPS:
        lean = _lean(target, layer_ops)
        got = [lean.prefill(ids[:25], last_only=False), target.captured_hidden,
               lean.prefill(ids[25:26]), target.captured_hidden]
        for size in (3, 9):
            anc = _ancestors(parents[:size])
            depth = anc.sum(1) - 1
            got += [lean.tree_forward(ids[26:26 + size] if size == 3 else ids[20:29], depth, anc),
                    target.captured_hidden]
        lean.compact(torch.tensor([0, 3, 5, -1]), 2)
        got.append(lean.prefill(ids[29:30]))
        outs[layer_ops] = got
        assert lean.w.fused == (layer_ops == "fused")
    for a, b in zip(outs["fused"], outs["torch"]):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a.float(), b.float(), **tol)


def test_capture_matches_hf_hidden_states():
    model = MODELS["llama-gqa"]()
    target = hs.CausalLM(model)
    target.capture_hidden_states([0, 2])
    ids = torch.randint(0, VOCAB, (9,), generator=torch.Generator().manual_seed(3))
    lean = LeanDecoder(target)
    lean.prefill(ids[:6])
    first = target.captured_hidden
    lean.prefill(ids[6:])
    with torch.no_grad():
        hs_ = model(input_ids=ids[None], output_hidden_states=True).hidden_states
    want = torch.cat([hs_[0][0], hs_[2][0]], dim=-1)
    torch.testing.assert_close(torch.cat([first, target.captured_hidden]), want, atol=1e-5,
                               rtol=1e-4)


def test_prefill_chunks_and_capacity_growth(monkeypatch):
    import heterospec.lean_target as lt

    monkeypatch.setattr(lt, "PREFILL_CHUNK", 7)
    model = MODELS["llama-gqa"]()
    target = hs.CausalLM(model)
    lean = LeanDecoder(target, capacity=16)
    ids = torch.randint(0, VOCAB, (50,), generator=torch.Generator().manual_seed(4))
    got = lean.prefill(ids, last_only=False).float()
    assert got.shape == (50, VOCAB) and lean.capacity >= 50
    torch.testing.assert_close(got, _hf_logits(model, ids), atol=1e-4, rtol=1e-4)
    last = lean.prefill(ids[:3])
    assert last.shape == (1, VOCAB) and lean.length == 53


def test_context_limit_is_a_clear_error():
    target = hs.CausalLM(tiny_llama(VOCAB, seed=5))  # max_position_embeddings 512
    lean = LeanDecoder(target)
    with pytest.raises(hs.GenerationConfigError, match="context of 512"):
        lean.prefill(torch.zeros(513, dtype=torch.int64))


def test_unsupported_models_fall_back_to_the_hf_module():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2)).eval()
    reason = lean_unsupported_reason(gpt2)
    assert reason is not None and "gpt2" in reason
    sliding = tiny_llama(VOCAB, seed=6)
    sliding.config.layer_types = ["sliding_attention", "full_attention"]
    assert "sliding" in lean_unsupported_reason(sliding)
    target = hs.CausalLM(tiny_llama(VOCAB, seed=7))
    target.model.config.hidden_act = "gelu"
    with pytest.raises(hs.UnsupportedModelError, match="hidden_act"):
        make_verifier(target, "lean")
    assert isinstance(make_verifier(target, "auto"), DynamicTreeCache)
    target.model.config.hidden_act = "silu"
    assert isinstance(make_verifier(target, "auto"), LeanDecoder)
    with pytest.raises(hs.GenerationConfigError, match="verifier must be one of"):
        make_verifier(target, "fast")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_linear(dtype, bias):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(67, 45, generator=g)
    b = torch.randn(67, generator=g) if bias else None
    for rows in (1, 3, 16, 70):
        x = torch.randn(rows, 45, generator=g)
        want = x.double() @ w.double().T + (0 if b is None else b.double())
        got = PackedLinear(w, b, dtype)(x.to(dtype)).double()
        # bfloat16: inputs, weights and the output each rounded once (2^-8 relative)
        tol = 1e-5 if dtype == torch.float32 else 4e-2 * want.abs().max().item()
        assert (got - want).abs().max().item() <= tol
    lin = [torch.nn.Linear(45, 10), torch.nn.Linear(45, 6, bias=False)]
    fused = PackedLinear.fuse(lin, torch.float32)
    x = torch.randn(4, 45, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), torch.cat([lin[0](x), lin[1](x)], -1))


def test_tree_attention_probe_per_dtype():
    """The probe accepts a correct model in float32 and bfloat16 (bf16 rounding is not a mask
    violation) and rejects a model that ignores the mask in both."""

    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_llama(VOCAB, seed=8, logit_scale=30.0)
        model._apply(lambda t: t.to(dtype) if t.is_floating_point() else t)
        hs.CausalLM(model)  # passes
        with pytest.raises(hs.UnsupportedModelError, match="does not honour"):
            hs.CausalLM(IgnoresMask(model))


def test_rope_table_rotates_like_hf():
    """RopeTable.rotate (signed-sin table, roll) against HF's x * cos + rotate_half(x) * sin, at
    gathered positions and at one broadcast position, odd head count and far positions."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, rotate_half

    from heterospec.lean_target import RopeTable

    from transformers import LlamaConfig

    rotary = LlamaRotaryEmbedding(LlamaConfig(hidden_size=48, num_attention_heads=3,
                                              max_position_embeddings=4096))
    table = RopeTable(rotary)
    gen = torch.Generator().manual_seed(0)
    positions = torch.tensor([0, 5, 3, 1500, 2047])
    x = torch.randn((5, 3, 16), generator=gen, dtype=torch.float64).float()
    cos, sin = rotary(x, positions[None])
    want = x * cos[0][:, None] + rotate_half(x) * sin[0][:, None]
    torch.testing.assert_close(RopeTable.rotate(x, table.at(positions)), want,
                               atol=1e-5, rtol=1e-5)
    same = RopeTable.rotate(x, table.at_position(1500, 5))
    torch.testing.assert_close(same, RopeTable.rotate(x, table.at(torch.full((5,), 1500))))
    assert table.table.shape[0] >= 2048
