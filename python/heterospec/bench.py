"""``heterospec bench``: the paper's Table 1 on real prompts, in one process.

Methods: ``ar`` (the target's own loop on the same forward code as the speculative methods),
``static`` (the EAGLE tree the policy builds on), ``tuned`` (another static tree, e.g. the
winner of ``bench/tools/tune_static_tree.py``), ``heterospec`` (the policy), the ablation
``ded`` (HeteroSpec's extended depth only: every stratum verifies the static tree's N),
``hf:<dtype>:<attention>`` (plain HF ``model.generate`` on the same model: what a user runs
without this package; by default float32 and bfloat16, eager and sdpa) and ``hf_assisted`` (HF ``generate(assistant_model=)`` with
the same int8 draft; greedy only). Every method decodes every prompt ``repeats`` times, the
repeats interleaved across the methods (one round of every method, then the next round in reverse
order), so that a slow spell of a shared host is spread over all of them; wall times are medians
over repeats, per prompt. Per prompt set and on average (mean over sets, as the
paper) it reports speedup over AR and over the best HF ``generate`` configuration (the one with the
highest mean tok/s at T = 0, measured in the same run), tau, Calls and Tokens (verification calls
and verified tokens), stratum occupancy and the draft / verify / overhead split, for each
temperature. At T > 0 only the best HF configuration runs (sampling, ``do_sample=True``).

Sampling runs (temperature > 0) seed each prompt's generator with the prompt's index, so the
repeats of a prompt are the same run and only the clock varies.
"""
from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

METHOD_LABELS = {"ar": "AR", "static": "static tree", "tuned": "static tree, tuned",
                 "ded": "+extended depth (DED)", "heterospec": "HeteroSpec",
                 "cost": "HeteroSpec cost-aware", "hf_assisted": "HF assisted"}
DEFAULT_HF_CONFIGS = ("float32:eager", "float32:sdpa", "bfloat16:eager", "bfloat16:sdpa")
HF_CONFIGS = tuple(f"{d}:{a}" for d in ("float32", "bfloat16", "float16")
                   for a in ("eager", "sdpa"))
BENCH_METHODS = tuple(METHOD_LABELS) + tuple(f"hf:{c}" for c in HF_CONFIGS)


@dataclass
class BenchConfig:
    """What :func:`run_bench` runs. ``methods`` empty: AR, the static tree, HeteroSpec (with
    ``ablation`` also DED; with ``cost_policy`` also the cost-aware rule; with ``tuned_static``
    also that static tree as ``tuned``), the ``hf_configs``
    HF generate baselines (unless ``no_hf``) and, with ``hf_assisted_draft``, HF assisted
    generation with that draft module."""

    sets: Sequence[str] = ("humaneval", "gsm8k", "mtbench")
    prompts_per_set: int = 1
    prompt_offset: int = 0
    max_new_tokens: int = 48
    repeats: int = 1
    temperatures: Sequence[float] = (0.0,)
    methods: Sequence[str] = ()
    hf_configs: Sequence[str] = DEFAULT_HF_CONFIGS
    no_hf: bool = False
    ablation: bool = False
    verifier: str = "auto"
    truncate_prompt: str = "none"
    cost_policy: Optional[object] = None  # a HeteroSpec with a cost-aware table
    # another static tree (a StaticTree with the policy's top_k), e.g. the best of a tuning sweep
    tuned_static: Optional[object] = None
    hf_assisted_draft: Optional[object] = None  # an nn.Module draft for HF assisted generation
    labels: Dict[str, str] = field(default_factory=dict)  # provenance only (model, draft, ...)


def method_label(m: str) -> str:
    if m.startswith("hf:"):
        _, dtype, attn = m.split(":")
        return f"HF generate {dtype.replace('float32', 'fp32').replace('bfloat16', 'bf16')} {attn}"
    return METHOD_LABELS[m]


def is_hf_generate(m: str) -> bool:
    return m.startswith("hf:")


