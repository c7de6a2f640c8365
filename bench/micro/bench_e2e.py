"""End-to-end driver benchmark.

As a script (the numbers in bench/RESULTS.md)::

    python bench/micro/bench_e2e.py [heterospec bench flags...]
    # = heterospec bench --threads 2 --prompts-per-set 2 --max-new-tokens 64 --repeats 3

runs AR, the static tree, HeteroSpec and HF assisted generation (same int8 draft) on real
HumanEval / GSM8K / MT-bench prompts with SmolLM2-135M-Instruct and prints the table.

Under pytest (``pytest bench``) it is a quick pytest-benchmark of one decode on a small randomly
initialised Llama pair, so the benchmark smoke run stays fast.
"""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_ARGS = ["--threads", "2", "--prompts-per-set", "2", "--max-new-tokens", "64",
                "--repeats", "3"]


def _import_heterospec():
    try:
        import heterospec
    except ImportError:  # source tree without an install
        sys.path.insert(0, os.path.join(ROOT, "python"))
        import heterospec
    return heterospec


def test_e2e_tiny_decode(benchmark):
    hs = _import_heterospec()
    from heterospec.testing import tiny_llama

    target = hs.CausalLM(tiny_llama(vocab=64, seed=0))
    draft = hs.CausalLM(tiny_llama(vocab=64, seed=1))
    gen = hs.SpeculativeGenerator(target, hs.ModelDrafter(draft, top_k=3),
                                  hs.HeteroSpec(depth=3, top_k=3, total_tokens=10))
    ref = hs.autoregressive_generate(target, [1, 2, 3], 16).token_ids
    res = benchmark(lambda: gen.generate([1, 2, 3], 16))
    assert res.token_ids == ref


if __name__ == "__main__":
    _import_heterospec()
    from heterospec.cli import main

    sys.exit(main(["bench", *(sys.argv[1:] or DEFAULT_ARGS)]))
