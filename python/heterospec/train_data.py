"""Training data for an EAGLE-3 head: token sequences, the target's own answers, and the target
pass cached on disk in shards. Every stage is resumable: rerunning it continues where it stopped.

Sequences come from two sources:

* **ShareGPT conversations** formatted with the target's chat template and cut at ``max_len``
  tokens (the labels are still the target's own distributions at every position);
* **self-distillation**: the target's greedy answers to the conversations' first user turns
  (lean batched generation), which is the text the head drafts for at inference; the forwards
  that choose the answer tokens also give their labels and states (no second pass).

The **target pass** runs each sequence through the target once (the lean CPU forward where the
model supports it, else the HF module) and stores, per token:

* ``states``: the inputs of the three captured decoder layers, ``[T, 3H]`` in the target's dtype
  (bfloat16: exactly what the drafter receives at inference);
* ``top_ids`` / ``top_logp``: the target's ``topk`` most likely next tokens (int32) and their
  log-probabilities (float16), ``[T, topk]``: the soft labels;
* ``tokens``: the sequence itself (int32).

Shards of about ``shard_tokens`` tokens (whole sequences) are written as ``shard-NNNNN.pt`` with a
``manifest.json``; a finished shard is never recomputed. Disk use is about
``(3H * 2 + topk * 6 + 4)`` bytes per token: 3.7 KB for SmolLM2 with ``topk = 32``.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Iterable, List, Optional

import torch

import heterospec_ext as hx

from .target import CausalLM

DATA_VERSION = 2


def stable_key(*parts) -> str:
    """A short hash of JSON-able parts (identifies what a stage's output was made from)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _write_json(path: str, obj) -> None:
    """Atomic JSON write (a crash never leaves a half-written file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- sequences


def conversation_messages(conv: dict) -> List[dict]:
    """ShareGPT ``{"conversations": [{"from", "value"}]}`` as chat-template messages."""
    roles = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
             "bard": "assistant", "bing": "assistant", "assistant": "assistant",
             "system": "system"}
    out = []
    for turn in conv.get("conversations", []) or []:
        role = roles.get(str(turn.get("from", "")).lower())
        text = turn.get("value")
        if role is None or not isinstance(text, str) or not text.strip():
            continue
        out.append({"role": role, "content": text})
    return out


def _template_ids(tokenizer, messages: List[dict], add_generation_prompt=False) -> List[int]:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, tokenize=True,
                                            add_generation_prompt=add_generation_prompt)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]
    text = "\n\n".join(m["content"] for m in messages)
    return [int(t) for t in tokenizer(text).input_ids]


def encode_conversation(tokenizer, messages: List[dict]) -> List[int]:
    return _template_ids(tokenizer, messages)


def conversation_sequences(tokenizer, conversations: Iterable[dict], max_tokens: int,
                           max_len: int, min_len: int = 16) -> List[List[int]]:
    """Templated conversations with an assistant turn, cut at ``max_len`` tokens, until
    ``max_tokens`` tokens are collected."""
    seqs, total = [], 0
    if max_tokens <= 0:
        return seqs
    for conv in conversations:
        messages = conversation_messages(conv)
        if not any(m["role"] == "assistant" for m in messages):
            continue
        ids = encode_conversation(tokenizer, messages)[:max_len]
        if len(ids) < min_len:
            continue
        seqs.append(ids)
        total += len(ids)
        if total >= max_tokens:
            break
    return seqs


def user_prompts(tokenizer, conversations: Iterable[dict], prompt_max: int) -> List[List[int]]:
    """The first user turn of each conversation, as a generation prompt (chat template), when it
    has 4 to ``prompt_max`` tokens."""
    out = []
    for conv in conversations:
        first = next((m for m in conversation_messages(conv) if m["role"] == "user"), None)
        if first is None:
            continue
        ids = _template_ids(tokenizer, [first], add_generation_prompt=True)
        if 4 <= len(ids) <= prompt_max:
            out.append(ids)
    return out


# ----------------------------------------------------------------------------- target pass


class ShardSet:
    """The shards of one target pass (``directory/manifest.json`` + ``shard-NNNNN.pt``)."""

    def __init__(self, directory: str):
        self.directory = directory
        with open(os.path.join(directory, "manifest.json")) as f:
            self.manifest = json.load(f)

    @property
    def shards(self) -> List[dict]:
        return self.manifest["shards"]

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)

    def load(self, index: int) -> dict:
        """Shard ``index``: ``tokens`` ``[T]`` int32, ``offsets`` ``[S + 1]`` int64,
        ``states`` ``[T, 3H]``, ``top_ids`` ``[T, K]`` int32, ``top_logp`` ``[T, K]`` float16."""
        return torch.load(os.path.join(self.directory, self.shards[index]["file"]),
                          weights_only=True)

    def greedy_counts(self, vocab_size: int) -> torch.Tensor:
        """How often each token is the target's greedy (top-1) next token, ``[V]`` int64."""
        counts = torch.zeros(vocab_size, dtype=torch.int64)
        for i in range(len(self.shards)):
            counts += torch.bincount(self.load(i)["top_ids"][:, 0].long(), minlength=vocab_size)
        return counts


class ShardUnion(ShardSet):
    """Several shard sets seen as one (training on ShareGPT and target-answer shards)."""

    def __init__(self, sets: List[ShardSet]):
        self.sets = sets
        self._index = [(s, i) for s in sets for i in range(len(s.shards))]

    @property
    def shards(self) -> List[dict]:
        return [s.shards[i] for s, i in self._index]

    def load(self, index: int) -> dict:
        s, i = self._index[index]
        return s.load(i)


class ShardWriter:
    """Appends per-sequence records to shards of about ``shard_tokens`` tokens under
    ``directory``, with a ``manifest.json`` rewritten atomically after each shard. ``key``
    identifies what the shards are made from: an existing directory with another key is an
    error, one with the same key is resumed (``manifest["shards"]`` lists what is done)."""

    def __init__(self, directory: str, key: str, shard_tokens: int, meta: dict):
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.path = os.path.join(directory, "manifest.json")
        self.shard_tokens = shard_tokens
        self.manifest = {"key": key, **meta, "shards": [], "complete": False}
        if os.path.isfile(self.path):
            with open(self.path) as f:
                old = json.load(f)
            if old.get("key") != key:
                raise ValueError(f"{directory} holds a target pass of other data or another "
                                 "model; use a fresh --work-dir")
            self.manifest = old
        self._records: List[dict] = []
        self._tokens = 0

    @property
    def complete(self) -> bool:
        return self.manifest["complete"]

    def add(self, record: dict) -> None:
        """``record``: ``tokens`` (list or ``[T]``), ``states`` ``[T, 3H]``, ``top_ids``
        ``[T, K]``, ``top_logp`` ``[T, K]``, ``ref`` (what the manifest records as done) and
        optionally ``answer_tokens`` (recorded per shard)."""
        self._records.append(record)
        self._tokens += len(record["tokens"])
        if self._tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self._records:
            return
        recs, self._records, count, self._tokens = self._records, [], self._tokens, 0
        lengths = torch.tensor([len(r["tokens"]) for r in recs], dtype=torch.int64)
        shard = {"tokens": torch.cat([torch.as_tensor(r["tokens"], dtype=torch.int32)
                                      for r in recs]),
                 "offsets": torch.cat((torch.zeros(1, dtype=torch.int64), lengths.cumsum(0))),
                 "states": torch.cat([r["states"] for r in recs]),
                 "top_ids": torch.cat([r["top_ids"].to(torch.int32) for r in recs]),
                 "top_logp": torch.cat([r["top_logp"].to(torch.float16) for r in recs])}
        name = f"shard-{len(self.manifest['shards']):05d}.pt"
        torch.save(shard, os.path.join(self.directory, name + ".tmp"))
        os.replace(os.path.join(self.directory, name + ".tmp"),
                   os.path.join(self.directory, name))
        entry = {"file": name, "tokens": count, "refs": [r["ref"] for r in recs]}
        if all("answer_tokens" in r for r in recs):
            entry["answer_tokens"] = [r["answer_tokens"] for r in recs]
        self.manifest["shards"].append(entry)
        _write_json(self.path, self.manifest)

    def done_refs(self) -> set:
        return {ref for shard in self.manifest["shards"] for ref in shard["refs"]}

    def finish(self, **meta) -> ShardSet:
        self.flush()
        self.manifest.update(meta)
        self.manifest["complete"] = True
        _write_json(self.path, self.manifest)
        return ShardSet(self.directory)


def _sequence_forward(target: CausalLM, verifier, ids: torch.Tensor):
    """Logits ``[T, V]`` and captured states ``[T, 3H]`` of one causal forward of ``ids``."""
    verifier.reset()
    target.captured_hidden = None
    logits = verifier.prefill(ids, last_only=False)
    return logits, target.captured_hidden


def _meta(target: CausalLM, layers, topk) -> dict:
    return {"target": target.name, "dtype": str(target.dtype).replace("torch.", ""),
            "layers": list(layers), "topk": topk}


@torch.inference_mode()
def target_pass(target: CausalLM, seqs: List[List[int]], layers: List[int], directory: str,
                topk: int = 32, shard_tokens: int = 32768,
                progress: Optional[Callable[[int], None]] = None) -> ShardSet:
    """Run ``seqs`` through the target and store states and top-``topk`` labels in shards under
    ``directory`` (see the module docstring), in order. Resumable; a directory made from other
    data or another model is an error, not overwritten."""
    from .verifier import make_verifier

    key = stable_key(DATA_VERSION, "pass", target.name, str(target.dtype), list(layers), topk,
                     shard_tokens, len(seqs), stable_key(seqs))
    writer = ShardWriter(directory, key, shard_tokens,
                         {**_meta(target, layers, topk), "sequences": len(seqs)})
    done = writer.done_refs()
    if progress:
        progress(sum(len(s) for i, s in enumerate(seqs) if i in done))
    if writer.complete:
        return ShardSet(directory)
    target.capture_hidden_states(layers)
    verifier = make_verifier(target)
    for i, s in enumerate(seqs):
        if i in done:
            continue
        ids = torch.tensor(s, dtype=torch.int64, device=target.device)
        logits, hidden = _sequence_forward(target, verifier, ids)
        stats = hx.draft_topk_entropy(logits, topk, 1.0)
        writer.add({"ref": i, "tokens": s, "states": hidden.to(target.dtype).cpu(),
                    "top_ids": stats.topk_ids.cpu(), "top_logp": stats.topk_logprobs.cpu()})
        if progress:
            progress(len(s))
    return writer.finish()


@torch.inference_mode()
def answer_pass(target: CausalLM, prompts: List[List[int]], layers: List[int], directory: str,
                max_tokens: int, max_new: int, batch: int, topk: int = 32,
                shard_tokens: int = 32768, progress: Optional[Callable[[int], None]] = None
                ) -> ShardSet:
    """Self-distillation data in one pass: the target's greedy answers to ``prompts`` (prompt
    order, until ``max_tokens`` answer tokens) and, from the same forwards, the states and
    top-``topk`` labels of every position of prompt + answer. Lean batched generation
    (:class:`~heterospec.lean_target.BatchGreedyGenerator`, ``batch`` sequences at a time);
    resumable by prompt (finished prompts are skipped on a rerun)."""
    from .lean_target import BatchGreedyGenerator

    key = stable_key(DATA_VERSION, "answers", target.name, str(target.dtype), list(layers), topk,
                     shard_tokens, max_new, stable_key(prompts))
    writer = ShardWriter(directory, key, shard_tokens,
                         {**_meta(target, layers, topk), "max_new": max_new,
                          "prompts": len(prompts)})
    done = writer.done_refs()
    produced = sum(int(a) for shard in writer.manifest["shards"]
                   for a in shard.get("answer_tokens", []))
    if progress:
        progress(min(produced, max_tokens))
    if writer.complete and writer.manifest.get("max_tokens", 0) >= max_tokens:
        return ShardSet(directory)
    writer.manifest["complete"] = False
    target.capture_hidden_states(layers)
    todo = [i for i in range(len(prompts)) if i not in done]
    capacity = max(len(prompts[i]) for i in todo) + max_new if todo else 1
    gen = BatchGreedyGenerator(target, batch, capacity)

    def feed():
        for i in todo:
            if produced >= max_tokens:  # read lazily: the budget stops new prompts
                return
            yield i, prompts[i]

    for rec in gen.run_stream(feed(), max_new, target.tokenizer.eos_token_id, topk):
        i = rec["index"]
        n_answer = len(rec["tokens"]) - len(prompts[i])
        produced += n_answer
        writer.add({"ref": i, "answer_tokens": n_answer, "tokens": rec["tokens"],
                    "states": rec["states"].cpu(), "top_ids": rec["top_ids"].cpu(),
                    "top_logp": rec["top_logp"].cpu()})
        if progress:
            progress(n_answer)
    return writer.finish(max_tokens=max_tokens, answer_tokens=produced)
