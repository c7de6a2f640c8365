"""Argument checks of the ``heterospec`` CLI. All of them run before any model loads:

* argparse ``type=`` functions (:func:`int_in`, :func:`float_in`, :func:`comma_list`,
  :func:`draft_spec`) reject a bad value while the command line is parsed
  (``argument --flag: ...``);
* :func:`check_args` checks what needs several flags or a look at the machine (method / draft /
  policy combinations, the device, the prompt sets), then the files (:func:`check_paths`: inputs
  exist, outputs can be written), and raises :class:`~heterospec.errors.UsageError` naming the
  flag.

:func:`fit_to_context` is the one check that needs the loaded model (its context length).
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Callable, Optional, Sequence

from .errors import ContextLengthError, UsageError

# Counts and sizes past int32 overflow tensor index math long before they make sense.
INT_MAX = 2**31 - 1
# torch.Generator.manual_seed takes an unsigned 64-bit seed.
SEED_MAX = 2**64 - 1
# Sanity limit: every draft level is one sequential draft forward per cycle (EAGLE uses 5-8).
MAX_DEPTH = 64
# fused_verify's CUDA kernel verifies at most 4096 tree nodes per request (see README).
MAX_TREE_TOKENS = 4096
# draft_topk_entropy returns at most 64 candidates per row.
MAX_TREE_TOP_K = 64


# ----------------------------------------------------------------------------- argparse types


def _range_text(lo, hi, lo_open=False) -> str:
    low = f"> {lo}" if lo_open else f">= {lo}"
    return low if hi in (math.inf, INT_MAX) else f"{low} and <= {hi}"


def int_in(lo: int, hi: int = INT_MAX) -> Callable[[str], int]:
    """argparse type: a base-10 integer in ``[lo, hi]``."""
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not lo <= value <= hi:
            bound = _range_text(lo, hi) if value < lo else f"<= {hi}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value
    return parse


def float_in(lo: float, hi: float = math.inf, *, lo_open: bool = False) -> Callable[[str], float]:
    """argparse type: a finite number ``>= lo`` (``> lo`` with ``lo_open``) and ``<= hi``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        above = value > lo if lo_open else value >= lo
        if not (math.isfinite(value) and above and value <= hi):
            raise argparse.ArgumentTypeError(
                f"must be a finite number {_range_text(lo, hi, lo_open)}, got {text}")
        return value
    return parse


def tree_spec(text: str):
    """argparse type: a static tree ``DEPTH,TOP_K,TOTAL_TOKENS`` -> a tuple of three ints, each
    in the range of ``--depth``, ``--tree-top-k`` and ``--total-tokens``."""
    parts = [part.strip() for part in text.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(
            f"expected DEPTH,TOP_K,TOTAL_TOKENS (three integers), got {text!r}")
    limits = (("DEPTH", 1, MAX_DEPTH), ("TOP_K", 1, MAX_TREE_TOP_K),
              ("TOTAL_TOKENS", 2, MAX_TREE_TOKENS))
    values = []
    for part, (name, lo, hi) in zip(parts, limits):
        try:
            values.append(int_in(lo, hi)(part))
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{name}: {e}") from None
    return tuple(values)


def comma_list(choices: Optional[Sequence[str]] = None,
               item: Optional[Callable[[str], object]] = None) -> Callable[[str], str]:
    """argparse type: a comma-separated list of distinct items, each one of ``choices`` or
    accepted by the ``item`` type. Returns the list re-joined with commas (the form the
    commands split again), so ``"0, 1"`` becomes ``"0,1"``."""
    def parse(text: str) -> str:
        items = [part.strip() for part in text.split(",")]
        if not text.strip() or any(not part for part in items):
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list without empty items, got {text!r}")
        values = []
        for part in items:
            if choices is not None and part not in choices:
                raise argparse.ArgumentTypeError(
                    f"unknown item {part!r}; choose from {', '.join(choices)}")
            values.append(item(part) if item is not None else part)
        if len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"repeated item in {text!r}")
        return ",".join(items)
    return parse


