"""Synthetic op inputs with the shapes real engines produce: parent rows of every tree shape, an
EAGLE-2 candidate pool, and one small decoding cycle through all four ops."""
import torch

import heterospec_ext as hx


def random_parents(kind: str, batch: int, num_nodes: int, gen, padding: float = 0.0):
    """``[batch, num_nodes]`` int64 parent rows in the tree convention of the ops.

    ``kind``: ``chain``; ``star``; ``deep`` (parent among the 3 previous nodes: long paths);
    ``bushy`` (uniform random recursive tree: shallow, wide). ``padding`` turns that fraction
    of the non-root slots into padding (-1); a padded node takes its whole subtree with it, so
    the rows stay valid. Random draws come from ``gen``.
    """
    idx = torch.arange(num_nodes)
    if kind == "chain":
        parents = (idx - 1).expand(batch, num_nodes).clone()
    elif kind == "star":
        parents = torch.zeros(batch, num_nodes, dtype=torch.int64)
    elif kind == "deep":
        back = torch.randint(1, 4, (batch, num_nodes), generator=gen)
        parents = (idx - back).clamp_min(0)
    elif kind == "bushy":
        parents = (torch.rand(batch, num_nodes, generator=gen) * idx).floor().to(torch.int64)
    else:
        raise ValueError(kind)
    parents[:, 0] = -1
    if padding > 0 and num_nodes > 1:
        pad = torch.rand(batch, num_nodes, generator=gen) < padding
        pad[:, 0] = False
        for i in range(1, num_nodes):  # the subtree of a padding slot is padding too
            pad[:, i] |= pad.gather(1, parents[:, i:i + 1].clamp_min(0)).squeeze(1)
        parents = torch.where(pad, torch.full_like(parents, -1), parents)
    return parents


def eagle_pool(batch: int, k: int, depth: int, gen: torch.Generator):
    """An EAGLE-2 candidate pool with cumulative draft log-prob scores.

    Layout (EAGLE's ``topK_genrate``): root at 0, k level-0 nodes at ``[1, 1 + k)``, then per
    level the k best frontier nodes times k children each. Returns ``(parents, scores)``:
    ``[batch, 1 + k + depth * k * k]`` int64 / float32 on the CPU, drawn from ``gen``.
    """
    num = 1 + k + depth * k * k
    parents = torch.full((batch, num), -1, dtype=torch.int64)
    scores = torch.zeros(batch, num)
    scores[:, 1:1 + k] = torch.log_softmax(torch.randn(batch, 50, generator=gen) * 2,
                                           -1).topk(k).values
    parents[:, 1:1 + k] = 0
    frontier = torch.arange(1, 1 + k).expand(batch, k)
    for level in range(1, depth + 1):
        base = 1 + k + (level - 1) * k * k
        logp = torch.log_softmax(torch.randn(batch, k, 50, generator=gen) * 2, -1).topk(k).values
        level_scores = (scores.gather(1, frontier)[:, :, None] + logp).reshape(batch, k * k)
        parents[:, base:base + k * k] = frontier.repeat_interleave(k, dim=1)
        scores[:, base:base + k * k] = level_scores
        frontier = base + level_scores.topk(k, dim=1).indices
    return parents, scores


def random_parent_row(kind: str, num_nodes: int, gen: torch.Generator) -> torch.Tensor:
    """One ``[num_nodes]`` int64 parent row drawn node by node from ``gen``.

    ``kind``: ``chain``; ``star``; ``bushy`` (parent uniform among the earlier nodes); ``deep``
    (mostly a chain with a few side branches); ``padded`` (a random tree whose slots are padding
    with probability 0.3; real nodes only hang under real nodes).
    """
    parents = torch.full((num_nodes,), -1, dtype=torch.int64)
    for i in range(1, num_nodes):
        if kind == "chain":
            parents[i] = i - 1
        elif kind == "star":
            parents[i] = 0
        elif kind == "bushy":
            parents[i] = int(torch.randint(0, i, (1,), generator=gen))
        elif kind == "deep":
            back = int(torch.randint(1, 4, (1,), generator=gen))
            parents[i] = max(0, i - back)
        elif kind == "padded":
            if torch.rand((), generator=gen) < 0.3:
                continue
            real = [j for j in range(i) if j == 0 or parents[j] >= 0]
            parents[i] = real[int(torch.randint(0, len(real), (1,), generator=gen))]
        else:
            raise ValueError(kind)
    return parents


def cycle_inputs(device, batch: int = 3, k: int = 4, depth: int = 3, vocab: int = 257,
                 seed: int = 0) -> dict:
    """Inputs of :func:`run_cycle`: an EAGLE-2 pool of ``depth`` levels (:func:`eagle_pool`,
    ``1 + k + (depth - 1) * k * k`` nodes per request), one row of draft logits ``[V]`` float32
    per pool node, pool tokens, target logits ``[batch, 16, V]``, uniforms, thresholds and a
    policy, all on ``device`` and drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    parents, _ = eagle_pool(batch, k, depth - 1, g)
    pool = parents.shape[1]
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


def run_cycle(draft_logits, parents, tokens, target_logits, uniforms, thresholds, policy, k):
    """One HeteroSpec cycle through the four ops (draft statistics -> stratum -> tree -> greedy
    and sampled verification) on :func:`cycle_inputs`; returns every output tensor, in order.
    Traceable by torch.compile (fullgraph) and capturable in a CUDA graph."""
    batch, pool = parents.shape
    stats = hx.draft_topk_entropy(draft_logits, k, 1.0)
    step_entropy = stats.topk_entropy.view(batch, pool)
    confidence = stats.topk_logprobs[:, 0].view(batch, pool)
    scores = torch.cumsum(confidence, dim=1)  # any scores make a valid pool
    strat = hx.stratify(step_entropy, confidence, parents, thresholds, policy)
    tree = hx.build_tree(parents, scores, tokens, strat.top_n, target_logits.shape[1])
    candidates = tree.tokens.clamp(min=0)
    greedy = hx.fused_verify(target_logits, candidates, tree.parents, temperature=0.0,
                             uniforms=uniforms)
    sampled = hx.fused_verify(target_logits, candidates, tree.parents, temperature=0.9,
                              top_k=50, top_p=0.95, uniforms=uniforms)
    return (*stats, *strat, *tree, *greedy, *sampled)
