"""Train an EAGLE-3-style draft head for a target model, in plain PyTorch on CPU.

Pipeline (``heterospec train-draft``):

1. **Data.** Conversations (ShareGPT by default) formatted with the target's chat template,
   truncated to ``max_len`` tokens, until ``max_tokens`` tokens are collected.
2. **Target pass, cached on disk.** One causal forward per conversation records, per position,
   the inputs of the three EAGLE-3 decoder layers (low, middle, high; the same hooks the
   inference drafter uses), the final normed hidden state (for soft labels) and the target's
   greedy token. The cache directory is reused when its ``meta.json`` matches.
3. **Draft vocabulary.** The ``draft_vocab`` most frequent token ids of the data (plus the
   tokenizer's special tokens), ascending; ``d2t``/``t2d`` maps as in the official layout.
4. **Training-time test.** ``ttt_steps`` unrolled steps. Step 0, entry j: ``fc`` of the target
   states of token j with the embedding of token j + 1, position j. Step k: the head's own step
   k - 1 output state at entry j with the embedding of token j + k + 1, position j + k; it
   attends to the step-0 entries 0..j and to its own earlier steps at entry j (its ancestors),
   exactly what a depth-k tree node sees at inference. The label of step k at entry j is the
   target's distribution at position j + k + 1, renormalised over the draft vocabulary; entries
   whose target greedy token is outside the draft vocabulary are masked. Step k's loss weighs
   ``0.8 ** k``.
5. **Checkpoint** in the official EAGLE-3 layout that :class:`~heterospec.Eagle3Drafter` loads
   (``config.json`` + ``model.safetensors``; fp16 by default).

The head reuses the target's frozen token embedding; ``norm``/``lm_head`` start as the target's
final norm and output rows (a logit-lens start, ``fc`` = identity on the high layer, was measured
worse: on SmolLM2 the layer-27 lens has a cross-entropy of ~38 nats against the target).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F

from .eagle3 import Eagle3Head, default_capture_layers, eagle3_config
from .errors import DataError
from .target import CausalLM

CACHE_VERSION = 1


@dataclass
class TrainConfig:
    """Data size, draft vocabulary and optimisation settings (defaults: the shipped head)."""

    max_tokens: int = 200_000       # target-pass tokens to collect
    max_len: int = 512              # tokens per conversation (longer ones are cut)
    min_len: int = 16
    draft_vocab: int = 8192
    epochs: int = 2
    ttt_steps: int = 3
    step_decay: float = 0.8
    batch_tokens: int = 4096        # padded tokens per optimiser step
    lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    save_dtype: str = "float16"
    offset: int = 0                 # first conversation used
    capture_layers: Optional[List[int]] = None
    fc_init: str = "random"         # "random" or "lens" (identity on the high layer's state)
    # self-distillation: answer the conversations' first user turns with the target's own
    # greedy decoding (batched HF generate) and train on those sequences
    regenerate_tokens: int = 0      # target-generated tokens to collect (0: off)
    regenerate_max_new: int = 128
    regenerate_batch: int = 48
    regenerate_prompt_max: int = 256
    init_from: Optional[str] = None  # start from this head checkpoint (keeps its draft vocab)


# ----------------------------------------------------------------------------- data


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


def encode_conversation(tokenizer, messages: List[dict]) -> List[int]:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]
    text = "\n\n".join(m["content"] for m in messages)
    return [int(t) for t in tokenizer(text).input_ids]


def token_sequences(tokenizer, conversations: Iterable[dict], cfg: TrainConfig) -> List[List[int]]:
    """Templated, truncated token sequences until ``cfg.max_tokens`` tokens are collected."""
    seqs, total = [], 0
    for conv in conversations:
        messages = conversation_messages(conv)
        if not any(m["role"] == "assistant" for m in messages):
            continue
        ids = encode_conversation(tokenizer, messages)[: cfg.max_len]
        if len(ids) < cfg.min_len:
            continue
        seqs.append(ids)
        total += len(ids)
        if total >= cfg.max_tokens:
            break
    return seqs


@torch.inference_mode()
def regenerate(target: CausalLM, conversations: Iterable[dict], cfg: TrainConfig, cache_dir: str,
               progress: Optional[Callable[[int], None]] = None) -> List[List[int]]:
    """Prompt + the target's greedy answer (EOS included when reached) for the first user turn
    of each conversation, until ``cfg.regenerate_tokens`` answer tokens. Batched, left-padded
    HF ``generate``; cached in ``cache_dir`` by model, prompts and settings."""
    tok = target.tokenizer
    prompts = []
    for conv in conversations:
        msgs = conversation_messages(conv)
        first = next((m for m in msgs if m["role"] == "user"), None)
        if first is None:
            continue
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([first], add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        else:
            ids = tok(first["content"]).input_ids
        ids = [int(t) for t in ids]
        if 4 <= len(ids) <= cfg.regenerate_prompt_max:
            prompts.append(ids)
    h = hashlib.sha256(json.dumps([CACHE_VERSION, "regen", target.name, cfg.regenerate_tokens,
                                   cfg.regenerate_max_new, cfg.regenerate_batch,
                                   cfg.regenerate_prompt_max, prompts[:4096]]).encode())
    path = os.path.join(cache_dir, f"regenerated-{h.hexdigest()[:16]}.json")
    if os.path.isfile(path):
        with open(path) as f:
            seqs = json.load(f)
        if progress:
            progress(cfg.regenerate_tokens)
        return seqs
    eos = tok.eos_token_id
    pad = getattr(tok, "pad_token_id", None)
    pad = eos if pad is None else pad
    seqs, produced = [], 0
    for start in range(0, len(prompts), cfg.regenerate_batch):
        batch = prompts[start:start + cfg.regenerate_batch]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=target.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch],
                            device=target.device)
        out = target.model.generate(ids, attention_mask=mask, do_sample=False,
                                    max_new_tokens=cfg.regenerate_max_new, pad_token_id=pad)
        for p, row in zip(batch, out[:, width:].tolist()):
            answer = []
            for t in row:
                answer.append(int(t))
                if t == eos:
                    break
            seqs.append(p + answer)
            produced += len(answer)
            if progress:
                progress(len(answer))
        if produced >= cfg.regenerate_tokens:
            break
    os.makedirs(cache_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(seqs, f)
    return seqs


# ----------------------------------------------------------------------------- target pass


def _cache_key(target_name: str, seqs: List[List[int]], layers: List[int], dtype) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, target_name, layers, str(dtype)]).encode())
    for s in seqs:
        h.update(len(s).to_bytes(4, "little"))
        h.update(torch.tensor(s, dtype=torch.int32).numpy().tobytes())
    return h.hexdigest()[:16]


@torch.inference_mode()
def target_pass(target: CausalLM, seqs: List[List[int]], layers: List[int], cache_dir: str,
                target_name: str, progress: Optional[Callable[[int], None]] = None) -> dict:
    """Captured states ``[T, 3H]`` bf16, final normed states ``[T, H]`` bf16, greedy target
    tokens ``[T]`` int32 and the tokens ``[T]`` int32 of every sequence, concatenated, with
    ``offsets`` ``[S + 1]``. Cached as ``cache_dir/target_pass.pt`` keyed by data and model."""
    key = _cache_key(target_name, seqs, layers, target.dtype)
    path = os.path.join(cache_dir, "target_pass.pt")
    meta_path = os.path.join(cache_dir, "meta.json")
    if os.path.isfile(path) and os.path.isfile(meta_path):
        with open(meta_path) as f:
            if json.load(f).get("key") == key:
                if progress:
                    progress(sum(len(s) for s in seqs))
                return torch.load(path, weights_only=True)
    target.capture_hidden_states(layers)
    model = target.model
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    head_w = model.get_output_embeddings().weight
    states, finals, greedy = [], [], []
    for s in seqs:
        ids = torch.tensor(s, dtype=torch.int64, device=target.device)[None]
        out = base(input_ids=ids, use_cache=False)
        hidden = out.last_hidden_state[0]
        captured = torch.cat([target._captured.pop(i)[0] for i in sorted(layers)], dim=-1)
        states.append(captured.to(torch.bfloat16).cpu())
        finals.append(hidden.to(torch.bfloat16).cpu())
        greedy.append((hidden @ head_w.T).argmax(-1).to(torch.int32).cpu())
        if progress:
            progress(len(s))
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    data = {
        "tokens": torch.tensor([t for s in seqs for t in s], dtype=torch.int32),
        "offsets": torch.cat((torch.zeros(1, dtype=torch.int64), lengths.cumsum(0))),
        "states": torch.cat(states),
        "finals": torch.cat(finals),
        "greedy": torch.cat(greedy),
    }
    os.makedirs(cache_dir, exist_ok=True)
    torch.save(data, path)
    with open(meta_path, "w") as f:
        json.dump({"key": key, "target": target_name, "layers": list(layers),
                   "sequences": len(seqs), "tokens": int(lengths.sum())}, f, indent=1)
    return data


def choose_draft_vocab(tokens: torch.Tensor, vocab_size: int, size: int,
                       always: Iterable[int] = ()) -> torch.Tensor:
    """The ``size`` most frequent ids of ``tokens`` (ties to the lower id) plus ``always``,
    ascending, as int64 ``[size]``."""
    size = min(size, vocab_size)
    counts = torch.bincount(tokens.long(), minlength=vocab_size).double()
    for t in always:
        if 0 <= int(t) < vocab_size:
            counts[int(t)] = float("inf")
    # stable sort on -count keeps ties in id order
    order = torch.sort(-counts, stable=True).indices[:size]
    return torch.sort(order).values


# ----------------------------------------------------------------------------- the head


def head_config(target: CausalLM, draft_vocab: int, layers: List[int]) -> dict:
    """config.json of a one-layer EAGLE-3 head shaped like one decoder layer of ``target``."""
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
        "num_hidden_layers": 1,
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
        head.d2t.copy_(draft_ids - torch.arange(draft_ids.numel()))
        head.t2d.zero_()
        head.t2d[draft_ids] = True


def ttt_forward(head: Eagle3Head, embed_w: torch.Tensor, tokens: torch.Tensor,
                states: torch.Tensor, steps: int) -> List[torch.Tensor]:
    """Draft-vocabulary logits of every unrolled step, ``steps`` tensors ``[B, T, Vd]``.

    ``tokens`` ``[B, T]`` int64 target ids, ``states`` ``[B, T, 3 * target_H]`` captured target
    states. Step k, entry j: the step k - 1 output state at entry j (``fc`` of the target state
    of token j for k = 0) with the embedding of token ``min(j + k + 1, T - 1)``, at position
    j + k, attending to the step-0 entries 0..j and to its own steps 1..k at entry j."""
    attn = head.midlayer.self_attn
    bsz, t = tokens.shape
    j = torch.arange(t, device=tokens.device)
    causal = j[None, :] <= j[:, None]                      # [T, T]
    rep = attn.heads // attn.kv_heads
    scale = 1.0 / math.sqrt(attn.head_dim)
    g = head.fc(states)
    keys, values, logits = [], [], []
    for k in range(steps):
        emb = F.embedding(tokens[:, (j + k + 1).clamp(max=t - 1)], embed_w)
        q, kk, vv = head.attention_inputs(emb, g, (j + k)[None].expand(bsz, t))
        keys.append(kk.repeat_interleave(rep, dim=1))
        values.append(vv.repeat_interleave(rep, dim=1))
        s0 = (q @ keys[0].transpose(2, 3)) * scale          # [B, nh, T, T]
        s0 = s0.masked_fill(~causal, float("-inf"))
        diag = [(q * keys[i]).sum(-1, keepdim=True) * scale for i in range(1, k + 1)]
        probs = torch.softmax(torch.cat([s0] + diag, dim=-1), dim=-1)
        out = probs[..., :t] @ values[0]
        for i in range(1, k + 1):
            out = out + probs[..., t + i - 1: t + i] * values[i]
        g = head.residual_update(g, out)
        logits.append(head.lm_head(head.norm(g)))
    return logits


def ttt_loss(head: Eagle3Head, embed_w: torch.Tensor, batch: dict, steps: int,
             decay: float) -> tuple:
    """Training-time-test loss of one padded batch (see the module docstring).

    ``batch``: ``tokens`` ``[B, T]`` int64, ``states`` ``[B, T, 3H]``, ``target_logp``
    ``[B, T, Vd]`` float32 (target log-probs over the draft vocabulary), ``valid``
    ``[B, T]`` bool (real token whose greedy target token lies in the draft vocabulary),
    ``lengths`` ``[B]``. Returns (loss, per-step accuracies, per-step entry counts)."""
    tokens, lengths = batch["tokens"], batch["lengths"]
    t = tokens.shape[1]
    j = torch.arange(t, device=tokens.device)
    total = torch.zeros((), device=tokens.device)
    accs, counts = [], []
    for k, logits in enumerate(ttt_forward(head, embed_w, tokens, batch["states"], steps)):
        logp = torch.log_softmax(logits.float(), dim=-1)
        label_pos = j + k + 1
        at = label_pos.clamp(max=t - 1)
        ok = (label_pos[None] < lengths[:, None]) & batch["valid"][:, at]
        tlogp = batch["target_logp"][:, at]
        n = ok.sum()
        ce = -(tlogp.exp() * logp).sum(-1)
        total = total + (decay ** k) * (ce * ok).sum() / n.clamp(min=1)
        with torch.no_grad():
            hit = (logp.argmax(-1) == tlogp.argmax(-1)) & ok
            accs.append(float(hit.sum()) / max(int(n), 1))
            counts.append(int(n))
    return total, accs, counts


# ----------------------------------------------------------------------------- training


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


def _make_batch(data: dict, idx: List[int], lm_rows: torch.Tensor, draft_mask: torch.Tensor,
                dtype) -> dict:
    offs = data["offsets"]
    lengths = torch.tensor([int(offs[i + 1] - offs[i]) for i in idx])
    t = int(lengths.max())
    bsz = len(idx)
    width = data["states"].shape[1]
    h = data["finals"].shape[1]
    tokens = torch.zeros((bsz, t), dtype=torch.int64)
    states = torch.zeros((bsz, t, width), dtype=dtype)
    finals = torch.zeros((bsz, t, h), dtype=torch.float32)
    valid = torch.zeros((bsz, t), dtype=torch.bool)
    for r, i in enumerate(idx):
        a, b = int(offs[i]), int(offs[i + 1])
        n = b - a
        tokens[r, :n] = data["tokens"][a:b].long()
        states[r, :n] = data["states"][a:b].to(dtype)
        finals[r, :n] = data["finals"][a:b].float()
        valid[r, :n] = draft_mask[data["greedy"][a:b].long()]
    with torch.no_grad():
        target_logp = torch.log_softmax(finals @ lm_rows.T, dim=-1)
    return {"tokens": tokens, "states": states, "target_logp": target_logp, "valid": valid,
            "lengths": lengths}


def train_head(head: Eagle3Head, embed_w: torch.Tensor, lm_rows: torch.Tensor,
               draft_mask: torch.Tensor, data: dict, cfg: TrainConfig,
               log: Optional[Callable[[dict], None]] = None,
               progress: Optional[Callable[[int], None]] = None) -> List[dict]:
    """AdamW with linear warmup and cosine decay over ``cfg.epochs`` passes of ``data``.
    Returns the per-step log (loss, per-step accuracies)."""
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    head.train()
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=(0.9, 0.95))
    plan = [_batches(data["offsets"], cfg.batch_tokens, rng) for _ in range(cfg.epochs)]
    total_steps = sum(len(p) for p in plan)

    def lr_at(step):
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    history, step = [], 0
    dtype = head.fc.weight.dtype
    for epoch, batches in enumerate(plan):
        for idx in batches:
            batch = _make_batch(data, idx, lm_rows, draft_mask, dtype)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            loss, accs, counts = ttt_loss(head, embed_w, batch, cfg.ttt_steps, cfg.step_decay)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            rec = {"step": step, "epoch": epoch, "loss": float(loss.detach()), "acc": accs,
                   "entries": counts, "lr": lr_at(step)}
            history.append(rec)
            if log:
                log(rec)
            if progress:
                progress(int(batch["lengths"].sum()))
            step += 1
    head.eval()
    return history


def save_head(head: Eagle3Head, config: dict, out_dir: str, dtype: str, provenance: dict) -> None:
    """Write ``config.json``, ``model.safetensors`` (official names, ``d2t``/``t2d``) and
    ``TRAINING.json`` (how the head was made)."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    tdtype = getattr(torch, dtype)
    tensors = {name: p.detach().to(tdtype).contiguous() for name, p in head.named_parameters()
               if not name.startswith("embed")}
    tensors["d2t"] = head.d2t.clone()
    tensors["t2d"] = head.t2d.clone()
    save_file(tensors, os.path.join(out_dir, "model.safetensors"))
    cfg = dict(config, torch_dtype=dtype)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    with open(os.path.join(out_dir, "TRAINING.json"), "w") as f:
        json.dump(provenance, f, indent=1)


