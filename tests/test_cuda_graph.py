"""All four ops captured in one torch.cuda.CUDAGraph and replayed with new inputs."""
import pytest
import torch

from heterospec_ext.testing import cycle_inputs, run_cycle

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cycle_captures_in_a_cuda_graph_and_replays_with_new_inputs():
    device = torch.device("cuda")
    static = cycle_inputs(device, seed=0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run_cycle(**static)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run_cycle(**static)
    for seed in (1, 2, 3):
        fresh = cycle_inputs(device, seed=seed)
        for name, value in fresh.items():
            if isinstance(value, torch.Tensor):
                static[name].copy_(value)
        graph.replay()
        torch.cuda.synchronize()
        expected = run_cycle(**fresh)
        for got, want in zip(static_out, expected):
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
