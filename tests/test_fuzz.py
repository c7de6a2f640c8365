"""Property-based fuzzing of the four ops against their float64 references (hypothesis).

Each example draws a shape class (tiny V with k = V, chains / stars / deep / bushy trees,
padding, root-only trees, empty batches), a value style (ties, -inf, +-inf and NaN, extreme
magnitudes, huge offsets), extreme temperatures and sampling parameters, every logit dtype,
a memory layout (transposed, strided, offset views) and a call form (functional, or ``_out``
into buffers filled with garbage), then compares the op with its oracle in
``heterospec_ext.reference``:

* draft_topk_entropy: ids exact, values to float32 rounding; invalid rows raise (CPU, naming
  the lowest invalid row) or give NaN / -1 (CUDA);
* stratify and build_tree: bit-exact;
* fused_verify: greedy requests exact; sampling requests must give one of the outcomes that
  ``reference.fused_verify_outcomes`` allows for a float32 kernel (the float64 one unless a
  decision is within rounding); invalid visited rows raise naming the lowest bad request.

Tensors are built from a drawn seed, so hypothesis shrinks the structure (sizes, styles,
layouts), and the falsifying ``case`` it prints replays exactly with
``check_<op>(torch.device(...), case, heterospec_ext)``. ``test_fuzz_finds_a_planted_bug``
shows that each property fails on a subtly wrong op.

Budget: in CI a fixed, derandomised number of examples per op (the same cases every run);
``HX_FUZZ_EXAMPLES=N`` runs N fresh random examples per op instead, and with
``HX_FUZZ_DERANDOMIZE=1`` the first N of the fixed sequence (scripts/sanitize.sh and
bench/gpu_check.sh run such a slice under the sanitizers).
"""
import math
import os
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

import heterospec_ext as hx
from heterospec_ext import reference as ref
from heterospec_ext.testing import assert_topk_matches, random_parents

FUZZ_EXAMPLES = int(os.environ.get("HX_FUZZ_EXAMPLES", "0"))
FUZZ_DERANDOMIZE = FUZZ_EXAMPLES == 0 or os.environ.get("HX_FUZZ_DERANDOMIZE") == "1"
LOGIT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TREE_KINDS = ["chain", "star", "deep", "bushy"]


def fuzz_settings(max_examples: int, derandomize: bool, **overrides):
    return settings(
        max_examples=max_examples,
        derandomize=derandomize,
        database=None,
        deadline=None,
        print_blob=True,
        # The device fixture is immutable; inputs are built from a seed, not drawn piecewise.
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                               HealthCheck.data_too_large, HealthCheck.filter_too_much],
        **overrides,
    )


def run_property(check, cases, device, ops, examples_settings):
    """Run ``check(device, case, ops)`` on the examples hypothesis draws from ``cases``."""
    @examples_settings
    @given(case=cases())
    def property_holds(case):
        check(device, case, ops)

    property_holds()


# ----------------------------------------------------------------------------- building blocks

SEEDS = st.integers(0, 2**32 - 1)


def weighted(*choices):
    """A strategy drawing ``value`` of ``(value, weight)`` pairs about ``weight`` percent of the
    time (hypothesis favours the ends of a range, so the first value, meant to be the most
    common, also fills the last slot)."""
    table = [value for value, weight in choices for _ in range(weight)]
    table.append(choices[0][0])
    return st.integers(0, len(table) - 1).map(table.__getitem__)


