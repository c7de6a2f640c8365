"""Train an EAGLE-3-style draft head for a target model, in plain PyTorch on CPU.

Pipeline (``heterospec train-draft``; every stage resumes where it stopped, in ``work_dir``):

1. **Data** (:mod:`heterospec.train_data`). Training sequences: ShareGPT conversations (chat
   template, cut at ``max_len``) and the target's own greedy answers to their first user turns.
   Held-out sequences, from conversations never trained on: ShareGPT conversations, and the
   target's greedy answers to held-out prompts.
2. **Target pass**, cached on disk in shards: captured states of the three EAGLE-3 layers and the
   target's top-``topk_labels`` next-token log-probs per position.
3. **Draft vocabulary**: the ``draft_vocab`` tokens the target most often predicts (its greedy
   tokens on the training data) plus the special tokens; ``d2t``/``t2d`` as in the official
   layout. The coverage of held-out greedy tokens is recorded for several sizes.
4. **Training-time test.** ``ttt_steps`` unrolled steps. Step 0, entry j: ``fc`` of the target
   states of token j with the embedding of token j + 1, position j. Step k: the head's own step
   k - 1 output state at entry j with the embedding of token j + k + 1, position j + k; it
   attends to the step-0 entries 0..j and to its own earlier steps at entry j (its ancestors),
   exactly what a depth-k tree node sees at inference. The label of step k at entry j is the
   target's distribution at position j + k + 1 (its top-``topk_labels``, renormalised over the
   draft vocabulary); entries whose target greedy token is outside the draft vocabulary are
   masked. Step k's loss weighs ``step_decay ** k``. AdamW, warmup, cosine decay, bfloat16
   autocast where the CPU has native bf16.
5. **Checkpoints and evaluation.** ``checkpoint.pt`` (head, optimiser, data cursor, RNG) every
   ``checkpoint_every`` steps and at each epoch end; after each epoch the per-step acceptance
   (draft top-1 = target top-1) on both held-out sets goes into ``TRAINING.json`` and the head is
   written in the official EAGLE-3 layout that :class:`~heterospec.Eagle3Drafter` loads.

The head reuses the target's frozen token embedding; ``norm``/``lm_head`` start as the target's
final norm and output rows.

Capacity experiment: ``head_layers = 2`` stacks a plain Llama decoder layer (``layers.0.*``)
after the mid layer; it unrolls like the mid layer, over its own keys and values. Its residual
branches start at zero, so warm-started from a one-layer head it starts as that head. Such heads
are evaluated here only: the drafter runs one-layer heads and refuses them. ``max_steps`` caps a
run (the learning-rate schedule spans the cap), for experiments at an equal step budget.
"""
from __future__ import annotations

import math
import os
import platform
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F

from .eagle3 import Eagle3Head, default_capture_layers, eagle3_config
from .errors import DataError
from .target import CausalLM, native_bf16_cpu
from .train_data import (ShardSet, ShardUnion, _write_json, answer_pass, conversation_sequences,
                         stable_key, target_pass, user_prompts)


