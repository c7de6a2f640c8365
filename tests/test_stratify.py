"""stratify: H(P*) bit-exact against the float32 reference, P* tie rules, strata, policy, errors."""
import math
import zlib
from types import SimpleNamespace

import pytest
import torch

import heterospec_ext as hx
from heterospec_ext.testing import eagle_pool, raises_exactly, random_parents
from heterospec_ext import reference as ref

OP = torch.ops.heterospec.stratify.default
OP_OUT = torch.ops.heterospec.stratify_out.default
FIELDS = ("path_entropy", "pstar", "stratum", "extra_depth", "top_n")


# ----------------------------------------------------------------------------- input builders


def random_inputs(kind, batch, num_nodes, gen, num_thresholds=7, padding=0.1, ties=False,
                  nans=False):
    parents = random_parents(kind, batch, num_nodes, gen, padding)
    step_entropy = torch.rand(batch, num_nodes, generator=gen) * 2.0
    if ties:  # few distinct confidence values: ties must go to the lowest index
        confidence = torch.randint(0, 3, (batch, num_nodes), generator=gen).float() / 2
    else:
        confidence = torch.rand(batch, num_nodes, generator=gen)
    if nans:
        u = torch.rand(batch, num_nodes, generator=gen)
        confidence[u < 0.3] = float("nan")
        confidence[(u >= 0.3) & (u < 0.45)] = float("-inf")  # ties with NaN
        step_entropy[torch.rand(batch, num_nodes, generator=gen) < 0.02] = float("nan")
    # Thresholds spread over the range of H so every stratum is hit.
    thresholds = torch.sort(torch.rand(num_thresholds, generator=gen) * 6.0).values
    policy = torch.randint(0, 100, (num_thresholds + 1, 2), generator=gen)
    return step_entropy, confidence, parents, thresholds, policy


def to(device, *tensors):
    return [t.to(device) for t in tensors]


def assert_matches_reference(args, out):
    expected = ref.stratify(*[a.cpu() for a in args])
    for name, got, want in zip(FIELDS, out, expected):
        assert got.dtype == want.dtype, name
        assert torch.equal(got.cpu(), want) or (
            name == "path_entropy" and torch.allclose(got.cpu(), want, rtol=0, atol=0,
                                                      equal_nan=True)
        ), f"{name}: got {got.cpu()}, want {want}"


# ----------------------------------------------------------------------------- reference checks


@pytest.mark.parametrize("kind", ["chain", "star", "deep", "bushy"])
@pytest.mark.parametrize("batch,num_nodes", [(1, 1), (7, 7), (83, 111), (7, 1013)])
def test_matches_reference(device, kind, batch, num_nodes):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{kind}-{batch}-{num_nodes}".encode()))
    args = to(device, *random_inputs(kind, batch, num_nodes, gen))
    out = hx.stratify(*args)
    assert all(t.device.type == device.type for t in out)
    assert_matches_reference(args, out)


@pytest.mark.parametrize("ties,nans", [(True, False), (False, True), (True, True)])
def test_ties_and_nans_match_reference(device, ties, nans):
    gen = torch.Generator().manual_seed(11)
    for kind in ("bushy", "deep"):
        args = to(device, *random_inputs(kind, 83, 57, gen, ties=ties, nans=nans))
        assert_matches_reference(args, hx.stratify(*args))


def test_eagle_pool(device):
    gen = torch.Generator().manual_seed(3)
    k, depth, batch = 10, 7, 8
    parents, scores = eagle_pool(batch, k, depth, gen)
    step_entropy = torch.rand(parents.shape, generator=gen)
    # P* over the deepest level only: the others are made ineligible with -inf.
    confidence = torch.full(parents.shape, float("-inf"))
    last = 1 + k + (depth - 1) * k * k
    confidence[:, last:] = scores[:, last:].exp()
    thresholds = torch.tensor([0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0])
    policy = hx.make_policy(depth, 59)
    args = to(device, step_entropy, confidence, parents, thresholds, policy)
    out = hx.stratify(*args)
    assert_matches_reference(args, out)
    assert bool((out.pstar.cpu() >= last).all())


# ----------------------------------------------------------------------------- exact semantics


