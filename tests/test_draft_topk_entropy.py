"""draft_topk_entropy against the float64 reference, edge cases, the _out op, opcheck, errors."""
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import heterospec_ext as hx
from heterospec_ext import reference
from heterospec_ext.testing import assert_topk_matches, raises_exactly

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAMES = ("topk_logprobs", "topk_ids", "topk_entropy", "entropy", "logsumexp")


def _random_logits(n, v, dtype, device, scale=4.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=gen) * scale).to(dtype).to(device)


# Shapes with small V for big N; every shape is checked for every dtype, k and temperature.
SHAPES = [(1, 262144), (7, 32000), (83, 5003), (1000, 257)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}xV{s[1]}")
@pytest.mark.parametrize("k,temperature", [(1, 1.0), (10, 0.5), (64, 2.0), (10, 0.7)])
def test_matches_reference(device, dtype, shape, k, temperature):
    logits = _random_logits(*shape, dtype, device, seed=shape[0] + k)
    out = hx.draft_topk_entropy(logits, k, temperature)
    assert isinstance(out, hx.DraftTopK)
    assert out.topk_logprobs.shape == (shape[0], k) and out.topk_ids.shape == (shape[0], k)
    assert all(t.device == logits.device for t in out)
    assert_topk_matches(out, reference.draft_topk_entropy(logits, k, temperature))