@dataclass
class TrainConfig:
    """Data, draft vocabulary and optimisation settings (defaults: the shipped head)."""

    max_tokens: int = 2_000_000      # ShareGPT conversation tokens to train on
    regenerate_tokens: int = 1_000_000  # target-answer tokens to train on (self-distillation)
    max_len: int = 768               # tokens per conversation (longer ones are cut)
    min_len: int = 16
    regenerate_max_new: int = 256
    regenerate_batch: int = 32
    regenerate_prompt_max: int = 256
    offset: int = 0                  # first training conversation
    heldout_offset: int = 16000      # first held-out conversation (never trained on)
    heldout_conversations: int = 100
    heldout_prompts: int = 100
    topk_labels: int = 32
    shard_tokens: int = 32768
    draft_vocab: int = 8192
    epochs: int = 3
    ttt_steps: int = 3
    step_decay: float = 0.8
    batch_tokens: int = 4096         # padded tokens per optimiser step
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    save_dtype: str = "float16"
    checkpoint_every: int = 200      # optimiser steps
    max_steps: int = 0               # stop (and evaluate) after this many steps; 0: all epochs
    head_layers: int = 1             # 1: EAGLE-3 (drafting); 2: a stacked layer (experiment)
    capture_layers: Optional[List[int]] = None
    init_from: Optional[str] = None  # start from this head checkpoint (keeps its draft vocab)
    autocast: str = "auto"           # bfloat16 autocast: auto (native bf16 CPUs), on, off

    def check(self) -> None:
        for name in ("max_len", "draft_vocab", "epochs", "ttt_steps", "batch_tokens",
                     "topk_labels", "shard_tokens", "checkpoint_every", "regenerate_batch",
                     "regenerate_max_new"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_tokens < 0 or self.regenerate_tokens < 0:
            raise ValueError("max_tokens and regenerate_tokens must be >= 0")
        if self.max_tokens == 0 and self.regenerate_tokens == 0:
            raise ValueError("max_tokens and regenerate_tokens are both 0: no training data")
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        if self.head_layers not in (1, 2):
            raise ValueError(f"head_layers must be 1 or 2, got {self.head_layers}")
        if self.topk_labels > 64:
            raise ValueError(f"topk_labels must be <= 64, got {self.topk_labels}")


# ----------------------------------------------------------------------------- vocabulary


def choose_draft_vocab(counts: torch.Tensor, size: int, always: Iterable[int] = ()
                       ) -> torch.Tensor:
    """The ``size`` ids with the highest ``counts`` (``[V]``; ties to the lower id) plus
    ``always``, ascending, as int64 ``[size]``."""
    vocab_size = counts.numel()
    size = min(size, vocab_size)
    counts = counts.double().clone()
    for t in always:
        if 0 <= int(t) < vocab_size:
            counts[int(t)] = float("inf")
    # stable sort on -count keeps ties in id order
    order = torch.sort(-counts, stable=True).indices[:size]
    return torch.sort(order).values


def vocab_coverage(train_counts: torch.Tensor, heldout_counts: torch.Tensor,
                   sizes=(2048, 4096, 8192, 16384, 32768)) -> Dict[int, dict]:
    """For each draft vocabulary size: the share of the target's greedy tokens it covers on the
    training data and on held-out data (the vocabulary chosen from the training counts)."""
    out = {}
    for size in sizes:
        if size > train_counts.numel():
            continue
        ids = choose_draft_vocab(train_counts, size)
        out[size] = {"train": round(float(train_counts[ids].sum() / train_counts.sum()), 4),
                     "heldout": round(float(heldout_counts[ids].sum() /
                                            max(1, int(heldout_counts.sum()))), 4)}
    return out


# ----------------------------------------------------------------------------- the head


def head_config(target: CausalLM, draft_vocab: int, layers: List[int],
                head_layers: int = 1) -> dict:
    """config.json of an EAGLE-3 head shaped like one decoder layer of ``target``:
    ``head_layers`` 1 (EAGLE-3, what the drafter runs) or 2 (a stacked layer, an experiment)."""
    t = target.config
    heads = int(t.num_attention_heads)
    cfg = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": int(t.hidden_size),
        "intermediate_size": int(t.intermediate_size),
        "num_attention_heads": heads,
        "num_key_value_heads": int(getattr(t, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(t, "head_dim", None) or t.hidden_size // heads),
        "hidden_act": str(getattr(t, "hidden_act", "silu")),
        "rms_norm_eps": float(getattr(t, "rms_norm_eps", 1e-6)),
        "max_position_embeddings": int(getattr(t, "max_position_embeddings", 8192)),
        "vocab_size": int(target.vocab_size),
        "draft_vocab_size": int(draft_vocab),
        "target_hidden_size": int(t.hidden_size),
        "num_hidden_layers": int(head_layers),
        "eagle_aux_hidden_state_layer_ids": [int(i) for i in layers],
        "tie_word_embeddings": False,
    }
    rope = getattr(t, "rope_parameters", None) or getattr(t, "rope_scaling", None)
    theta = getattr(t, "rope_theta", None)
    if isinstance(rope, dict) and theta is None:
        theta = rope.get("rope_theta")
    if theta is not None:
        cfg["rope_theta"] = float(theta)
    if isinstance(rope, dict) and rope.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return cfg


def init_head(head: Eagle3Head, target: CausalLM, draft_ids: torch.Tensor,
              fc_init: str = "random") -> None:
    """``norm``/``lm_head`` from the target; ``fc`` random or (``"lens"``) the identity on the
    high layer's state."""
    h = head.config.hidden_size
    with torch.no_grad():
        if fc_init == "lens" and head.config.target_hidden_size == h:
            head.fc.weight.zero_()
            head.fc.weight[:, 2 * h:] = torch.eye(h)
        lm = target.model.get_output_embeddings().weight
        head.lm_head.weight.copy_(lm[draft_ids].float())
        final_norm = getattr(getattr(target.model, "model", target.model), "norm", None)
        if final_norm is not None and getattr(final_norm, "weight", None) is not None \
                and final_norm.weight.shape == head.norm.weight.shape:
            head.norm.weight.copy_(final_norm.weight.float())
        # small residual branches, so the identity start is not drowned
        for lin in (head.midlayer.self_attn.o_proj, head.midlayer.mlp.down_proj):
            lin.weight.mul_(0.1)
        # stacked layers start as the identity (zero residual branches): a two-layer head
        # grown from a one-layer checkpoint computes exactly what that head did
        for layer in head.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head.d2t.copy_(draft_ids - torch.arange(draft_ids.numel()))
        head.t2d.zero_()
        head.t2d[draft_ids] = True


def ttt_forward(head: Eagle3Head, embed_w: torch.Tensor, tokens: torch.Tensor,
                states: torch.Tensor, steps: int) -> List[torch.Tensor]:
    """Draft-vocabulary logits of every unrolled step, ``steps`` tensors ``[B, T, Vd]``.

    ``tokens`` ``[B, T]`` int64 target ids, ``states`` ``[B, T, 3 * target_H]`` captured target
    states. Step k, entry j: the step k - 1 output state at entry j (``fc`` of the target state
    of token j for k = 0) with the embedding of token ``min(j + k + 1, T - 1)``, at position
    j + k, attending to the step-0 entries 0..j and to its own steps 1..k at entry j. Every
    layer of the head (the mid layer, then any stacked layer) attends that way to its own keys
    and values."""
    attn = head.midlayer.self_attn
    bsz, t = tokens.shape
    j = torch.arange(t, device=tokens.device)
    causal = j[None, :] <= j[:, None]                      # [T, T]
    rep = attn.heads // attn.kv_heads
    scale = 1.0 / math.sqrt(attn.head_dim)
    g = head.fc(states)
    # per layer, the keys/values of every step so far ([B, heads, T, hd] each, GQA-expanded)
    keys = [[] for _ in range(1 + len(head.layers))]
    values = [[] for _ in range(1 + len(head.layers))]

    def attend(layer: int, q, kk, vv):
        ks, vs = keys[layer], values[layer]
        ks.append(kk.repeat_interleave(rep, dim=1))
        vs.append(vv.repeat_interleave(rep, dim=1))
        k = len(ks) - 1
        s0 = (q @ ks[0].transpose(2, 3)) * scale            # [B, nh, T, T]
        s0 = s0.masked_fill(~causal, float("-inf"))
        diag = [(q * ks[i]).sum(-1, keepdim=True) * scale for i in range(1, k + 1)]
        probs = torch.softmax(torch.cat([s0] + diag, dim=-1), dim=-1)
        out = probs[..., :t] @ vs[0]
        for i in range(1, k + 1):
            out = out + probs[..., t + i - 1: t + i] * vs[i]
        return out

    logits = []
    for k in range(steps):
        emb = F.embedding(tokens[:, (j + k + 1).clamp(max=t - 1)], embed_w)
        positions = (j + k)[None].expand(bsz, t)
        g = head.residual_update(g, attend(0, *head.attention_inputs(emb, g, positions)))
        for li, layer in enumerate(head.layers):
            g = layer.residual_update(
                g, attend(1 + li, *layer.attention_inputs(g, head.rotary, positions)))
        logits.append(head.lm_head(head.norm(g)))
    return logits


# ----------------------------------------------------------------------------- loss


def ttt_loss(head: Eagle3Head, embed_w: torch.Tensor, batch: dict, steps: int,
             decay: float) -> tuple:
    """Training-time-test loss of one padded batch (see the module docstring).

    ``batch``: ``tokens`` ``[B, T]`` int64, ``states`` ``[B, T, 3H]``, ``label_ids`` ``[B, T, K]``
    int64 draft ids of the target's top-K next tokens (``-1``: outside the draft vocabulary),
    ``label_p`` ``[B, T, K]`` float32 their probabilities renormalised over the draft vocabulary,
    ``valid`` ``[B, T]`` bool (a real position whose target greedy token is in the draft
    vocabulary), ``lengths`` ``[B]``. Returns (loss, per-step accuracies, per-step counts)."""
    tokens, lengths = batch["tokens"], batch["lengths"]
    t = tokens.shape[1]
    j = torch.arange(t, device=tokens.device)
    total = torch.zeros((), device=tokens.device)
    accs, counts = [], []
    for k, logits in enumerate(ttt_forward(head, embed_w, tokens, batch["states"], steps)):
        logq = torch.log_softmax(logits.float(), dim=-1)
        label_pos = j + k + 1
        at = label_pos.clamp(max=t - 1)
        ok = (label_pos[None] < lengths[:, None]) & batch["valid"][:, at]
        ids, p = batch["label_ids"][:, at], batch["label_p"][:, at]
        n = ok.sum()
        ce = -(p * logq.gather(-1, ids.clamp(min=0))).sum(-1)
        total = total + (decay ** k) * (ce * ok).sum() / n.clamp(min=1)
        with torch.no_grad():
            hit = (logq.argmax(-1) == ids[..., 0]) & ok
            accs.append(float(hit.sum()) / max(int(n), 1))
            counts.append(int(n))
    return total, accs, counts


# ----------------------------------------------------------------------------- batches


def _batches(offsets: torch.Tensor, batch_tokens: int, rng: random.Random) -> List[List[int]]:
    """Sequence indices grouped by similar length, at most ``batch_tokens`` padded tokens."""
    lengths = (offsets[1:] - offsets[:-1]).tolist()
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    batches, cur, cur_max = [], [], 0
    for i in order:
        m = max(cur_max, lengths[i])
        if cur and m * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur, m = [], lengths[i]
        cur.append(i)
        cur_max = m
    if cur:
        batches.append(cur)
    rng.shuffle(batches)
    return batches


def _make_batch(shard: dict, idx: List[int], draft_of: torch.Tensor, dtype) -> dict:
    """A padded batch of shard sequences ``idx``; ``draft_of`` ``[V]`` int64 maps target ids to
    draft ids (``-1`` outside the draft vocabulary)."""
    offs = shard["offsets"]
    lengths = torch.tensor([int(offs[i + 1] - offs[i]) for i in idx])
    t, bsz = int(lengths.max()), len(idx)
    width, k = shard["states"].shape[1], shard["top_ids"].shape[1]
    tokens = torch.zeros((bsz, t), dtype=torch.int64)
    states = torch.zeros((bsz, t, width), dtype=dtype)
    label_ids = torch.full((bsz, t, k), -1, dtype=torch.int64)
    label_logp = torch.full((bsz, t, k), float("-inf"), dtype=torch.float32)
    for r, i in enumerate(idx):
        a, b = int(offs[i]), int(offs[i + 1])
        n = b - a
        tokens[r, :n] = shard["tokens"][a:b].long()
        states[r, :n] = shard["states"][a:b].to(dtype)
        label_ids[r, :n] = draft_of[shard["top_ids"][a:b].long()]
        label_logp[r, :n] = shard["top_logp"][a:b].float()
    label_logp = label_logp.masked_fill(label_ids < 0, float("-inf"))
    label_p = torch.softmax(label_logp, dim=-1).nan_to_num(0.0)
    valid = label_ids[..., 0] >= 0
    return {"tokens": tokens, "states": states, "label_ids": label_ids, "label_p": label_p,
            "valid": valid, "lengths": lengths}


def _autocast(cfg: TrainConfig):
    on = cfg.autocast == "on" or (cfg.autocast == "auto" and native_bf16_cpu())
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=on)


@torch.no_grad()
def evaluate(head: Eagle3Head, embed_w: torch.Tensor, shards: ShardSet, draft_of: torch.Tensor,
             cfg: TrainConfig) -> dict:
    """Per-step acceptance (draft top-1 = target top-1, among positions whose target top-1 is in
    the draft vocabulary) and the mean loss on a held-out shard set."""
    was_training = head.training
    head.eval()
    hits = [0.0] * cfg.ttt_steps
    counts = [0] * cfg.ttt_steps
    loss_sum, batches = 0.0, 0
    for s in range(len(shards.shards)):
        shard = shards.load(s)
        for idx in _batches(shard["offsets"], cfg.batch_tokens, random.Random(0)):
            batch = _make_batch(shard, idx, draft_of, torch.float32)
            with _autocast(cfg):
                loss, accs, ns = ttt_loss(head, embed_w, batch, cfg.ttt_steps, cfg.step_decay)
            loss_sum += float(loss)
            batches += 1
            for k in range(cfg.ttt_steps):
                hits[k] += accs[k] * ns[k]
                counts[k] += ns[k]
    head.train(was_training)
    return {"acceptance_per_step": [round(h / max(c, 1), 4) for h, c in zip(hits, counts)],
            "positions_per_step": counts, "loss": round(loss_sum / max(batches, 1), 4)}


# ----------------------------------------------------------------------------- training


class Trainer:
    """AdamW with linear warmup and cosine decay over ``cfg.epochs`` passes of the training
    shards, resumable from ``checkpoint.pt`` in ``work_dir``: the data order of epoch e is a
    permutation of the shards and of each shard's batches seeded by (seed, e, shard), so a
    cursor (epoch, shard position, batch position) says exactly what is left."""

    def __init__(self, head: Eagle3Head, embed_w: torch.Tensor, draft_of: torch.Tensor,
                 train: ShardSet, cfg: TrainConfig, work_dir: str, key: str):
        self.head, self.embed_w, self.draft_of = head, embed_w, draft_of
        self.train_set, self.cfg, self.key = train, cfg, key
        self.path = os.path.join(work_dir, "checkpoint.pt")
        params = [p for p in head.parameters() if p.requires_grad]
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     betas=(0.9, 0.95))
        self.step, self.epoch, self.shard_pos, self.batch_pos = 0, 0, 0, 0
        self.tokens_done = 0
        self.history: List[dict] = []
        self.evals: List[dict] = []
        self.seconds = 0.0
        # batches per epoch (same for every epoch: the shards' batches, only reordered)
        self.batches_per_epoch = sum(len(self._shard_batches(0, s)) for s in
                                     range(len(train.shards)))
        self.total_steps = self.batches_per_epoch * cfg.epochs
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)

    def _shard_order(self, epoch: int) -> List[int]:
        order = list(range(len(self.train_set.shards)))
        random.Random(f"{self.cfg.seed}/{epoch}").shuffle(order)
        return order

    def _shard_batches(self, epoch: int, shard_index: int, shard: Optional[dict] = None):
        offsets = shard["offsets"] if shard is not None else \
            self.train_set.load(shard_index)["offsets"]
        return _batches(offsets, self.cfg.batch_tokens,
                        random.Random(f"{self.cfg.seed}/{epoch}/{shard_index}"))

    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, self.total_steps - cfg.warmup_steps)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))

    # -- checkpoints
    def save(self) -> None:
        state = {"key": self.key, "head": self.head.state_dict(), "opt": self.opt.state_dict(),
                 "step": self.step, "epoch": self.epoch, "shard_pos": self.shard_pos,
                 "batch_pos": self.batch_pos, "tokens_done": self.tokens_done,
                 "history": self.history, "evals": self.evals,
                 "seconds": self.seconds + time.time() - self._t0,
                 "torch_rng": torch.get_rng_state()}
        torch.save(state, self.path + ".tmp")
        os.replace(self.path + ".tmp", self.path)

    def try_resume(self) -> bool:
        if not os.path.isfile(self.path):
            return False
        state = torch.load(self.path, weights_only=False)
        if state.get("key") != self.key:
            raise ValueError(f"{self.path} is a checkpoint of another training run (other data or "
                             "settings); use a fresh --work-dir or delete it")
        self.head.load_state_dict(state["head"])
        self.opt.load_state_dict(state["opt"])
        for name in ("step", "epoch", "shard_pos", "batch_pos", "tokens_done", "history",
                     "evals", "seconds"):
            setattr(self, name, state[name])
        torch.set_rng_state(state["torch_rng"])
        return True

    # -- the loop
    def run(self, on_epoch: Callable[[int], None], log: Callable[[dict], None],
            progress=None) -> None:
        cfg, head = self.cfg, self.head
        head.train()
        self._t0 = time.time()
        dtype = torch.float32
        while self.epoch < cfg.epochs:
            order = self._shard_order(self.epoch)
            while self.shard_pos < len(order):
                s = order[self.shard_pos]
                shard = self.train_set.load(s)
                batches = self._shard_batches(self.epoch, s, shard)
                while self.batch_pos < len(batches) and self.step < self.total_steps:
                    batch = _make_batch(shard, batches[self.batch_pos], self.draft_of, dtype)
                    lr = self.lr_at(self.step)
                    for group in self.opt.param_groups:
                        group["lr"] = lr
                    with _autocast(cfg):
                        loss, accs, counts = ttt_loss(head, self.embed_w, batch, cfg.ttt_steps,
                                                      cfg.step_decay)
                    self.opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.grad_clip:
                        torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
                    self.opt.step()
                    n_tok = int(batch["lengths"].sum())
                    rec = {"step": self.step, "epoch": self.epoch, "loss": round(float(loss.detach()), 5),
                           "acc": [round(a, 4) for a in accs], "lr": lr}
                    self.history.append(rec)
                    log(rec)
                    self.step += 1
                    self.batch_pos += 1
                    self.tokens_done += n_tok
                    if progress is not None:
                        progress(n_tok)
                    if self.step % cfg.checkpoint_every == 0:
                        self.save()
                if self.step >= self.total_steps:  # the --max-steps budget: training ends
                    self.epoch, self.batch_pos = cfg.epochs - 1, 0
                    break
                self.shard_pos += 1
                self.batch_pos = 0
            self.epoch += 1
            self.shard_pos = 0
            on_epoch(self.epoch)
            self.save()
        head.eval()

    @property
    def elapsed(self) -> float:
        return self.seconds + time.time() - self._t0