def test_hand_computed(device):
    #   0 -> 1 -> 3 -> 5 ;  0 -> 2 -> 4 ; slot 6 is padding
    parents = torch.tensor([[-1, 0, 0, 1, 2, 3, -1]])
    step_entropy = torch.tensor([[9.0, 0.25, 0.5, 1.0, 2.0, 0.125, 7.0]])
    confidence = torch.tensor([[5.0, 0.1, 0.2, 0.3, 0.9, 0.9, 10.0]])  # root and padding ignored
    thresholds = torch.tensor([1.0, 2.5, 2.5, 4.0])
    policy = torch.tensor([[4, 20], [3, 30], [2, 40], [1, 50], [0, 60]])
    out = hx.stratify(*to(device, step_entropy, confidence, parents, thresholds, policy))
    assert out.pstar.tolist() == [4]  # tie 0.9 between 4 and 5: lowest index
    assert out.path_entropy.tolist() == [2.5]  # 0.5 + 2.0; the root's 9.0 is ignored
    assert out.stratum.tolist() == [3]  # thresholds <= 2.5: 1.0, 2.5, 2.5
    assert out.extra_depth.tolist() == [1] and out.top_n.tolist() == [50]


def test_summation_order_is_root_down_float32(device):
    # Root-down: (1 + 1e8) - 1e8 = 0 in float32; any other order gives 1.
    parents = torch.tensor([[-1, 0, 1, 2]])
    step_entropy = torch.tensor([[0.0, 1.0, 1e8, -1e8]])
    confidence = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    out = hx.stratify(*to(device, step_entropy, confidence, parents, torch.tensor([0.5]),
                          torch.tensor([[0, 1], [0, 2]])))
    assert out.pstar.tolist() == [3]
    assert out.path_entropy.tolist() == [0.0]
    assert out.stratum.tolist() == [0]


def test_root_only_and_all_padding(device):
    parents = torch.tensor([[-1, -1, -1], [-1, 0, -1]])
    confidence = torch.tensor([[1.0, 2.0, 3.0], [0.0, float("-inf"), 0.0]])
    step_entropy = torch.tensor([[5.0, 5.0, 5.0], [5.0, 3.0, 5.0]])
    thresholds = torch.tensor([0.0, 2.0])
    policy = torch.tensor([[1, 11], [2, 22], [3, 33]])
    out = hx.stratify(*to(device, step_entropy, confidence, parents, thresholds, policy))
    # Root-only tree: P* = 0, H = 0 (thresholds <= 0: one). -inf confidence is still eligible.
    assert out.pstar.tolist() == [0, 1]
    assert out.path_entropy.tolist() == [0.0, 3.0]
    assert out.stratum.tolist() == [1, 2]
    assert out.top_n.tolist() == [22, 33]
    single = hx.stratify(*to(device, torch.zeros(3, 1), torch.zeros(3, 1),
                             torch.full((3, 1), -1), thresholds, policy))
    assert single.pstar.tolist() == [0, 0, 0] and single.stratum.tolist() == [1, 1, 1]


def test_nan_confidence_is_minus_inf_and_nan_entropy_is_last_stratum(device):
    parents = torch.tensor([[-1, 0, 0, 0], [-1, 0, 1, 1]])
    confidence = torch.tensor([[0.0, float("nan"), float("-inf"), float("nan")],
                               [0.0, 0.5, float("nan"), 0.7]])
    step_entropy = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, float("nan"), 1.0, 1.0]])
    thresholds = torch.tensor([0.5, 1.5])
    policy = torch.tensor([[0, 1], [0, 2], [0, 3]])
    out = hx.stratify(*to(device, step_entropy, confidence, parents, thresholds, policy))
    assert out.pstar.tolist() == [1, 3]  # all -inf: lowest index; NaN loses to 0.5 and 0.7
    assert out.path_entropy[0].item() == 1.0 and math.isnan(out.path_entropy[1].item())
    assert out.stratum.tolist() == [1, 2]
    assert out.top_n.tolist() == [2, 3]


def test_single_stratum_and_infinite_thresholds(device):
    gen = torch.Generator().manual_seed(5)
    step_entropy, confidence, parents, _, _ = random_inputs("bushy", 7, 31, gen)
    out = hx.stratify(*to(device, step_entropy, confidence, parents, torch.zeros(0),
                          torch.tensor([[3, 9]])))
    assert out.stratum.tolist() == [0] * 7 and out.top_n.tolist() == [9] * 7
    thresholds = torch.tensor([float("-inf"), float("-inf"), 1.0, float("inf")])
    args = to(device, step_entropy, confidence, parents, thresholds, torch.arange(10).view(5, 2))
    assert_matches_reference(args, hx.stratify(*args))


def test_make_policy_rows_feed_stratify(device):
    policy = hx.make_policy(7, 59)
    assert policy.tolist()[:4] == [[4, 23], [3, 39], [2, 62], [0, 60]]
    parents = torch.tensor([[-1, 0, 1]])
    out = hx.stratify(*to(device, torch.tensor([[0.0, 0.1, 0.1]]), torch.tensor([[0, 0, 1.0]]),
                          parents, torch.tensor([0.1, 0.3, 0.5, 1, 2, 3, 4.0]), policy))
    assert out.stratum.tolist() == [1]  # H = 0.2 >= 0.1 only
    assert out.extra_depth.tolist() == [3] and out.top_n.tolist() == [39]


