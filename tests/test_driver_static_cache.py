"""The static-shape target cache (heterospec.static_cache) run eagerly on CPU: the code the CUDA
graphs capture, checked against the dynamic-cache driver, a plain forward and by hand."""
import pytest
import torch

import heterospec as hs
from heterospec.static_cache import StaticTreeCache
from heterospec.target import tree_attention_mask
from heterospec.testing import (greedy_by_full_forwards, official_eagle3_config,
                                random_eagle3_state, run_cli, save_eagle3_head, tiny_llama)

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_static_cache_matches_fresh(lm, cache, committed, atol=1e-4):
    """The committed rows equal a plain causal forward over the committed tokens."""
    n = cache.get_seq_length()
    assert n == len(committed) - 1
    fresh = lm.new_cache()
    lm.causal_forward(torch.tensor(committed[:n], dtype=torch.int64), fresh)
    keys, values = cache.committed()
    for k, v, layer in zip(keys, values, fresh.layers):
        assert k.shape == layer.keys.shape, (k.shape, layer.keys.shape)
        torch.testing.assert_close(k, layer.keys, atol=atol, rtol=1e-4)
        torch.testing.assert_close(v, layer.values, atol=atol, rtol=1e-4)


POLICIES = [
    hs.StaticTree(depth=1, top_k=1, total_tokens=2),
    hs.StaticTree(depth=3, top_k=3, total_tokens=8),
    hs.HeteroSpec(depth=3, top_k=3, total_tokens=10, thresholds=[0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0]),
]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: str(p.describe()))
def test_static_cache_greedy_equals_dynamic_path(tiny_pair, policy):
    target, draft = tiny_pair
    dynamic = hs.SpeculativeGenerator(target, hs.ModelDrafter(draft, top_k=policy.top_k), policy)
    static = hs.SpeculativeGenerator(target, hs.ModelDrafter(draft, top_k=policy.top_k), policy,
                                     static_cache=True, max_len=96)
    for prompt in ([5], [3, 9, 27, 4, 4, 11, 2]):
        want = dynamic.generate(prompt, 24)
        got = static.generate(prompt, 24)
        assert got.token_ids == want.token_ids == greedy_by_full_forwards(target, prompt, 24)
        assert got.stats.cycles == want.stats.cycles
        assert got.stats.target_forwards == want.stats.target_forwards
        assert isinstance(static.cache, StaticTreeCache)
        assert_static_cache_matches_fresh(target, static.cache, static.committed)


def test_static_cache_with_high_acceptance(tiny_pair):
    """Draft = target: most cycles accept several nodes, so compaction moves many rows."""
    target, _ = tiny_pair
    policy = hs.StaticTree(depth=3, top_k=2, total_tokens=6)
    gen = hs.SpeculativeGenerator(target, hs.ModelDrafter(target, top_k=2), policy,
                                  static_cache=True, max_len=64)
    accepted = []
    gen.on_cycle = lambda c: accepted.append(c["accepted"])
    res = gen.generate([4, 5, 6], 30)
    assert res.token_ids == greedy_by_full_forwards(target, [4, 5, 6], 30)
    assert max(accepted) >= 3, accepted
    assert_static_cache_matches_fresh(target, gen.cache, gen.committed)


def test_static_cache_with_eagle3_head(tmp_path):
    """EAGLE-3 reads the target's captured hidden rows after every static-cache forward."""

    target = hs.CausalLM(tiny_llama(64, seed=1, layers=8, hidden=32, logit_scale=30.0),
                         name="tiny target")
    cfg = official_eagle3_config()
    path = save_eagle3_head(tmp_path, cfg, random_eagle3_state(cfg, seed=3))
    policy = hs.HeteroSpec(depth=3, top_k=3, total_tokens=10,
                           thresholds=[0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0])
    outs = []
    for static in (False, True):
        drafter = hs.Eagle3Drafter.from_pretrained(path, target, top_k=3)
        gen = hs.SpeculativeGenerator(target, drafter, policy, static_cache=static, max_len=64)
        outs.append(gen.generate([3, 9, 27, 4, 4, 11, 2], 16).token_ids)
    assert outs[0] == outs[1] == greedy_by_full_forwards(target, [3, 9, 27, 4, 4, 11, 2], 16)
    assert_static_cache_matches_fresh(target, gen.cache, gen.committed)


