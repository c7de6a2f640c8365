"""Statistical checks of the sampling paths: a chi-square p-value, a target whose law over the
first two generated tokens is known exactly, and the assertion that observed counts match such a
law (p > 1e-3) while being precise enough to reject a law 1% away in total variation
(p < 1e-3), so that a pass is not a matter of too few samples. Needs scipy."""
import torch

from heterospec_ext.reference import _fv_target_probs as processed_probs


def chi_square(counts: torch.Tensor, expected_probs: torch.Tensor, total: int) -> float:
    """Chi-square p-value of ``counts`` (any shape, integer) against ``expected_probs`` (same
    shape, float64, summing to 1) over ``total`` draws, pooling cells with expected count < 5
    into one cell. Fails if an outcome of probability 0 was observed."""
    from scipy import stats

    expected = expected_probs.flatten() * total
    observed = counts.flatten().double()
    assert float(observed[expected == 0].sum()) == 0, "a zero-probability outcome was emitted"
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum().reshape(1)])
    exp = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    return float(stats.chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item())
                 .pvalue)


class TokenPathTarget:
    """Target logits that depend only on the token path: ``l0 [V]`` after the root, ``l1[a]``
    after token a, ``l2[a, b]`` after a then b (N(0, 1.5^2) entries from ``seed``). ``p0`` and
    ``p1`` are the processed (temperature, top-k, top-p) float64 laws; the first two generated
    tokens follow ``joint() = p0(y1) * p1(y2 | y1)``. ``gen`` continues the seed's stream."""

    def __init__(self, seed, vocab, temperature, top_k, top_p):
        self.gen = g = torch.Generator().manual_seed(seed)
        self.vocab, self.params = vocab, (temperature, top_k, top_p)
        self.l0 = torch.randn(vocab, generator=g) * 1.5
        self.l1 = torch.randn(vocab, vocab, generator=g) * 1.5
        self.l2 = torch.randn(vocab, vocab, vocab, generator=g) * 1.5
        self.p0 = processed_probs(self.l0.double(), *self.params)
        self.p1 = torch.stack([processed_probs(self.l1[a].double(), *self.params)
                               for a in range(vocab)])

    def joint(self) -> torch.Tensor:
        return self.p0[:, None] * self.p1


def assert_matches_exact_law(counts: torch.Tensor, law: torch.Tensor, trials: int) -> None:
    """``counts`` match ``law`` (p > 1e-3) and would not match it with 0.01 of mass moved
    between its two likeliest outcomes (p < 1e-3)."""
    assert chi_square(counts, law, trials) > 1e-3
    shifted = law.flatten().clone()
    top2 = torch.topk(shifted, 2).indices
    shifted[top2[0]] -= 0.01
    shifted[top2[1]] += 0.01
    assert chi_square(counts, shifted.view_as(law), trials) < 1e-3


def joint_counts(sample, vocab: int, trials: int, chunk: int, seed: int):
    """Counts ``[V, V]`` of the first two tokens over ``trials`` draws of
    ``sample(batch, gen) -> (y1, y2, flag)`` in chunks, and how many draws raised ``flag``."""
    gen = torch.Generator().manual_seed(seed)
    joint, flagged = torch.zeros(vocab * vocab, dtype=torch.int64), 0
    for _ in range(trials // chunk):
        y1, y2, flag = sample(chunk, gen)
        joint += torch.bincount(y1 * vocab + y2, minlength=vocab * vocab)
        flagged += int(flag.sum())
    return joint.view(vocab, vocab), flagged
