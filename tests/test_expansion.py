"""heterospec.expansion.TreeExpansion (the EAGLE-2 bookkeeping both drafters share) against a
plain-Python oracle of the same rules, with ties, and the visibility rows the drafters feed."""
import math

import pytest
import torch

from heterospec.expansion import TreeExpansion


def oracle(k, root, levels):
    """Pool lists from ``levels``: [(ids [k], logprobs [k], entropy)] for level 0, then
    [(ids [k][k], logprobs [k][k], entropies [k])] per further level."""
    ids0, lp0, h0 = levels[0]
    tokens, parents, scores = [root] + list(ids0), [-1] + [0] * k, [0.0] + list(lp0)
    level, ent, own = [-1] + [0] * k, [0.0] + [h0] * k, [0.0] + list(lp0)
    frontier = list(range(1, 1 + k))
    for depth, (ids, lps, hs) in enumerate(levels[1:], start=1):
        start = len(tokens)
        for f, node in enumerate(frontier):
            for c in range(k):
                tokens.append(ids[f][c])
                parents.append(node)
                # float32, as the pool stores it
                scores.append(float(torch.tensor(scores[node]) + torch.tensor(lps[f][c])))
                level.append(depth)
                ent.append(hs[f])
                own.append(lps[f][c])
        children = list(range(start, len(tokens)))
        frontier = sorted(children, key=lambda i: (-scores[i], i))[:k]
    return tokens, parents, scores, level, ent, own


def random_levels(k, depth, gen, ties):
    def lp(*shape):
        x = -torch.rand(shape, generator=gen) * 3
        if ties:  # few distinct values: many equal cumulative scores
            x = -torch.randint(1, 3, shape, generator=gen).float()
        return x

    levels = [(torch.randint(0, 500, (k,), generator=gen), lp(k), torch.rand((), generator=gen))]
    for _ in range(depth - 1):
        levels.append((torch.randint(0, 500, (k, k), generator=gen), lp(k, k),
                       torch.rand((k,), generator=gen)))
    return levels


@pytest.mark.parametrize("k,depth,ties", [(1, 4, False), (3, 4, False), (5, 3, True),
                                          (4, 9, True)], ids=str)
def test_pool_matches_oracle(k, depth, ties):
    gen = torch.Generator().manual_seed(k * 10 + depth)
    levels = random_levels(k, depth, gen, ties)
    exp = TreeExpansion(k, "cpu", levels_hint=2)  # grows its buffers past the hint
    exp.start(7, *levels[0])
    for ids, lps, hs in levels[1:]:
        exp.grow(ids, lps, hs)
    pool = exp.pool()
    want = oracle(k, 7, [(a.tolist(), b.tolist(), c.tolist()) for a, b, c in levels])
    got = (pool.tokens, pool.parents, pool.scores, pool.level, pool.step_entropy, pool.logprob)
    for name, g, w in zip(("tokens", "parents", "scores", "level", "entropy", "logprob"), got, want):
        w = torch.tensor(w, dtype=g.dtype)
        assert g.shape == (1, len(w)), name
        assert torch.equal(g[0], w), name
    assert pool.levels == depth and pool.size == 1 + k + (depth - 1) * k * k


def test_visibility_rows_and_fed_prefix():
    """Frontier rows see the committed context, their fed ancestors and themselves."""
    k = 2
    exp = TreeExpansion(k, "cpu")
    exp.start(0, torch.tensor([10, 11]), torch.tensor([-0.1, -0.2]), torch.tensor(0.5))
    rows = exp.frontier_visibility(3)
    assert rows.dtype == torch.bool and rows.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 0, 1]]
    assert exp.frontier_parent_slots().tolist() == [-1, -1]
    # children: node 1 (slot 0) -> pool 3, 4; node 2 (slot 1) -> pool 5, 6
    exp.grow(torch.tensor([[20, 21], [22, 23]]), torch.tensor([[-0.5, -3.0], [-0.1, -4.0]]),
             torch.tensor([0.3, 0.4]))
    # best two by cumulative score: pool 5 (-0.3), pool 3 (-0.6)
    assert exp.frontier_tokens().tolist() == [22, 20]
    assert exp.frontier_parent_slots().tolist() == [1, 0]
    assert exp.frontier_visibility().tolist() == [[0, 1, 1, 0], [1, 0, 0, 1]]
    assert exp.frontier_visibility(1).tolist() == [[1, 0, 1, 1, 0], [1, 1, 0, 0, 1]]
    # a path root -> 2 -> 5: both fed nodes keep their slots; 5 itself was never fed
    assert exp.fed_prefix([0, 2, 5]).tolist() == [1]
    exp.grow(torch.tensor([[30, 31], [32, 33]]), torch.zeros(2, 2), torch.zeros(2))
    assert exp.fed_prefix([0, 2, 5]).tolist() == [1, 2]
    assert exp.fed_prefix([0, 1, 3, 7]).tolist() == [0, 3]
    assert exp.fed_prefix([0]).tolist() == []


def test_pool_is_a_copy():
    exp = TreeExpansion(2, "cpu")
    exp.start(1, torch.tensor([2, 3]), torch.tensor([-1.0, -2.0]), torch.tensor(math.log(2)))
    pool = exp.pool()
    exp.start(9, torch.tensor([4, 5]), torch.tensor([-3.0, -4.0]), torch.tensor(0.0))
    assert pool.tokens.tolist() == [[1, 2, 3]] and pool.scores.tolist() == [[0.0, -1.0, -2.0]]
