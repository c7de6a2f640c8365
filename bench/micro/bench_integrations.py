"""Engine adapters vs the unfused PyTorch compositions the engines run.

SGLang (tree of N = 64 slots in SGLang's link format, a spine of 5 first children accepted):
  composition greedy:   argmax over every row [B, N, V], then the tree walk;
  composition sampling: softmax(logits / T) -> top-k renorm -> top-p renorm over every row, then
                        SGLang's target-only walk (one coin per node, ``coin <= cumulative p``)
                        and the final draw from the residual; both walks in vectorised torch;
  renorm + drop-in:     the same softmax / renorms (or argmax), then our sgl-kernel drop-in
                        (``tree_speculative_sampling_target_only`` / ``verify_tree_greedy``),
                        the structure SGLang has with its own verify kernel;
  fused:                ``tree_speculative_sampling_from_logits`` (temperature 0 for greedy);
  op-only:              ``fused_verify`` alone on the same tree (the adapter's overhead is the
                        difference to fused).
vLLM (chains of 5 drafts per request, logits ``[B * 6, V]``):
  composition: vLLM V1's steps in torch - the bonus rows through a sampler (temperature, sort-based
               top-k / top-p, softmax, exponential-race sample), the draft rows gathered to fp32,
               temperature, sort-based top-k / top-p, softmax, accept ``p / q >= u`` (float64 u),
               recovered tokens ``argmax(residual / Exp)``, output assembly;
  fused:       ``integrations.vllm.rejection_sample`` (one fused_verify launch);
  op-only:     ``fused_verify`` alone on the same chain trees.
Every case checks that the compared paths accept the same number of tokens (greedy: the same
tokens). Sampling uses T = 0.7, top-k 50, top-p 0.9; V = 151936 (Qwen2.5's vocabulary), bf16.

CPU (pytest-benchmark; 2 threads, or HX_BENCH_THREADS of them):

    PYTHONPATH=. python -m pytest -q bench/micro/bench_integrations.py
    HX_BENCH_THREADS=1 PYTHONPATH=. python -m pytest -q bench/micro/bench_integrations.py

GPU: ``gpu_cases(device)``, run by ``python bench/tools/gpu_bench.py --ops integrations`` (not
part of gpu_check.sh's default op list, whose time budget it would exceed).
"""
import pytest
import torch

import heterospec_ext as hx
from bench_fused_verify import TEMPERATURE, TOP_K, TOP_P, renormalised_probs
from heterospec_ext.integrations import sglang as sg
from heterospec_ext.integrations import vllm as vl

VOCAB = 151936
NODES, SPINE = 64, 5  # SGLang tree slots; accepted first children along the spine
DRAFTS = 5  # vLLM chain length


# ----------------------------------------------------------------------------- SGLang inputs


def sglang_inputs(batch, dtype, sampling, device="cpu"):
    """Trees in SGLang's parent-first link format: nodes 1..SPINE+1 form a chain of first
    children, the rest hang off random earlier nodes (so they are later siblings). The spine's
    tokens hold about half the processed mass (sampling, coin 0.05) or the argmax (greedy);
    node SPINE+1 is rejected."""
    gen = torch.Generator().manual_seed(batch * 31 + sampling)
    parents = torch.empty(batch, NODES, dtype=torch.int64)
    parents[:, 0] = -1
    parents[:, 1:SPINE + 2] = torch.arange(0, SPINE + 1)
    for i in range(SPINE + 2, NODES):
        parents[:, i] = torch.randint(0, i, (batch,), generator=gen)
    is_child = parents[:, None, :] == torch.arange(NODES)[None, :, None]  # [B, parent, child]
    first = torch.where(is_child.any(-1), is_child.int().argmax(-1), -1)
    later = is_child.int().cumsum(-1) * is_child  # rank among siblings, 1-based
    rank = later.amax(1)  # [B, child]
    same_parent = parents[:, :, None] == parents[:, None, :]
    next_rank = same_parent & (rank[:, None, :] == rank[:, :, None] + 1)
    next_sibling = torch.where(next_rank.any(-1), next_rank.int().argmax(-1), -1)
    next_sibling[:, 0] = -1
    cands = torch.randint(0, VOCAB, (batch, NODES), generator=gen)
    logits = torch.randn(batch, NODES, VOCAB, generator=gen) * 3.0
    rows = torch.arange(batch)
    for level in range(SPINE):
        spike = torch.logsumexp(logits[:, level] / TEMPERATURE, -1) * TEMPERATURE
        logits[rows, level, cands[:, level + 1]] = spike if sampling else 40.0
    coins = torch.rand(batch, NODES, generator=gen) * 0.5 + 0.5
    coins[:, :SPINE] = 0.05  # node i's coin decides its first child, the spine node i + 1
    final = torch.rand(batch, generator=gen)
    d = lambda t: t.to(device)  # noqa: E731
    return dict(logits=d(logits.to(dtype)), cands=d(cands), parents=d(parents),
                next_token=d(first), next_sibling=d(next_sibling),
                retrive_index=d(torch.arange(batch * NODES).view(batch, NODES)),
                coins=d(coins), final=d(final),
                # fused_verify's columns for the same decisions: node c tests with its parent's
                # coin (c - 1 on the spine), column 0 is the final draw
                op_uniforms=d(torch.cat([final[:, None], coins[:, :-1]], 1)),
                temperature=d(torch.full((batch,), TEMPERATURE if sampling else 0.0)),
                top_k=d(torch.full((batch,), TOP_K)), top_p=d(torch.full((batch,), TOP_P)))


