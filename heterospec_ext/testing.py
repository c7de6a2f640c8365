"""Synthetic inputs with the shapes real engines produce, for tests and benchmarks."""
import torch


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