# ----------------------------------------------------------------------------- layouts, out, opcheck


def test_non_contiguous_inputs(device):
    gen = torch.Generator().manual_seed(7)
    args = to(device, *random_inputs("bushy", 9, 40, gen))
    strided = [torch.stack([a, a], dim=-1)[..., 0] for a in args[:3]]
    thresholds = torch.stack([args[3], args[3]], -1)[:, 1]
    policy = args[4].t().contiguous().t()
    inputs = [*strided, thresholds, policy]
    assert not inputs[0].is_contiguous() and not inputs[3].is_contiguous()
    assert_matches_reference(inputs, hx.stratify(*inputs))


def test_out_variant_overwrites_buffers(device):
    gen = torch.Generator().manual_seed(8)
    args = to(device, *random_inputs("deep", 13, 50, gen))
    outs = [torch.full((13,), float("nan"), device=device)] + [
        torch.full((13,), 12345, dtype=torch.int64, device=device) for _ in range(4)]
    assert hx.stratify_out(*args, *outs) is None
    for name, got, want in zip(FIELDS, outs, hx.stratify(*args)):
        assert torch.equal(got, want), name


def test_empty_batch(device):
    out = hx.stratify(*to(device, torch.zeros(0, 5), torch.zeros(0, 5),
                          torch.zeros(0, 5, dtype=torch.int64), torch.zeros(1),
                          torch.zeros(2, 2, dtype=torch.int64)))
    assert all(t.shape == (0,) for t in out)


def test_opcheck(device):
    gen = torch.Generator().manual_seed(9)
    args = to(device, *random_inputs("bushy", 5, 23, gen))
    torch.library.opcheck(OP, tuple(args))
    outs = [torch.empty(5, device=device)] + [torch.empty(5, dtype=torch.int64, device=device)
                                              for _ in range(4)]
    torch.library.opcheck(OP_OUT, tuple(args) + tuple(outs))


def test_torch_compile_fullgraph(device):
    gen = torch.Generator().manual_seed(10)
    args = to(device, *random_inputs("bushy", 4, 19, gen))
    compiled = torch.compile(hx.stratify, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(*args), hx.stratify(*args)):
        assert torch.equal(got, want)


# ----------------------------------------------------------------------------- malformed input


MALFORMED_PARENTS = {
    "parent_not_below_node": [[-1, 0, 1, 0], [-1, 0, 2, 1]],
    "parent_below_minus_one": [[-1, 0, 1, 0], [-1, 0, -2, 1]],
    "root_parent_not_minus_one": [[-1, 0, 1, 0], [0, 0, 1, 1]],
    "real_node_under_padding": [[-1, 0, 1, 0], [-1, -1, 0, 1]],
}


def test_malformed_parents_on_cuda_give_sentinels(device):
    if device.type != "cuda":
        pytest.skip("CPU raises instead (test_data_errors_raise_on_cpu_and_not_on_cuda)")
    for name, rows in MALFORMED_PARENTS.items():
        parents = torch.tensor(rows)
        args = to(device, torch.rand(2, 4), torch.rand(2, 4), parents, torch.tensor([0.5]),
                  torch.tensor([[1, 2], [3, 4]]))
        out = hx.stratify(*args)
        torch.cuda.synchronize()
        assert out.pstar.tolist()[1] == -1 and out.stratum.tolist()[1] == -1, name
        assert math.isnan(out.path_entropy[1].item()), name
        assert out.extra_depth.tolist()[1] == 0 and out.top_n.tolist()[1] == 0, name
        good = ref.stratify(*[a.cpu()[:1] for a in args[:3]], *[a.cpu() for a in args[3:]])
        for got, want in zip(out, good):
            assert torch.equal(got[:1].cpu(), want), name


def _good_inputs(device):
    """Valid stratify arguments: B = 2 requests of M = 4 nodes, 2 thresholds, 3 strata."""
    return SimpleNamespace(
        e=torch.rand(2, 4, device=device), c=torch.rand(2, 4, device=device),
        p=torch.tensor([[-1, 0, 1, 0], [-1, 0, 1, 1]], device=device),
        t=torch.tensor([0.5, 1.0], device=device),
        pol=torch.zeros(3, 2, dtype=torch.int64, device=device))


def _outputs(device, path_entropy=None, **int_outputs):
    """stratify_out buffers for B = 2, with replacements by name."""
    outs = {"path_entropy": torch.empty(2, device=device) if path_entropy is None else path_entropy}
    for name in ("pstar", "stratum", "extra_depth", "top_n"):
        outs[name] = int_outputs.get(name, torch.empty(2, dtype=torch.int64, device=device))
    return list(outs.values())


