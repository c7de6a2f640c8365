"""Synthetic inputs with the shapes real engines produce, for tests and benchmarks."""
import torch


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
