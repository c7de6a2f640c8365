"""Comparisons of op outputs with the float64 references, and the error check, that several test
modules share."""
import contextlib

import torch


def assert_topk_matches(out, expected, *, check_ids: bool = True) -> None:
    """``draft_topk_entropy`` outputs against ``reference.draft_topk_entropy``: the dtypes,
    exact ``topk_ids`` (unless ``check_ids`` is False) and float32-level values."""
    got = [t.cpu() for t in out]
    exp = [t.cpu() for t in expected]
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.int64
    assert all(t.dtype == torch.float32 for t in got[2:])
    if check_ids:
        assert torch.equal(got[1], exp[1]), "topk_ids differ from the reference"
    # Log-probs are O(10): float32 sums over up to 2^18 terms give ~1e-6 relative error.
    torch.testing.assert_close(got[0], exp[0], rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(got[2], exp[2], rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(got[3], exp[3], rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(got[4], exp[4], rtol=1e-6, atol=5e-5)


@contextlib.contextmanager
def raises_exactly(exception: type, match: str):
    """``pytest.raises(exception, match=match)`` that also fails when the error is a subclass of
    ``exception``: the ops raise RuntimeError for bad arguments and ValueError for bad data, and
    a more specific error (NotImplementedError is a RuntimeError) would mean another path
    failed. Yields pytest's ExceptionInfo."""
    import pytest

    with pytest.raises(exception, match=match) as raised:
        yield raised
    assert raised.type is exception, f"raised {raised.type.__name__}, not {exception.__name__}"
