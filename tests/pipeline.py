"""A small but complete HeteroSpec cycle built from the four ops, shared by the compile and
CUDA-graph tests: draft statistics -> stratum -> tree -> verification."""
import torch

import heterospec_ext as hx


def make_inputs(device, batch=3, k=4, depth=3, vocab=257, seed=0):
    """An EAGLE-style pool (k root children, then k*k children per level) with its logits."""
    g = torch.Generator().manual_seed(seed)
    pool = 1 + k + (depth - 1) * k * k
    parents = torch.full((batch, pool), -1, dtype=torch.int64)
    for i in range(1, 1 + k):
        parents[:, i] = 0
    start, frontier = 1 + k, list(range(1, 1 + k))
    for _ in range(depth - 1):
        nxt = []
        for f in frontier:
            for c in range(k):
                parents[:, start] = f
                nxt.append(start)
                start += 1
        frontier = nxt[:k]
    draft_logits = torch.randn(batch * pool, vocab, generator=g)
    tokens = torch.randint(0, vocab, (batch, pool), generator=g)
    target_logits = torch.randn(batch, 16, vocab, generator=g) * 3
    uniforms = torch.rand(batch, 16, generator=g)
    thresholds = torch.tensor([0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5])
    policy = hx.make_policy(depth, 12, pool_size=pool - 1)
    return {
        "draft_logits": draft_logits.to(device), "parents": parents.to(device),
        "tokens": tokens.to(device), "target_logits": target_logits.to(device),
        "uniforms": uniforms.to(device), "thresholds": thresholds.to(device),
        "policy": policy.to(device), "k": k,
    }


def cycle(draft_logits, parents, tokens, target_logits, uniforms, thresholds, policy, k):
    """All four ops in sequence; returns every output tensor of the cycle."""
    batch, pool = parents.shape
    stats = hx.draft_topk_entropy(draft_logits, k, 1.0)
    step_entropy = stats.topk_entropy.view(batch, pool)
    confidence = stats.topk_logprobs[:, 0].view(batch, pool)
    scores = torch.cumsum(confidence, dim=1)  # any scores work for the pipeline test
    strat = hx.stratify(step_entropy, confidence, parents, thresholds, policy)
    tree = hx.build_tree(parents, scores, tokens, strat.top_n, target_logits.shape[1])
    candidates = tree.tokens.clamp(min=0)
    greedy = hx.fused_verify(target_logits, candidates, tree.parents, temperature=0.0,
                             uniforms=uniforms)
    sampled = hx.fused_verify(target_logits, candidates, tree.parents, temperature=0.9,
                              top_k=50, top_p=0.95, uniforms=uniforms)
    return (*stats, *strat, *tree, *greedy, *sampled)
