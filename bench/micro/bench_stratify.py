"""stratify vs the unfused PyTorch pipeline an engine would run instead.

CPU: pytest-benchmark, B in {1, 8}, an EAGLE pool of M = 1 + 10 + 7 * 100 = 711 nodes (root, k = 10,
depth 7). GPU: ``gpu_cases(device)`` for the GPU benchmark script, B in {1, 8, 64}.
"""
import pytest
import torch

import heterospec_ext as hx
from heterospec_ext.testing import eagle_pool

K, DEPTH = 10, 7
POOL = 1 + K + DEPTH * K * K  # 711
LEVELS = DEPTH + 1  # node depths 1..8 below the root


def eagle_inputs(batch, device, seed=0):
    """EAGLE-2 pool layout with per-node step entropies and P* eligible on the last level."""
    gen = torch.Generator().manual_seed(seed)
    parents, scores = eagle_pool(batch, K, DEPTH, gen)
    step_entropy = torch.rand(batch, POOL, generator=gen) * 0.5
    last = 1 + K + (DEPTH - 1) * K * K
    confidence = torch.full((batch, POOL), float("-inf"))
    confidence[:, last:] = torch.rand(batch, POOL - last, generator=gen)
    thresholds = torch.tensor([0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0])
    policy = hx.make_policy(DEPTH, 59, pool_size=POOL - 1)
    return [t.to(device) for t in (step_entropy, confidence, parents, thresholds, policy)]


def composition(step_entropy, confidence, parents, thresholds, policy, levels=LEVELS):
    """Unfused: cumulative entropy by one gather per depth level, argmax, bucketize, policy index."""
    real_child = parents >= 0
    parent_idx = parents.clamp_min(0)
    h = torch.zeros_like(step_entropy)
    for _ in range(levels):  # after d rounds every node of depth <= d holds its final H
        h = torch.where(real_child, h.gather(1, parent_idx) + step_entropy, 0.0)
    conf = torch.where(real_child & ~confidence.isnan(), confidence, float("-inf"))
    pstar = conf.argmax(dim=1)
    path_entropy = h.gather(1, pstar[:, None]).squeeze(1)
    stratum = torch.bucketize(path_entropy, thresholds, right=True)
    stratum = torch.where(path_entropy.isnan(), thresholds.numel(), stratum)
    chosen = policy[stratum]
    return path_entropy, pstar, stratum, chosen[:, 0], chosen[:, 1]


def io_bytes(batch, num_thresholds=7):
    inputs = batch * POOL * (4 + 4 + 8) + 4 * num_thresholds + 16 * (num_thresholds + 1)
    outputs = batch * (4 + 4 * 8)
    return inputs + outputs


def test_composition_agrees_with_op():
    args = eagle_inputs(8, "cpu")
    for got, want in zip(composition(*args), hx.stratify(*args)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("impl", ["fused", "composition"])
@pytest.mark.parametrize("batch", [1, 8])
def test_stratify_cpu(benchmark, batch, impl):
    torch.set_num_threads(2)
    args = eagle_inputs(batch, "cpu")
    benchmark.group = f"stratify B={batch} M={POOL}"
    fn = hx.stratify if impl == "fused" else composition
    benchmark(fn, *args)


def gpu_cases(device):
    cases = []
    for batch in (1, 8, 64):
        args = eagle_inputs(batch, device)
        cases.append({
            "name": f"stratify B={batch} M={POOL}",
            "fused": lambda args=args: hx.stratify(*args),
            "composition": lambda args=args: composition(*args),
            "bytes": io_bytes(batch),
        })
    return cases