def save_head(head: Eagle3Head, config: dict, out_dir: str, dtype: str) -> None:
    """Write ``config.json`` and ``model.safetensors`` (official names, ``d2t``/``t2d``)."""
    import json

    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    tdtype = getattr(torch, dtype)
    tensors = {name: p.detach().to(tdtype).contiguous() for name, p in head.named_parameters()
               if not name.startswith("embed")}
    tensors["d2t"] = head.d2t.clone()
    tensors["t2d"] = head.t2d.clone()
    save_file(tensors, os.path.join(out_dir, "model.safetensors.tmp"))
    os.replace(os.path.join(out_dir, "model.safetensors.tmp"),
               os.path.join(out_dir, "model.safetensors"))
    cfg = dict(config, torch_dtype=dtype)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)


# ----------------------------------------------------------------------------- pipeline


def _stage(progress_factory, total, desc):
    bar = progress_factory(total, desc) if progress_factory else None
    return bar, (bar.update if bar is not None else None)


def train_draft(target: CausalLM, conversations: List[dict], out_dir: str, cfg: TrainConfig,
                work_dir: str, target_name: str, progress_factory=None,
                log: Optional[Callable[[str], None]] = None,
                command: Optional[str] = None) -> dict:
    """The whole pipeline (module docstring). ``conversations``: ShareGPT conversations by index
    (the training ones are ``[offset, heldout_offset)``, the held-out ones follow
    ``heldout_offset``). Returns the provenance written to ``out_dir/TRAINING.json`` (also after
    every epoch, with the evaluations so far)."""
    cfg.check()
    if cfg.heldout_offset < cfg.offset:
        raise ValueError(f"heldout_offset ({cfg.heldout_offset}) must be >= offset ({cfg.offset})")
    say = log or (lambda s: None)
    os.makedirs(work_dir, exist_ok=True)
    t_start = time.time()
    times = {}
    layers = cfg.capture_layers or default_capture_layers(len(target.decoder_layers()))
    tok = target.tokenizer
    train_convs = conversations[cfg.offset:cfg.heldout_offset]
    held_convs = conversations[cfg.heldout_offset:]

    # 1. sequences and prompts
    sharegpt = conversation_sequences(tok, train_convs, cfg.max_tokens, cfg.max_len, cfg.min_len)
    train_prompts = user_prompts(tok, train_convs, cfg.regenerate_prompt_max) \
        if cfg.regenerate_tokens > 0 else []
    held_sharegpt = conversation_sequences(tok, held_convs[:cfg.heldout_conversations],
                                           1 << 62, cfg.max_len, cfg.min_len)
    held_prompts = user_prompts(tok, held_convs, cfg.regenerate_prompt_max)[:cfg.heldout_prompts]

    # 2. the target's answers (with their labels) and the target pass over conversations
    t0 = time.time()
    passes = {}

    def answers(name, prompts, budget):
        total = min(budget, len(prompts) * cfg.regenerate_max_new)
        bar, upd = _stage(progress_factory, total, f"target answers ({name})")
        passes[name] = answer_pass(target, prompts, layers, os.path.join(work_dir, f"pass-{name}"),
                                   budget, cfg.regenerate_max_new, cfg.regenerate_batch,
                                   cfg.topk_labels, cfg.shard_tokens, upd)
        if bar is not None:
            bar.close()

    def conversations_pass(name, seqs):
        bar, upd = _stage(progress_factory, sum(len(s) for s in seqs), f"target pass ({name})")
        passes[name] = target_pass(target, seqs, layers, os.path.join(work_dir, f"pass-{name}"),
                                   cfg.topk_labels, cfg.shard_tokens, upd)
        if bar is not None:
            bar.close()

    answers("heldout-self", held_prompts, 1 << 62)
    conversations_pass("heldout-sharegpt", held_sharegpt)
    if train_prompts:
        answers("train-answers", train_prompts, cfg.regenerate_tokens)
    if sharegpt:
        conversations_pass("train-sharegpt", sharegpt)
    times["data_and_target_pass"] = round(time.time() - t0, 1)
    train_sets = [passes[n] for n in ("train-answers", "train-sharegpt") if n in passes]
    train_set = ShardUnion(train_sets)
    n_tokens = train_set.tokens
    if not n_tokens:
        raise DataError("no usable training sequences (need conversations with an assistant "
                        f"turn and >= {cfg.min_len} tokens, or prompts to answer)")
    answer_manifest = passes["train-answers"].manifest if "train-answers" in passes else {}
    say(f"data: {len(sharegpt)} conversations ({sum(map(len, sharegpt))} tokens) + "
        f"{sum(len(sh['refs']) for sh in answer_manifest.get('shards', []))} target answers "
        f"({answer_manifest.get('answer_tokens', 0)} answer tokens); held-out: "
        f"{len(held_sharegpt)} conversations, {len(held_prompts)} target answers")

    # 3. draft vocabulary (from the target's greedy tokens on the training data)
    v = target.vocab_size
    train_counts = train_set.greedy_counts(v)
    held_counts = passes["heldout-self"].greedy_counts(v) + \
        passes["heldout-sharegpt"].greedy_counts(v)
    specials = [int(i) for i in (getattr(tok, "all_special_ids", None) or [])]
    init_state = None
    if cfg.init_from:
        from .eagle3 import load_eagle3_state

        init_state = load_eagle3_state(cfg.init_from)
        vd = init_state["lm_head.weight"].shape[0]
        d2t = init_state.get("d2t", torch.zeros(vd, dtype=torch.int64))
        draft_ids = torch.arange(vd) + d2t.long()
    else:
        draft_ids = choose_draft_vocab(train_counts, cfg.draft_vocab, specials)
    draft_of = torch.full((v,), -1, dtype=torch.int64)
    draft_of[draft_ids] = torch.arange(draft_ids.numel())
    coverage = vocab_coverage(train_counts, held_counts)
    chosen_cov = {"train": round(float(train_counts[draft_ids].sum() / train_counts.sum()), 4),
                  "heldout": round(float(held_counts[draft_ids].sum() /
                                         max(1, int(held_counts.sum()))), 4)}
    say(f"draft vocab {draft_ids.numel()}: covers {chosen_cov['train']:.1%} of the target's "
        f"greedy tokens on the training data, {chosen_cov['heldout']:.1%} held out")

    # 4. the head and its training
    config = head_config(target, int(draft_ids.numel()), layers, cfg.head_layers)
    with torch.random.fork_rng():  # the initial weights depend on cfg.seed only
        torch.manual_seed(cfg.seed)
        head = Eagle3Head(eagle3_config(config))
        init_head(head, target, draft_ids)
    if init_state is not None:
        params = dict(head.named_parameters())
        unused = sorted(n for n in init_state if n not in params and n not in ("d2t", "t2d")
                        and not n.startswith("embed"))
        if unused:
            raise DataError(f"--init-from {cfg.init_from} has tensors this head lacks "
                            f"({unused[:3]}...): it has more layers than --head-layers "
                            f"{cfg.head_layers}")
        with torch.no_grad():
            for name, p in head.named_parameters():
                if name in init_state:
                    p.copy_(init_state[name].float())
    head = head.float()
    embed_w = target.model.get_input_embeddings().weight.detach().float()
    # settings added after runs already existed enter the key only when set, so those runs'
    # checkpoints still resume
    keyed = {k: v for k, v in asdict(cfg).items()
             if (k, v) not in (("max_steps", 0), ("head_layers", 1))}
    key = stable_key("train", keyed, [t.manifest["key"] for t in train_sets],
                     draft_ids.tolist())
    trainer = Trainer(head, embed_w, draft_of, train_set, cfg, work_dir, key)
    resumed = trainer.try_resume()
    if resumed:
        say(f"resuming at step {trainer.step} (epoch {trainer.epoch}, "
            f"{trainer.tokens_done} tokens done)")
    provenance = {
        "target": target_name, "target_dtype": str(target.dtype).replace("torch.", ""),
        "init_from": cfg.init_from, "config": asdict(cfg), "capture_layers": list(layers),
        "data": {"sharegpt_conversations": len(sharegpt),
                 "sharegpt_tokens": sum(map(len, sharegpt)),
                 "target_answers": sum(len(sh["refs"]) for sh in
                                       answer_manifest.get("shards", [])),
                 "target_answer_tokens": answer_manifest.get("answer_tokens", 0),
                 "train_tokens": n_tokens,
                 "heldout_sharegpt": {"conversations": len(held_sharegpt),
                                      "tokens": passes["heldout-sharegpt"].tokens,
                                      "first_conversation": cfg.heldout_offset},
                 "heldout_self": {"answers": len(held_prompts),
                                  "tokens": passes["heldout-self"].tokens}},
        "draft_vocab": int(draft_ids.numel()), "greedy_coverage": chosen_cov,
        "vocab_coverage_by_size": coverage, "steps_per_epoch": trainer.batches_per_epoch,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_native_bf16": native_bf16_cpu(), "command": command,
    }

    def write_provenance(final: bool):
        last = trainer.history[-min(50, len(trainer.history)):] or [{"loss": float("nan"),
                                                                    "acc": []}]
        provenance.update({
            "steps": trainer.step, "epochs_done": trainer.epoch, "evaluations": trainer.evals,
            "final_train_loss": round(sum(r["loss"] for r in last) / len(last), 4),
            "final_train_acc_per_step": [round(sum(r["acc"][k] for r in last) / len(last), 4)
                                         for k in range(len(last[0]["acc"]))],
            "seconds": {**times, "train": round(trainer.elapsed, 1),
                        "total_this_run": round(time.time() - t_start, 1)},
            "complete": final})
        _write_json(os.path.join(out_dir, "TRAINING.json"), provenance)

    def on_epoch(epoch):
        ev = {"epoch": epoch, "step": trainer.step,
              "heldout_sharegpt": evaluate(head, embed_w, passes["heldout-sharegpt"], draft_of,
                                           cfg),
              "heldout_self": evaluate(head, embed_w, passes["heldout-self"], draft_of, cfg)}
        trainer.evals.append(ev)
        say(f"epoch {epoch}: held-out acceptance per step: ShareGPT "
            f"{ev['heldout_sharegpt']['acceptance_per_step']}, target answers "
            f"{ev['heldout_self']['acceptance_per_step']}")
        save_head(head, config, out_dir, cfg.save_dtype)
        write_provenance(final=epoch == cfg.epochs)

    every = 10

    def log_step(rec):
        if rec["step"] % every == 0:
            say(f"step {rec['step']}/{trainer.total_steps} epoch {rec['epoch']} loss "
                f"{rec['loss']:.4f} acc/step {' '.join(f'{a:.3f}' for a in rec['acc'])} "
                f"lr {rec['lr']:.2e}")

    os.makedirs(out_dir, exist_ok=True)
    # tokens to train on: every epoch's, or the --max-steps share of them
    budget = round(n_tokens * trainer.total_steps / max(1, trainer.batches_per_epoch))
    bar = progress_factory(budget, "train") if progress_factory else None
    if bar is not None:
        bar.update(trainer.tokens_done)
    trainer.run(on_epoch, log_step, bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    if not trainer.evals or trainer.evals[-1]["epoch"] != cfg.epochs:
        on_epoch(cfg.epochs)  # resumed after the last epoch's evaluation was lost
    write_provenance(final=True)
    return provenance
