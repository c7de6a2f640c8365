"""GPU benchmark of every heterospec op against the PyTorch composition it replaces.

Run on a machine with a CUDA GPU (bench/gpu_check.sh does):

    python bench/tools/gpu_bench.py --out results.json

Each bench/micro/bench_<op>.py provides ``gpu_cases(device)``: a list of dicts with ``name``,
``fused`` and ``composition`` (zero-argument callables) and ``bytes`` (what any implementation
must read). Each callable is timed by replaying a CUDA graph of ``--graph-calls`` back-to-back
calls (launch overhead excluded, as in a captured decode step); callables that cannot be captured
(host syncs in a composition) are timed eagerly, and the table says which. Achieved bandwidth
counts ``bytes`` only; the copy bandwidth counts bytes read plus bytes written by a 2 GiB
device-to-device copy, the usual "memcpy bandwidth" figure.
"""
import argparse
import importlib.util
import json
import os
import sys
import time

import torch

# The microbenchmarks, whose gpu_cases() this script times.
MICRO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "micro")
OPS = ("draft_topk_entropy", "stratify", "build_tree", "fused_verify")


def load_bench_module(op):
    path = os.path.join(MICRO, f"bench_{op}.py")
    spec = importlib.util.spec_from_file_location(f"bench_{op}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, MICRO)  # bench modules import each other's compositions
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.pop(0)
    return mod


def copy_bandwidth(device, nbytes=2 << 30, iters=20):
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / iters
    return 2 * nbytes / seconds  # read + write


def time_graph(fn, calls, replays):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / calls)
    samples.sort()
    return samples[len(samples) // 2]


def time_eager(fn, iters):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def time_callable(fn, calls, replays):
    try:
        return time_graph(fn, calls, replays), "graph"
    except Exception:  # noqa: BLE001 - compositions with host syncs cannot be captured
        torch.cuda.synchronize()
        return time_eager(fn, calls * 2), "eager"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the full results as JSON here")
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--graph-calls", type=int, default=20)
    parser.add_argument("--replays", type=int, default=15)
    parser.add_argument("--filter", default="", help="only cases whose name contains this")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "gpu_bench.py needs a CUDA GPU"
    import heterospec_ext  # noqa: F401  (registers the ops)

    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    copy_bw = copy_bandwidth(device)
    results = {
        "device": props.name, "sms": props.multi_processor_count,
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "copy_bandwidth_GBps": copy_bw / 1e9, "cases": [],
    }
    print(f"# {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
          f"device-to-device copy {copy_bw / 1e9:.0f} GB/s (read+write)", flush=True)
    for op in args.ops.split(","):
        try:
            cases = load_bench_module(op).gpu_cases(device)
        except Exception as exc:  # noqa: BLE001
            print(f"{op}: gpu_cases failed: {type(exc).__name__}: {exc}", flush=True)
            results["cases"].append({"op": op, "error": f"{type(exc).__name__}: {exc}"})
            continue
        for case in cases:
            if args.filter and args.filter not in case["name"]:
                continue
            row = {"op": op, "name": case["name"], "bytes": case["bytes"]}
            try:
                row["fused_us"], row["fused_timing"] = time_callable(
                    case["fused"], args.graph_calls, args.replays)
                row["composition_us"], row["composition_timing"] = time_callable(
                    case["composition"], max(2, args.graph_calls // 4), args.replays)
                row["GBps"] = case["bytes"] / (row["fused_us"] * 1e-6) / 1e9
                row["frac_copy_bw"] = row["GBps"] * 1e9 / copy_bw
                row["speedup"] = row["composition_us"] / row["fused_us"]
            except Exception as exc:  # noqa: BLE001
                row["error"] = f"{type(exc).__name__}: {exc}"
            results["cases"].append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.synchronize()

    lines = [
        f"| case | fused µs | composition µs | speedup | GB/s read | of copy BW |",
        f"|---|---|---|---|---|---|",
    ]
    for row in results["cases"]:
        if "error" in row:
            lines.append(f"| {row.get('name', row['op'])} | error: {row['error'][:80]} | | | | |")
            continue
        mark = "" if row["composition_timing"] == "graph" else " (eager)"
        lines.append(
            f"| {row['name']} | {row['fused_us']:.1f} | {row['composition_us']:.1f}{mark} | "
            f"{row['speedup']:.1f}× | {row['GBps']:.0f} | {100 * row['frac_copy_bw']:.0f}% |")
    table = "\n".join(lines)
    results["table"] = table
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print(f"\n## {props.name}, {results['date']}, copy bandwidth "
          f"{copy_bw / 1e9:.0f} GB/s (read+write)\n")
    print(table)


if __name__ == "__main__":
    main()
