"""``heterospec bench``: AR, the static tree, HeteroSpec and HF assisted generation (same int8
draft) on the same real prompts, in one process, with a table and optional JSON."""
from __future__ import annotations

import json
import statistics
import sys
import time


def _hf_assisted(target, draft_model, ids, max_new_tokens):
    """HF ``generate(assistant_model=...)``, greedy; counts target forwards with a hook."""
    import torch

    calls = [0]
    handle = target.model.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    try:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = target.model.generate(ids[None], attention_mask=torch.ones_like(ids[None]),
                                        do_sample=False, max_new_tokens=max_new_tokens,
                                        min_new_tokens=max_new_tokens,
                                        assistant_model=draft_model)
        wall = time.perf_counter() - t0
    finally:
        handle.remove()
    toks = out[0, ids.numel():].tolist()
    return toks, wall, calls[0]


def run_bench(args, load):
    import torch

    from .generate import SpeculativeGenerator, autoregressive_generate
    from .policy import StaticTree
    from .prompts import encode, load_prompts

    target, drafter, policy = load(args)
    static = StaticTree(depth=policy.depth, top_k=policy.top_k, total_tokens=policy.total_tokens)
    methods = {"static": SpeculativeGenerator(target, drafter, static)}
    if policy.adaptive:
        methods["heterospec"] = SpeculativeGenerator(target, drafter, policy)
    prompts = []
    for name in args.sets.split(","):
        for p in load_prompts(name.strip(), args.prompts_per_set):
            prompts.append((p["id"], encode(target.tokenizer, p["text"], p["chat"])))
    names = ["ar", *methods] + ([] if args.no_hf or args.draft != "int8" else ["hf_assisted"])
    rows = {m: {"new_tokens": 0, "wall": [], "cycles": 0, "verified": 0, "accepted": 0,
                "identical": 0, "draft": 0.0, "verify": 0.0, "overhead": 0.0, "decode": 0.0,
                "strata": None} for m in names}
    n = args.max_new_tokens
    try:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts) * len(names) * args.repeats, desc="bench", file=sys.stderr)
    except ImportError:  # pragma: no cover
        bar = None
    # warm-up: the first forwards after load are slow
    warm = prompts[0][1]
    autoregressive_generate(target, warm, 4)
    for gen in methods.values():
        gen.generate(warm, 4)
    for pid, ids in prompts:
        ref = None
        for m in names:
            walls = []
            for _ in range(args.repeats):
                if m == "ar":
                    res = autoregressive_generate(target, ids, n)
                    toks, st = res.token_ids, res.stats
                    walls.append(st.wall_time_s)
                elif m == "hf_assisted":
                    toks, wall, calls = _hf_assisted(target, drafter.lm.model, ids, n)
                    walls.append(wall)
                    st = None
                else:
                    res = methods[m].generate(ids, n)
                    toks, st = res.token_ids, res.stats
                    walls.append(st.wall_time_s)
                if bar is not None:
                    bar.update(1)
            r = rows[m]
            if m == "ar":
                ref = toks
            r["identical"] += int(toks == ref)
            r["new_tokens"] += len(toks)
            r["wall"].append(statistics.median(walls))
            if st is not None:
                r["cycles"] += st.cycles
                r["verified"] += st.verified_tokens
                r["accepted"] += st.accepted_tokens
                r["draft"] += st.draft_time_s
                r["verify"] += st.verify_time_s
                r["overhead"] += st.overhead_time_s
                r["decode"] += st.wall_time_s - st.prefill_time_s
                if st.stratum_counts:
                    r["strata"] = [a + b for a, b in zip(r["strata"] or [0] * len(st.stratum_counts),
                                                         st.stratum_counts)]
            else:
                r["cycles"] += calls - 1  # minus the prefill forward
                r["verified"] = None
    if bar is not None:
        bar.close()
    table = []
    ar_tps = rows["ar"]["new_tokens"] / sum(rows["ar"]["wall"])
    hf_tps = None
    if "hf_assisted" in rows:
        hf_tps = rows["hf_assisted"]["new_tokens"] / sum(rows["hf_assisted"]["wall"])
    for m in names:
        r = rows[m]
        tps = r["new_tokens"] / sum(r["wall"])
        entry = {"method": m, "prompts": len(prompts), "new_tokens": r["new_tokens"],
                 "tokens_per_s": round(tps, 2), "speedup_vs_ar": round(tps / ar_tps, 3),
                 "speedup_vs_hf_assisted": round(tps / hf_tps, 3) if hf_tps else None,
                 "calls": r["cycles"],
                 "tau": round(r["new_tokens"] / r["cycles"], 3) if r["cycles"] else None,
                 "verified_tokens": r["verified"] if m != "ar" else r["cycles"],
                 "identical_to_ar": f"{r['identical']}/{len(prompts)}",
                 "stratum_counts": r["strata"]}
        if r["decode"]:
            entry.update({"draft_share": round(r["draft"] / r["decode"], 3),
                          "verify_share": round(r["verify"] / r["decode"], 3),
                          "overhead_share": round(r["overhead"] / r["decode"], 3),
                          "overhead_ms_per_cycle": round(1e3 * r["overhead"] / r["cycles"], 2)})
        table.append(entry)
    meta = {"max_new_tokens": n, "repeats": args.repeats, "sets": args.sets,
            "policy": policy.describe(), "threads": torch.get_num_threads(),
            "draft": args.draft, "model": args.model or "SmolLM2-135M-Instruct.Q4_1.gguf"}
    if args.json:
        print(json.dumps({"bench": table, "config": meta}))
    else:
        cols = ["method", "tokens_per_s", "speedup_vs_ar", "speedup_vs_hf_assisted", "tau",
                "calls", "verified_tokens", "identical_to_ar", "overhead_share"]
        print(" | ".join(cols))
        print(" | ".join("---" for _ in cols))
        for e in table:
            print(" | ".join("" if e.get(c) is None else str(e.get(c)) for c in cols))
        for e in table:
            if e["stratum_counts"]:
                print(f"{e['method']} stratum occupancy: {e['stratum_counts']}")
        print(f"config: {json.dumps(meta)}")
    return 0
