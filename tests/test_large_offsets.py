"""Element offsets past 2**32: the kernels index logits with 64-bit offsets.

B*N*V and N*V exceed 2**32 here, and every request / row is built so that a wrapped 32-bit
offset would read a different (all-zero) row and change the result. bf16 keeps the tensors near
9 GB; each test skips where the device lacks the memory.
"""
import pytest
import torch

import heterospec_ext as hx

VOCAB = 1 << 23  # the CUDA kernel's vocabulary limit
BIG = 1 << 32


def _free_bytes(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def _need(device, nbytes):
    if _free_bytes(device) < nbytes * 1.5:
        pytest.skip(f"needs {nbytes * 1.5 / 2**30:.0f} GiB free on {device}")


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampling"])
def test_fused_verify_past_2_pow_32(device, temperature):
    batch, nodes = 9, 64
    assert batch * nodes * VOCAB > BIG and (batch - 1) * nodes * VOCAB >= BIG
    _need(device, batch * nodes * VOCAB * 2)
    logits = torch.zeros(batch, nodes, VOCAB, dtype=torch.bfloat16, device=device)
    parents = torch.full((batch, nodes), -1, dtype=torch.int64)
    parents[:, 1:4] = torch.tensor([0, 1, 2])  # chain 0 -> 1 -> 2 -> 3, the rest padding
    cands = torch.full((batch, nodes), -1, dtype=torch.int64)
    expect = []
    for b in range(batch):
        toks = [VOCAB - 1 - 7 * b - i for i in range(4)]  # distinct per request, near the end
        cands[b, 1:4] = torch.tensor(toks[:3])
        for level in range(3):
            logits[b, level, toks[level]] = 40.0
        logits[b, 3, toks[3]] = 40.0  # bonus
        expect.append(toks)
    uniforms = torch.full((batch, nodes), 0.5)
    out = hx.fused_verify(logits, cands.to(device), parents.to(device), temperature=temperature,
                          uniforms=uniforms.to(device))
    assert out.num_accepted.tolist() == [3] * batch
    assert out.out_tokens[:, :4].cpu().tolist() == expect
    assert out.accepted_nodes[:, :4].cpu().tolist() == [[0, 1, 2, 3]] * batch


@pytest.mark.slow
def test_draft_topk_entropy_past_2_pow_32(device):
    if device.type != "cuda":
        pytest.skip("reading 8.6 GB of logits on 2 CPU cores is too slow for the suite")
    rows = BIG // VOCAB + 1
    _need(device, rows * VOCAB * 2)
    logits = torch.zeros(rows, VOCAB, dtype=torch.bfloat16, device=device)
    logits[-1, VOCAB - 3] = 30.0
    logits[-1, 5] = 20.0
    out = hx.draft_topk_entropy(logits, 2, 1.0)
    assert out.topk_ids[-1].tolist() == [VOCAB - 3, 5]
    assert out.topk_ids[0].tolist() == [0, 1]  # an all-zero row: ties to the lowest ids
    want_lse = torch.logsumexp(logits[-1].double(), 0).item()
    assert abs(out.logsumexp[-1].item() - want_lse) < 1e-4
