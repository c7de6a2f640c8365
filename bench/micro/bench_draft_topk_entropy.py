"""draft_topk_entropy vs the unfused PyTorch pipeline it replaces.

CPU (pytest-benchmark, 2 threads): N = 64 draft nodes per request, V = 128256, B in {1, 8}
requests (rows = B * 64), fp32 and bf16, k = 10 (EAGLE's top_k). Each case is its own
benchmark group so the fused op and the composition sit side by side:

    PYTHONPATH=. python -m pytest -q bench/micro/bench_draft_topk_entropy.py

GPU: ``gpu_cases(device)`` returns the cases the GPU benchmark script times.
"""
import pytest
import torch

import heterospec_ext as hx

NODES = 64
TOP_K = 10
TEMPERATURE = 1.0


def make_logits(batch: int, vocab: int, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(batch * 7919 + vocab)
    return (torch.randn(batch * NODES, vocab, generator=gen, device=device) * 3.0).to(dtype)


def composition(logits: torch.Tensor, k: int = TOP_K, temperature: float = TEMPERATURE):
    """The unfused pipeline: log-softmax, top-k, renormalise, full and top-k entropies."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    topk_logprobs, topk_ids = torch.topk(logp, k, dim=-1)
    top_logp = torch.log_softmax(topk_logprobs, dim=-1)  # renormalised top-k
    topk_entropy = -(top_logp.exp() * top_logp).sum(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    logsumexp = torch.logsumexp(logits.float() / temperature, dim=-1)
    return topk_logprobs, topk_ids, topk_entropy, entropy, logsumexp


def fused(logits: torch.Tensor, k: int = TOP_K, temperature: float = TEMPERATURE):
    return hx.draft_topk_entropy(logits, k, temperature)


CPU_CASES = [(b, d) for b in (1, 8) for d in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("impl", ["fused", "composition"])
@pytest.mark.parametrize("batch,dtype", CPU_CASES,
                         ids=[f"B{b}-{str(d).split('.')[-1]}" for b, d in CPU_CASES])
def test_cpu(benchmark, batch, dtype, impl):
    torch.set_num_threads(2)
    vocab = 128256
    dtype_name = str(dtype).split(".")[-1]
    benchmark.group = f"draft_topk_entropy B={batch} N={NODES} V={vocab} {dtype_name}"
    logits = make_logits(batch, vocab, dtype)
    fn = fused if impl == "fused" else composition
    rounds = 10 if batch == 1 else 4
    result = benchmark.pedantic(fn, args=(logits,), rounds=rounds, warmup_rounds=1)
    # Same answer (values: torch.topk breaks exact ties, common in bf16, in no set order).
    torch.testing.assert_close(result[0], fused(logits).topk_logprobs, rtol=1e-5, atol=1e-4)


def gpu_cases(device) -> list:
    """Cases for the GPU benchmark script: N=64, V in {32000, 128256}, B in {1, 8, 64}."""
    cases = []
    for vocab in (32000, 128256):
        for batch in (1, 8, 64):
            for dtype in (torch.bfloat16, torch.float32):
                logits = make_logits(batch, vocab, dtype, device)
                name = f"draft_topk_entropy B={batch} V={vocab} {str(dtype).split('.')[-1]}"
                cases.append({
                    "name": name,
                    "fused": (lambda x=logits: fused(x)),
                    "composition": (lambda x=logits: composition(x)),
                    "bytes": logits.numel() * logits.element_size(),
                })
    return cases
