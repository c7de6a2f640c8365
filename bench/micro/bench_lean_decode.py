"""Cost of the decode path's pieces on the real target: the verify-cost curve, the draft cost per
level, and our AR loop against plain HF ``generate``.

As a script (the numbers in bench/RESULTS.md)::

    python bench/micro/bench_lean_decode.py --threads 2 --out lean_decode.json

1. **Verify-cost curve.** One tree forward of N = 1..64 nodes (a chain mask) after a
   ``--prefix``-token context, for the lean verifier and the HF module (``dynamic``), in
   bfloat16 and float32; median of ``--reps``; "AR step" is one committed token.
2. **Draft cost per level.** ``draft(root, levels)`` of the shipped EAGLE-3 head for 1..6 levels
   at top_k 8, 6 (the shipped tree's) and 4, and of the int8 self-draft for 1..4 levels at top_k
   8 and 4; the per-level cost is the least-squares slope. For the head, the time of the level's
   five GEMMs alone is reported beside it (the rest is small tensor ops).
3. **Draft vocabulary size against cost** (``--parts vocab``). The per-level cost in bfloat16 of
   random heads shaped like the shipped one with a draft vocabulary of 4k to 32k tokens; its
   ``lm_head`` is most of the head's bytes. The coverage of the target's greedy tokens by each
   size is in the shipped head's ``TRAINING.json`` (``vocab_coverage_by_size``).
4. **The head's decode-layer ops against its torch composition** (``--parts ops``). The
   shipped head at top_k 6 with ``PackedEagle3Head.fused`` on and off in alternation: the
   per-level cost as in 2, then end to end (static d3 k6 N16, greedy, ``--new-tokens`` tokens on
   ``--prompts`` prompts per set, ``--reps`` rounds): drafting ms per cycle and tok/s, medians of
   the per-pair ratios.
5. **The target's decode-layer ops against its torch composition** (``--parts target-ops``).
   The lean verifier with ``LeanWeights.fused`` on and off in alternation: one tree forward of
   N = 1..24 nodes after the ``--prefix``-token context (median of ``--reps`` rounds of three),
   then end to end our AR loop and the static tree d3 k6 N16 with the shipped head
   (``--new-tokens`` tokens on ``--prompts`` prompts per set): tok/s, medians of the per-pair
   ratios.
6. **The attention op against torch** (``--parts attention``). ``rope_cache_attention`` against
   RoPE from the table, the cache writes and torch's ``scaled_dot_product_attention`` (the lean
   target's path above 16 rows), at SmolLM2's heads (9 query and 3 KV heads of 64, bf16) for
   1-32 new rows over 300, 700 and 1,500 cached rows, a causal tree mask; medians of
   ``--reps`` x 30 alternating calls.
7. **What a second head layer would cost** (``--parts head-layers``). The shipped head's cost
   per draft level (top_k 6, slope over 1-5 levels) beside one of the target's decoder layers at
   6 rows over the ``--prefix`` cache (a stacked head layer's shape), from the lean forward over
   every layer against over one, interleaved.
8. **AR against HF generate.** Greedy decoding of ``--new-tokens`` tokens on HumanEval, GSM8K
   and MT-bench prompts: our AR loop (lean verifier) and ``model.generate`` for each dtype x
   attention; median of ``--reps`` per prompt, summed over prompts.

Under pytest (``pytest bench``) it is a quick pytest-benchmark of a tree forward on a small random
Llama through both verifiers.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _import_heterospec():
    try:
        import heterospec
    except ImportError:  # source tree without an install
        sys.path.insert(0, os.path.join(ROOT, "python"))
        import heterospec
    return heterospec


def _median_ms(fn, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def chain(n):
    return torch.ones((n, n), dtype=torch.bool).tril_()


def verify_curve(target, kind, prefix_ids, sizes, reps):
    """{N: median ms of one tree forward of N nodes after ``prefix_ids``}."""
    from heterospec.target import compact_cache
    from heterospec.verifier import make_verifier

    ver = make_verifier(target, kind)
    ver.reset()
    ver.prefill(prefix_ids)
    g = torch.Generator().manual_seed(0)
    out = {}
    for n in sizes:
        toks = torch.randint(10, target.vocab_size, (n,), generator=g)

        def one():
            ver.tree_forward(toks, torch.arange(n), chain(n))
            if kind == "dynamic":  # the HF cache grew by the tree: cut it back
                compact_cache(ver.cache, len(prefix_ids), None)
        one()
        out[n] = _median_ms(one, reps)
    return out


def draft_levels(drafter, prompt_ids, target, levels_list, reps):
    """{levels: median ms of draft(root, levels)} after a prompt (target states captured)."""
    from heterospec.verifier import make_verifier

    ver = make_verifier(target)
    ver.reset()
    target.captured_hidden = None
    ver.prefill(prompt_ids[:-1])
    hidden = target.captured_hidden
    times = {levels: [] for levels in levels_list}
    # round robin over the level counts, so a slow spell of the host hits every count alike
    for rep in range(reps + 1):
        for levels in levels_list:
            drafter.reset(prompt_ids, target_hidden=hidden)
            t0 = time.perf_counter()
            drafter.draft(int(prompt_ids[-1]), levels)
            if rep:  # the first round warms up
                times[levels].append(time.perf_counter() - t0)
    out = {levels: 1e3 * statistics.median(t) for levels, t in times.items()}
    # the root pass re-feeds the prompt each time: per-level cost is the slope over levels
    xs = list(out)
    mx, my = statistics.mean(xs), statistics.mean(out.values())
    slope = sum((x - mx) * (out[x] - my) for x in xs) / sum((x - mx) ** 2 for x in xs)
    return out, slope


def head_gemm_ms(drafter, reps):
    """Median ms of one draft level's five GEMMs alone (q/k/v, o, gate/up, down, lm_head on
    ``top_k`` rows of the packed head, back to back): the part of a level that reads weights.
    The rest of the per-level cost is the small tensor ops around them (norms, RoPE, attention,
    top-k, the expansion's bookkeeping)."""
    p, k = drafter.packed, drafter.top_k

    def rows(n):
        return torch.randn(k, n).to(p.dtype)

    x2h, xh, xi = rows(2 * p.hidden), rows(p.hidden), rows(p.intermediate)
    xo = rows(p.heads * p.head_dim)

    def one():
        p.qkv(x2h), p.o(xo), p.gate_up(xh), p.down(xi), p.lm_head(xh)

    with torch.inference_mode():
        one()
        return _median_ms(one, reps)


def _tok_s(stats) -> float:
    return stats.new_tokens / stats.wall_time_s


def _draft_ms(stats) -> float:
    return 1e3 * stats.draft_time_s / stats.cycles


def alternating_pairs(switch, prompts, reps, methods, new_tokens):
    """Every method on every prompt with a variant on and off, the order alternating between
    repeats so that the host's drift hits both alike. ``switch(on)`` selects the variant;
    ``methods`` maps a name to ``fn(ids, new_tokens)``, a generation result. Returns one dict per
    (repeat, prompt): ``{(method, on): stats}``."""
    pairs = []
    for rep in range(reps):
        for ids in prompts:
            pair = {}
            for on in ((True, False) if rep % 2 == 0 else (False, True)):
                switch(on)
                for name, fn in methods.items():
                    pair[(name, on)] = fn(ids, new_tokens).stats
            pairs.append(pair)
    return pairs


def decode_layer_ops_ab(target, tok, prompts_per_set, new_tokens, reps):
    """The shipped head with and without the decode-layer ops, alternating in one process."""
    from heterospec.eagle3 import SHIPPED_HEAD_DIR, Eagle3Drafter
    from heterospec.generate import SpeculativeGenerator
    from heterospec.policy import StaticTree
    from heterospec.prompts import encode, load_prompts

    drafter = Eagle3Drafter.from_pretrained(SHIPPED_HEAD_DIR, target, top_k=6)
    ids = encode(tok, load_prompts("humaneval", 1)[0]["text"], True)
    levels = {}
    for fused in (True, False, True, False):  # two alternating runs of each
        drafter.packed.fused = fused
        levels.setdefault(fused, []).append(
            draft_levels(drafter, ids, target, [1, 5], reps)[1])
    gen = SpeculativeGenerator(target, drafter, StaticTree(depth=3, top_k=6, total_tokens=16))
    prompts = [encode(tok, p["text"], p["chat"]) for s in ("humaneval", "gsm8k", "mtbench")
               for p in load_prompts(s, prompts_per_set)]
    gen.generate(prompts[0], 8)

    def switch(fused):
        drafter.packed.fused = fused

    tree = "static tree"
    pairs = alternating_pairs(switch, prompts, reps, {tree: gen.generate}, new_tokens)
    runs = [{"fused": fused, "draft_ms_per_cycle": _draft_ms(st), "tok_s": _tok_s(st)}
            for pair in pairs for (_, fused), st in pair.items()]
    draft_ratio = [_draft_ms(p[(tree, True)]) / _draft_ms(p[(tree, False)]) for p in pairs]
    speed_ratio = [_tok_s(p[(tree, True)]) / _tok_s(p[(tree, False)]) for p in pairs]
    drafter.packed.fused = True

    def med(fused, key):
        return statistics.median(r[key] for r in runs if r["fused"] == fused)

    out = {"per_level_ms": {"ops": levels[True], "composition": levels[False]},
           "draft_ms_per_cycle": {"ops": med(True, "draft_ms_per_cycle"),
                                  "composition": med(False, "draft_ms_per_cycle")},
           "tok_s": {"ops": med(True, "tok_s"), "composition": med(False, "tok_s")},
           "draft_ratio_median": statistics.median(draft_ratio),
           "tok_s_ratio_median": statistics.median(speed_ratio),
           "tok_s_ratio_range": [min(speed_ratio), max(speed_ratio)]}
    print(f"per level: ops {levels[True]} ms, composition {levels[False]} ms")
    print(f"end to end: drafting {out['draft_ms_per_cycle']['ops']:.2f} against "
          f"{out['draft_ms_per_cycle']['composition']:.2f} ms per cycle (ratio "
          f"{out['draft_ratio_median']:.2f}); {out['tok_s']['ops']:.1f} against "
          f"{out['tok_s']['composition']:.1f} tok/s (ratio {out['tok_s_ratio_median']:.2f}, "
          f"{min(speed_ratio):.2f}-{max(speed_ratio):.2f})", flush=True)
    return out


def target_ops_ab(target, prefix_ids, tok, prompts_per_set, new_tokens, reps):
    """The lean verifier with and without the decode-layer ops, alternating in one process."""
    from heterospec.eagle3 import SHIPPED_HEAD_DIR, Eagle3Drafter
    from heterospec.generate import SpeculativeGenerator, autoregressive_generate
    from heterospec.lean_target import LeanDecoder, LeanWeights
    from heterospec.policy import StaticTree
    from heterospec.prompts import encode, load_prompts

    weights = LeanWeights.of(target)
    sizes = [1, 4, 8, 16, 24]
    lean = LeanDecoder(target)
    times = {(fused, n): [] for fused in (True, False) for n in sizes}
    for rep in range(reps):
        for fused in ((True, False) if rep % 2 == 0 else (False, True)):
            weights.fused = fused
            lean.reset()
            lean.prefill(prefix_ids)
            for n in sizes:
                t0 = time.perf_counter()
                for _ in range(3):
                    lean.tree_forward(prefix_ids[:n], torch.arange(n), chain(n))
                times[(fused, n)].append(1e3 * (time.perf_counter() - t0) / 3)
    curve = {name: {n: statistics.median(times[(fused, n)]) for n in sizes}
             for name, fused in (("ops", True), ("composition", False))}
    print("verify forward ms, ops / composition: " + ", ".join(
        f"N={n}: {curve['ops'][n]:.1f} / {curve['composition'][n]:.1f}" for n in sizes),
        flush=True)
    drafter = Eagle3Drafter.from_pretrained(SHIPPED_HEAD_DIR, target, top_k=6)
    gen = SpeculativeGenerator(target, drafter, StaticTree(depth=3, top_k=6, total_tokens=16))
    prompts = [encode(tok, p["text"], p["chat"]) for s in ("humaneval", "gsm8k", "mtbench")
               for p in load_prompts(s, prompts_per_set)]
    gen.generate(prompts[0], 8)
    autoregressive_generate(target, prompts[0], 4)
    methods = {"ar": lambda ids, n: autoregressive_generate(target, ids, n),
               "static tree": gen.generate}

    def switch(fused):
        weights.fused = fused

    pairs = alternating_pairs(switch, prompts, reps, methods, new_tokens)
    runs = [{"fused": fused, "method": method, "tok_s": _tok_s(st)}
            for pair in pairs for (method, fused), st in pair.items()]
    ratios = {m: [_tok_s(p[(m, True)]) / _tok_s(p[(m, False)]) for p in pairs] for m in methods}
    weights.fused = True
    out = {"verify_ms": curve, "runs": runs, "tok_s": {}, "tok_s_ratio_median": {}}
    for method in ratios:
        out["tok_s"][method] = {name: statistics.median(
            r["tok_s"] for r in runs if r["method"] == method and r["fused"] == fused)
            for name, fused in (("ops", True), ("composition", False))}
        out["tok_s_ratio_median"][method] = statistics.median(ratios[method])
        print(f"{method}: {out['tok_s'][method]['ops']:.1f} against "
              f"{out['tok_s'][method]['composition']:.1f} tok/s (median ratio "
              f"{statistics.median(ratios[method]):.2f}, {min(ratios[method]):.2f}-"
              f"{max(ratios[method]):.2f})", flush=True)
    return out


def stacked_layer_cost(target, prompt_ids, reps, top_k=6):
    """What a second head layer (train-draft --head-layers 2) would add to a draft level: the
    shipped head's per-level cost, and one of the target's decoder layers (the stacked layer's
    shape: same hidden size, heads and MLP) at a level's ``top_k`` rows over the prompt's cache,
    from the lean forward over all layers against over one, interleaved."""
    import copy
    import random

    from heterospec.eagle3 import SHIPPED_HEAD_DIR, Eagle3Drafter
    from heterospec.lean_target import LeanDecoder

    # the layers first: a drafter makes the target capture layers a one-layer forward lacks
    full, one = LeanDecoder(target), LeanDecoder(target)
    one.w = copy.copy(one.w)
    one.w.layers = one.w.layers[:1]
    for dec in (full, one):
        dec.prefill(prompt_ids)
    layers = len(full.w.layers)
    times = {"full": [], "one": []}
    order = random.Random(0)
    for _ in range(3 * reps + 2):
        pair = ["full", "one"]
        order.shuffle(pair)
        for name in pair:
            dec = full if name == "full" else one
            t0 = time.perf_counter()
            dec.tree_forward(prompt_ids[:top_k], torch.arange(top_k), chain(top_k))
            times[name].append(1e3 * (time.perf_counter() - t0))
    per_layer = (statistics.median(times["full"][2:]) - statistics.median(times["one"][2:])) \
        / (layers - 1)
    drafter = Eagle3Drafter.from_pretrained(SHIPPED_HEAD_DIR, target, top_k=top_k)
    _, per_level = draft_levels(drafter, prompt_ids, target, [1, 2, 3, 4, 5], reps)
    out = {"head_per_level_ms": per_level, "target_layer_ms": per_layer, "rows": top_k,
           "cached_rows": int(prompt_ids.numel())}
    print(f"draft level of the shipped head (top_k {top_k}): {per_level:.2f} ms; one decoder "
          f"layer of the target at {top_k} rows over {prompt_ids.numel()} cached: "
          f"{per_layer:.2f} ms (a stacked head layer: about +{100 * per_layer / per_level:.0f}% "
          "per level)", flush=True)
    return out


def attention_grid(rows, cached, reps):
    """{cached: {rows: (op µs, torch µs)}} for rope_cache_attention against its composition
    (``bench_decode_layer.attention_composition``), at the sizes of that module."""
    from bench_decode_layer import DT, HEAD_DIM, HEADS, KV_HEADS, attention_composition

    import heterospec_ext as hx

    g = torch.Generator().manual_seed(0)
    angles = torch.rand(4096, HEAD_DIM // 2, generator=g) * 6.3
    table = torch.stack((torch.cat((angles.cos(), angles.cos()), -1),
                         torch.cat((-angles.sin(), angles.sin()), -1)), dim=1)
    out = {}
    for length in cached:
        out[length] = {}
        for n in rows:
            qkv = torch.randn(n, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=g).to(DT)
            k_cache = torch.randn(KV_HEADS, length + n, HEAD_DIM, generator=g).to(DT)
            v_cache = torch.randn(KV_HEADS, length + n, HEAD_DIM, generator=g).to(DT)
            visible = None
            if n > 1:
                visible = torch.ones(n, length + n, dtype=torch.bool)
                visible[:, length:] = chain(n)
            args = (qkv, table, length + torch.arange(n), k_cache, v_cache, length, visible,
                    HEADS, KV_HEADS)
            sides = (hx.rope_cache_attention, attention_composition)
            times = {fn: [] for fn in sides}
            for _ in range(reps * 30):
                for fn in sides:
                    t0 = time.perf_counter()
                    fn(*args)
                    times[fn].append(time.perf_counter() - t0)
            mine, theirs = (1e6 * statistics.median(times[fn]) for fn in sides)
            out[length][n] = (mine, theirs)
            print(f"attention over {length} cached rows, {n} new: op {mine:.0f} µs, torch "
                  f"{theirs:.0f} µs ({theirs / mine:.2f}x)", flush=True)
    return out


def draft_cost_by_vocab(target, prompt_ids, sizes, reps, top_k=8):
    """{draft vocabulary size: per-level ms} of random heads shaped like the shipped one."""
    import tempfile

    from heterospec.eagle3 import SHIPPED_HEAD_DIR, Eagle3Drafter
    from heterospec.testing import random_eagle3_state, save_eagle3_head

    with open(os.path.join(SHIPPED_HEAD_DIR, "config.json")) as f:
        shipped = json.load(f)
    out = {}
    for size in sizes:
        cfg = dict(shipped, draft_vocab_size=size)
        with tempfile.TemporaryDirectory() as d:
            save_eagle3_head(d, cfg, random_eagle3_state(cfg))
            drafter = Eagle3Drafter.from_pretrained(d, target, top_k=top_k)
        _, out[size] = draft_levels(drafter, prompt_ids, target, [1, 2, 3, 4, 5, 6], reps)
        print(f"draft vocabulary {size}: {out[size]:.2f} ms per level (top_k {top_k})", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefix", type=int, default=300)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=1, help="prompts per set for the AR part")
    ap.add_argument("--parts", default="curve,draft,vocab,ar")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hs = _import_heterospec()
    from heterospec.bench import HFGenerate
    from heterospec.eagle3 import SHIPPED_HEAD_DIR, Eagle3Drafter
    from heterospec.generate import autoregressive_generate
    from heterospec.prompts import encode, load_prompts

    parts = args.parts.split(",")
    result = {"threads": args.threads, "prefix": args.prefix, "reps": args.reps,
              "torch": torch.__version__, "command": " ".join(sys.argv)}
    if "attention" in parts:
        result["attention_us"] = attention_grid((1, 4, 8, 16, 24, 32), (300, 700, 1500),
                                                args.reps)
    if parts == ["attention"]:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        return 0
    targets = {dt: hs.load_target(dtype=getattr(torch, dt)) for dt in ("bfloat16", "float32")}
    tok = targets["float32"].tokenizer
    text = " ".join(p["text"] for p in load_prompts("mtbench", 8))
    prefix = torch.tensor(tok(text).input_ids[:args.prefix])
    if "curve" in parts:
        sizes = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64]
        curves = {}
        for dt, target in targets.items():
            for kind in ("lean", "dynamic"):
                curves[f"{dt} {kind}"] = verify_curve(target, kind, prefix, sizes, args.reps)
                print(f"curve {dt} {kind}: " + ", ".join(
                    f"{n}:{ms:.1f}" for n, ms in curves[f'{dt} {kind}'].items()), flush=True)
        result["curve_ms"] = curves
        print("\n| verifier | " + " | ".join(f"N={n}" for n in sizes) + " |")
        print("|---|" + "---|" * len(sizes))
        for name, c in curves.items():
            print(f"| {name} | " + " | ".join(f"{c[n]:.1f}" for n in sizes) + " |")
        for name, c in curves.items():
            print(f"{name}: N<=16 worst / N=1 = {max(c[n] for n in sizes if n <= 16) / c[1]:.2f}")
    if "draft" in parts:
        ids = encode(tok, load_prompts("humaneval", 1)[0]["text"], True)
        draft = {}
        for dt, target in targets.items():
            for k in (8, 6, 4):
                drafter = Eagle3Drafter.from_pretrained(SHIPPED_HEAD_DIR, target, top_k=k)
                ms, slope = draft_levels(drafter, ids, target, [1, 2, 3, 4, 5, 6], args.reps)
                gemm = head_gemm_ms(drafter, args.reps)
                draft[f"eagle3 {dt} k={k}"] = {"levels_ms": ms, "per_level_ms": slope,
                                               "gemm_ms_per_level": gemm}
                print(f"eagle3 {dt} top_k {k}: per level {slope:.2f} ms, of which the five GEMMs "
                      f"{gemm:.2f} ms ({ms})", flush=True)
        for k in (8, 4):
            drafter = hs.int8_drafter(targets["float32"], top_k=k)
            ms, slope = draft_levels(drafter, ids, targets["float32"], [1, 2, 3, 4], args.reps)
            draft[f"int8 k={k}"] = {"levels_ms": ms, "per_level_ms": slope}
            print(f"int8 top_k {k}: per level {slope:.2f} ms ({ms})", flush=True)
        result["draft"] = draft
    if "vocab" in parts:
        result["per_level_ms_by_draft_vocab"] = draft_cost_by_vocab(
            targets["bfloat16"], encode(tok, load_prompts("humaneval", 1)[0]["text"], True),
            (4096, 8192, 16384, 32768), args.reps)
    if "ops" in parts:
        result["decode_layer_ops"] = decode_layer_ops_ab(targets["bfloat16"], tok, args.prompts,
                                                         args.new_tokens, args.reps)
    if "target-ops" in parts:
        result["target_decode_layer_ops"] = target_ops_ab(
            targets["bfloat16"], prefix, tok, args.prompts, args.new_tokens, args.reps)
    if "head-layers" in parts:
        result["stacked_head_layer"] = stacked_layer_cost(targets["bfloat16"], prefix, args.reps)
    if "ar" in parts:
        prompts = [encode(tok, p["text"], p["chat"]) for s in ("humaneval", "gsm8k", "mtbench")
                   for p in load_prompts(s, args.prompts)]
        n = args.new_tokens
        rows = {}
        for dt, target in targets.items():
            hf = HFGenerate(target)
            for attn in ("eager", "sdpa"):
                name = f"HF generate {dt} {attn}"
                hf(f"hf:{dt}:{attn}", prompts[0], 4, 0.0, 0)
                rows[name] = sum(statistics.median(
                    hf(f"hf:{dt}:{attn}", ids, n, 0.0, 0)[1] for _ in range(args.reps))
                    for ids in prompts)
                print(f"{name}: {n * len(prompts) / rows[name]:.1f} tok/s", flush=True)
            name = f"our AR loop {dt} lean"
            autoregressive_generate(target, prompts[0], 4)
            rows[name] = sum(statistics.median(
                autoregressive_generate(target, ids, n).stats.wall_time_s
                for _ in range(args.reps)) for ids in prompts)
            print(f"{name}: {n * len(prompts) / rows[name]:.1f} tok/s", flush=True)
        tps = {k: n * len(prompts) / v for k, v in rows.items()}
        result["ar_tokens_per_s"] = tps
        best = max((k for k in tps if k.startswith("HF")), key=tps.get)
        print("\n| decoder | tok/s | vs best HF |\n|---|---|---|")
        for k, v in tps.items():
            print(f"| {k} | {v:.1f} | {v / tps[best]:.2f}× |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def test_tree_verify_lean_vs_hf_module(benchmark):
    hs = _import_heterospec()
    from heterospec.testing import tiny_llama
    from heterospec.verifier import make_verifier

    target = hs.CausalLM(tiny_llama(vocab=256, hidden=64))
    prefix = torch.arange(40) % 256
    toks = torch.arange(16) + 7
    lean, dyn = make_verifier(target, "lean"), make_verifier(target, "dynamic")
    for ver in (lean, dyn):
        ver.reset()
        ver.prefill(prefix)
    ref = dyn.tree_forward(toks, torch.arange(16), chain(16))
    got = benchmark(lambda: lean.tree_forward(toks, torch.arange(16), chain(16)))
    torch.testing.assert_close(got.float(), ref.float(), atol=1e-4, rtol=1e-4)


if __name__ == "__main__":
    sys.exit(main())