class HFGenerate:
    """Plain HF ``model.generate`` on a copy of the target's module in each wanted dtype (the
    target's own module when the dtype matches), attention switched per call."""

    def __init__(self, target):
        self.target = target
        self.models = {}

    def model(self, dtype_name: str):
        import torch

        dtype = getattr(torch, dtype_name)
        if dtype == self.target.dtype:
            return self.target.model
        if dtype_name not in self.models:
            m = copy.deepcopy(self.target.model)
            # nn.Module._apply: HF's .to() refuses models flagged quantised (GGUF-loaded ones)
            m._apply(lambda t: t.to(dtype) if t.is_floating_point() else t)
            self.models[dtype_name] = m.eval()
        return self.models[dtype_name]

    def __call__(self, method: str, ids, max_new_tokens: int, temperature: float, seed: int):
        """(new tokens, wall seconds, target forwards) of one decode; exactly
        ``max_new_tokens`` tokens (EOS suppressed, as the other methods ignore it)."""
        import torch

        _, dtype_name, attn = method.split(":")
        model = self.model(dtype_name)
        before = model.config._attn_implementation
        model.set_attn_implementation(attn)
        calls = [0]
        handle = model.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
        kw = {"do_sample": False}
        if temperature > 0:
            kw = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
            torch.manual_seed(seed)
        try:
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(ids[None], attention_mask=torch.ones_like(ids[None]),
                                     max_new_tokens=max_new_tokens,
                                     min_new_tokens=max_new_tokens, **kw)
            wall = time.perf_counter() - t0
        finally:
            handle.remove()
            model.set_attn_implementation(before)
        return out[0, ids.numel():].tolist(), wall, calls[0]


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


def _methods(cfg: BenchConfig, target, drafter, policy):
    from .errors import GenerationConfigError
    from .generate import SpeculativeGenerator
    from .policy import HeteroSpec, StaticTree

    wanted = [m for m in cfg.methods if m]
    if not wanted:
        wanted = ["ar", "static"] + (["heterospec"] if policy.adaptive else [])
        if cfg.ablation and policy.adaptive:
            wanted.insert(2, "ded")
        if cfg.tuned_static is not None:
            wanted.insert(2, "tuned")
        if cfg.cost_policy is not None:
            wanted.append("cost")
        if not cfg.no_hf:
            wanted += [f"hf:{c}" for c in cfg.hf_configs]
            if cfg.hf_assisted_draft is not None:
                wanted.append("hf_assisted")
    unknown = [m for m in wanted if m not in BENCH_METHODS]
    if unknown:
        raise GenerationConfigError(f"methods: unknown {unknown}; choose from "
                                    f"{list(BENCH_METHODS)}")
    if ("heterospec" in wanted or "ded" in wanted) and not policy.adaptive:
        raise GenerationConfigError("methods heterospec/ded need an adaptive policy "
                                    "(heterospec or a policy JSON), not 'static'")
    if "tuned" in wanted and cfg.tuned_static is None:
        raise GenerationConfigError("method tuned needs a static tree (--tuned-static D,K,N)")
    if "tuned" in wanted and cfg.tuned_static.top_k != policy.top_k:
        raise GenerationConfigError(
            f"the tuned static tree drafts top_k={cfg.tuned_static.top_k} but the policy drafts "
            f"top_k={policy.top_k} (the methods share one drafter)")
    if "cost" in wanted and cfg.cost_policy is None:
        raise GenerationConfigError("method cost needs a cost-aware policy (--cost-policy FILE)")
    if "hf_assisted" in wanted and cfg.hf_assisted_draft is None:
        raise GenerationConfigError("method hf_assisted needs a whole draft model")
    gens = {}
    static = StaticTree(depth=policy.depth, top_k=policy.top_k, total_tokens=policy.total_tokens)
    for m in wanted:
        pol = None
        if m == "static":
            pol = static
        elif m == "heterospec":
            pol = policy
        elif m == "cost":
            pol = cfg.cost_policy
        elif m == "tuned":
            pol = cfg.tuned_static
        elif m == "ded":
            pol = HeteroSpec(depth=policy.depth, top_k=policy.top_k,
                             total_tokens=policy.total_tokens, thresholds=policy.thresholds,
                             alpha=policy.alpha, gammas=policy.gammas, prune_top_n=False,
                             name="ded", source=policy.source)
        if pol is not None:
            gens[m] = SpeculativeGenerator(target, drafter, pol, verifier=cfg.verifier)
    if any(is_hf_generate(m) for m in wanted):
        gens["hf"] = HFGenerate(target)
    return wanted, gens


