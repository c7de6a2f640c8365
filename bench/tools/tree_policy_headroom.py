"""How much a tree policy can gain with a draft head on this machine, from one greedy decode.

    python bench/tools/tree_policy_headroom.py [--draft DIR] [--policy COST_AWARE_JSON]
        [--depth 3 --extra 2 --top-k 6 --strata 8] [--prompts 48 --offset 14000
        --max-new-tokens 64 --threads 2] [--out headroom.json]

Decodes ShareGPT first human turns greedily with a static tree of ``depth + extra`` levels and,
for every cycle, counts the tokens that each smaller tree (its first ``depth .. depth + extra``
levels, reranked to the best ``N`` nodes as EAGLE-2 does) would have accepted against the
target's own continuation (``heterospec.calibrate.collect_counterfactual``). From those counts:

1. **tau by tree size** (levels x N). Counts only: the host's noise does not enter.
2. **Modelled tokens/s** with the cycle costs that a cost-aware calibration measured on this
   machine (``--policy``: its ``calibration.cost_model``):
   - the static tree (``depth`` levels, 16 nodes);
   - the best per-cycle choice, knowing what every tree would accept (an oracle: no policy
     that decides before verifying can beat it);
   - the best split of the cycles into at most ``--strata`` ranges of one signal, each with its
     own (extra depth, N), for H(P*) (HeteroSpec's signal) and for the best path's cumulative
     draft log-prob. Each split is fitted to maximise tokens/s (Dinkelbach's method around an
     exact 1-D dynamic programme), once on all cycles (in-sample) and once per half of a
     random 2-fold split, scored on the other half (held out).

A policy that stratifies by a signal can gain at most what that signal's held-out split gains.
"""
import argparse
import json
import random
import statistics
import sys

TOP_NS = (2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64)
SIGNALS = ("H", "best_path_logprob")


def tau_table(records, depth, extra):
    """``{levels: {N: tau}}``: mean accepted tokens + 1 of each tree every cycle could fill."""
    table = {}
    for e in range(extra + 1):
        row = {}
        for n in TOP_NS:
            got = [r["accepted"].get((e, n)) for r in records]
            if any(a is None for a in got):  # the pool of this depth cannot fill N nodes
                break
            row[n] = round(1 + statistics.mean(got), 3)
        table[depth + e] = row
    return table


def rate(records, choices, seconds):
    """Modelled tokens/s when cycle i uses tree ``choices[i]``."""
    return (sum(r["accepted"][c] + 1 for r, c in zip(records, choices))
            / sum(seconds[c] for c in choices))


def oracle(records, configs, seconds, start):
    """The best tokens/s of any per-cycle choice (Dinkelbach: each cycle maximises
    tokens - lambda * seconds at the current ratio lambda)."""
    lam = start
    for _ in range(100):
        choices = [max(configs, key=lambda c: r["accepted"][c] + 1 - lam * seconds[c])
                   for r in records]
        new = rate(records, choices, seconds)
        if abs(new - lam) < 1e-9 * lam:
            break
        lam = new
    return lam


def best_split(records, key, strata, configs, seconds, start):
    """``(thresholds, table)``: at most ``strata`` ranges of ``r[key]`` (sorted), each with one
    tree, maximising modelled tokens/s. For a fixed ratio lambda, the best split maximises
    sum(tokens - lambda * seconds), an exact dynamic programme over the sorted cycles (a range
    ending at cycle j takes its best tree, with prefix sums per tree); lambda then moves to the
    split's ratio until it stops changing."""
    rs = sorted(records, key=lambda r: r[key])
    n = len(rs)
    lam, split = start, ([], [configs[0]])
    for _ in range(50):
        prefix = {c: [0.0] for c in configs}
        for r in rs:
            for c in configs:
                prefix[c].append(prefix[c][-1] + r["accepted"][c] + 1 - lam * seconds[c])
        neg = float("-inf")
        best = [[neg] * (n + 1) for _ in range(strata + 1)]
        back = [[None] * (n + 1) for _ in range(strata + 1)]
        best[0][0] = 0.0
        for k in range(1, strata + 1):
            for c in configs:
                run, run_at = neg, None  # max over i < j of best[k-1][i] - prefix[c][i]
                for j in range(1, n + 1):
                    v = best[k - 1][j - 1] - prefix[c][j - 1]
                    if v > run:
                        run, run_at = v, j - 1
                    if run + prefix[c][j] > best[k][j]:
                        best[k][j], back[k][j] = run + prefix[c][j], (run_at, c)
        k = max(range(1, strata + 1), key=lambda k: best[k][n])
        ranges, j = [], n
        while j > 0:
            i, c = back[k][j]
            ranges.append((rs[i][key], c))
            j, k = i, k - 1
        ranges.reverse()
        split = ([lo for lo, _ in ranges[1:]], [c for _, c in ranges])
        new = split_rate(records, key, split, seconds)
        if abs(new - lam) < 1e-9 * lam:
            break
        lam = new
    return split


