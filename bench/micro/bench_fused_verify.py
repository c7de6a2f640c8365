"""fused_verify vs the unfused SGLang-style pipelines it replaces.

Compositions (pure torch, no host syncs, so they can be CUDA-graph captured):
  greedy:   argmax over every row of [B, N, V] (EAGLE's / SGLang's "argmax-every-row" verify),
            then a vectorised tree walk;
  sampling: softmax(logits / T) -> top-k renorm -> top-p renorm over every row, then the
            deterministic-draft walk (u < residual) and the final residual draw.
The fused op reads only the rows of visited nodes. Inputs are built so that 5 levels are
accepted (6 visited rows out of N = 64), a typical EAGLE acceptance depth.

CPU (pytest-benchmark, 2 threads): N = 64, V = 128256, B in {1, 8}, fp32 and bf16:

    PYTHONPATH=. python -m pytest -q bench/micro/bench_fused_verify.py

GPU: ``gpu_cases(device)`` returns the cases the GPU benchmark script times.
"""
import pytest
import torch

import heterospec_ext as hx

NODES = 64
DEPTH = 5  # accepted levels
TEMPERATURE, TOP_K, TOP_P = 0.7, 50, 0.9


def make_inputs(batch, vocab, dtype, device="cpu", sampling=False):
    """Random logits (N(0, 3^2)) and trees whose spine 1 -> 2 -> ... -> 5 is accepted: node i's
    token is the target's argmax at node i - 1 (greedy), or holds about half the mass with a
    coin of 0.05 (sampling). Nodes 6..63 hang off random earlier nodes, with random tokens."""
    gen = torch.Generator(device="cpu").manual_seed(batch * 7919 + vocab + (1 if sampling else 0))
    parents = torch.empty(batch, NODES, dtype=torch.int64)
    parents[:, 0] = -1
    parents[:, 1:DEPTH + 2] = torch.arange(0, DEPTH + 1)
    for i in range(DEPTH + 2, NODES):
        parents[:, i] = torch.randint(0, i, (batch,), generator=gen)
    cands = torch.randint(0, vocab, (batch, NODES), generator=gen)
    cands[:, 0] = -1
    uniforms = torch.rand(batch, NODES, generator=gen) * 0.5 + 0.5
    uniforms[:, 1:DEPTH + 1] = 0.05
    d = lambda t: t.to(device)  # noqa: E731
    dev_gen = torch.Generator(device=device).manual_seed(batch * 104729 + vocab)
    logits = torch.randn(batch, NODES, vocab, generator=dev_gen, device=device) * 3.0
    rows = torch.arange(batch, device=device)
    for level in range(DEPTH):
        spike = torch.logsumexp(logits[:, level] / TEMPERATURE, -1) * TEMPERATURE
        logits[rows, level, d(cands[:, level + 1])] = spike if sampling else 40.0
    temperature = torch.full((batch,), TEMPERATURE if sampling else 0.0)
    return dict(logits=logits.to(dtype), cands=d(cands), parents=d(parents),
                temperature=d(temperature), top_k=d(torch.full((batch,), TOP_K)),
                top_p=d(torch.full((batch,), TOP_P)), uniforms=d(uniforms))


def fused(inp):
    return hx.fused_verify(inp["logits"], inp["cands"], inp["parents"],
                           temperature=inp["temperature"], top_k=inp["top_k"],
                           top_p=inp["top_p"], uniforms=inp["uniforms"])


def _walk(cands, parents, accept_fn):
    """Vectorised tree walk: one pass over nodes in index order (children follow parents)."""
    batch, nodes = cands.shape
    rows = torch.arange(batch, device=cands.device)
    cur = torch.zeros(batch, dtype=torch.int64, device=cands.device)
    num = torch.zeros(batch, dtype=torch.int64, device=cands.device)
    path = torch.full((batch, nodes), -1, dtype=torch.int64, device=cands.device)
    path[:, 0] = 0
    rejected_mass = torch.zeros(batch, dtype=torch.float32, device=cands.device)
    for c in range(1, nodes):
        is_child = parents[:, c] == cur
        x = cands[:, c]
        dup = ((parents[:, 1:c] == cur[:, None]) & (cands[:, 1:c] == x[:, None])).any(1)
        accept, px = accept_fn(rows, cur, c, x, rejected_mass)
        accept = is_child & ~dup & accept
        reject = is_child & ~dup & ~accept
        rejected_mass = torch.where(accept, 0.0, rejected_mass + torch.where(reject, px, 0.0))
        num = num + accept.long()
        path[rows, num] = torch.where(accept, c, path[rows, num])
        cur = torch.where(accept, c, cur)
    return cur, num, path, rows


def _outputs(cands, cur, num, path, rows, emitted):
    out = torch.full_like(cands, -1)
    steps = path[:, 1:]
    out[:, :-1] = torch.where(steps >= 0, cands.gather(1, steps.clamp_min(0)), -1)
    out[rows, num] = emitted
    return out, path, num


