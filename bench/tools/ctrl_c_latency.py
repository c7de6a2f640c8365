"""How long Ctrl-C takes to stop a long prefill, chunked (the driver) vs one whole forward.

Python raises KeyboardInterrupt only between kernels, so the latency is the longest single kernel
of the prefill. The script loads SmolLM2-135M-Instruct (the default model), encodes a prompt of
about 8100 tokens (within its 8192 context), and for each mode

* times one full prefill (``CausalLM.causal_forward(ids[:-1], cache, last_only=True)``), then
* sends itself SIGINT ``--delays`` seconds into fresh prefills and reports how long after the
  signal the KeyboardInterrupt arrived.

    python bench/tools/ctrl_c_latency.py --threads 2

Writes a markdown table to stdout (for bench/RESULTS.md)."""
import argparse
import os
import signal
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))
import heterospec as hs  # noqa: E402
from heterospec.target import PREFILL_CHUNK  # noqa: E402


def interrupt_latency(target, ids, chunk, delay):
    """Seconds from SIGINT (sent ``delay`` s into the prefill) to KeyboardInterrupt, or None if
    the prefill finished first."""
    sent = []

    def fire():
        sent.append(time.perf_counter())
        os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Timer(delay, fire)
    timer.start()
    try:
        target.causal_forward(ids, target.new_cache(), last_only=True, chunk=chunk)
    except KeyboardInterrupt:
        return time.perf_counter() - sent[0]
    timer.cancel()
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--delays", default="2,5", help="seconds into the prefill, comma-separated")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    target = hs.load_target()
    ids = target.tokenizer("hello world " * 4050, return_tensors="pt").input_ids[0][:-1]
    delays = [float(d) for d in args.delays.split(",")]
    print(f"prompt: {ids.numel()} tokens, threads {args.threads}, torch {torch.__version__}")
    print("\n| prefill | full prefill s | " + " | ".join(f"SIGINT at {d:g} s: latency s"
                                                       for d in delays) + " |")
    print("|---|---|" + "---|" * len(delays))
    for label, chunk in ((f"chunks of {PREFILL_CHUNK} (driver)", PREFILL_CHUNK),
                         ("one forward (before)", ids.numel())):
        t0 = time.perf_counter()
        target.causal_forward(ids, target.new_cache(), last_only=True, chunk=chunk)
        full = time.perf_counter() - t0
        lat = [interrupt_latency(target, ids, chunk, d) for d in delays]
        print(f"| {label} | {full:.1f} | " + " | ".join(
            "finished first" if v is None else f"{v:.3f}" for v in lat) + " |", flush=True)


if __name__ == "__main__":
    main()
