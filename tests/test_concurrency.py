"""Several Python threads call every op (functional and ``_out``, valid and invalid input) at
once; every result equals the single-threaded one and every error is the expected one.

The ops keep no global state besides torch's thread pool; this checks that (per-call scratch
buffers, error reporting, the intra-op parallel_for of each call) under contention.
"""
import threading

import torch

import heterospec_ext as hx
from heterospec_ext.testing import eagle_pool, random_parents

THREADS = 8
ROUNDS = 6


def _workload(device):
    """Named calls returning a list of tensors; inputs sized so a call takes milliseconds."""
    gen = torch.Generator().manual_seed(0)
    d = lambda t: t.to(device)  # noqa: E731
    logits = d((torch.randn(16, 32000, generator=gen) * 3).bfloat16())
    parents, scores = eagle_pool(24, 8, 4, gen)
    parents, scores = d(parents), d(scores)
    tokens = d(torch.randint(0, 32000, parents.shape, generator=gen))
    step_entropy, confidence = d(torch.rand(parents.shape, generator=gen) * 2), scores
    thresholds = d(torch.linspace(0.5, 3.5, 7))
    policy = d(hx.make_policy(depth=4, top_n_default=40, pool_size=parents.shape[1] - 1))
    top_n = d(torch.randint(1, 70, (parents.shape[0],), generator=gen))
    b, n, v = 8, 24, 4000
    tree = d(random_parents("bushy", b, n, gen, padding=0.2))
    cands = d(torch.randint(0, v, (b, n), generator=gen))
    target = d(torch.randn(b, n, v, generator=gen) * 2)
    target[torch.arange(b)[:, None], tree.clamp(min=0), cands] += 6.0  # deep acceptance
    q = torch.softmax(target.float() + d(torch.randn(b, n, v, generator=gen)), -1)
    temperature = d(torch.tensor([0.0, 0.7, 1.0, 1.3] * (b // 4)))
    top_k, top_p = d(torch.tensor([0, 50] * (b // 2))), d(torch.tensor([1.0, 0.9] * (b // 2)))
    uniforms = d(torch.rand(b, n, generator=gen))
    verify_args = (target, cands, tree, temperature, top_k, top_p, uniforms)
    nan_target = target.clone()
    nan_target[5, 0, 17] = float("nan")

    def out_call(op, args, like):
        outs = [torch.full_like(t, 7) for t in like]
        op(*args, *outs)
        return outs

    topk_like = hx.draft_topk_entropy(logits, 10, 0.8)
    strat_args = (step_entropy, confidence, parents, thresholds, policy)
    strat_like = hx.stratify(*strat_args)
    tree_args = (parents, scores, tokens, top_n)
    tree_like = hx.build_tree(*tree_args, 64)
    verify_like = hx.fused_verify(*verify_args[:3], temperature=temperature, uniforms=uniforms)
    calls = {
        "draft_topk_entropy": lambda: list(hx.draft_topk_entropy(logits, 10, 0.8)),
        "draft_topk_entropy_out": lambda: out_call(hx.draft_topk_entropy_out,
                                                   (logits, 10, 0.8), topk_like),
        "stratify": lambda: list(hx.stratify(*strat_args)),
        "stratify_out": lambda: out_call(hx.stratify_out, strat_args, strat_like),
        "build_tree": lambda: list(hx.build_tree(*tree_args, 64)),
        "build_tree_out": lambda: out_call(hx.build_tree_out, tree_args, tree_like),
        "fused_verify": lambda: list(torch.ops.heterospec.fused_verify(*verify_args, None)),
        "fused_verify_real_q": lambda: list(torch.ops.heterospec.fused_verify(*verify_args, q)),
        "fused_verify_out": lambda: out_call(hx.fused_verify_out, verify_args + (q,),
                                             verify_like),
    }
    if device.type == "cpu":  # CUDA writes sentinels instead of raising
        def raises(fn, message):
            """A call whose result is whether it raised ValueError(message...)."""
            def call():
                try:
                    fn()
                except ValueError as exc:
                    return [str(exc).startswith(message)]
                return [False]
            return call

        calls["error_fused_verify_nan_row"] = raises(
            lambda: torch.ops.heterospec.fused_verify(nan_target, *verify_args[1:], None),
            "target_logits: request 5 node 0")
        calls["error_stratify_bad_tree"] = raises(
            lambda: hx.stratify(step_entropy, confidence, torch.where(
                torch.arange(parents.shape[1], device=device) == 3, 9, parents), thresholds,
                policy), "stratify: parents of request 0")
    return calls


def _same(a, b) -> bool:
    """Equal dtype, shape and values (NaN equal to NaN); plain values compare with ==."""
    if not isinstance(a, torch.Tensor):
        return a == b
    a, b = a.cpu(), b.cpu()
    return a.dtype == b.dtype and a.shape == b.shape and (
        torch.equal(a, b) or (a.is_floating_point() and torch.allclose(
            a, b, rtol=0.0, atol=0.0, equal_nan=True)))


def test_threads_calling_every_op_at_once_match_single_threaded(device):
    calls = _workload(device)
    expected = {name: call() for name, call in calls.items()}
    assert all(expected[name] == [True] for name in calls if name.startswith("error_"))
    names = list(calls)
    start = threading.Barrier(THREADS)
    failures = []

    def worker(index):
        start.wait()
        try:
            for r in range(ROUNDS):
                for j in range(len(names)):  # each thread walks the ops in its own order
                    name = names[(index + r + j) % len(names)]
                    got = calls[name]()
                    if len(got) != len(expected[name]) or not all(
                            map(_same, got, expected[name])):
                        failures.append(f"thread {index} round {r}: {name} differs")
        except Exception as exc:  # noqa: BLE001  (reported below)
            failures.append(f"thread {index}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    if device.type == "cuda":
        torch.cuda.synchronize()
    assert not failures, "\n".join(failures[:20])