def batch_sizes(largest: int):
    """Mostly 1..largest; an empty batch 5% of the time."""
    return weighted(*[(b, 95 // largest) for b in range(1, largest + 1)], (0, 5))


def paddings(*values):
    """Padding fractions, mostly the first ones; 1.0 (every slot padding: a root-only tree)
    about 10% of the time."""
    return weighted(*[(v, 90 // len(values)) for v in values], (1.0, 10))


def gen_from(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pick(values, shape, gen):
    """A tensor of ``shape`` whose entries are drawn uniformly from ``values``."""
    table = torch.tensor(values, dtype=torch.float64)
    return table[torch.randint(0, len(values), shape, generator=gen)]


def logit_values(style: str, shape, gen) -> torch.Tensor:
    """float64 logits of one style (cast to the dtype later, which may overflow fp16)."""
    if style == "normal":
        return torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    if style == "ties":  # few distinct values: top-k and argmax ties go to the lowest id
        return torch.randint(-2, 3, shape, generator=gen).double()
    if style == "neg_inf":  # most of the vocabulary masked
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        return x.masked_fill(torch.rand(shape, generator=gen) < 0.7, -math.inf)
    if style == "extreme":
        return pick([0.0, -0.0, 1.0, -1.0, 1e4, -1e4, 3e38, -3e38, 1e-30, 6e4, -math.inf],
                    shape, gen)
    if style == "offset":  # huge common offset: only differences matter
        offset = float(pick([1e4, -1e4, 6e4, 1e6], (1,), gen))
        return torch.randn(shape, generator=gen, dtype=torch.float64) + offset
    raise ValueError(style)


LOGIT_STYLES = ["normal", "ties", "neg_inf", "extreme", "offset"]


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` in another memory layout (a non-contiguous view)."""
    if layout == "contiguous" or t.dim() == 0 or t.numel() == 0:
        return t
    if layout == "transposed":
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "strided":  # every other element of the last dimension
        wide = t.new_zeros(t.shape[:-1] + (2 * t.shape[-1],))
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "offset":  # starts one element into its storage, rows padded
        wide = t.new_zeros(t.shape[:-1] + (t.shape[-1] + 3,))
        wide[..., 1:t.shape[-1] + 1] = t
        return wide[..., 1:t.shape[-1] + 1]
    raise ValueError(layout)


LAYOUTS = ["contiguous", "transposed", "strided", "offset"]


def garbage_like(t: torch.Tensor, gen) -> torch.Tensor:
    """A buffer shaped like ``t`` holding values no op writes (NaN, huge, random bits)."""
    if t.dtype == torch.bool:
        return torch.randint(0, 2, t.shape, generator=gen).bool()
    if t.dtype.is_floating_point:
        return pick([math.nan, 1e30, -7.0, math.inf], t.shape, gen).to(t.dtype)
    info = torch.iinfo(t.dtype)
    return torch.randint(info.min, info.max, t.shape, generator=gen, dtype=t.dtype)


def run_op(functional, out_op, args, like, form: str, gen):
    """Call the functional op, or its ``_out`` twin on garbage-filled buffers shaped like
    ``like`` (a list of reference outputs) and return those buffers."""
    if form == "functional":
        return [t.cpu() for t in functional(*args)]
    outs = [garbage_like(t, gen).to(args[0].device) for t in like]
    assert out_op(*args, *outs) is None
    return [t.cpu() for t in outs]


def tree_parents(kind: str, batch: int, nodes: int, padding: float, gen) -> torch.Tensor:
    parents = random_parents(kind, batch, nodes, gen, padding)
    if kind == "chain" and padding >= 1.0 and nodes > 1:
        parents[:, 1:] = -1  # all padding: a root-only tree
    return parents


# ----------------------------------------------------------------------------- draft_topk_entropy


@st.composite
def topk_cases(draw):
    vocab = draw(st.one_of(st.integers(1, 8), st.integers(9, 300),
                           st.sampled_from([1023, 1024, 1025, 4099])))
    k_max = min(vocab, 64)
    return dict(
        rows=draw(batch_sizes(6)),
        vocab=vocab,
        k=draw(st.one_of(st.just(k_max), st.integers(1, k_max))),  # k = V for tiny V
        dtype=draw(st.sampled_from(LOGIT_DTYPES)),
        style=draw(st.sampled_from(LOGIT_STYLES)),
        temperature=draw(st.one_of(st.sampled_from([1.0, 0.5, 2.0, 1e-3, 1e-30, 1e30, 1e-38]),
                                   st.floats(1e-4, 1e4))),
        layout=draw(st.sampled_from(LAYOUTS + ["rows_apart"])),
        form=draw(st.sampled_from(["functional", "out"])),
        spoil=draw(weighted((None, 80), ("nan", 7), ("posinf", 7), ("all_neg_inf", 6))),
        seed=draw(SEEDS),
    )


def topk_invalid_rows(logits, k, temperature):
    """Rows the reference rejects (NaN or +inf after scaling, or no finite value)."""
    bad = []
    for r in range(logits.shape[0]):
        try:
            ref.draft_topk_entropy(logits[r:r + 1], k, temperature)
        except ValueError:
            bad.append(r)
    return bad


def check_draft_topk_entropy(device, case, ops):
    gen = gen_from(case["seed"])
    rows, vocab, k, temperature = case["rows"], case["vocab"], case["k"], case["temperature"]
    logits = logit_values(case["style"], (rows, vocab), gen).to(case["dtype"])
    if case["spoil"] and rows:
        row = int(torch.randint(0, rows, (1,), generator=gen))
        col = int(torch.randint(0, vocab, (1,), generator=gen))
        if case["spoil"] == "all_neg_inf":
            logits[row] = -math.inf
        else:
            logits[row, col] = math.nan if case["spoil"] == "nan" else math.inf
    if case["layout"] == "rows_apart":
        x = torch.zeros(2 * rows, vocab, dtype=logits.dtype)
        x[::2] = logits
        x = x.to(device)[::2]
    else:
        x = laid_out(logits.to(device), case["layout"])
    bad = topk_invalid_rows(logits, k, temperature)
    good = [r for r in range(rows) if r not in bad]
    want = ref.draft_topk_entropy(logits[good], k, temperature)
    call = lambda: run_op(ops.draft_topk_entropy, ops.draft_topk_entropy_out,  # noqa: E731
                          (x, k, temperature), [t.new_empty((rows,) + t.shape[1:]) for t in want],
                          case["form"], gen)
    if bad and device.type == "cpu":
        with pytest.raises(ValueError, match=rf"logits row {bad[0]} is invalid"):
            call()
        return
    got = call()
    assert_topk_matches([t[good] for t in got], want)
    if bad:  # CUDA: invalid rows are NaN with ids -1
        assert (got[1][bad] == -1).all()
        assert all(t[bad].isnan().all() for t in got[:1] + got[2:])


# ----------------------------------------------------------------------------- stratify


@st.composite
def stratify_cases(draw):
    return dict(
        batch=draw(batch_sizes(5)),
        nodes=draw(st.one_of(st.integers(1, 12), st.integers(13, 80), st.just(257))),
        kind=draw(st.sampled_from(TREE_KINDS)),
        padding=draw(paddings(0.0, 0.2, 0.6)),
        entropy=draw(st.sampled_from(["normal", "ties", "extreme"])),
        confidence=draw(st.sampled_from(["normal", "ties", "extreme"])),
        thresholds=draw(st.integers(0, 9)),
        threshold_style=draw(st.sampled_from(["spread", "ties", "infinite"])),
        layouts=draw(st.lists(st.sampled_from(LAYOUTS), min_size=5, max_size=5)),
        form=draw(st.sampled_from(["functional", "out"])),
        seed=draw(SEEDS),
    )


def float_values(style: str, shape, gen) -> torch.Tensor:
    """float32 entropies / confidences / scores of one style."""
    if style == "normal":
        return torch.rand(shape, generator=gen) * 2
    if style == "ties":  # few distinct values, signed zeros included
        return pick([0.0, -0.0, 0.5, 1.0], shape, gen).float()
    if style == "extreme":  # NaN, +-inf, float32's largest and smallest magnitudes
        return pick([math.nan, math.inf, -math.inf, 3.4e38, -3.4e38, 1e-45, 0.0, -0.0, 1.0],
                    shape, gen).float()
    raise ValueError(style)


def check_stratify(device, case, ops):
    gen = gen_from(case["seed"])
    batch, nodes = case["batch"], case["nodes"]
    parents = tree_parents(case["kind"], batch, nodes, case["padding"], gen)
    entropy = float_values(case["entropy"], (batch, nodes), gen).abs()
    confidence = float_values(case["confidence"], (batch, nodes), gen)
    num_thresholds = case["thresholds"]
    if case["threshold_style"] == "spread":
        thresholds = torch.rand(num_thresholds, generator=gen) * 8
    elif case["threshold_style"] == "ties":
        thresholds = pick([0.0, 0.5, 1.0], (num_thresholds,), gen).float()
    else:
        thresholds = pick([-math.inf, 0.0, 1.0, math.inf], (num_thresholds,), gen).float()
    thresholds = torch.sort(thresholds).values
    policy = torch.randint(-2**62, 2**62, (num_thresholds + 1, 2), generator=gen)
    args = [laid_out(t.to(device), layout) for t, layout in
            zip((entropy, confidence, parents, thresholds, policy), case["layouts"])]
    want = ref.stratify(entropy, confidence, parents, thresholds, policy)
    got = run_op(ops.stratify, ops.stratify_out, args, want, case["form"], gen)
    for name, g, w in zip(hx.Stratum._fields, got, want):
        assert g.dtype == w.dtype and torch.equal(g.isnan(), w.isnan()), name
        assert torch.equal(g.nan_to_num(0.0), w.nan_to_num(0.0)), f"{name}: {g} != {w}"


# ----------------------------------------------------------------------------- build_tree


@st.composite
def build_tree_cases(draw):
    return dict(
        batch=draw(batch_sizes(4)),
        pool=draw(st.one_of(st.integers(1, 12), st.integers(13, 70), st.just(130))),
        n_max=draw(st.one_of(st.sampled_from([1, 2, 31, 32, 33, 63, 64, 65]),
                             st.integers(1, 70))),
        kind=draw(st.sampled_from(TREE_KINDS)),
        padding=draw(paddings(0.0, 0.2, 0.6)),
        scores=draw(st.sampled_from(["monotone", "normal", "ties", "extreme"])),
        layouts=draw(st.lists(st.sampled_from(LAYOUTS), min_size=4, max_size=4)),
        form=draw(st.sampled_from(["functional", "out"])),
        seed=draw(SEEDS),
    )


def check_build_tree(device, case, ops):
    gen = gen_from(case["seed"])
    batch, pool, n_max = case["batch"], case["pool"], case["n_max"]
    parents = tree_parents(case["kind"], batch, pool, case["padding"], gen)
    if case["scores"] == "monotone":  # cumulative log-probs: children never outscore parents
        scores = torch.zeros(batch, pool)
        step = -torch.rand(batch, pool, generator=gen) * 3
        for i in range(1, pool):
            scores[:, i] = scores.gather(1, parents[:, i:i + 1].clamp_min(0))[:, 0] + step[:, i]
    else:
        scores = float_values(case["scores"], (batch, pool), gen) * (
            -1.0 if case["scores"] == "ties" else 1.0)
    tokens = torch.randint(-2**40, 2**40, (batch, pool), generator=gen)
    top_n = pick([1, 0, -5, 2, 7, pool, pool + 3, n_max, n_max + 1, 10**12], (batch,),
                 gen).long()
    args = [laid_out(t.to(device), layout) for t, layout in
            zip((parents, scores, tokens, top_n), case["layouts"])]
    want = ref.build_tree(parents, scores, tokens, top_n, n_max)
    if case["form"] == "functional":
        got = [t.cpu() for t in ops.build_tree(*args, n_max)]
    else:
        got = run_op(None, ops.build_tree_out, args, want, "out", gen)
    for name, g, w in zip(hx.Tree._fields, got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.equal(g, w), f"{name}:\n got {g}\nwant {w}"


# ----------------------------------------------------------------------------- fused_verify


@st.composite
def verify_cases(draw):
    vocab = draw(st.one_of(st.integers(1, 6), st.integers(7, 200), st.sampled_from([1025, 4099])))
    return dict(
        batch=draw(batch_sizes(6)),
        nodes=draw(weighted((None, 85), (33, 15)).flatmap(
            lambda n: st.just(n) if n else st.integers(1, 16))),
        vocab=vocab,
        kind=draw(st.sampled_from(TREE_KINDS)),
        padding=draw(paddings(0.0, 0.3)),
        dtype=draw(st.sampled_from(LOGIT_DTYPES)),
        style=draw(st.sampled_from(LOGIT_STYLES)),
        boost=draw(st.sampled_from([0.0, 1.0, 2.0, 4.0, 30.0])),
        duplicates=draw(st.booleans()),
        temperature=draw(weighted(("sampling", 40), ("mixed", 30), ("greedy", 15),
                                  ("extreme", 15))),
        top_k=draw(weighted(("off", 50), ("mixed", 30), ("small", 20))),
        top_p=draw(weighted(("off", 50), ("mixed", 30), ("tiny", 20))),
        uniforms=draw(weighted(("random", 60), ("edges", 25), ("zero", 15))),
        draft=draw(st.sampled_from([None, "softmax", "sparse", "one_hot"])),
        layout=draw(st.sampled_from(["contiguous", "nodes_apart", "vocab_strided", "small_t"])),
        form=draw(st.sampled_from(["functional", "out", "out_strided"])),
        spoil=draw(weighted((None, 80), ("nan", 5), ("posinf", 5), ("all_neg_inf", 5),
                            ("draft_negative", 5))),
        seed=draw(SEEDS),
    )


def verify_inputs(case, gen):
    """CPU tensors (logits, candidates, parents, temperature, top_k, top_p, uniforms, q)."""
    b, n, v = case["batch"], case["nodes"], case["vocab"]
    parents = tree_parents(case["kind"], b, n, case["padding"], gen)
    real = parents >= 0
    real[:, 0] = False
    # Root and padding candidates are ignored by the op: give them garbage.
    cands = torch.where(real, torch.randint(0, v, (b, n), generator=gen),
                        torch.randint(-2**40, 2**40, (b, n), generator=gen))
    if case["duplicates"]:  # half of the later siblings repeat their first sibling's token
        for bi, c in torch.nonzero(real).tolist():
            siblings = torch.nonzero(parents[bi, 1:c] == parents[bi, c])[:, 0] + 1
            if siblings.numel() and float(torch.rand((), generator=gen)) < 0.5:
                cands[bi, c] = cands[bi, int(siblings[0])]
    logits = logit_values(case["style"], (b, n, v), gen)
    bi, ci = torch.nonzero(real, as_tuple=True)
    logits[bi, parents[bi, ci], cands[bi, ci]] += case["boost"]  # so that acceptance happens
    logits = logits.to(case["dtype"])

    t_style = case["temperature"]
    temps = {"greedy": [0.0], "mixed": [0.0, 0.3, 1.0, 1.7], "sampling": [0.5, 1.0, 2.0],
             "extreme": [0.0, 1e-30, 1e-3, 1e3, 1e30, 3e38]}[t_style]
    temperature = pick(temps, (b,), gen).float()
    k_values = {"off": [0, -1, v, v + 5], "small": [1, 2, 3], "mixed": [0, 1, 2, max(v - 1, 1), 10]}
    top_k = pick(k_values[case["top_k"]], (b,), gen).long()
    p_values = {"off": [1.0], "mixed": [1.0, 0.9, 0.5, 0.99999994], "tiny": [1e-6, 0.05, 0.3]}
    top_p = pick(p_values[case["top_p"]], (b,), gen).float()
    u_values = {"random": None, "edges": [0.0, 1e-45, 0.5, 0.99999994],
                "zero": [0.0]}[case["uniforms"]]
    uniforms = (torch.rand(b, n, generator=gen) if u_values is None
                else pick(u_values, (b, n), gen).float())
    greedy = temperature == 0
    uniforms[greedy] = pick([7.0, -1.0, math.nan], (int(greedy.sum()), n), gen).float()  # ignored

    q = None
    if case["draft"] is not None:
        noise = torch.randn(b, n, v, generator=gen, dtype=torch.float64)
        q = torch.softmax(torch.nan_to_num(logits.double(), neginf=-60.0, posinf=60.0) + noise,
                          -1).float()
        if case["draft"] == "sparse":  # exact zeros: q(x) = 0 < p(x) accepts outright
            q = q.masked_fill(torch.rand(b, n, v, generator=gen) < 0.5, 0.0)
        elif case["draft"] == "one_hot":
            q = torch.nn.functional.one_hot(torch.randint(0, v, (b, n), generator=gen), v).float()
        if case["draft"] != "one_hot":
            q = q * pick([1.0, 0.5, 3.0], (b, 1, 1), gen).float()  # used as given, not normalised
        if greedy.any():
            q[greedy] = math.nan  # greedy requests ignore draft_probs

    if case["spoil"] and b:
        row_b = int(torch.randint(0, b, (1,), generator=gen))
        row_n = int(torch.randint(0, n, (1,), generator=gen))
        if case["spoil"] == "all_neg_inf":
            logits[row_b, row_n] = -math.inf
        elif case["spoil"] == "draft_negative" and q is not None:
            q[row_b, row_n, int(torch.randint(0, v, (1,), generator=gen))] = -0.25
        elif case["spoil"] in ("nan", "posinf"):
            logits[row_b, row_n, int(torch.randint(0, v, (1,), generator=gen))] = (
                math.nan if case["spoil"] == "nan" else math.inf)
    return logits, cands, parents, temperature, top_k, top_p, uniforms, q


def verify_layout(tensors, layout, device):
    logits, cands, parents, temperature, top_k, top_p, uniforms, q = [
        None if t is None else t.to(device) for t in tensors]
    if layout == "nodes_apart" and logits.numel():  # node rows not adjacent
        wide = logits.new_zeros(logits.shape[0], 2 * logits.shape[1], logits.shape[2])
        wide[:, ::2] = logits
        logits = wide[:, ::2]
    elif layout == "vocab_strided":
        logits = laid_out(logits, "strided")
        q = None if q is None else laid_out(q, "strided")
    elif layout == "small_t":
        cands, parents, uniforms = (laid_out(t, "transposed") for t in (cands, parents, uniforms))
        temperature, top_k, top_p = (laid_out(t, "strided") for t in (temperature, top_k, top_p))
    return logits, cands, parents, temperature, top_k, top_p, uniforms, q


def request_outcomes(inputs):
    """Per request: the outcomes the reference allows (None: not enumerated), or the
    ValueError it raises for that request alone."""
    per_request = []
    for b in range(inputs[0].shape[0]):
        sliced = [None if t is None else t[b:b + 1] for t in inputs]
        try:
            per_request.append(ref.fused_verify_outcomes(*sliced)[0])
        except ValueError as exc:
            per_request.append(exc)
    return per_request


def may_raise(allowed) -> bool:
    """A branch within rounding reaches invalid data, so the kernel may raise there."""
    return allowed is not None and any(o[0] == "raises" for o in allowed)


def assert_verify_result(got, inputs, per_request):
    """The op's result is, request by request, a valid accepted path with its emitted token,
    and one of the outcomes the reference allows (``None``: any valid outcome)."""
    out_tokens, accepted_nodes, num_accepted = got
    logits, cands, parents, temperature = inputs[:4]
    vocab = logits.shape[2]
    for b, allowed in enumerate(per_request):
        a = int(num_accepted[b])
        path = tuple(accepted_nodes[b, :a + 1].tolist())
        emitted = int(out_tokens[b, a])
        if a == 0 and emitted == -1 and may_raise(allowed):
            continue  # CUDA's sentinel where a branch within rounding meets invalid data
        assert (accepted_nodes[b, a + 1:] == -1).all() and (out_tokens[b, a + 1:] == -1).all()
        assert path[0] == 0 and 0 <= emitted < vocab, (b, path, emitted)
        for i in range(1, len(path)):
            assert int(parents[b, path[i]]) == path[i - 1], f"request {b}: not a root path"
            assert int(out_tokens[b, i - 1]) == int(cands[b, path[i]])
        if allowed is not None:
            assert (path, emitted) in allowed, (
                f"request {b} (T={float(temperature[b])}): op gave {(path, emitted)}, "
                f"the reference allows {sorted(allowed, key=str)}")


def spans_more_than_float32(logits) -> bool:
    """Some row's finite logits lie more than float32's range (3.4e38) apart."""
    x = logits.double()
    finite = torch.isfinite(x)
    highest = x.masked_fill(~finite, -math.inf).amax(-1)
    lowest = x.masked_fill(~finite, math.inf).amin(-1)
    return bool((highest - lowest > torch.finfo(torch.float32).max).any())


def check_fused_verify(device, case, ops):
    gen = gen_from(case["seed"])
    inputs = verify_inputs(case, gen)
    # The CUDA kernel still gives weight 0 to such tokens (documented, and kept visible by the
    # strict xfail of test_fused_verify.py::test_logits_spanning_more_than_the_float32_range).
    assume(device.type != "cuda" or not spans_more_than_float32(inputs[0]))
    per_request = request_outcomes(inputs)
    args = verify_layout(inputs, case["layout"], device)
    b, n = case["batch"], case["nodes"]
    like = [torch.empty(b, n, dtype=torch.int64), torch.empty(b, n, dtype=torch.int64),
            torch.empty(b, dtype=torch.int64)]

    def call():
        if case["form"] == "functional":
            return [t.cpu() for t in ops.fused_verify(*args[:3], temperature=args[3],
                                                     top_k=args[4], top_p=args[5],
                                                     uniforms=args[6], draft_probs=args[7])]
        outs = [garbage_like(t, gen).to(device) for t in like]
        if case["form"] == "out_strided":
            outs = [laid_out(t, "transposed") for t in outs]
        ops.fused_verify_out(*args, *outs)
        return [t.cpu() for t in outs]

    invalid = [i for i, e in enumerate(per_request) if isinstance(e, ValueError)]
    if device.type == "cpu" and (invalid or any(map(may_raise, per_request))):
        try:
            got = call()
        except ValueError as exc:
            # The lowest request whose walk meets invalid data (for some requests only on a
            # branch within rounding), named with its argument, as the reference names it.
            request = int(str(exc).split("request ")[1].split()[0])
            assert not [i for i in invalid if i < request], f"{exc}; reference: {per_request}"
            expected = per_request[request]
            if expected is None:
                return  # rounding may change that walk in ways the reference does not list
            messages = [str(expected)] if request in invalid else [
                m for kind, m in expected if kind == "raises"]
            # The same subject: the argument ("candidates:") or op and argument
            # ("fused_verify: parents of") that the message names before the request.
            subject = str(exc).split(" request ")[0]
            assert any(subject == m.split(" request ")[0] for m in messages), (
                f"{exc}; reference: {messages}")
            return
        assert not invalid, f"the op did not raise; reference: {per_request}"
    else:
        got = call()
    for i in invalid:  # CUDA: an invalid request emits nothing
        assert int(got[2][i]) == 0 and (got[0][i] == -1).all() and (got[1][i] == -1).all()
    if invalid:  # check the valid requests only
        valid = [i for i in range(b) if i not in invalid]
        got = [t[valid] for t in got]
        inputs = [None if t is None else t[valid] for t in inputs]
        per_request = [per_request[i] for i in valid]
    assert_verify_result(got, inputs, per_request)


# ----------------------------------------------------------------------------- the properties

# op -> (case strategy, property, CI examples)
PROPERTIES = {
    "draft_topk_entropy": (topk_cases, check_draft_topk_entropy, 600),
    "stratify": (stratify_cases, check_stratify, 600),
    "build_tree": (build_tree_cases, check_build_tree, 500),
    "fused_verify": (verify_cases, check_fused_verify, 600),
}


@pytest.mark.parametrize("op", list(PROPERTIES))
def test_fuzz(device, op):
    """CI: a fixed number of examples from a fixed seed (the same cases every run);
    ``HX_FUZZ_EXAMPLES=N``: N examples, fresh random ones unless HX_FUZZ_DERANDOMIZE=1."""
    cases, check, ci_examples = PROPERTIES[op]
    run_property(check, cases, device, hx,
                 fuzz_settings(FUZZ_EXAMPLES or ci_examples, FUZZ_DERANDOMIZE))


# ----------------------------------------------------------------------------- planted bugs


def _planted(**replacements):
    """The ops of heterospec_ext with some replaced by a subtly wrong version."""
    names = ("draft_topk_entropy", "draft_topk_entropy_out", "stratify", "stratify_out",
             "build_tree", "build_tree_out", "fused_verify", "fused_verify_out")
    return SimpleNamespace(**{n: replacements.get(n, getattr(hx, n)) for n in names})


def _entropy_off_by_a_thousandth(logits, k, temperature):
    out = hx.draft_topk_entropy(logits, k, temperature)
    return out._replace(entropy=out.entropy * 1.001)


def _entropy_out_off_by_a_thousandth(logits, k, temperature, *outs):
    hx.draft_topk_entropy_out(logits, k, temperature, *outs)
    outs[3].mul_(1.001)


def _thresholds_one_ulp_up(step_entropy, confidence, parents, thresholds, policy, *outs):
    """A stratum boundary that puts H(P*) == threshold below it instead of above."""
    up = torch.nextafter(thresholds, torch.full_like(thresholds, math.inf))
    op = hx.stratify_out if outs else hx.stratify
    return op(step_entropy, confidence, parents, up, policy, *outs)


def _top_n_one_short(pool_parents, pool_scores, pool_tokens, top_n, *rest):
    op = hx.build_tree_out if len(rest) > 1 else hx.build_tree
    return op(pool_parents, pool_scores, pool_tokens, top_n - 1, *rest)


def _next_columns(uniforms):
    """Node c's accept test reads column c + 1 (the last node's wraps to column 1): an
    off-by-one in the uniform indexing. Column 0, the final draw, is left alone."""
    shifted = uniforms.clone()
    if uniforms.shape[1] > 1:
        shifted[:, 1:] = torch.roll(uniforms[:, 1:], -1, dims=1)
    return shifted


def _five_points_rarer(uniforms):
    """Accept tests compare u + 0.05 with the threshold: every acceptance probability 5
    percentage points too low (a token the target always takes is rejected 5% of the time)."""
    biased = uniforms.clone()
    biased[:, 1:] = (biased[:, 1:] + 0.05).clamp(max=0.99999994)
    return biased


def _verify_with(uniforms_fn):
    """fused_verify and fused_verify_out with the uniforms passed through uniforms_fn."""
    def functional(target_logits, candidates, parents, **kw):
        kw["uniforms"] = uniforms_fn(kw["uniforms"])
        return hx.fused_verify(target_logits, candidates, parents, **kw)

    def out(target_logits, candidates, parents, temperature, top_k, top_p, uniforms, *rest):
        hx.fused_verify_out(target_logits, candidates, parents, temperature, top_k, top_p,
                            uniforms_fn(uniforms), *rest)
    return dict(fused_verify=functional, fused_verify_out=out)


PLANTED = {
    "entropy_off_by_1e-3": (check_draft_topk_entropy, topk_cases, _planted(
        draft_topk_entropy=_entropy_off_by_a_thousandth,
        draft_topk_entropy_out=_entropy_out_off_by_a_thousandth)),
    "stratum_boundary_one_ulp": (check_stratify, stratify_cases, _planted(
        stratify=_thresholds_one_ulp_up, stratify_out=_thresholds_one_ulp_up)),
    "top_n_one_short": (check_build_tree, build_tree_cases, _planted(
        build_tree=_top_n_one_short, build_tree_out=_top_n_one_short)),
    "uniform_column_off_by_one": (check_fused_verify, verify_cases, _planted(
        **_verify_with(_next_columns))),
    "acceptance_5_points_rarer": (check_fused_verify, verify_cases, _planted(
        **_verify_with(_five_points_rarer))),
}


@pytest.mark.parametrize("plant", list(PLANTED))
def test_fuzz_finds_a_planted_bug(plant):
    """Each property fails within 300 examples on a subtly wrong op, so its tolerances (float32
    rounding; for fused_verify the outcomes within rounding) do not hide real errors."""
    check, cases, ops = PLANTED[plant]
    no_shrinking = fuzz_settings(300, True, phases=[Phase.generate])
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        run_property(check, cases, torch.device("cpu"), ops, no_shrinking)