def test_tree_inputs_match_the_dynamic_mask(tiny_pair):
    target, _ = tiny_pair
    cache = StaticTreeCache(target, max_len=20)
    cache.prefill(torch.tensor([3, 4, 5, 6, 7]))
    # root, two children of the root, a grandchild under node 2
    anc = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    depth = torch.tensor([0, 1, 1, 2])
    positions, slots, mask = cache.tree_inputs(depth, anc)
    assert positions.tolist() == [5, 6, 6, 7]
    assert slots.tolist() == [5, 6, 7, 8]
    assert mask.shape == (1, 1, 4, 20) and mask.dtype == target.dtype
    want = tree_attention_mask(anc, 5, target.dtype)
    torch.testing.assert_close(mask[..., :9], want, rtol=0, atol=0)
    assert (mask[..., 9:] == torch.finfo(target.dtype).min).all()


def test_tree_forward_logits_equal_the_dynamic_tree_forward(tiny_pair):
    target, _ = tiny_pair
    prompt = torch.tensor([3, 9, 27, 4, 4])
    anc = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    toks, depth = torch.tensor([2, 8, 13]), torch.tensor([0, 1, 1])
    dyn = target.new_cache()
    target.causal_forward(prompt, dyn)
    want = target.tree_forward(toks, depth, anc, dyn)
    cache = StaticTreeCache(target, max_len=16)
    cache.prefill(prompt)
    got = cache.tree_forward(toks, depth, anc)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == 5  # tree entries stay tentative until compact


def test_compact_moves_accepted_rows_by_index(tiny_pair):
    target, _ = tiny_pair
    cache = StaticTreeCache(target, max_len=16)
    with torch.inference_mode():
        rows = torch.arange(16, dtype=cache.dtype)
        cache.k.copy_(rows[None, None, None, :, None].expand_as(cache.k))
        cache.v.copy_(-rows[None, None, None, :, None].expand_as(cache.v))
        cache.length.fill_(4)
    # tree at slots 4..9; accepted path: root (node 0), node 2, node 5; -1 padded to N = 6
    cache.compact(torch.tensor([0, 2, 5, -1, -1, -1]), torch.tensor(2))
    assert cache.get_seq_length() == 7
    keys, values = cache.committed()
    assert keys[0][0, 0, :, 0].tolist() == [0, 1, 2, 3, 4, 6, 9]
    assert values[1][0, 1, :, 0].tolist() == [0, -1, -2, -3, -4, -6, -9]


def test_static_cache_argument_errors(tiny_pair):
    target, draft = tiny_pair
    policy = hs.StaticTree(depth=2, top_k=2, total_tokens=6)
    gen = hs.SpeculativeGenerator(target, hs.ModelDrafter(draft, top_k=2), policy,
                                  static_cache=True, max_len=32)
    with pytest.raises(hs.GenerationConfigError, match="max_len=32"):
        gen.generate([1, 2, 3], 24)  # 3 + 24 + 6 > 32
    with pytest.raises(hs.GenerationConfigError, match="max_len"):
        StaticTreeCache(target, max_len=1)
    with pytest.raises(hs.GenerationConfigError, match="cuda_graphs.*CUDA"):
        hs.SpeculativeGenerator(target, hs.ModelDrafter(draft, top_k=2), policy, cuda_graphs=True)


def test_graph_tree_sizes_cover_the_policy():
    from heterospec.cuda_graphs import tree_sizes

    assert tree_sizes(hs.StaticTree(depth=5, top_k=10, total_tokens=60)) == [60]
    het = hs.HeteroSpec(depth=5, top_k=10, total_tokens=60)
    sizes = tree_sizes(het)
    assert sizes == sorted({n for _, n in het.shapes()}) and sizes[-1] == het.n_max
    assert 60 in sizes and len(sizes) <= het.policy_t.shape[0]


def test_cli_cuda_graphs_on_cpu_is_a_one_line_error():

    proc = run_cli("generate", "--prompt", "hi", "--device", "cpu", "--cuda-graphs")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--cuda-graphs needs --device cuda" in lines[0], proc.stderr
