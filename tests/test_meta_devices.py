"""Fake (meta) kernels check arguments like the real kernels, so a call that mixes ``meta`` and
CPU tensors raises instead of returning uninitialised memory (or, for ``_out``, writing nothing).

Any meta argument routes the whole call to the fake kernel. Each op's argument names come from
its schema, so every tensor argument of every op is covered.
"""
import re

import pytest
import torch

import heterospec_ext as hx

OPS = torch.ops.heterospec


def _valid_cpu_calls():
    """(op name, op overload, valid CPU arguments) for all eight ops."""
    gen = torch.Generator().manual_seed(0)
    i64 = dict(dtype=torch.int64)
    logits = torch.randn(3, 50, generator=gen)
    topk_outs = (torch.empty(3, 5), torch.empty(3, 5, **i64), torch.empty(3), torch.empty(3),
                 torch.empty(3))
    parents = torch.tensor([[-1, 0, 1, 0], [-1, 0, 1, 1]])
    strat_in = (torch.rand(2, 4, generator=gen), torch.rand(2, 4, generator=gen), parents,
                torch.tensor([0.5, 1.0]), torch.zeros(3, 2, **i64))
    strat_outs = (torch.empty(2),) + tuple(torch.empty(2, **i64) for _ in range(4))
    tree_in = (parents, torch.rand(2, 4, generator=gen), torch.arange(8).view(2, 4),
               torch.tensor([2, 3]))
    tree_outs = tuple(torch.empty_like(t) for t in hx.build_tree(*tree_in, 5))
    b, n, v = 2, 4, 10
    verify_in = (torch.randn(b, n, v, generator=gen), torch.tensor([[-1, 3, 4, 5], [-1, 1, 2, 3]]),
                 torch.tensor([[-1, 0, 0, 1], [-1, 0, 1, 2]]), torch.ones(b),
                 torch.zeros(b, **i64), torch.ones(b), torch.rand(b, n, generator=gen) * 0.5,
                 torch.softmax(torch.randn(b, n, v, generator=gen), -1))
    verify_outs = (torch.empty(b, n, **i64), torch.empty(b, n, **i64), torch.empty(b, **i64))
    return [
        ("draft_topk_entropy", OPS.draft_topk_entropy.default, (logits, 5, 0.7)),
        ("draft_topk_entropy_out", OPS.draft_topk_entropy_out.default,
         (logits, 5, 0.7) + topk_outs),
        ("stratify", OPS.stratify.default, strat_in),
        ("stratify_out", OPS.stratify_out.default, strat_in + strat_outs),
        ("build_tree", OPS.build_tree.default, tree_in + (5,)),
        ("build_tree_out", OPS.build_tree_out.default, tree_in + tree_outs),
        ("fused_verify", OPS.fused_verify.default, verify_in),
        ("fused_verify_out", OPS.fused_verify_out.default, verify_in + verify_outs),
    ]


CALLS = _valid_cpu_calls()
ARG_NAMES = {name: [a.name for a in op._schema.arguments] for name, op, _ in CALLS}
TENSOR_ARGS = [(name, i) for name, _, args in CALLS for i, a in enumerate(args)
               if isinstance(a, torch.Tensor)]
# draft_topk_entropy has a single tensor argument, so it cannot mix devices.
MIXABLE_ARGS = [(name, i) for name, i in TENSOR_ARGS if name != "draft_topk_entropy"]


def _to_meta(value):
    """A meta tensor with the same sizes and strides (``.to("meta")`` makes non-dense views
    contiguous), or a non-tensor value unchanged."""
    if not isinstance(value, torch.Tensor):
        return value
    return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")


def _call(name):
    return next((op, list(args)) for n, op, args in CALLS if n == name)


def _outcome(op, args):
    """(exception type name or None, message) of one call."""
    try:
        op(*args)
    except (RuntimeError, ValueError) as exc:
        return type(exc).__name__, str(exc)
    return None, ""


