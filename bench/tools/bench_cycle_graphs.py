"""One draft+verify cycle per tree shape, eager vs CUDA-graph replay, random model of real size.

Target: a randomly initialised Llama with the Llama-3.1-8B config in bf16; draft: a random
EAGLE-3 head of matching size (draft vocabulary 32000). Random weights make acceptance
meaningless, so the tree shapes are forced: for each (draft levels, verified nodes N) a HeteroSpec
policy can produce (``policy.shapes()``), a static tree of exactly that shape runs through the
real driver (``SpeculativeGenerator``) three ways:

* ``dynamic``: the default driver (DynamicCache, eager);
* ``static``: the preallocated static cache, eager (the code the graphs capture);
* ``graph``: the static cache with the tree-verify forward replayed from a CUDA graph.

A cycle is timed between consecutive ``on_cycle`` calls (draft, build_tree, verify,
fused_verify, compaction, draft commit); the verify step alone is timed too. CUDA events,
warm-up cycles dropped, medians. The draft step is eager in every mode (only the target is
captured). Estimated (not yet run on a GPU): about 17 GB of GPU memory, under 90 s on an H100.

    python bench/tools/bench_cycle_graphs.py --out cycle_graphs.json
    python bench/tools/bench_cycle_graphs.py --small  # tiny config on CPU, eager only (smoke test)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
for path in (ROOT, os.path.join(ROOT, "python")):
    if path not in sys.path:
        sys.path.insert(0, path)

import heterospec as hs  # noqa: E402
from heterospec.cuda_graphs import GraphedTarget  # noqa: E402
from heterospec.eagle3 import Eagle3Drafter, Eagle3Head  # noqa: E402

# Llama-3.1-8B (meta-llama/Llama-3.1-8B-Instruct config.json); rope scaling left out (no effect
# on timing)
LLAMA31_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                  rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072)
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512, rope_theta=500000.0, rms_norm_eps=1e-5,
             max_position_embeddings=2048)


def _init_random_(module: torch.nn.Module) -> None:
    """normal(0, 0.02) matrices, unit norm weights, in place (seconds even for 8B on a GPU)."""
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)


def random_llama(shape: dict, device, dtype):
    """A random Llama built on the meta device and materialised on ``device`` (no fp32 copy)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    attn = "sdpa" if torch.device(device).type == "cuda" else "eager"
    cfg = LlamaConfig(**shape, tie_word_embeddings=False, attn_implementation=attn,
                      bos_token_id=0, eos_token_id=1, pad_token_id=None)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to(dtype).to_empty(device=device)
    _init_random_(model)
    # to_empty leaves non-persistent buffers (RoPE inv_freq) uninitialised: rebuild them
    model.model.rotary_emb = LlamaRotaryEmbedding(cfg).to(device)
    return model.eval()


def random_eagle3_head(shape: dict, draft_vocab: int, target: hs.CausalLM) -> Eagle3Head:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(**{**shape, "num_hidden_layers": 1})
    cfg.draft_vocab_size = draft_vocab
    cfg.target_hidden_size = shape["hidden_size"]
    cfg.head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    cfg.eagle_capture_layers = None
    with torch.device("meta"):
        head = Eagle3Head(cfg)
    head = head.to(target.dtype).to_empty(device=target.device)
    _init_random_(head)
    with torch.no_grad():
        head.d2t.zero_()  # draft id i = target id i
        head.t2d.fill_(True)
    head.rotary = LlamaRotaryEmbedding(cfg).to(target.device)
    head.embed = target.model.get_input_embeddings()
    return head.eval()


