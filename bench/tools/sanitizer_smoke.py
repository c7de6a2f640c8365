"""Calls every heterospec op once on small CUDA inputs, for compute-sanitizer memcheck.

Sizes are odd (V not a multiple of the vector width, unaligned rows) so that tail handling
is exercised; every mode of fused_verify runs.
"""
import torch

import heterospec_ext as hx

torch.manual_seed(0)
dev = torch.device("cuda")
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    logits = torch.randn(7, 1003, device=dev).to(dtype)
    hx.draft_topk_entropy(logits[:, 1:], 10, 1.0)  # unaligned, strided rows
    hx.draft_topk_entropy(torch.randn(3, 262147, device=dev).to(dtype), 64, 0.7)

B, M = 5, 111
parents = torch.full((B, M), -1, dtype=torch.int64, device=dev)
for i in range(1, M):
    parents[:, i] = torch.randint(0, i, (B,), device=dev)
parents[:, M - 7:] = -1  # padding slots
scores = torch.randn(B, M, device=dev)
tokens = torch.randint(0, 1000, (B, M), device=dev)
thresholds = torch.linspace(0.5, 3.5, 7, device=dev)
policy = hx.make_policy(5, 59).to(dev)
strat = hx.stratify(torch.rand(B, M, device=dev), torch.rand(B, M, device=dev), parents,
                    thresholds, policy)
tree = hx.build_tree(parents, scores, tokens, strat.top_n, 65)

N, V = tree.tokens.shape[1], 1003
for dtype in (torch.float32, torch.bfloat16):
    target = torch.randn(B, N, V, device=dev).to(dtype)
    cand = tree.tokens.clamp(min=0) % V
    for temperature, top_k, top_p in ((0.0, 0, 1.0), (1.0, 0, 1.0), (0.8, 50, 0.9)):
        hx.fused_verify(target, cand, tree.parents, temperature=temperature, top_k=top_k,
                        top_p=top_p)
    q = torch.softmax(torch.randn(B, N, V, device=dev), -1)
    hx.fused_verify(target, cand, tree.parents, temperature=1.0, draft_probs=q)
torch.cuda.synchronize()
print("sanitizer smoke: all ops ran")
