"""The driver's CUDA-graph path (heterospec.cuda_graphs) on tiny random Llamas: graph replay
equals the eager static-cache forward, and greedy decoding through replays equals the target's
own greedy decoding. GPU only (bench/gpu_check.sh runs it); every test name says cuda so that
script's ``-k cuda`` selects it."""
import pytest
import torch

import heterospec as hs
from heterospec.testing import greedy_by_full_forwards, tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

VOCAB = 64
DEV = torch.device("cuda")


def cuda_lm(seed, layers=2, name="tiny"):
    return hs.CausalLM(tiny_llama(VOCAB, seed=seed, layers=layers, logit_scale=30.0).to(DEV),
                       name=name)


def random_tree(n, gen):
    """A random tree of n nodes (parents precede children): depth [n], ancestors [n, n]."""
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)]
    anc = torch.eye(n, dtype=torch.bool)
    depth = [0] * n
    for i in range(1, n):
        anc[i] |= anc[parents[i]]
        depth[i] = depth[parents[i]] + 1
    return torch.tensor(depth, device=DEV), anc.to(DEV)


def test_cuda_graph_replay_equals_eager_forward():
    from heterospec.cuda_graphs import GraphedTarget

    target = cuda_lm(1)
    graphed = GraphedTarget(target, max_len=64, sizes=[4, 7])
    assert target.forward_calls == 0  # capture forwards are not counted
    gen = torch.Generator().manual_seed(0)
    for step, n in enumerate([4, 7, 4, 7]):
        # a new prefix length every time; rows of earlier steps stay behind as stale entries
        prompt = torch.randint(2, VOCAB, (9 - 2 * step,), generator=gen).to(DEV)
        graphed.reset()
        graphed.prefill(prompt)
        toks = torch.randint(2, VOCAB, (n,), generator=gen).to(DEV)
        depth, anc = random_tree(n, gen)
        got = graphed.tree_forward(toks, depth, anc).clone()
        eager = graphed.cache.tree_forward(toks, depth, anc)  # same prefix, same slots
        torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
        dyn = target.new_cache()
        target.causal_forward(prompt, dyn)
        want = target.tree_forward(toks, depth, anc, dyn)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert graphed.replays == 4 and graphed.eager_calls == 0
    toks = torch.randint(2, VOCAB, (5,), generator=gen).to(DEV)
    depth, anc = random_tree(5, gen)
    graphed.tree_forward(toks, depth, anc)  # no graph of 5 nodes: eager fallback
    assert graphed.eager_calls == 1


@pytest.mark.parametrize("policy", [
    hs.StaticTree(depth=3, top_k=3, total_tokens=8),
    hs.HeteroSpec(depth=3, top_k=3, total_tokens=10, thresholds=[0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0]),
], ids=["static", "heterospec"])
def test_cuda_graphs_greedy_equals_autoregressive(policy):
    target, draft = cuda_lm(1, name="target"), cuda_lm(2, name="draft")
    gen = hs.SpeculativeGenerator(target, hs.ModelDrafter(draft, top_k=policy.top_k), policy,
                                  cuda_graphs=True, max_len=128)
    for prompt in ([5], [3, 9, 27, 4, 4, 11, 2]):
        want = greedy_by_full_forwards(target, prompt, 24)
        assert hs.autoregressive_generate(target, prompt, 24).token_ids == want
        res = gen.generate(prompt, 24)
        assert res.token_ids == want
        n = gen.cache.get_seq_length()
        assert n == len(gen.committed) - 1
        fresh = target.new_cache()
        target.causal_forward(torch.tensor(gen.committed[:n], device=DEV), fresh)
        keys, values = gen.cache.committed()
        for k, v, layer in zip(keys, values, fresh.layers):
            torch.testing.assert_close(k, layer.keys, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(v, layer.values, atol=1e-4, rtol=1e-4)
    assert gen.verifier.replays > 0


def test_cuda_graphs_with_eagle3_and_high_acceptance():
    """Draft = target via ModelDrafter gives multi-node acceptance; EAGLE-3 reads the graph's
    static captured-hidden output."""
    from heterospec.eagle3 import Eagle3Drafter, Eagle3Head

    target = cuda_lm(1, layers=6, name="target")
    policy = hs.StaticTree(depth=3, top_k=2, total_tokens=6)
    gen = hs.SpeculativeGenerator(target, hs.ModelDrafter(target, top_k=2), policy,
                                  cuda_graphs=True, max_len=96)
    res = gen.generate([4, 5, 6], 30)
    assert res.token_ids == greedy_by_full_forwards(target, [4, 5, 6], 30)
    assert res.stats.tau > 2.0

    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, rms_norm_eps=1e-5)
    cfg.draft_vocab_size, cfg.target_hidden_size, cfg.head_dim = 48, 32, 8
    torch.manual_seed(0)
    head = Eagle3Head(cfg, embed=target.model.get_input_embeddings()).to(DEV).eval()
    eager_out = []
    for graphs in (False, True):
        drafter = Eagle3Drafter(head, target, top_k=2, capture_layers=[0, 2, 4])
        gen = hs.SpeculativeGenerator(target, drafter, policy, static_cache=True,
                                      cuda_graphs=graphs, max_len=96)
        eager_out.append(gen.generate([3, 9, 27, 4], 20).token_ids)
    assert eager_out[0] == eager_out[1] == greedy_by_full_forwards(target, [3, 9, 27, 4], 20)