def sglang_outputs(inp, steps=SPINE + 2):
    batch = inp["cands"].shape[0]
    dev = inp["cands"].device
    return (torch.full((batch * NODES,), -1, dtype=torch.int32, device=dev),
            torch.full((batch, steps), -1, dtype=torch.int32, device=dev),
            torch.zeros(batch, dtype=torch.int32, device=dev))


def tree_args(inp):
    return (inp["cands"], inp["retrive_index"], inp["next_token"], inp["next_sibling"])


def sglang_fused(inp):
    out = sglang_outputs(inp)
    sg.tree_speculative_sampling_from_logits(*out, *tree_args(inp), inp["coins"], inp["final"],
                                             inp["logits"], inp["temperature"], inp["top_k"],
                                             inp["top_p"])
    return out


def sglang_op_only(inp):
    """fused_verify alone on the same (already parent-first) tree: the adapter's overhead is the
    difference to :func:`sglang_fused`."""
    return hx.fused_verify(inp["logits"], inp["cands"], inp["parents"],
                           temperature=inp["temperature"], top_k=inp["top_k"],
                           top_p=inp["top_p"], uniforms=inp["op_uniforms"])


def sglang_walk_torch(inp, accept_fn, steps=SPINE + 2):
    """SGLang's level walk for parent-first trees as one pass over nodes in index order: node c
    is tested when its parent is the current node; ``accept_fn(rows, cur, c, tested_mass)``."""
    cands, parents = inp["cands"], inp["parents"]
    batch = cands.shape[0]
    rows = torch.arange(batch, device=cands.device)
    cur = torch.zeros(batch, dtype=torch.int64, device=cands.device)
    num = torch.zeros_like(cur)
    tested_mass = torch.zeros(batch, device=cands.device)
    for c in range(1, NODES):
        test = (parents[:, c] == cur) & (num < steps - 1)
        accept, mass = accept_fn(rows, cur, c, tested_mass)
        accept = test & accept
        tested_mass = torch.where(accept, 0.0, tested_mass + torch.where(test, mass, 0.0))
        num = num + accept.long()
        cur = torch.where(accept, c, cur)
    return cur, num, rows


def sglang_greedy_composition(inp):
    predicted = inp["logits"].argmax(-1)  # every row
    none = torch.zeros((), device=predicted.device)
    cur, num, rows = sglang_walk_torch(inp, lambda rows, cur, c, _: (
        predicted[rows, cur] == inp["cands"][:, c], none))
    return num, predicted[rows, cur]


def sglang_sampling_composition(inp):
    probs = renormalised_probs(inp["logits"])

    def accept(rows, cur, c, tested_mass):
        px = probs[rows, cur, inp["cands"][:, c]]
        return inp["coins"][rows, cur] <= tested_mass + px, px  # SGLang: coin <= cumulative p

    cur, num, rows = sglang_walk_torch(inp, accept)
    residual = probs[rows, cur]
    child = (inp["parents"] == cur[:, None]).float()
    rejected = torch.zeros_like(residual).scatter_add_(1, inp["cands"].clamp_min(0), child) > 0
    residual = torch.where(rejected & (num < SPINE + 1)[:, None], 0.0, residual)
    cum = torch.cumsum(residual, -1)
    final = (cum <= inp["final"][:, None] * cum[:, -1:]).sum(-1).clamp_max(VOCAB - 1)
    return num, final


def sglang_drop_in(inp, sampling):
    out = sglang_outputs(inp)
    if sampling:
        sg.tree_speculative_sampling_target_only(*out, *tree_args(inp), inp["coins"],
                                                 inp["final"], renormalised_probs(inp["logits"]))
    else:
        sg.verify_tree_greedy(*out, *tree_args(inp), inp["logits"].argmax(-1))
    return out


# ----------------------------------------------------------------------------- vLLM inputs


