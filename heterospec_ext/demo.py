"""Runs one HeteroSpec decoding cycle's four fused ops on real-sized inputs and says what it did.

    python -m heterospec_ext.demo [--device cpu|cuda] [--vocab 128256] [--batch 2]

The draft pool has EAGLE-3's shape (top_k=10, depth=5: 1 + 10 + 5*100 nodes); the logits are
synthetic, with a peaked (predictable) request and a flat (uncertain) one, so the two land in
different strata and get different trees.
"""
import argparse
import time

import torch

import heterospec_ext as hx
from heterospec_ext.testing import eagle_pool


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, (time.perf_counter() - start) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--depth", type=int, default=5)
    parser.add_argument("--total-tokens", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device, V, B, k = torch.device(args.device), args.vocab, args.batch, args.top_k
    torch.manual_seed(args.seed)
    print(f"heterospec_ext {hx.__version__} {hx.build_info()}")
    print(f"device={device} batch={B} vocab={V} EAGLE top_k={k} depth={args.depth} "
          f"total_tokens={args.total_tokens}")

    # One EAGLE-2 pool shape for every request (its random scores are replaced below by the
    # cumulative log-probs of this cycle's draft logits).
    pool_parents, _ = eagle_pool(1, k, args.depth, torch.Generator().manual_seed(args.seed))
    parents = pool_parents.expand(B, -1).contiguous().to(device)
    M = parents.shape[1]
    # Request b gets draft logits with peak height 12 / (b + 1): request 0 is predictable.
    peak = torch.tensor([12.0 / (b + 1) for b in range(B)]).repeat_interleave(M).to(device)
    draft_logits = torch.randn(B * M, V, device=device)
    hot = torch.randint(0, V, (B * M,), device=device)
    draft_logits[torch.arange(B * M, device=device), hot] += peak
    draft_logits = draft_logits.to(torch.bfloat16)

    stats, ms = timed(lambda: hx.draft_topk_entropy(draft_logits, k, 1.0), device)
    print(f"[draft_topk_entropy] {B * M} rows x {V} bf16 in {ms:.2f} ms: "
          f"mean top-{k} entropy {stats.topk_entropy.mean():.3f} nats, "
          f"mean full entropy {stats.entropy.mean():.3f} nats")

    # Node i was drawn from its parent's distribution: its token is one of the parent's top-k.
    rows = (torch.arange(B, device=device)[:, None] * M + parents.clamp(min=0)).view(-1)
    rank = (torch.arange(M, device=device) % k).repeat(B)
    tokens = stats.topk_ids[rows, rank].view(B, M)
    step_logp = stats.topk_logprobs[rows, rank].view(B, M)
    step_entropy = stats.topk_entropy[rows].view(B, M)
    step_logp[:, 0] = 0
    scores = torch.zeros(B, M, device=device)
    for i in range(1, M):  # cumulative log-prob along the path, as EAGLE-2 scores nodes
        scores[:, i] = scores[:, parents[0, i]] + step_logp[:, i]
    depth_of = torch.zeros(M, dtype=torch.int64)
    for i in range(1, M):
        depth_of[i] = depth_of[parents[0, i].item()] + 1
    confidence = step_logp.exp().masked_fill((depth_of != depth_of.max()).to(device), float("-inf"))

    thresholds = torch.tensor([0.4, 0.8, 1.2, 1.6, 2.4, 3.2, 4.0], device=device) * args.depth
    policy = hx.make_policy(args.depth, args.total_tokens - 1, pool_size=M - 1).to(device)
    strat, ms = timed(lambda: hx.stratify(step_entropy, confidence, parents, thresholds, policy),
                      device)
    print(f"[stratify] in {ms:.2f} ms: H(P*) = {[round(h, 3) for h in strat.path_entropy.tolist()]},"
          f" stratum = {strat.stratum.tolist()}, extra_depth = {strat.extra_depth.tolist()},"
          f" top_n = {strat.top_n.tolist()}")

    n_max = int(policy[:, 1].max())
    tree, ms = timed(lambda: hx.build_tree(parents, scores, tokens, strat.top_n, n_max), device)
    print(f"[build_tree] in {ms:.2f} ms: nodes = {tree.num_nodes.tolist()} (n_max {n_max}), "
          f"max depth = {tree.depth.max(dim=1).values.tolist()}")

    # Target logits: agree with the draft's top token for request 0 more often than request 1.
    N = n_max
    target = torch.randn(B, N, V, device=device)
    agree = torch.rand(B, N, device=device) < torch.tensor([0.9, 0.3] + [0.5] * (B - 2),
                                                           device=device)[:B, None]
    child_tok = torch.full((B, N), -1, dtype=torch.int64, device=device)
    child_tok.scatter_(1, tree.first_child.clamp(min=0),
                       tree.tokens.gather(1, tree.first_child.clamp(min=0)))
    bump = torch.where(agree & (tree.first_child >= 0), 20.0, 0.0)
    target.scatter_add_(2, child_tok.clamp(min=0)[..., None], bump[..., None])
    target = target.to(torch.bfloat16)
    cand = tree.tokens.clamp(min=0)
    greedy, ms = timed(lambda: hx.fused_verify(target, cand, tree.parents, temperature=0.0),
                       device)
    print(f"[fused_verify greedy] in {ms:.2f} ms: accepted {greedy.num_accepted.tolist()} draft "
          f"tokens; emitted {[row[row >= 0].tolist() for row in greedy.out_tokens]}")
    sampled, ms = timed(lambda: hx.fused_verify(target, cand, tree.parents, temperature=1.0,
                                                top_k=50, top_p=0.9), device)
    print(f"[fused_verify T=1 top_k=50 top_p=0.9] in {ms:.2f} ms: accepted "
          f"{sampled.num_accepted.tolist()} draft tokens")
    ref = hx.reference.fused_verify(target, cand, tree.parents,
                                    *hx.ops.fused_verify.sampling_params(target, 0.0, 0, 1.0),
                                    torch.zeros(B, N, device=device))
    same = torch.equal(ref[0], greedy.out_tokens)
    print(f"greedy result equals the float64 PyTorch reference: {same}")
    if not same:
        raise SystemExit("demo: kernel and reference disagree")


if __name__ == "__main__":
    main()