def _run_once(m, gens, target, drafter, ids, n, sampling, verifier=None):
    """(tokens, stats dict) of one decode."""
    from .generate import autoregressive_generate

    if m == "ar":
        res = autoregressive_generate(target, ids, n, sampling=sampling, verifier=verifier)
        return res.token_ids, res.stats.as_dict()
    if is_hf_generate(m):
        toks, wall, calls = gens["hf"](m, ids, n, sampling.temperature, sampling.seed or 0)
        return toks, {"new_tokens": len(toks), "wall_time_s": wall, "cycles": calls,
                      "verified_tokens": calls, "accepted_tokens": 0}
    if m == "hf_assisted":
        toks, wall, calls = _hf_assisted(target, gens["hf_assisted_draft"], ids, n)
        return toks, {"new_tokens": len(toks), "wall_time_s": wall, "cycles": calls - 1,
                      "verified_tokens": None, "accepted_tokens": len(toks) - (calls - 1)}
    res = gens[m].generate(ids, n, sampling=sampling)
    return res.token_ids, res.stats.as_dict()


def best_hf_method(rows: List[dict]) -> Optional[str]:
    """The HF ``generate`` configuration with the highest mean tok/s at T = 0 (else the lowest
    temperature measured)."""
    hf = [r for r in rows if r["set"] == "mean" and is_hf_generate(r["method"])]
    if not hf:
        return None
    t = min(r["temperature"] for r in hf)
    return max((r for r in hf if r["temperature"] == t), key=lambda r: r["tokens_per_s"])["method"]


def aggregate(runs: List[dict], methods: List[str], sets: List[str],
              temperatures: List[float]) -> List[dict]:
    """Rows ``{temperature, set, method, ...}`` (``set`` = "mean" for the average over sets)."""
    rows = []
    for t in temperatures:
        per_set: Dict[str, Dict[str, dict]] = {}
        for s in sets:
            per_set[s] = {}
            for m in methods:
                rs = [r for r in runs if r["temperature"] == t and r["set"] == s
                      and r["method"] == m]
                if not rs:
                    continue
                prompts = sorted({r["prompt"] for r in rs})
                wall = tokens = 0.0
                first = []
                for p in prompts:
                    pr = [r for r in rs if r["prompt"] == p]
                    wall += statistics.median(r["wall_time_s"] for r in pr)
                    tokens += pr[0]["new_tokens"]
                    first.append(pr[0])
                cycles = sum(r["cycles"] for r in first)
                accepted = sum(r["accepted_tokens"] for r in first)
                verified = None if first[0].get("verified_tokens") is None else \
                    sum(r["verified_tokens"] for r in first)
                row = {"temperature": t, "set": s, "method": m, "prompts": len(prompts),
                       "new_tokens": int(tokens), "tokens_per_s": tokens / wall if wall else 0.0,
                       "calls": cycles, "tokens": verified,
                       "tau": (accepted + cycles) / cycles if cycles else None,
                       "tokens_per_call": verified / cycles if cycles and verified else None,
                       "identical_to_ar": sum(r.get("identical_to_ar", False) for r in first)
                       if t == 0 else None}
                decode = sum(r.get("wall_time_s", 0) - r.get("prefill_time_s", 0) for r in rs)
                if m not in ("ar", "hf_assisted") and not is_hf_generate(m) and decode > 0:
                    for part in ("draft", "verify", "overhead"):
                        row[f"{part}_share"] = sum(r[f"{part}_time_s"] for r in rs) / decode
                    row["overhead_ms_per_cycle"] = 1e3 * sum(r["overhead_time_s"] for r in rs) / \
                        max(1, sum(r["cycles"] for r in rs))
                strata = [r.get("stratum_counts") for r in first if r.get("stratum_counts")]
                row["stratum_counts"] = [sum(c) for c in zip(*strata)] if strata else None
                per_set[s][m] = row
            ar = per_set[s].get("ar")
            for m, row in per_set[s].items():
                row["speedup"] = row["tokens_per_s"] / ar["tokens_per_s"] if ar else None
                rows.append(row)
        for m in methods:
            rs = [per_set[s][m] for s in sets if m in per_set[s]]
            if not rs:
                continue
            mean = {"temperature": t, "set": "mean", "method": m, "prompts": sum(r["prompts"]
                                                                                   for r in rs),
                    "new_tokens": sum(r["new_tokens"] for r in rs), "calls": sum(r["calls"]
                                                                                 for r in rs)}
            for key in ("speedup", "tau", "tokens_per_s", "tokens_per_call", "draft_share",
                        "verify_share", "overhead_share", "overhead_ms_per_cycle"):
                vals = [r[key] for r in rs if r.get(key) is not None]
                mean[key] = sum(vals) / len(vals) if vals else None
            mean["tokens"] = None if any(r["tokens"] is None for r in rs) else \
                sum(r["tokens"] for r in rs)
            ident = [r["identical_to_ar"] for r in rs if r["identical_to_ar"] is not None]
            mean["identical_to_ar"] = sum(ident) if ident else None
            strata = [r["stratum_counts"] for r in rs if r["stratum_counts"]]
            mean["stratum_counts"] = [sum(c) for c in zip(*strata)] if strata else None
            rows.append(mean)
    _add_speedup_vs_hf(rows, sets)
    return rows