def train_draft(target: CausalLM, conversations: Iterable[dict], out_dir: str, cfg: TrainConfig,
                cache_dir: str, target_name: str, progress_factory=None,
                log: Optional[Callable[[str], None]] = None,
                command: Optional[str] = None) -> dict:
    """The whole pipeline; returns the provenance dict also written to ``TRAINING.json``
    (``command``: the command line that ran it, recorded there)."""
    say = log or (lambda s: None)
    t_start = time.time()
    layers = cfg.capture_layers or default_capture_layers(len(target.decoder_layers()))
    conversations = list(conversations)
    seqs = token_sequences(target.tokenizer, conversations, cfg) if cfg.max_tokens > 0 else []
    if cfg.regenerate_tokens > 0:
        bar = progress_factory(cfg.regenerate_tokens, "regenerate") if progress_factory else None
        t0 = time.time()
        regen = regenerate(target, conversations, cfg, cache_dir,
                           progress=bar.update if bar is not None else None)
        if bar is not None:
            bar.close()
        say(f"regenerated {len(regen)} answers with the target in {time.time() - t0:.0f} s")
        seqs = seqs + regen
    if not seqs:
        raise DataError("no usable training conversations (need an assistant turn and "
                        f">= {cfg.min_len} tokens)")
    n_tokens = sum(len(s) for s in seqs)
    say(f"data: {len(seqs)} conversations, {n_tokens} tokens (max_len {cfg.max_len})")
    bar = progress_factory(n_tokens, "target pass") if progress_factory else None
    t0 = time.time()
    data = target_pass(target, seqs, layers, cache_dir, target_name,
                       progress=bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    t_pass = time.time() - t0
    tok = target.tokenizer
    specials = [int(i) for i in (getattr(tok, "all_special_ids", None) or [])]
    init_state = None
    if cfg.init_from:
        from .eagle3 import load_eagle3_state

        init_state = load_eagle3_state(cfg.init_from)
        vd = init_state["lm_head.weight"].shape[0]
        d2t = init_state.get("d2t", torch.zeros(vd, dtype=torch.int64))
        draft_ids = torch.arange(vd) + d2t.long()
    else:
        draft_ids = choose_draft_vocab(data["tokens"], target.vocab_size, cfg.draft_vocab,
                                       specials)
    draft_mask = torch.zeros(target.vocab_size, dtype=torch.bool)
    draft_mask[draft_ids] = True
    coverage = float(draft_mask[data["tokens"].long()].float().mean())
    greedy_cov = float(draft_mask[data["greedy"].long()].float().mean())
    say(f"draft vocab {draft_ids.numel()}: covers {coverage:.1%} of data tokens, "
        f"{greedy_cov:.1%} of target greedy tokens")

    config = head_config(target, int(draft_ids.numel()), layers)
    head = Eagle3Head(eagle3_config(config))
    init_head(head, target, draft_ids, cfg.fc_init)
    if init_state is not None:
        with torch.no_grad():
            for name, p in head.named_parameters():
                if name in init_state:
                    p.copy_(init_state[name].float())
    embed_w = target.model.get_input_embeddings().weight.detach().float()
    lm_rows = target.model.get_output_embeddings().weight.detach()[draft_ids].float()
    bar = progress_factory(n_tokens * cfg.epochs, "train") if progress_factory else None
    t0 = time.time()
    every = 5

    def log_step(rec):
        if rec["step"] % every == 0:
            accs = " ".join(f"{a:.3f}" for a in rec["acc"])
            say(f"step {rec['step']} epoch {rec['epoch']} loss {rec['loss']:.4f} "
                f"acc/step {accs} lr {rec['lr']:.2e}")

    history = train_head(head, embed_w, lm_rows, draft_mask, data, cfg, log=log_step,
                         progress=bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    t_train = time.time() - t0
    last = history[-min(20, len(history)):]
    provenance = {
        "target": target_name,
        "init_from": cfg.init_from,
        "config": asdict(cfg),
        "capture_layers": list(layers),
        "conversations": len(seqs),
        "tokens": n_tokens,
        "draft_vocab": int(draft_ids.numel()),
        "draft_vocab_coverage": round(coverage, 4),
        "greedy_coverage": round(greedy_cov, 4),
        "steps": len(history),
        "first_loss": round(history[0]["loss"], 4),
        "final_loss": round(sum(r["loss"] for r in last) / len(last), 4),
        "final_acc_per_step": [round(sum(r["acc"][k] for r in last) / len(last), 4)
                               for k in range(cfg.ttt_steps)],
        "seconds_target_pass": round(t_pass, 1),
        "seconds_train": round(t_train, 1),
        "seconds_total": round(time.time() - t_start, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "command": command,
    }
    save_head(head, config, out_dir, cfg.save_dtype, provenance)
    return provenance