def test_outputs_are_consistent(device):
    """Properties that do not depend on the reference: sorted, renormalised, bounded."""
    logits = _random_logits(33, 4099, torch.float32, device, scale=2.0, seed=5)
    k = 17
    lp, ids, top_h, h, lse = hx.draft_topk_entropy(logits, k, 1.0)
    assert torch.all(lp[:, :-1] >= lp[:, 1:])
    assert torch.all((ids >= 0) & (ids < logits.shape[1]))
    assert torch.all(ids.sort(dim=1).values.diff(dim=1) > 0), "duplicate ids in a row"
    torch.testing.assert_close(lse, torch.logsumexp(logits, dim=1), rtol=1e-6, atol=1e-5)
    assert torch.all(h > 0) and torch.all(h <= math.log(logits.shape[1]) + 1e-5)
    assert torch.all(top_h > 0) and torch.all(top_h <= math.log(k) + 1e-5)
    torch.testing.assert_close(lp, torch.gather(torch.log_softmax(logits, 1), 1, ids),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("v", [1, 7, 64])
def test_k_equals_vocab(device, dtype, v):
    logits = _random_logits(5, v, dtype, device, seed=v)
    out = hx.draft_topk_entropy(logits, v, 1.0)
    assert_topk_matches(out, reference.draft_topk_entropy(logits, v, 1.0))
    # With k == V the top-k distribution is the full one.
    torch.testing.assert_close(out.topk_entropy, out.entropy, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.topk_ids.sort(dim=1).values.cpu(), torch.arange(v).expand(5, v))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_neg_inf_entries(device, dtype):
    n, v, k = 9, 3001, 10
    logits = _random_logits(n, v, dtype, device, seed=11)
    gen = torch.Generator().manual_seed(12)
    mask = (torch.rand(n, v, generator=gen) < 0.5).to(device)
    logits = logits.masked_fill(mask, float("-inf"))
    # Row 0: only three finite values, so 7 top-k slots are -inf with the lowest -inf ids.
    logits[0] = float("-inf")
    logits[0, [2999, 5, 1000]] = torch.tensor([1.0, 3.0, 2.0], dtype=dtype, device=device)
    # Row 1: a single finite value: entropy 0, logsumexp = that value.
    logits[1] = float("-inf")
    logits[1, 77] = 2.5
    # Row 2: the only finite value is the last id, so the -inf slots come from the first tiles.
    logits[2] = float("-inf")
    logits[2, v - 1] = 1.0
    out = hx.draft_topk_entropy(logits, k, 1.0)
    assert_topk_matches(out, reference.draft_topk_entropy(logits, k, 1.0))
    assert out.topk_ids[0].tolist() == [5, 1000, 2999, 0, 1, 2, 3, 4, 6, 7]
    assert torch.isneginf(out.topk_logprobs[0, 3:]).all()
    assert out.entropy[1].item() == 0.0 and out.topk_entropy[1].item() == 0.0
    assert out.logsumexp[1].item() == pytest.approx(2.5, abs=1e-6)
    assert out.topk_logprobs[1, 0].item() == pytest.approx(0.0, abs=1e-6)
    assert out.topk_ids[1, 0].item() == 77
    assert out.topk_ids[2].tolist() == [v - 1] + list(range(k - 1))


@pytest.mark.parametrize("dtype,offset", [(torch.float32, 1e4), (torch.float32, -1e4),
                                          (torch.float16, 6e4), (torch.bfloat16, 1e4)],
                         ids=["f32+1e4", "f32-1e4", "f16+6e4", "bf16+1e4"])
def test_huge_logits(device, dtype, offset):
    n, v, k = 4, 2053, 10
    base = _random_logits(n, v, torch.float32, "cpu", scale=1.0, seed=3)
    logits = (base + offset).to(dtype)
    # Row 0: the largest value of the dtype next to its negative (no overflow anywhere).
    logits[0, 0] = torch.finfo(dtype).max if dtype == torch.float16 else offset
    logits[0, 1] = -torch.finfo(dtype).max if dtype == torch.float16 else -offset
    logits = logits.to(device)
    for temperature in (0.5, 1.0):
        out = hx.draft_topk_entropy(logits, k, temperature)
        assert_topk_matches(out, reference.draft_topk_entropy(logits, k, temperature))
        assert torch.isfinite(out.logsumexp).all() and torch.isfinite(out.entropy).all()


@pytest.mark.parametrize("temperature", [1e-30, 1e-20, 1e-9])
def test_tiny_temperature_keeps_order_one_values(device, temperature):
    """Logits [3, 3, 1] / 1e-30 are z = [3e30, 3e30, 1e30]: two tokens of probability 1/2, so
    every entropy is ln 2 and both top log-probs -ln 2, although |z| ~ 1e30. Computed as
    z - logsumexp(z) those O(1) values vanish below the ulp of z (the float64 oracle gave
    entropy -0, the CPU op top log-probs 0); both now shift by the row max first."""
    logits = torch.tensor([[3.0, 3.0, 1.0], [1.0, 2.0, 2.0]])
    ln2 = math.log(2.0)
    for out in (hx.draft_topk_entropy(logits.to(device), 2, temperature),
                reference.draft_topk_entropy(logits, 2, temperature)):
        lp, ids, top_h, h, lse = (t.cpu() for t in out)
        assert ids.tolist() == [[0, 1], [1, 2]]
        torch.testing.assert_close(lp, torch.full((2, 2), -ln2), rtol=0, atol=1e-6)
        torch.testing.assert_close(top_h, torch.full((2,), ln2), rtol=0, atol=1e-6)
        torch.testing.assert_close(h, torch.full((2,), ln2), rtol=0, atol=1e-6)
        torch.testing.assert_close(lse, torch.tensor([3.0, 2.0]) / temperature, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exact_ties_go_to_lowest_id(device, dtype):
    n, v = 6, 5000
    gen = torch.Generator().manual_seed(21)
    logits = torch.randint(-3, 4, (n, v), generator=gen).to(dtype)
    logits[0] = 0.0  # uniform: ids 0..k-1, entropy log V, top-k entropy log k
    logits = logits.to(device)
    for k in (1, 10, 64):
        out = hx.draft_topk_entropy(logits, k, 1.0)
        assert_topk_matches(out, reference.draft_topk_entropy(logits, k, 1.0))
        assert out.topk_ids[0].tolist() == list(range(k))
        assert out.entropy[0].item() == pytest.approx(math.log(v), rel=1e-6)
        assert out.topk_entropy[0].item() == pytest.approx(math.log(k), abs=1e-6)
        assert out.logsumexp[0].item() == pytest.approx(math.log(v), rel=1e-6)


def test_ties_across_split_boundaries(device):
    """Equal maxima far apart in a long row (on CUDA, in different CTAs) keep id order."""
    v = 200003
    logits = torch.full((2, v), -5.0)
    hot = [v - 1, 150000, 99999, 65536, 4097, 3]
    logits[:, hot] = 7.0
    logits[1, 7] = 8.0
    logits = logits.to(device)
    out = hx.draft_topk_entropy(logits, 8, 1.0)
    assert_topk_matches(out, reference.draft_topk_entropy(logits, 8, 1.0))
    assert out.topk_ids[0, :6].tolist() == sorted(hot)
    assert out.topk_ids[1, :7].tolist() == [7] + sorted(hot)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["every_other_column", "transposed", "wide_rows",
                                    "unaligned_start"])
def test_strided_logits(device, dtype, layout):
    n, v, k = 5, 3001, 12
    if layout == "every_other_column":
        logits = _random_logits(n, 2 * v, dtype, device, seed=1)[:, ::2]
    elif layout == "transposed":
        logits = _random_logits(v, n, dtype, device, seed=2).t()
    elif layout == "wide_rows":
        logits = _random_logits(n, v + 13, dtype, device, seed=3)[:, :v]
    else:
        logits = _random_logits(n, v + 1, dtype, device, seed=4)[:, 1:]
    assert not logits.is_contiguous()
    out = hx.draft_topk_entropy(logits, k, 0.5)
    assert_topk_matches(out, reference.draft_topk_entropy(logits, k, 0.5))
    dense = hx.draft_topk_entropy(logits.contiguous(), k, 0.5)
    assert torch.equal(out.topk_ids, dense.topk_ids)
    for a, b in zip(out, dense):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_large_vocab_many_rows(device):
    """Several long rows at once: B=2 x 64 nodes at V=128256 (bf16)."""
    logits = _random_logits(16, 128256, torch.bfloat16, device, seed=8)
    out = hx.draft_topk_entropy(logits, 10, 1.0)
    assert_topk_matches(out, reference.draft_topk_entropy(logits, 10, 1.0))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_out_variant(device, dtype):
    n, v, k = 7, 1111, 9
    logits = _random_logits(n, v, dtype, device, seed=6)
    outs = [
        torch.full((n, k), float("nan"), device=device),
        torch.full((n, k), -7, dtype=torch.int64, device=device),
        torch.full((n,), float("nan"), device=device),
        torch.full((n,), float("nan"), device=device),
        torch.full((n,), float("nan"), device=device),
    ]
    assert hx.draft_topk_entropy_out(logits, k, 2.0, *outs) is None
    expected = hx.draft_topk_entropy(logits, k, 2.0)
    for got, exp in zip(outs, expected):
        assert torch.equal(got, exp)
    assert_topk_matches(outs, reference.draft_topk_entropy(logits, k, 2.0))


def test_deterministic(device):
    logits = _random_logits(3, 262144, torch.float32, device, seed=9)
    first = hx.draft_topk_entropy(logits, 64, 1.0)
    second = hx.draft_topk_entropy(logits, 64, 1.0)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_empty_batch(device):
    logits = torch.empty(0, 100, device=device)
    out = hx.draft_topk_entropy(logits, 5, 1.0)
    assert out.topk_logprobs.shape == (0, 5) and out.logsumexp.shape == (0,)


def test_default_temperature(device):
    logits = _random_logits(3, 100, torch.float32, device)
    a = hx.draft_topk_entropy(logits, 4)
    b = hx.draft_topk_entropy(logits, 4, 1.0)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_opcheck(device):
    logits = _random_logits(5, 333, torch.bfloat16, device)
    torch.library.opcheck(torch.ops.heterospec.draft_topk_entropy.default, (logits, 7, 0.8))
    outs = (
        torch.empty(5, 7, device=device),
        torch.empty(5, 7, dtype=torch.int64, device=device),
        torch.empty(5, device=device),
        torch.empty(5, device=device),
        torch.empty(5, device=device),
    )
    torch.library.opcheck(torch.ops.heterospec.draft_topk_entropy_out.default,
                          (logits, 7, 0.8) + outs)


def test_invalid_rows_give_sentinels_on_cuda(device):
    if device.type != "cuda":
        pytest.skip("CPU raises instead; see test_bad_inputs")
    logits = _random_logits(4, 70000, torch.float32, device)
    logits[1, 12345] = float("nan")
    logits[2] = float("-inf")
    logits[3, 69999] = float("inf")
    out = hx.draft_topk_entropy(logits, 10, 1.0)
    good = hx.draft_topk_entropy(logits[:1], 10, 1.0)
    for bad_row in (1, 2, 3):
        assert torch.isnan(out.topk_logprobs[bad_row]).all()
        assert (out.topk_ids[bad_row] == -1).all()
        for name in ("topk_entropy", "entropy", "logsumexp"):
            assert torch.isnan(getattr(out, name)[bad_row])
    # Row 0 is untouched by its invalid neighbours (a 1-row launch may split differently, so
    # compare values to float32 rounding).
    assert torch.equal(out.topk_ids[:1], good.topk_ids)
    for a, b in zip(out[:1] + out[2:], good[:1] + good[2:]):
        torch.testing.assert_close(a[:1], b, rtol=1e-5, atol=1e-5)


def _outputs(rows, k, device, **changes):
    """Valid draft_topk_entropy_out buffers for ``rows`` x ``k``, with ``changes`` by name."""
    f32, i64 = dict(device=device), dict(dtype=torch.int64, device=device)
    outs = {"topk_logprobs": torch.empty(rows, k, **f32), "topk_ids": torch.empty(rows, k, **i64),
            "topk_entropy": torch.empty(rows, **f32), "entropy": torch.empty(rows, **f32),
            "logsumexp": torch.empty(rows, **f32)}
    outs.update({name: make(device) for name, make in changes.items()})
    return list(outs.values())


def _call_out(device, **changes):
    x = torch.randn(3, 50, device=device)
    hx.draft_topk_entropy_out(x, 5, 1.0, *_outputs(3, 5, device, **changes))


# name -> (call on a device, exception, text the message must hold)
ARGUMENT_ERRORS = {
    "rank1": (lambda d: hx.draft_topk_entropy(torch.randn(50, device=d), 5),
              RuntimeError, "logits"),
    "rank3": (lambda d: hx.draft_topk_entropy(torch.randn(2, 3, 50, device=d), 5),
              RuntimeError, "logits"),
    "int_dtype": (lambda d: hx.draft_topk_entropy(torch.ones(3, 50, dtype=torch.int32, device=d),
                                                  5), RuntimeError, "logits"),
    "float64": (lambda d: hx.draft_topk_entropy(torch.randn(3, 50, dtype=torch.float64, device=d),
                                                5), RuntimeError, "logits"),
    "k0": (lambda d: hx.draft_topk_entropy(torch.randn(3, 50, device=d), 0), ValueError, "k"),
    "k_gt_v": (lambda d: hx.draft_topk_entropy(torch.randn(3, 50, device=d), 51), ValueError,
               "k"),
    "k_gt_64": (lambda d: hx.draft_topk_entropy(torch.randn(3, 500, device=d), 65), ValueError,
                "k"),
    "temp0": (lambda d: hx.draft_topk_entropy(torch.randn(3, 50, device=d), 5, 0.0), ValueError,
              "temperature"),
    "temp_neg": (lambda d: hx.draft_topk_entropy(torch.randn(3, 50, device=d), 5, -1.0),
                 ValueError, "temperature"),
    "temp_nan": (lambda d: hx.draft_topk_entropy(torch.randn(3, 50, device=d), 5, float("nan")),
                 ValueError, "temperature"),
    # finite as a double, inf as float32: the message must show the digits that matter
    "temp_float32_overflow": (
        lambda d: hx.draft_topk_entropy(torch.randn(3, 50, device=d), 5, 3.4028236e38),
        ValueError, "got 3.4028236e+38"),
    "out_bad_shape": (lambda d: _call_out(d, topk_logprobs=lambda d: torch.empty(3, 4, device=d)),
                      RuntimeError, "topk_logprobs"),
    "out_bad_dtype": (lambda d: _call_out(d, topk_ids=lambda d: torch.empty(
        3, 5, dtype=torch.int32, device=d)), RuntimeError, "topk_ids"),
    "out_noncontiguous": (lambda d: _call_out(d, topk_logprobs=lambda d: torch.empty(
        5, 3, device=d).t()), RuntimeError, "topk_logprobs"),
}


@pytest.mark.parametrize("case", ARGUMENT_ERRORS)
def test_argument_errors(device, case):
    call, exc, needle = ARGUMENT_ERRORS[case]
    with raises_exactly(exc, re.escape(needle)):
        call(device)


# name -> (spoils row `row` of x, row)
INVALID_ROWS = {
    "nan_row": (lambda x: x[1].index_fill_(0, torch.tensor([7], device=x.device), float("nan")),
                1),
    "inf_row": (lambda x: x[2].index_fill_(0, torch.tensor([0], device=x.device), float("inf")),
                2),
    "all_neg_inf_row": (lambda x: x[1].fill_(float("-inf")), 1),
}


@pytest.mark.parametrize("case", INVALID_ROWS)
def test_invalid_rows_raise_on_cpu_and_do_not_raise_on_cuda(device, case):
    spoil, row = INVALID_ROWS[case]
    x = torch.randn(3, 50, device=device)
    spoil(x)
    if device.type == "cuda":  # NaN / -1 outputs instead: test_invalid_rows_give_sentinels_on_cuda
        hx.draft_topk_entropy(x, 5)
        torch.cuda.synchronize()
        return
    with raises_exactly(ValueError, rf"^logits row {row} is invalid"):
        hx.draft_topk_entropy(x, 5)


def test_portable_cpu_path_matches():
    """The 4-lane path used on CPUs without AVX2 + FMA gives the same answers."""
    code = (
        "import torch, heterospec_ext as hx\n"
        "from heterospec_ext import reference as ref\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for dt in (torch.float32, torch.float16, torch.bfloat16):\n"
        "    x = (torch.randn(9, 20011, generator=g) * 4).to(dt)\n"
        "    x[3, ::3] = float('-inf')\n"
        "    for k in (1, 10, 64):\n"
        "        o = hx.draft_topk_entropy(x[:, 1:], k, 0.7)\n"
        "        e = ref.draft_topk_entropy(x[:, 1:], k, 0.7)\n"
        "        assert torch.equal(o[1], e[1])\n"
        "        for a, b in zip(o[:1] + o[2:], e[:1] + e[2:]):\n"
        "            torch.testing.assert_close(a, b, rtol=1e-5, atol=5e-5)\n"
        "print('portable ok')\n"
    )
    env = dict(os.environ, HETEROSPEC_CPU_PORTABLE="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "portable ok" in proc.stdout