def draft_spec(text: str) -> str:
    """argparse type: ``--draft``: ``int8``, ``eagle3``, ``model:PATH`` or ``eagle3:DIR`` (the
    path is checked by :func:`check_paths`)."""
    if text in ("int8", "eagle3"):
        return text
    for prefix in ("model:", "eagle3:"):
        if text.startswith(prefix):
            if not text[len(prefix):]:
                raise argparse.ArgumentTypeError(f"{prefix} needs a path, got {text!r}")
            return text
    raise argparse.ArgumentTypeError(
        f"expected int8, eagle3, model:PATH or eagle3:DIR, got {text!r}")


# ----------------------------------------------------------------------------- before loading


def _writable_parent(path: str) -> Optional[str]:
    """Why ``path`` cannot be created (its nearest existing ancestor is not a writable
    directory), or None."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is not a directory"
    if not os.access(parent, os.W_OK):
        return f"directory {parent} is not writable"
    return None


def check_output(flag: str, path: Optional[str], is_dir: bool = False) -> None:
    """An output file (or directory with ``is_dir``) that can be written: not the other kind of
    thing already, in a directory that exists or can be made."""
    if path is None:
        return
    full = os.path.expanduser(path)
    if os.path.exists(full) and os.path.isdir(full) != is_dir:
        raise UsageError(f"{flag} {path} is a {'file' if is_dir else 'directory'}; expected a "
                         f"{'directory' if is_dir else 'file name'}")
    problem = _writable_parent(full)
    if problem:
        raise UsageError(f"{flag} {path}: cannot write there: {problem}")


def check_paths(args) -> None:
    """Inputs exist and outputs can be written (before hours of work, not after)."""
    if args.model is not None and not os.path.exists(os.path.expanduser(args.model)):
        raise UsageError(f"--model: model path does not exist: {args.model} (expected a .gguf "
                         "file or a local Hugging Face model directory)")
    draft = args.draft if args.command != "train-draft" else "int8"  # train-draft ignores it
    for prefix, what in (("model:", "draft model path"), ("eagle3:", "EAGLE-3 head directory")):
        if draft.startswith(prefix) and not os.path.exists(os.path.expanduser(draft[len(prefix):])):
            raise UsageError(f"--draft {draft}: the {what} does not exist: {draft[len(prefix):]}")
    policy = getattr(args, "policy", "static")
    if policy not in ("static", "heterospec") and not os.path.isfile(os.path.expanduser(policy)):
        raise UsageError(f"--policy: policy file not found: {policy} (expected static, "
                         "heterospec or a policy JSON file)")
    if getattr(args, "init_from", None) and not os.path.isdir(os.path.expanduser(args.init_from)):
        raise UsageError(f"--init-from: checkpoint directory does not exist: {args.init_from}")
    if args.command == "calibrate":
        check_output("--out", args.out)
        check_output("--cost-aware-out", args.cost_aware_out)
    elif args.command == "train-draft":
        check_output("--out", args.out, is_dir=True)
        check_output("--work-dir", args.work_dir, is_dir=True)
    elif args.command == "bench":
        if args.cost_policy is not None and not os.path.isfile(os.path.expanduser(args.cost_policy)):
            raise UsageError(f"--cost-policy: policy file not found: {args.cost_policy}")
        check_output("--out-json", args.out_json)
        check_output("--figure", args.figure)


def check_device(spec: str) -> None:
    """``--device``: cpu, or cuda[:N] with a CUDA torch, CUDA kernels in heterospec_ext and a
    visible GPU; the message names what is missing."""
    if spec == "cpu":  # the default: no need to import torch for it
        return
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {spec!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise UsageError(f"--device {spec}: heterospec's kernels run on cpu and cuda only")
    if torch.version.cuda is None:
        raise UsageError(f"--device {spec}: this torch ({torch.__version__}) is built without "
                         "CUDA; install a CUDA build of torch or use --device cpu")
    import heterospec_ext

    if not heterospec_ext.build_info()["with_cuda"]:
        raise UsageError(f"--device {spec}: heterospec_ext was built without CUDA kernels; "
                         "rebuild it with HX_BUILD=cuda (README: Install)")
    count = torch.cuda.device_count()
    if count == 0:
        raise UsageError(f"--device {spec}: no CUDA device is visible")
    if device.index is not None and device.index >= count:
        raise UsageError(f"--device {spec}: only {count} CUDA device(s) are visible")


def check_prompt_text(flag: str, text: str) -> None:
    """``--prompt`` / ``--chat``: some text, encodable as UTF-8."""
    if not text.strip():
        raise UsageError(f"{flag} is empty; give some text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{flag} is not valid UTF-8 text") from None


def check_prompt_sets(sets: str, per_set: int, offset: int) -> None:
    """``--sets`` / ``--prompts-per-set`` / ``--prompt-offset``: every set holds that many
    prompts from that offset on (reads the prompt files, not the model)."""
    from .prompts import load_prompts

    for name in sets.split(","):
        found = len(load_prompts(name, per_set, offset=offset))
        if found < per_set:
            raise UsageError(
                f"--prompts-per-set {per_set} --prompt-offset {offset}: prompt set {name} has "
                f"only {found} prompts from there")


def check_args(args) -> None:
    """The checks that need more than one flag or a look at the machine, then
    :func:`check_paths`; raises :class:`UsageError` naming the flag. Loads no model."""
    command = args.command
    check_device(args.device)
    if command != "train-draft" and args.draft == "int8" and \
            not str(args.device).startswith("cpu"):
        raise UsageError(f"--draft int8 (dynamic int8 quantisation) runs on CPU only; with "
                         f"--device {args.device} use --draft model:PATH or eagle3")
    if command == "generate":
        if args.chat is not None:
            check_prompt_text("--chat", args.chat)
        else:
            check_prompt_text("--prompt", args.prompt)
        if args.cuda_graphs and not str(args.device).startswith("cuda"):
            raise UsageError(
                f"--cuda-graphs needs --device cuda, got --device {args.device}; on CPU the "
                "driver runs eagerly (drop --cuda-graphs)")
    elif command == "bench":
        methods = (args.methods or "").split(",")
        if "cost" in methods and not args.cost_policy:
            raise UsageError("--methods cost needs --cost-policy FILE (a cost-aware policy JSON)")
        if args.policy == "static" and ("heterospec" in methods or "ded" in methods):
            raise UsageError("--methods heterospec/ded need an adaptive --policy (heterospec or "
                             "a policy JSON), not 'static'")
        if "hf_assisted" in methods and args.draft.split(":")[0] not in ("int8", "model"):
            raise UsageError("--methods hf_assisted needs a whole draft model (--draft int8 or "
                             f"model:PATH), not --draft {args.draft}")
        if args.figure:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise UsageError("--figure needs matplotlib: pip install matplotlib") from None
        check_prompt_sets(args.sets, args.prompts_per_set, args.prompt_offset)
    elif command == "train-draft":
        if args.max_tokens == 0 and args.regenerate_tokens == 0:
            raise UsageError("--max-tokens must be > 0 (or collect --regenerate-tokens instead)")
    check_paths(args)


# ----------------------------------------------------------------------------- after loading


def context_models(target, drafter) -> list:
    """The models whose context a request must fit: the target, and a whole draft model."""
    lm = getattr(drafter, "lm", None)
    return [target] + ([lm] if lm is not None and lm is not target else [])


def check_fits(models, prompt_tokens: int, max_new_tokens: int, tree_tokens: int,
               hint: str) -> None:
    """:func:`~heterospec.target.check_context` for every model, with ``hint`` (the flags that
    fix it) appended to the error."""
    from .target import check_context

    try:
        for lm in models:
            check_context(lm, prompt_tokens, max_new_tokens, tree_tokens)
    except ContextLengthError as exc:
        raise ContextLengthError(f"{exc}; {hint}") from None


def fit_to_context(ids, models, max_new_tokens: int, tree_tokens: int, truncate: str):
    """``ids`` (``[n]`` int64 prompt) if prompt + ``max_new_tokens`` + ``tree_tokens`` fit the
    context of every model in ``models``; with ``truncate == "left"`` the prompt's last tokens
    that fit; otherwise :class:`ContextLengthError` naming the flags."""
    limits = [lm.context_length for lm in models if getattr(lm, "context_length", None)]
    room = min(limits) - max_new_tokens - tree_tokens if limits else None
    if truncate == "left" and room is not None and 0 < room < ids.numel():
        return ids[-room:]
    hint = "lower --max-new-tokens" if truncate == "left" else \
        "shorten the prompt, lower --max-new-tokens or pass --truncate-prompt left"
    check_fits(models, ids.numel(), max_new_tokens, tree_tokens, hint)
    return ids