def vllm_inputs(batch, dtype, sampling, with_q, device="cpu"):
    """Chains of DRAFTS tokens; the target puts (almost) all its mass on each draft token, so
    every path accepts all drafts and emits a bonus."""
    gen = torch.Generator().manual_seed(batch * 37 + sampling + 2 * with_q)
    rows = batch * (DRAFTS + 1)
    drafts = torch.randint(0, VOCAB, (batch, DRAFTS), generator=gen)
    logits = torch.randn(rows, VOCAB, generator=gen) * 3.0
    draft_rows = (torch.arange(batch)[:, None] * (DRAFTS + 1) + torch.arange(DRAFTS)).reshape(-1)
    logits[draft_rows, drafts.reshape(-1)] = 40.0
    q = torch.softmax(torch.randn(batch * DRAFTS, VOCAB, generator=gen), -1) if with_q else None
    md = vl_metadata(batch, sampling, device)
    d = lambda t: None if t is None else t.to(device)  # noqa: E731
    return dict(drafts=d(drafts.reshape(-1)), logits=d(logits.to(dtype)), q=d(q), md=md,
                cu=d(torch.arange(1, batch + 1) * DRAFTS), batch=batch)


def vl_metadata(batch, sampling, device):
    from types import SimpleNamespace
    full = lambda v: torch.full((batch,), v, device=device)  # noqa: E731
    return SimpleNamespace(all_greedy=not sampling, temperature=full(TEMPERATURE) if sampling
                           else None, top_k=full(TOP_K), top_p=full(TOP_P), generators={})


def vllm_fused(inp):
    return vl.rejection_sample(inp["drafts"], [DRAFTS] * inp["batch"], DRAFTS, inp["cu"],
                               inp["q"], inp["logits"], inp["md"])


def vllm_op_only(inp):
    """fused_verify alone on the chain trees the adapter builds (the logits viewed in place)."""
    batch, md = inp["batch"], inp["md"]
    dev = inp["logits"].device
    parents = torch.arange(-1, DRAFTS, device=dev).expand(batch, DRAFTS + 1)
    cands = torch.cat([torch.full((batch, 1), -1, device=dev), inp["drafts"].view(batch, DRAFTS)],
                      1)
    q = None
    if inp["q"] is not None:
        q = torch.cat([inp["q"].view(batch, DRAFTS, VOCAB), inp["q"].view(batch, DRAFTS, VOCAB)[
            :, -1:]], 1)
    temperature = md.temperature if md.temperature is not None else torch.zeros(batch,
                                                                                  device=dev)
    return hx.fused_verify(inp["logits"].view(batch, DRAFTS + 1, VOCAB), cands, parents,
                           temperature=temperature, top_k=md.top_k, top_p=md.top_p,
                           uniforms=torch.rand(batch, DRAFTS + 1, device=dev), draft_probs=q)