class Timer:
    """Marks on the GPU timeline (CUDA events) or the host clock (CPU); ms between marks."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.marks = []

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self):
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def time_cycles(gen, prompt, cycles, warmup):
    """Median ms of one cycle; acceptance is ~0 with random weights, so cycles ~ tokens."""
    timer = Timer(gen.target.device)
    gen.on_cycle = lambda info: timer.mark()
    res = gen.generate(prompt, cycles + warmup + 1)
    gen.on_cycle = None
    ms = timer.intervals_ms()[warmup:]
    return statistics.median(ms), res.stats


def time_verify(fn, reps, warmup, device):
    """Median ms per call of ``fn``; on CUDA the events sit between launches, so host launch
    cost that outruns the GPU shows up as idle time, which is what graphs remove."""
    for _ in range(warmup):
        fn()
    timer = Timer(device)
    timer.mark()
    for _ in range(reps):
        fn()
        timer.mark()
    return statistics.median(timer.intervals_ms())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None,
                        help="write the results as JSON here ('-': one JSON line on stdout)")
    parser.add_argument("--small", action="store_true",
                        help="tiny config on CPU, eager modes only (a smoke test in seconds)")
    parser.add_argument("--cycles", type=int, default=None, help="timed cycles per mode")
    parser.add_argument("--warmup", type=int, default=3, help="cycles dropped per mode")
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--max-len", type=int, default=1024, help="static cache entries")
    args = parser.parse_args(argv)

    if args.small:
        device, dtype, shape, draft_vocab = torch.device("cpu"), torch.float32, SMALL, 256
        policy = hs.HeteroSpec(depth=3, top_k=4, total_tokens=12)
        cycles, prompt_len, modes = args.cycles or 4, args.prompt_len or 16, ("dynamic", "static")
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            parser.error("the full benchmark needs a CUDA GPU; use --small on CPU")
        device, dtype, shape, draft_vocab = torch.device("cuda"), torch.bfloat16, LLAMA31_8B, 32000
        policy = hs.HeteroSpec(depth=5, top_k=10, total_tokens=60)  # EAGLE's default tree
        cycles, prompt_len = args.cycles or 20, args.prompt_len or 128
        modes = ("dynamic", "static", "graph")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = random_llama(shape, device, dtype)
    target = hs.CausalLM(model, check_tree_attention=False, name="random Llama")
    head = random_eagle3_head(shape, draft_vocab, target)
    layers = shape["num_hidden_layers"]
    drafter = Eagle3Drafter(head, target, top_k=policy.top_k)  # layers 2, L/2, L-3
    build_s = time.perf_counter() - t0
    prompt = torch.randint(2, shape["vocab_size"], (prompt_len,)).tolist()
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"# {dev_name}, torch {torch.__version__}, {dtype}, target {layers} layers hidden "
          f"{shape['hidden_size']} vocab {shape['vocab_size']}, built in {build_s:.1f} s; "
          f"policy shapes (levels, N) {policy.shapes()}", flush=True)

    rows = []
    for levels, n in policy.shapes():
        tree = hs.StaticTree(depth=levels - 1, top_k=policy.top_k, total_tokens=n)
        row = {"levels": levels, "N": n}
        for mode in modes:
            t = time.perf_counter()
            gen = hs.SpeculativeGenerator(target, drafter, tree, static_cache=mode == "static",
                                          cuda_graphs=mode == "graph", max_len=args.max_len)
            setup_s = time.perf_counter() - t
            ms, stats = time_cycles(gen, prompt, cycles, args.warmup)
            row[f"{mode}_cycle_ms"] = ms
            row[f"{mode}_mean_verified"] = stats.mean_verified_per_cycle
            if mode == "graph":
                row["capture_s"] = setup_s
                row["graph_replays"] = gen.verifier.replays
                row["graph_eager_fallbacks"] = gen.verifier.eager_calls
            if mode in ("static", "graph"):
                # the verify step alone, on the prefix the run left behind
                verifier = gen.verifier
                toks = torch.randint(2, shape["vocab_size"], (n,), device=device)
                depth = torch.arange(n, device=device).clamp(max=levels)
                anc = torch.ones((n, n), dtype=torch.bool, device=device).tril_()
                step = lambda: verifier.tree_forward(toks, depth, anc)  # noqa: E731
                row[f"{mode}_verify_ms"] = time_verify(step, cycles, args.warmup, device)
                if mode == "graph":
                    got = step().float()
                    ref = verifier.cache.tree_forward(toks, depth, anc).float()
                    row["graph_vs_eager_max_abs"] = float((got - ref).abs().max())
            del gen
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if "graph" in modes:
            row["cycle_speedup"] = row["static_cycle_ms"] / row["graph_cycle_ms"]
            row["verify_speedup"] = row["static_verify_ms"] / row["graph_verify_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)

    if "graph" in modes:
        lines = ["| N | draft levels | dynamic cycle ms | static eager cycle ms | graph cycle ms | "
                 "cycle speedup | eager verify ms | graph verify ms | verify speedup |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(
                f"| {r['N']} | {r['levels']} | {r['dynamic_cycle_ms']:.2f} | "
                f"{r['static_cycle_ms']:.2f} | {r['graph_cycle_ms']:.2f} | "
                f"{r['cycle_speedup']:.2f}x | {r['static_verify_ms']:.2f} | "
                f"{r['graph_verify_ms']:.2f} | {r['verify_speedup']:.2f}x |")
    else:
        lines = ["| N | draft levels | dynamic cycle ms | static eager cycle ms | "
                 "eager verify ms |", "|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['N']} | {r['levels']} | {r['dynamic_cycle_ms']:.2f} | "
                         f"{r['static_cycle_ms']:.2f} | {r['static_verify_ms']:.2f} |")
    table = "\n".join(lines)
    results = {"device": dev_name, "torch": torch.__version__, "dtype": str(dtype),
               "config": shape, "draft_vocab": draft_vocab,
               "policy": {**policy.describe(), "shapes": policy.shapes()},
               "prompt_len": prompt_len, "max_len": args.max_len, "cycles": cycles,
               "warmup": args.warmup, "build_s": build_s,
               "total_s": time.perf_counter() - t0, "rows": rows, "table": table}
    if args.out == "-":  # one line on stdout: gpu_check.sh keeps it in a log it already returns
        print(json.dumps(results), flush=True)
    elif args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print(f"\n## draft+verify cycle by tree size, {dev_name}, {time.strftime('%Y-%m-%d')} "
          f"(random weights; median of {cycles} cycles)\n")
    print(table)
    return results


if __name__ == "__main__":
    main()