def split_rate(records, key, split, seconds):
    thresholds, table = split
    return rate(records, [table[sum(r[key] >= t for t in thresholds)] for r in records], seconds)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draft", default=None, help="EAGLE-3 head directory (default: shipped)")
    ap.add_argument("--policy", default=None,
                    help="cost-aware policy JSON whose calibration.cost_model gives the cycle "
                         "costs (default: the shipped one)")
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--extra", type=int, default=2, help="deeper trees judged: depth + 1..extra")
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--strata", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--offset", type=int, default=14000)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from heterospec_path import import_heterospec

    import_heterospec()
    import torch

    import heterospec as hs
    from heterospec.calibrate import collect_counterfactual, cycle_seconds
    from heterospec.eagle3 import SHIPPED_HEAD_DIR, Eagle3Drafter
    from heterospec.policy import EAGLE3_COST_POLICY_FILE
    from heterospec.prompts import encode, load_prompts
    from heterospec.target import choose_dtype

    with open(args.policy or EAGLE3_COST_POLICY_FILE) as f:
        cost_model = json.load(f)["calibration"]["cost_model"]
    costs = {"draft_root_s": cost_model["draft_root_ms"] / 1e3,
             "draft_level_s": cost_model["draft_level_ms"] / 1e3,
             "verify_s": {int(n): ms / 1e3 for n, ms in cost_model["verify_ms"].items()}}
    torch.set_num_threads(args.threads)
    target = hs.load_target(None, dtype=choose_dtype("auto"))
    drafter = Eagle3Drafter.from_pretrained(args.draft or SHIPPED_HEAD_DIR, target,
                                            top_k=args.top_k)
    gen = hs.SpeculativeGenerator(target, drafter, hs.StaticTree(
        depth=args.depth + args.extra, top_k=args.top_k, total_tokens=16))
    prompts = [encode(target.tokenizer, p["text"], True)[-512:]
               for p in load_prompts("sharegpt", args.prompts, offset=args.offset)]
    records = collect_counterfactual(gen, prompts, args.max_new_tokens, args.depth, args.extra,
                                     16, TOP_NS)
    tau = tau_table(records, args.depth, args.extra)
    print(f"{len(records)} cycles, {len(prompts)} prompts, top_k {args.top_k}; tau by levels "
          "(rows) and verified nodes N (columns):")
    print("| levels | " + " | ".join(f"N={n}" for n in TOP_NS) + " |")
    print("|---|" + "---|" * len(TOP_NS))
    for lv, row in tau.items():
        print(f"| {lv} | " + " | ".join(f"{row[n]:.2f}" if n in row else "–" for n in TOP_NS)
              + " |")

    configs = sorted(c for c in records[0]["accepted"] if c[1] in costs["verify_s"]
                     and all(c in r["accepted"] for r in records))
    seconds = {c: cycle_seconds(costs, args.depth + c[0], c[1], 1e-3) for c in configs}
    static = rate(records, [(0, 16)] * len(records), seconds)
    result = {"static": static, "oracle": oracle(records, configs, seconds, static)}
    print(f"\nmodelled tok/s: static d{args.depth} N16 {static:.2f}; per-cycle oracle "
          f"{result['oracle']:.2f} ({result['oracle'] / static - 1:+.1%})")
    order = list(range(len(records)))
    random.Random(0).shuffle(order)
    halves = [[records[i] for i in order[:len(order) // 2]],
              [records[i] for i in order[len(order) // 2:]]]
    for key in SIGNALS:
        split = best_split(records, key, args.strata, configs, seconds, static)
        inside = split_rate(records, key, split, seconds)
        held = []
        for train, test in (halves, halves[::-1]):
            s = best_split(train, key, args.strata, configs, seconds, static)
            base = rate(test, [(0, 16)] * len(test), seconds)
            held.append(split_rate(test, key, s, seconds) / base - 1)
        result[key] = {"in_sample": inside, "in_sample_gain": inside / static - 1,
                       "held_out_gains": held, "thresholds": split[0],
                       "table": [list(c) for c in split[1]]}
        print(f"best {args.strata}-range split by {key}: in-sample {inside:.2f} "
              f"({inside / static - 1:+.1%}), held out {held[0]:+.1%} / {held[1]:+.1%}; "
              f"trees {split[1]}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(sys.argv), "cycles": len(records),
                       "prompts": len(prompts), "top_k": args.top_k, "draft": args.draft or
                       "shipped", "dtype": str(target.dtype), "cost_model_ms": cost_model,
                       "tau": tau, "modelled_tokens_per_s": result}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