def apply_top_k_top_p(logits, top_k, top_p):
    """vLLM's sort-based masking: ascending sort; mask below the k-th largest; mask the low tail
    whose cumulative probability is <= 1 - p (keeping at least one token)."""
    sorted_logits, order = logits.sort(-1)
    kth = sorted_logits.gather(1, (logits.shape[1] - top_k)[:, None])
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    tail = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p[:, None]
    tail[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(tail, float("-inf"))
    return sorted_logits.scatter(-1, order, sorted_logits)


def vllm_composition(inp):
    batch, md = inp["batch"], inp["md"]
    blocks = inp["logits"].view(batch, DRAFTS + 1, VOCAB)
    target = blocks[:, :DRAFTS].reshape(-1, VOCAB).float()
    bonus_logits = blocks[:, DRAFTS].float()
    drafts = inp["drafts"].view(batch, DRAFTS)
    if md.all_greedy:
        proposal = target.argmax(-1).view(batch, DRAFTS)
        bonus = bonus_logits.argmax(-1)
        matched = (proposal == drafts).long().cumprod(1)
    else:
        per_row = lambda x: x.repeat_interleave(DRAFTS)  # noqa: E731
        bonus_probs = apply_top_k_top_p(bonus_logits / md.temperature[:, None], md.top_k,
                                        md.top_p).softmax(-1)
        bonus = (bonus_probs / torch.empty_like(bonus_probs).exponential_()).argmax(-1)
        probs = apply_top_k_top_p(target / per_row(md.temperature)[:, None], per_row(md.top_k),
                                  per_row(md.top_p)).softmax(-1)
        x = inp["drafts"][:, None]
        p_x = probs.gather(1, x)[:, 0].double()
        q_x = inp["q"].gather(1, x)[:, 0].double() if inp["q"] is not None else 1.0
        u = torch.rand(batch * DRAFTS, dtype=torch.float64, device=probs.device)
        accept = (p_x / q_x >= u).view(batch, DRAFTS)
        residual = (probs - inp["q"]).clamp_min(0) if inp["q"] is not None else \
            probs.scatter(1, x, 0.0)
        race = torch.empty(batch, VOCAB, device=probs.device).exponential_()
        proposal = (residual.view(batch, DRAFTS, VOCAB) / race[:, None]).argmax(-1)
        matched = accept.long().cumprod(1)
    num = matched.sum(1)
    out = torch.full((batch, DRAFTS + 1), -1, dtype=torch.int32, device=drafts.device)
    out[:, :DRAFTS] = torch.where(matched.bool(), drafts, proposal).int()
    out[:, DRAFTS] = bonus.int()
    keep = torch.arange(DRAFTS + 1, device=drafts.device)[None] <= num[:, None]
    return out.masked_fill(~keep, -1)


# ----------------------------------------------------------------------------- CPU benchmarks

SGLANG_CASES = [(m, b) for m in ("greedy", "sampling") for b in (1, 8)]
VLLM_CASES = [(m, b) for m in ("greedy", "sampling", "sampling+q") for b in (1, 8)]


@pytest.mark.parametrize("impl", ["fused", "op-only", "renorm+drop-in", "composition"])
@pytest.mark.parametrize("mode,batch", SGLANG_CASES, ids=[f"{m}-B{b}" for m, b in SGLANG_CASES])
def test_sglang_cpu(benchmark, mode, batch, impl):
    sampling = mode == "sampling"
    benchmark.group = f"sglang {mode} B={batch} N={NODES} V={VOCAB} bfloat16"
    inp = sglang_inputs(batch, torch.bfloat16, sampling)
    composition = sglang_sampling_composition if sampling else sglang_greedy_composition
    fn = {"fused": sglang_fused, "op-only": sglang_op_only,
          "renorm+drop-in": lambda x: sglang_drop_in(x, sampling),
          "composition": composition}[impl]
    rounds = 10 if impl in ("fused", "op-only") else 3
    result = benchmark.pedantic(fn, args=(inp,), rounds=rounds, warmup_rounds=1)
    fused = sglang_fused(inp)
    assert (fused[2] == SPINE).all(), "the inputs must accept exactly the spine"
    accepted = result[0] if impl == "composition" else result[2]
    assert torch.equal(accepted.long(), fused[2].long())
    if not sampling and impl == "composition":  # greedy bonus: the argmax at the spine's end
        assert torch.equal(result[1].int(), fused[0].view(batch, NODES)[:, SPINE])


@pytest.mark.parametrize("impl", ["fused", "op-only", "composition"])
@pytest.mark.parametrize("mode,batch", VLLM_CASES, ids=[f"{m}-B{b}" for m, b in VLLM_CASES])
def test_vllm_cpu(benchmark, mode, batch, impl):
    benchmark.group = f"vllm {mode} B={batch} drafts={DRAFTS} V={VOCAB} bfloat16"
    inp = vllm_inputs(batch, torch.bfloat16, mode != "greedy", mode == "sampling+q")
    fn = {"fused": vllm_fused, "op-only": vllm_op_only, "composition": vllm_composition}[impl]
    result = benchmark.pedantic(fn, args=(inp,), rounds=3 if impl == "composition" else 10,
                                warmup_rounds=1)
    if impl == "op-only":
        result = result.out_tokens.int()
    fused = vllm_fused(inp)
    assert ((fused >= 0).sum(1) == DRAFTS + 1).all(), "the inputs must accept every draft"
    assert torch.equal((result >= 0).sum(1), (fused >= 0).sum(1))
    assert torch.equal(result[:, :DRAFTS], fused[:, :DRAFTS])
    if mode == "greedy":
        assert torch.equal(result, fused)


def gpu_cases(device) -> list:
    """B in {1, 8, 64}, bf16: both engines' paths, fused against composition. ``bytes`` = the
    rows the fused path must read (SGLang: the 6 visited rows; vLLM: every row)."""
    cases = []
    for batch in (1, 8, 64):
        for mode in ("greedy", "sampling"):
            sampling = mode == "sampling"
            inp = sglang_inputs(batch, torch.bfloat16, sampling, device)
            comp = sglang_sampling_composition if sampling else sglang_greedy_composition
            cases.append({"name": f"sglang {mode} B={batch} N={NODES} V={VOCAB} bfloat16",
                          "fused": (lambda x=inp: sglang_fused(x)),
                          "composition": (lambda x=inp, f=comp: f(x)),
                          "bytes": batch * (SPINE + 1) * VOCAB * 2})
        for mode in ("greedy", "sampling", "sampling+q"):
            inp = vllm_inputs(batch, torch.bfloat16, mode != "greedy", mode == "sampling+q",
                              device)
            cases.append({"name": f"vllm {mode} B={batch} drafts={DRAFTS} V={VOCAB} bfloat16",
                          "fused": (lambda x=inp: vllm_fused(x)),
                          "composition": (lambda x=inp: vllm_composition(x)),
                          "bytes": batch * (DRAFTS + 1) * VOCAB * 2})
    return cases