def _first_argument_named(message, names):
    """The argument name that occurs first (as a whole word) in an error message."""
    hits = [(m.start(), n) for n in names for m in re.finditer(rf"\b{re.escape(n)}\b", message)]
    return min(hits)[1] if hits else None


@pytest.mark.parametrize("name,index", MIXABLE_ARGS,
                         ids=[f"{n}-{ARG_NAMES[n][i]}" for n, i in MIXABLE_ARGS])
def test_one_meta_argument_among_cpu_ones_raises(name, index):
    op, args = _call(name)
    arg_names = ARG_NAMES[name]
    args[index] = _to_meta(args[index])
    exc, message = _outcome(op, args)
    assert exc == "RuntimeError", f"{name} with meta {arg_names[index]}: {exc}: {message}"
    assert re.search(rf"\b{arg_names[index]}\b", message) and "device" in message, message


@pytest.mark.parametrize("name", [n for n, _, _ in CALLS])
def test_all_meta_call_returns_the_cpu_shapes(name):
    op, args = _call(name)
    want = op(*args)
    got = op(*map(_to_meta, args))
    if name.endswith("_out"):
        assert got is None and want is None
        return
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.device.type == "meta" and g.shape == w.shape and g.dtype == w.dtype


def _spoilers(t):
    """Metadata-only ways to make one tensor argument wrong."""
    other_dtype = torch.int64 if t.dtype.is_floating_point else torch.float32
    yield "dtype", t.to(other_dtype)
    yield "rank", t.unsqueeze(0)
    if t.dim() >= 1:
        yield "size0", torch.cat([t, t[:1]]) if t.shape[0] else t.new_empty((1,) + t.shape[1:])
    if t.dim() >= 2:
        yield "size1", t[:, :-1] if t.shape[1] > 1 else torch.cat([t, t], 1)
    if t.dim() >= 1 and t.numel() > 1:
        yield "strided", t.transpose(0, -1) if t.dim() >= 2 else t.repeat(2)[::2]


SPOILED = [(name, i, kind) for name, i in TENSOR_ARGS
           for kind, _ in _spoilers(_call(name)[1][i])]


@pytest.mark.parametrize("name,index,kind", SPOILED,
                         ids=[f"{n}-{ARG_NAMES[n][i]}-{k}" for n, i, k in SPOILED])
def test_fake_and_cpu_kernel_reject_the_same_metadata(name, index, kind):
    """The CPU kernel and the fake see the same spoiled argument: both accept it or both raise
    the same exception type whose message names the same argument first."""
    op, args = _call(name)
    args[index] = dict(_spoilers(args[index]))[kind]
    cpu = _outcome(op, args)
    meta = _outcome(op, list(map(_to_meta, args)))
    assert cpu[0] == meta[0], f"cpu: {cpu}\nmeta: {meta}"
    if cpu[0] is not None:
        names = ARG_NAMES[name]
        assert _first_argument_named(cpu[1], names) == _first_argument_named(meta[1], names), (
            f"cpu: {cpu[1]}\nmeta: {meta[1]}")


@pytest.mark.parametrize("k,temperature", [(0, 1.0), (65, 1.0), (51, 1.0), (5, 0.0),
                                           (5, -1.0), (5, float("nan")), (5, float("inf")),
                                           (5, 1e-50), (5, 1e39)])
def test_fake_checks_k_and_temperature_like_the_kernel(k, temperature):
    logits = torch.randn(3, 50)
    if k == 65:
        logits = torch.randn(3, 100)
    cpu = _outcome(OPS.draft_topk_entropy.default, (logits, k, temperature))
    meta = _outcome(OPS.draft_topk_entropy.default, (_to_meta(logits), k, temperature))
    assert cpu[0] == meta[0] == "ValueError", (cpu, meta)
    name = "k" if temperature == 1.0 else "temperature"
    assert _first_argument_named(meta[1], ["k", "temperature"]) == name, meta