# name -> (call with the inputs x on device d, text the RuntimeError must hold)
ARGUMENT_ERRORS = {
    "entropy_dtype": (lambda x, d: hx.stratify(x.e.double(), x.c, x.p, x.t, x.pol), "step_entropy"),
    "entropy_rank": (lambda x, d: hx.stratify(x.e[0], x.c, x.p, x.t, x.pol), "step_entropy"),
    "entropy_shape": (lambda x, d: hx.stratify(x.e[:, :3], x.c, x.p, x.t, x.pol), "step_entropy"),
    "confidence_dtype": (lambda x, d: hx.stratify(x.e, x.c.half(), x.p, x.t, x.pol), "confidence"),
    "confidence_shape": (lambda x, d: hx.stratify(x.e, x.c[:1], x.p, x.t, x.pol), "confidence"),
    "parents_dtype": (lambda x, d: hx.stratify(x.e, x.c, x.p.int(), x.t, x.pol), "parents"),
    "parents_rank": (lambda x, d: hx.stratify(x.e[0], x.c[0], x.p[0], x.t, x.pol), "parents"),
    "parents_empty": (lambda x, d: hx.stratify(x.e[:, :0], x.c[:, :0], x.p[:, :0], x.t, x.pol),
                      "parents"),
    "thresholds_rank": (lambda x, d: hx.stratify(x.e, x.c, x.p, x.t[None], x.pol), "thresholds"),
    "thresholds_dtype": (lambda x, d: hx.stratify(x.e, x.c, x.p, x.t.double(), x.pol),
                         "thresholds"),
    "policy_rows": (lambda x, d: hx.stratify(x.e, x.c, x.p, x.t, x.pol[:2]), "policy"),
    "policy_cols": (lambda x, d: hx.stratify(x.e, x.c, x.p, x.t, torch.zeros(
        3, 3, dtype=torch.int64, device=d)), "policy"),
    "policy_dtype": (lambda x, d: hx.stratify(x.e, x.c, x.p, x.t, x.pol.float()), "policy"),
    "out_dtype": (lambda x, d: hx.stratify_out(x.e, x.c, x.p, x.t, x.pol, *_outputs(
        d, path_entropy=torch.empty(2, device=d).double())), "path_entropy"),
    "out_shape": (lambda x, d: hx.stratify_out(x.e, x.c, x.p, x.t, x.pol, *_outputs(
        d, top_n=torch.empty(3, dtype=torch.int64, device=d))), "top_n"),
    "out_strided": (lambda x, d: hx.stratify_out(x.e, x.c, x.p, x.t, x.pol, *_outputs(
        d, pstar=torch.empty(4, dtype=torch.int64, device=d)[::2])), "pstar"),
}


@pytest.mark.parametrize("case", ARGUMENT_ERRORS)
def test_argument_errors(device, case):
    call, needle = ARGUMENT_ERRORS[case]
    with raises_exactly(RuntimeError, needle):
        call(_good_inputs(device), device)


def test_inputs_on_two_devices_raise(device):
    if device.type != "cuda":
        pytest.skip("needs a second device type")
    x = _good_inputs(device)
    with raises_exactly(RuntimeError, "same device"):
        hx.stratify(x.e.cpu(), x.c, x.p, x.t, x.pol)


# name -> (parents or thresholds to use, argument the ValueError names, request it names)
DATA_ERRORS = {
    **{f"malformed_{name}": (dict(p=rows), "parents", 1)
       for name, rows in MALFORMED_PARENTS.items()},
    "thresholds_unsorted": (dict(t=[1.0, 0.5]), "thresholds", None),
    "thresholds_nan": (dict(t=[0.5, float("nan")]), "thresholds", None),
}


@pytest.mark.parametrize("case", DATA_ERRORS)
def test_data_errors_raise_on_cpu_and_not_on_cuda(device, case):
    """CPU raises ValueError naming the argument (and the request); CUDA, which never syncs to
    raise, returns (test_malformed_parents_on_cuda_give_sentinels checks the values)."""
    changes, argument, request = DATA_ERRORS[case]
    x = _good_inputs(device)
    for name, value in changes.items():
        setattr(x, name, torch.tensor(value, device=device))
    call = lambda: hx.stratify(x.e, x.c, x.p, x.t, x.pol)  # noqa: E731
    if device.type == "cuda":
        call()
        torch.cuda.synchronize()
        return
    where = rf" of request {request} " if request is not None else ""
    with raises_exactly(ValueError, rf"^stratify: {argument}{where}"):
        call()
