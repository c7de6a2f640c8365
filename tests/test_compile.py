"""torch.compile(fullgraph=True) over a full cycle calling all four ops matches eager."""
import pytest
import torch

from heterospec_ext.testing import cycle_inputs, run_cycle


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_cycle_compiles_fullgraph_and_matches_eager(device, backend):
    torch._dynamo.reset()
    inputs = cycle_inputs(device)
    eager = run_cycle(**inputs)
    compiled = torch.compile(run_cycle, fullgraph=True, backend=backend)(**inputs)
    assert len(eager) == len(compiled)
    for a, b in zip(eager, compiled):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
