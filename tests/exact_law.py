"""What the engine adapters' statistical tests share: a target whose law over the first two
generated tokens is known exactly, and the assertion that observed counts match such a law
(chi-square p > 1e-3) while being precise enough to reject a law 1% away in total variation
(p < 1e-3), so that a pass is not a matter of too few samples."""
import torch

from heterospec_ext.reference import _fv_target_probs as processed_probs
from test_fused_verify_stats import chi_square


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