def _add_speedup_vs_hf(rows: List[dict], sets: List[str]) -> None:
    """``speedup_vs_hf``: tok/s over the best HF ``generate`` configuration's in the same set and
    temperature (mean row: the mean over sets); ``None`` where that configuration did not run."""
    best = best_hf_method(rows)
    for r in rows:
        r["speedup_vs_hf"] = None
    if best is None:
        return
    at = {(r["temperature"], r["set"], r["method"]): r for r in rows}
    for r in rows:
        if r["set"] == "mean":
            continue
        base = at.get((r["temperature"], r["set"], best))
        if base and base["tokens_per_s"]:
            r["speedup_vs_hf"] = r["tokens_per_s"] / base["tokens_per_s"]
    for r in rows:
        if r["set"] == "mean":
            vals = [at[(r["temperature"], s, r["method"])]["speedup_vs_hf"] for s in sets
                    if (r["temperature"], s, r["method"]) in at]
            vals = [v for v in vals if v is not None]
            r["speedup_vs_hf"] = sum(vals) / len(vals) if vals else None


def _fmt(v, nd=2):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def format_table(rows: List[dict]) -> str:
    """Markdown: one table per temperature, a row per (set, method)."""
    out = []
    for t in sorted({r["temperature"] for r in rows}):
        out.append(f"\nTemperature {t:g}\n")
        out.append("| set | method | vs AR | vs best HF | tok/s | τ | Calls | Tokens | "
                   "Tokens/Call | draft / verify / overhead | identical to AR | strata |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            if r["temperature"] != t:
                continue
            split = "–" if r.get("draft_share") is None else \
                f"{r['draft_share']:.0%} / {r['verify_share']:.0%} / {r['overhead_share']:.1%}"
            ident = "–" if r.get("identical_to_ar") is None else \
                f"{r['identical_to_ar']}/{r['prompts']}"
            out.append(" | ".join([
                f"| {r['set']}", method_label(r["method"]), _fmt(r.get("speedup")) + "×",
                _fmt(r.get("speedup_vs_hf")) + "×", _fmt(r.get("tokens_per_s"), 1), _fmt(r.get("tau")), _fmt(r.get("calls")),
                _fmt(r.get("tokens")), _fmt(r.get("tokens_per_call"), 1), split, ident,
                _fmt(r.get("stratum_counts"))]) + " |")
    return "\n".join(out)


def plot(rows: List[dict], path: str, title: str = "") -> None:
    """Speedup and τ per set and method, and verified tokens per call; one row per temperature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temps = sorted({r["temperature"] for r in rows})
    sets = list(dict.fromkeys(r["set"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(len(temps), 3, figsize=(15, 3.8 * len(temps)), squeeze=False)
    width = 0.8 / max(1, len(methods))
    for i, t in enumerate(temps):
        for j, (key, label) in enumerate((("speedup", "speedup over AR"), ("tau", "τ"),
                                          ("tokens_per_call", "verified tokens per call"))):
            ax = axes[i][j]
            for k, m in enumerate(methods):
                vals = []
                for s in sets:
                    r = next((r for r in rows if r["temperature"] == t and r["set"] == s
                              and r["method"] == m), None)
                    vals.append(r.get(key) if r and r.get(key) is not None else 0.0)
                xs = [x + (k - (len(methods) - 1) / 2) * width for x in range(len(sets))]
                ax.bar(xs, vals, width, label=method_label(m))
            ax.set_xticks(range(len(sets)))
            ax.set_xticklabels(sets)
            ax.set_title(f"{label}, T={t:g}")
            if key == "speedup":
                ax.axhline(1.0, color="black", lw=0.8)
            ax.grid(axis="y", alpha=0.3)
        axes[i][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass
class BenchResult:
    rows: List[dict]   # aggregate(): per temperature, set and method
    runs: List[dict]   # every single decode
    meta: dict         # the configuration and provenance

    def to_json(self) -> dict:
        return {"config": self.meta, "table": self.rows, "runs": self.runs}


def run_bench(target, drafter, policy, cfg: BenchConfig, progress_factory=None) -> BenchResult:
    """Decode every prompt of ``cfg.sets`` with every method (module docstring).
    ``progress_factory(total, desc)`` (optional) makes a progress bar (``update``/``close``)
    once the prompts are ready."""
    import torch

    from .cli_args import context_models, fit_to_context
    from .generate import SamplingParams, autoregressive_generate
    from .prompts import encode, load_prompts
    from .verifier import make_verifier

    methods, gens = _methods(cfg, target, drafter, policy)
    if cfg.hf_assisted_draft is not None:
        gens["hf_assisted_draft"] = cfg.hf_assisted_draft
    temps = sorted(float(t) for t in cfg.temperatures)
    sets = list(cfg.sets)
    n = cfg.max_new_tokens
    largest_tree = max((g.policy.n_max for g in gens.values() if hasattr(g, "policy")),
                       default=0)
    prompts = []
    for name in sets:
        for p in load_prompts(name, cfg.prompts_per_set, offset=cfg.prompt_offset):
            ids = fit_to_context(encode(target.tokenizer, p["text"], p["chat"]),
                                 context_models(target, drafter), n, largest_tree,
                                 cfg.truncate_prompt)
            prompts.append((name, p["id"], ids))
    ar_verifier = make_verifier(target, cfg.verifier)
    hf_methods = [m for m in methods if is_hf_generate(m)]
    best_hf = None

    def runs_at(t):
        """The methods run at temperature ``t``: HF assisted only greedy; after the first
        temperature, only the best HF generate configuration."""
        return [m for m in methods if not (m == "hf_assisted" and t != 0) and
                not (is_hf_generate(m) and t != temps[0] and m != best_hf)]

    # warm-up: the first forwards after load are slow
    warm = prompts[0][2]
    autoregressive_generate(target, warm, 4, verifier=ar_verifier)
    for m in methods:
        if m in gens:
            gens[m].generate(warm, 4)
        elif is_hf_generate(m):
            gens["hf"](m, warm, 4, 0.0, 0)
    bar = None
    if progress_factory is not None:
        per_prompt = sum(len(runs_at(t)) if t == temps[0] else
                         len([m for m in methods if not is_hf_generate(m)]) + (1 if hf_methods
                                                                               else 0)
                         for t in temps)
        bar = progress_factory(per_prompt * len(prompts) * cfg.repeats, "bench")
    runs = []
    run_index = 0  # the order the decodes ran in
    t_start = time.time()
    for t in temps:
        methods_t = runs_at(t)
        for index, (set_name, pid, ids) in enumerate(prompts):
            # repeats are interleaved across the methods, in alternating order, so that a slow
            # spell of a shared host hits every method alike instead of one method's repeats
            done, tokens = [], {}
            for rep in range(cfg.repeats):
                order = methods_t if rep % 2 == 0 else methods_t[::-1]
                for m in order:
                    sampling = SamplingParams(temperature=t, seed=index)
                    toks, st = _run_once(m, gens, target, drafter, ids, n, sampling,
                                         verifier=ar_verifier)
                    st = {k: v for k, v in st.items() if k != "method"}
                    st.update({"temperature": t, "set": set_name, "prompt": pid, "method": m,
                               "repeat": rep, "run_index": run_index})
                    run_index += 1
                    done.append(st)
                    tokens[(m, rep)] = toks
                    if bar is not None:
                        bar.update(1)
            ref = tokens.get(("ar", 0))
            for st in sorted(done, key=lambda st: (methods_t.index(st["method"]),
                                                   st["repeat"])):
                st["identical_to_ar"] = tokens[(st["method"], st["repeat"])] == ref
                runs.append(st)
        if hf_methods and best_hf is None:
            best_hf = best_hf_method(aggregate(runs, methods, sets, [t]))
    if bar is not None:
        bar.close()
    rows = aggregate(runs, methods, sets, temps)
    meta = {"max_new_tokens": n, "repeats": cfg.repeats, "sets": sets,
            "prompts_per_set": cfg.prompts_per_set, "temperatures": temps,
            "policy": policy.describe(),
            "cost_policy": cfg.cost_policy.describe() if cfg.cost_policy is not None else None,
            "tuned_static": cfg.tuned_static.describe() if cfg.tuned_static is not None
            else None,
            "threads": torch.get_num_threads(), "dtype": str(target.dtype).replace("torch.", ""),
            "verifier": type(ar_verifier).__name__, "best_hf": best_hf,
            "seconds": round(time.time() - t_start, 1), **cfg.labels}
    return BenchResult(rows, runs, meta)