def greedy_composition(inp):
    cands, parents = inp["cands"], inp["parents"]
    amax = inp["logits"].argmax(-1)  # every row
    no_mass = torch.zeros((), device=cands.device)
    cur, num, path, rows = _walk(
        cands, parents, lambda rows, cur, c, x, _: (amax[rows, cur] == x, no_mass))
    return _outputs(cands, cur, num, path, rows, amax[rows, cur])


def renormalised_probs(logits, temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P):
    """softmax(logits / T) -> top-k renorm -> top-p renorm over every row (SGLang's sequence)."""
    probs = torch.softmax(logits.float() / temperature, -1)
    kth = torch.topk(probs, top_k, -1).values[..., -1:]
    probs = torch.where(probs >= kth, probs, 0.0)
    probs = probs / probs.sum(-1, keepdim=True)
    desc, order = torch.sort(probs, -1, descending=True)
    drop = (torch.cumsum(desc, -1) - desc) >= top_p
    probs = probs.scatter(-1, order, torch.where(drop, 0.0, desc))
    return probs / probs.sum(-1, keepdim=True)


def sampling_composition(inp, temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P):
    cands, parents, u = inp["cands"], inp["parents"], inp["uniforms"]
    probs = renormalised_probs(inp["logits"], temperature, top_k, top_p)

    def accept(rows, cur, c, x, rejected_mass):
        px = probs[rows, cur, x]
        return u[:, c] * (1.0 - rejected_mass) < px, px

    cur, num, path, rows = _walk(cands, parents, accept)
    residual = probs[rows, cur]
    child = (parents == cur[:, None]).float()
    zero = torch.zeros_like(residual).scatter_add_(1, cands.clamp_min(0), child) > 0
    residual = torch.where(zero, 0.0, residual)
    cum = torch.cumsum(residual, -1)
    emitted = (cum <= u[:, :1] * cum[:, -1:]).sum(-1).clamp_max(residual.shape[-1] - 1)
    return _outputs(cands, cur, num, path, rows, emitted)


CPU_CASES = [(m, b, d) for m in ("greedy", "sampling") for b in (1, 8)
             for d in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("impl", ["fused", "composition"])
@pytest.mark.parametrize("mode,batch,dtype", CPU_CASES,
                         ids=[f"{m}-B{b}-{str(d).split('.')[-1]}" for m, b, d in CPU_CASES])
def test_cpu(benchmark, mode, batch, dtype, impl):
    torch.set_num_threads(2)
    vocab = 128256
    benchmark.group = (f"fused_verify {mode} B={batch} N={NODES} V={vocab} "
                       f"{str(dtype).split('.')[-1]}")
    inp = make_inputs(batch, vocab, dtype, sampling=mode == "sampling")
    comp = greedy_composition if mode == "greedy" else sampling_composition
    fn = fused if impl == "fused" else comp
    rounds = 10 if impl == "fused" else (3 if mode == "sampling" else 5)
    result = benchmark.pedantic(fn, args=(inp,), rounds=rounds, warmup_rounds=1)
    want = fused(inp)
    assert (want[2] == DEPTH).all(), "the inputs must accept exactly DEPTH levels"
    assert torch.equal(result[2], want[2])
    if mode == "greedy":
        assert torch.equal(result[0], want[0]) and torch.equal(result[1], want[1])


def gpu_cases(device) -> list:
    """Cases for the GPU benchmark script: N=64, V in {32000, 128256}, B in {1, 8, 64}, greedy
    and sampling, bf16 and fp32. ``bytes`` = visited rows (B * 6) * V * element size."""
    cases = []
    for mode in ("greedy", "sampling"):
        comp = greedy_composition if mode == "greedy" else sampling_composition
        for vocab in (32000, 128256):
            for batch in (1, 8, 64):
                for dtype in (torch.bfloat16, torch.float32):
                    inp = make_inputs(batch, vocab, dtype, device, sampling=mode == "sampling")
                    cases.append({
                        "name": f"fused_verify {mode} B={batch} V={vocab} "
                                f"{str(dtype).split('.')[-1]}",
                        "fused": (lambda x=inp: fused(x)),
                        "composition": (lambda x=inp, f=comp: f(x)),
                        "bytes": batch * (DEPTH + 1) * vocab * inp["logits"].element_size(),
                    })
    # Which filter costs what: the same sampling inputs with top-k / top-p switched off.
    for top_k, top_p, label in ((0, 1.0, "no filter"), (TOP_K, 1.0, "top-k only"),
                                (0, TOP_P, "top-p only")):
        for batch in (1, 64):
            inp = make_inputs(batch, 128256, torch.bfloat16, device, sampling=True)
            inp = dict(inp, top_k=torch.full_like(inp["top_k"], top_k),
                       top_p=torch.full_like(inp["top_p"], top_p))
            cases.append({
                "name": f"fused_verify sampling {label} B={batch} V=128256 bfloat16",
                "fused": (lambda x=inp: fused(x)),
                "composition": (lambda x=inp, k=top_k or 128256, p=top_p: sampling_composition(
                    x, top_k=k, top_p=p)),
                "bytes": batch * (DEPTH + 1) * 128256 * 2,
            })
    return cases
