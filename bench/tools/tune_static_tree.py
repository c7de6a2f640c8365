"""Tune the static EAGLE tree (depth, top_k, total tokens) for this machine.

    python bench/tools/tune_static_tree.py --draft eagle3:DIR --out tuning.json \
        [--prompts 4 --offset 2000 --max-new-tokens 64 --threads 2]

Decodes ShareGPT first human turns (an offset past the draft's training conversations and the
calibration prompts, never the evaluation sets) greedily with every tree in the grid, after a
warm-up, alternating AR runs as the baseline, and prints tokens/s, speedup over AR, tau and
verified tokens per cycle, best first. One pass per tree is noisy on a shared host: with
``--confirm K`` the best K trees are re-timed over ``--confirm-rounds`` interleaved rounds, each
with its own AR run, and ranked by their median speedup. The winner is the static tree of the
evaluation.
"""
import argparse
import itertools
import json
import sys
import time



def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--draft", required=True, help="eagle3:DIR, int8 or model:PATH")
    ap.add_argument("--depths", default="3,4,5,6")
    ap.add_argument("--top-ks", default="4,6,8")
    ap.add_argument("--totals", default="8,12,16,24")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--offset", type=int, default=2000)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--confirm", type=int, default=0,
                    help="re-time the best K trees of the sweep and rank them by the median "
                         "over --confirm-rounds interleaved rounds (one pass is noisy)")
    ap.add_argument("--confirm-rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from heterospec_path import import_heterospec

    import_heterospec()
    import torch

    import heterospec as hs
    from heterospec.eagle3 import Eagle3Drafter
    from heterospec.prompts import encode, load_prompts

    from heterospec.target import choose_dtype

    torch.set_num_threads(args.threads)
    target = hs.load_target(args.model, dtype=choose_dtype(args.dtype))
    prompts = [encode(target.tokenizer, p["text"], True)[-256:]
               for p in load_prompts("sharegpt", args.prompts, offset=args.offset)]
    n = args.max_new_tokens
    drafters = {}

    def drafter(k):
        if k not in drafters:
            if args.draft.startswith("eagle3:"):
                d = Eagle3Drafter.from_pretrained(args.draft[len("eagle3:"):], target, top_k=k)
            elif args.draft == "int8":
                d = hs.int8_drafter(target, top_k=k)
            else:
                raise SystemExit(f"unsupported --draft {args.draft}")
            drafters[k] = d
        return drafters[k]

    def ar_wall():
        return sum(hs.autoregressive_generate(target, p, n).stats.wall_time_s for p in prompts)

    ar_wall()  # warm-up
    grid = [(d, k, t) for d, k, t in itertools.product(
        [int(x) for x in args.depths.split(",")], [int(x) for x in args.top_ks.split(",")],
        [int(x) for x in args.totals.split(",")])]
    results = []
    base = None
    t0 = time.time()
    for i, (d, k, t) in enumerate(grid):
        gen = hs.SpeculativeGenerator(target, drafter(k), hs.StaticTree(depth=d, top_k=k,
                                                                       total_tokens=t))
        gen.generate(prompts[0], 4)
        if base is None or i % 4 == 0:  # the AR baseline, re-timed through the sweep
            base = ar_wall()
        wall = toks = cycles = acc = ver = 0
        for p in prompts:
            st = gen.generate(p, n).stats
            wall += st.wall_time_s
            toks += st.new_tokens
            cycles += st.cycles
            acc += st.accepted_tokens
            ver += st.verified_tokens
        ar_tps = len(prompts) * n / base
        row = {"depth": d, "top_k": k, "total_tokens": t, "tokens_per_s": toks / wall,
               "speedup": (toks / wall) / ar_tps, "tau": (acc + cycles) / cycles,
               "verified_per_cycle": ver / cycles, "ar_tokens_per_s": ar_tps}
        results.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    results.sort(key=lambda r: -r["speedup"])
    confirmed = confirm(results[:args.confirm], args.confirm_rounds, target, drafter, prompts,
                        n, ar_wall) if args.confirm > 0 else []
    print("| depth | top_k | total tokens | tok/s | speedup vs AR | τ | verified/cycle |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['depth']} | {r['top_k']} | {r['total_tokens']} | {r['tokens_per_s']:.1f} | "
              f"{r['speedup']:.2f}× | {r['tau']:.2f} | {r['verified_per_cycle']:.1f} |")
    if confirmed:
        print(f"\nThe best {len(confirmed)} re-timed over {args.confirm_rounds} interleaved rounds "
              f"(median speedup over the AR run of the same round):\n")
        print("| depth | top_k | total tokens | median speedup vs AR | speedups |")
        print("|---|---|---|---|---|")
        for r in confirmed:
            print(f"| {r['depth']} | {r['top_k']} | {r['total_tokens']} | "
                  f"{r['median_speedup']:.2f}× | "
                  f"{', '.join(f'{x:.2f}' for x in r['speedups'])} |")
    meta = {"draft": args.draft, "dtype": str(target.dtype).replace("torch.", ""),
            "prompts": args.prompts, "offset": args.offset,
            "max_new_tokens": n, "threads": args.threads, "seconds": round(time.time() - t0, 1),
            "command": "python bench/tools/tune_static_tree.py " + " ".join(sys.argv[1:])}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": meta, "results": results, "confirmed": confirmed}, f,
                      indent=1)
    print(f"config: {json.dumps(meta)}")
    return 0


def confirm(best, rounds, target, drafter, prompts, n, ar_wall):
    """Each of ``best`` (sweep rows) re-timed in ``rounds`` rounds, the order rotating per round,
    each round with its own AR run; rows with ``speedups`` and their ``median_speedup``, best
    first."""
    import statistics

    import heterospec as hs

    gens = [hs.SpeculativeGenerator(target, drafter(r["top_k"]),
                                    hs.StaticTree(depth=r["depth"], top_k=r["top_k"],
                                                  total_tokens=r["total_tokens"]))
            for r in best]
    speedups = [[] for _ in best]
    for rnd in range(rounds):
        base = ar_wall()
        order = list(range(len(best)))
        order = order[rnd % len(order):] + order[:rnd % len(order)]
        for i in order:
            wall = toks = 0
            for p in prompts:
                st = gens[i].generate(p, n).stats
                wall += st.wall_time_s
                toks += st.new_tokens
            speedups[i].append((toks / wall) / (len(prompts) * n / base))
    rows = [dict(r, speedups=s, median_speedup=statistics.median(s))
            for r, s in zip(best, speedups)]
    return sorted(rows, key=lambda r: -r["median_speedup"])


if __name__ == "__main__":
    sys.exit(main())
