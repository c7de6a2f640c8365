"""The target's forward for CPU decoding: a Llama-family decoder run layer by layer on weights
pre-packed for the CPU GEMM library, over a preallocated KV cache.

Why not the Hugging Face module: on a 2-core CPU a decode step of SmolLM2-135M through
``LlamaForCausalLM`` in bfloat16 spends more time in per-call weight re-layout, mask building and
small tensor copies than in reading the weights (bench/RESULTS.md). Here each decoder layer is
four packed GEMMs (q/k/v fused, o, gate/up fused, down) and, between them, the decode-layer ops
of ``heterospec_ext``: ``fused_add_rms_norm`` (residual add and the next norm in one pass),
``silu_and_mul``, and for a few rows over a cache of usual length ``rope_cache_attention``
(RoPE, cache append and attention). More work, a prompt's chunks or a long context, takes RoPE
from a precomputed table and torch's ``scaled_dot_product_attention``, which is faster there.
The residual stream stays in float32 whatever the weight dtype. Weight dtypes the ops do not take (float16) run the same layer as a
torch composition.

It computes the same function as the HF model (same weights, same normalisation, rotary and
attention); only the float rounding order differs. ``tests/test_lean_target.py`` compares its
logits with the HF forward in float32 and bfloat16, on random and real models.

Verifier interface (shared with :class:`~heterospec.target.DynamicTreeCache` and
:class:`~heterospec.static_cache.StaticTreeCache`): ``reset``, ``prefill`` (append committed
tokens), ``tree_forward`` (score tree nodes after the committed prefix, uncommitted) and
``compact`` (commit the accepted nodes).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

import heterospec_ext as hx

from .errors import GenerationConfigError, UnsupportedModelError
from .packed_linear import PackedLinear
from .target import CausalLM

# model_type values whose decoder layer is Llama's (RMSNorm, RoPE, GQA attention, SwiGLU MLP)
LLAMA_FAMILY = ("llama", "mistral", "qwen2")
# RoPE variants whose cos/sin depend only on the position (not on the sequence length)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# prompt tokens per prefill forward: bounds the mask's memory and returns control to Python
# (Ctrl-C) between chunks, at no measurable cost in GEMM efficiency
PREFILL_CHUNK = 512
# LeanDecoder's attention is rope_cache_attention for up to FUSED_ATTENTION_MAX_ROWS new rows
# when rows x keys is at most FUSED_ATTENTION_MAX_WORK, else RoPE + torch's attention. Against
# the latter (bench_lean_decode.py --parts attention; SmolLM2's 9/3 heads, bf16, 2 threads) the
# op is 2.3x faster at 1 row and 1.6x at 16 over 300 cached rows, 1.2x at 32; over 700 cached
# rows 1.7x at 1 row, 1.06x at 16 and 0.85x at 32; over 1,500 about even up to 4 rows and
# 0.8x at 16. One-token steps and the trees of a usual context stay on the op.
FUSED_ATTENTION_MAX_ROWS = 32
FUSED_ATTENTION_MAX_WORK = 12_000


def lean_unsupported_reason(model) -> Optional[str]:
    """``None`` when :class:`LeanDecoder` can run ``model`` exactly, else why not."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return "the model has no config"
    mtype = getattr(cfg, "model_type", None)
    if mtype not in LLAMA_FAMILY:
        return f"model_type {mtype!r} is not one of {list(LLAMA_FAMILY)}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r} (only silu)"
    if getattr(cfg, "mlp_bias", False):
        return "mlp_bias"
    layer_types = getattr(cfg, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types) or getattr(cfg, "use_sliding_window", False):
        return "sliding-window attention"
    if mtype == "mistral" and getattr(cfg, "sliding_window", None):
        return "sliding-window attention"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) \
        else "default"
    if rope_type not in STATIC_ROPE_TYPES:
        return f"rope type {rope_type!r} (only {list(STATIC_ROPE_TYPES)})"
    body = getattr(model, "model", None)
    if body is None or not hasattr(body, "layers") or not hasattr(body, "rotary_emb") or \
            not hasattr(body, "norm") or getattr(model, "lm_head", None) is None:
        return "not laid out as model.layers / rotary_emb / norm / lm_head"
    if next(model.parameters()).device.type != "cpu":
        return "not on the CPU"
    return None


class RopeTable:
    """Float32 rotary tables of a HF rotary module, evaluated at every position once and grown on
    demand (up to ``limit`` positions).

    ``table`` ``[positions, 2, head_dim]`` holds ``cos`` and the *signed* ``sin`` (first half
    negated), so that rotating is ``x * cos + roll(x, head_dim / 2) * signed_sin``: HF's
    ``x * cos + rotate_half(x) * sin`` in three tensor ops instead of six (each op costs
    microseconds at decode sizes, and a decoder runs this once per layer)."""

    def __init__(self, rotary, limit: int = 1 << 20):
        self.rotary = rotary
        self.limit = int(limit)
        self.table = torch.zeros(0, 2, 0)

    def __call__(self, need: int) -> torch.Tensor:
        """The table, grown to at least ``need`` positions."""
        if need > self.table.shape[0]:
            cap = min(self.limit, max(need, 2 * self.table.shape[0], 1024))
            with torch.inference_mode():
                cos, sin = self.rotary(torch.zeros(1), torch.arange(cap)[None])
                cos, sin = cos[0].float(), sin[0].float()
                half = sin.shape[-1] // 2
                signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
                self.table = torch.stack((cos, signed), dim=1)
        return self.table

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        """``[n, 2, head_dim]``: the rows of ``positions`` ``[n]`` int64."""
        return self(int(positions.max()) + 1)[positions]

    def at_position(self, position: int, n: int) -> torch.Tensor:
        """``[n, 2, head_dim]`` (a broadcast view): ``n`` rows at the same ``position``."""
        return self(position + 1)[position:position + 1].expand(n, -1, -1)

    @staticmethod
    def rotate(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """RoPE of ``x`` ``[n, heads, head_dim]`` float32, with ``rows`` ``[n, 2, head_dim]`` from
        :meth:`at` or :meth:`at_position`. Returns float32 ``[n, heads, head_dim]``."""
        cos, signed_sin = rows[:, 0:1], rows[:, 1:2]
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), signed_sin)


class _Layer:
    __slots__ = ("qkv", "o", "gate_up", "down", "norm1", "norm2")


class LeanWeights:
    """The target's weights packed once (shared by every :class:`LeanDecoder` of the target:
    the AR baseline and each generator reuse one copy)."""

    def __init__(self, model, dtype):
        cfg = model.config
        self.dtype = dtype
        self.hidden = int(cfg.hidden_size)
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or self.hidden // self.heads)
        self.intermediate = int(cfg.intermediate_size)
        self.eps = float(cfg.rms_norm_eps)
        self.context = int(getattr(cfg, "max_position_embeddings", 0) or 1 << 20)
        body = model.model
        self.layers: List[_Layer] = []
        for hf in body.layers:
            a, m = hf.self_attn, hf.mlp
            layer = _Layer()
            layer.qkv = PackedLinear.fuse([a.q_proj, a.k_proj, a.v_proj], dtype)
            layer.o = PackedLinear(a.o_proj.weight, getattr(a.o_proj, "bias", None), dtype)
            layer.gate_up = PackedLinear.fuse([m.gate_proj, m.up_proj], dtype)
            layer.down = PackedLinear(m.down_proj.weight, None, dtype)
            layer.norm1 = hf.input_layernorm.weight.detach().float()
            layer.norm2 = hf.post_attention_layernorm.weight.detach().float()
            self.layers.append(layer)
        self.embed = body.embed_tokens.weight.detach()
        self.final_norm = body.norm.weight.detach().float()
        self.lm_head = PackedLinear(model.lm_head.weight, getattr(model.lm_head, "bias", None),
                                    dtype)
        self.rope = RopeTable(body.rotary_emb, self.context)
        # the decode-layer ops between the GEMMs (False: the torch composition, same function)
        self.fused = dtype in hx.DECODE_LAYER_DTYPES

    @staticmethod
    def of(target: CausalLM) -> "LeanWeights":
        """The packed weights of ``target`` (packed on first use, then cached on it)."""
        cached = getattr(target, "_lean_weights", None)
        if cached is None or cached.dtype != target.dtype:
            cached = LeanWeights(target.model, target.dtype)
            target._lean_weights = cached
        return cached


class LeanDecoder:
    """Batch-1 decoding forward of a Llama-family target over its own KV cache.

    ``k``/``v``: ``[layers, kv_heads, capacity, head_dim]`` in the weight dtype; ``length``: the
    committed entries (a host int: this is a CPU path, host reads are free). Capacity grows on
    demand up to the model's context length."""

    def __init__(self, target: CausalLM, capacity: int = 1024):
        reason = lean_unsupported_reason(target.model)
        if reason is not None:
            raise UnsupportedModelError(f"{target.name} cannot use the lean CPU path: {reason}")
        self.target = target
        self.w = LeanWeights.of(target)
        self.dtype = self.w.dtype
        self.context = self.w.context
        self.capacity = 0
        self.k = self.v = None
        self.length = 0
        self._prefix = 0
        self._grow(min(max(int(capacity), 16), self.context))

    # -- storage
    def _grow(self, need: int) -> None:
        if need <= self.capacity:
            return
        if need > self.context:
            raise GenerationConfigError(
                f"the request needs {need} positions but {self.target.name} has a context of "
                f"{self.context} tokens")
        cap = min(self.context, max(need, 2 * self.capacity, 256))
        with torch.inference_mode():
            shape = (len(self.w.layers), self.w.kv_heads, cap, self.w.head_dim)
            k = torch.zeros(shape, dtype=self.dtype)
            v = torch.zeros(shape, dtype=self.dtype)
            if self.k is not None and self.length:
                k[:, :, :self.length] = self.k[:, :, :self.length]
                v[:, :, :self.length] = self.v[:, :, :self.length]
            self.k, self.v = k, v
        self.w.rope(cap)
        self.capacity = cap

    def get_seq_length(self) -> int:
        return self.length

    def committed(self):
        """``(keys, values)``: per layer ``[1, kv_heads, length, head_dim]`` (for inspection)."""
        n = self.length
        return ([self.k[i:i + 1, :, :n] for i in range(len(self.w.layers))],
                [self.v[i:i + 1, :, :n] for i in range(len(self.w.layers))])

    # -- the verifier interface
    def reset(self) -> None:
        self.length = 0

    def prefill(self, ids: torch.Tensor, last_only: bool = True) -> torch.Tensor:
        """Append committed tokens ``ids`` ``[n]`` int64 causally (in chunks of
        ``PREFILL_CHUNK``). Returns logits ``[1, V]`` of the last token (``[n, V]`` without
        ``last_only``) in the weight dtype."""
        n = int(ids.numel())
        if n == 0:
            raise GenerationConfigError("prefill needs at least one token")
        self._grow(self.length + n)
        outs, captured = [], []
        for a in range(0, n, PREFILL_CHUNK):
            chunk = ids[a:a + PREFILL_CHUNK]
            m = chunk.numel()
            start = self.length
            mask = None
            if m > 1:
                rows = torch.arange(m)
                mask = (torch.arange(start + m)[None, :] <= (start + rows)[:, None])[None, None]
            last = last_only and a + m == n
            outs.append(self._forward(chunk, start + torch.arange(m), start, mask,
                                      rows=slice(m - 1, m) if last else None))
            if self.target.capture_layer_ids:
                captured.append(self.target.captured_hidden)
            self.length += m
        if captured:
            self.target.captured_hidden = torch.cat(captured)
        return outs[-1] if last_only else torch.cat(outs)

    def tree_forward(self, tokens: torch.Tensor, depth: torch.Tensor, ancestors: torch.Tensor,
                     last_only: bool = False) -> torch.Tensor:
        """Score tree nodes ``tokens`` ``[n]`` int64 at positions ``length + depth`` (``depth``
        ``[n]``, root 0) under ``ancestors`` ``[n, n]`` bool (row i sees column j iff j is i or an
        ancestor of i; every committed entry is visible). Returns logits ``[n, V]``; the entries
        land after the committed ones, uncommitted until :meth:`compact`."""
        n = int(tokens.numel())
        self._grow(self.length + n)
        self._prefix = start = self.length
        mask = None
        if n > 1:
            mask = torch.ones((n, start + n), dtype=torch.bool)
            mask[:, start:] = ancestors
            mask = mask[None, None]
        rows = slice(n - 1, n) if last_only else None
        return self._forward(tokens, start + depth, start, mask, rows=rows)

    @torch.inference_mode()
    def compact(self, accepted_nodes: torch.Tensor, num_accepted) -> None:
        """Commit the tree entries of ``accepted_nodes`` (tree indices, root first, ``-1``
        padded; the first ``num_accepted + 1`` are kept) after the committed prefix."""
        keep = int(num_accepted) + 1
        nodes = accepted_nodes.reshape(-1)[:keep]
        start = self._prefix
        if not bool((nodes == torch.arange(keep)).all()):
            src = start + nodes
            self.k[:, :, start:start + keep] = self.k.index_select(2, src)
            self.v[:, :, start:start + keep] = self.v.index_select(2, src)
        self.length = start + keep

    # -- the forward
    @torch.inference_mode()
    def _forward(self, tokens, positions, start, mask, rows=None) -> torch.Tensor:
        """Logits of ``tokens`` ``[n]`` at ``positions`` ``[n]``, writing their K/V at cache
        slots ``start .. start + n - 1``; ``mask`` ``[1, 1, n, start + n]`` bool or ``None`` (all
        visible). ``rows`` selects the rows whose logits are computed."""
        n = int(tokens.numel())
        end = start + n
        w = self.w
        if w.fused and n <= FUSED_ATTENTION_MAX_ROWS and n * end <= FUSED_ATTENTION_MAX_WORK:
            table = w.rope(int(positions.max()) + 1)
            visible = None if mask is None else mask[0, 0]

            def attend(index, qkv):
                return hx.rope_cache_attention(qkv, table, positions, self.k[index],
                                               self.v[index], start, visible, w.heads,
                                               w.kv_heads)
        else:
            rope = w.rope.at(positions)

            def attend(index, qkv):
                q, k, v = rotated_qkv(w, qkv, rope)
                self.k[index, :, start:end] = k.transpose(0, 1)
                self.v[index, :, start:end] = v.transpose(0, 1)
                out = F.scaled_dot_product_attention(
                    q.transpose(0, 1)[None], self.k[index:index + 1, :, :end],
                    self.v[index:index + 1, :, :end], attn_mask=mask,
                    enable_gqa=w.kv_heads != w.heads)
                return out[0].transpose(0, 1).reshape(n, w.heads * w.head_dim)

        return decoder_forward(self.target, w, tokens, attend, rows)


def rotated_qkv(w, qkv: torch.Tensor, rope: torch.Tensor):
    """``(q, k, v)`` of a fused q/k/v projection ``qkv`` ``[n, (heads + 2 kv_heads) head_dim]``
    of a layer ``w`` with ``heads``, ``kv_heads``, ``head_dim`` and ``dtype``
    (:class:`LeanWeights`, ``PackedEagle3Head``): ``q`` ``[n, heads, head_dim]`` and ``k``
    ``[n, kv_heads, head_dim]`` rotated by ``rope``
    ``[n, 2, head_dim]`` (:meth:`RopeTable.at`), ``v`` ``[n, kv_heads, head_dim]``; all in the
    weight dtype."""
    n, nh, nkv = qkv.shape[0], w.heads, w.kv_heads
    qkv = qkv.view(n, nh + 2 * nkv, w.head_dim)
    qk = RopeTable.rotate(qkv[:, :nh + nkv].float(), rope).to(w.dtype)
    return qk[:, :nh], qk[:, nh:], qkv[:, nh + nkv:]


@torch.inference_mode()
def decoder_forward(target: CausalLM, w: LeanWeights, tokens: torch.Tensor, attend,
                    rows=None) -> torch.Tensor:
    """The decoder on ``n`` token rows (one or several sequences): embedding, every layer, final
    norm and the output projection of ``rows`` (all rows when ``None``). ``attend(index, qkv)``
    gets the layer's fused q/k/v projection ``[n, (heads + 2 kv_heads) head_dim]`` in the weight
    dtype, applies RoPE at the rows' positions, stores the keys/values where its cache wants
    them and returns the attention output ``[n, heads * head_dim]`` in the weight dtype. Sets
    ``target.captured_hidden`` (``[n, 3H]``) when the target captures layers."""
    n = int(tokens.numel())
    dt, eps = w.dtype, w.eps
    capture = target.capture_layer_ids
    captured = {}
    layers = w.layers
    # the residual stream x, float32; h: the normed input of the next GEMM, weight dtype
    embedded = w.embed[tokens].to(dt)
    if w.fused:
        x = torch.zeros(n, w.hidden)
        h = hx.fused_add_rms_norm(x, embedded, layers[0].norm1, eps)  # x = embedded
    else:
        x = embedded.float()
        h = _rms_norm(x, layers[0].norm1, eps, dt)
    for index, layer in enumerate(layers):
        if capture and index in capture:
            captured[index] = x.to(dt, copy=True)  # x is updated in place below
        attn = attend(index, layer.qkv(h))
        next_norm = layers[index + 1].norm1 if index + 1 < len(layers) else w.final_norm
        if w.fused:
            h = hx.fused_add_rms_norm(x, layer.o(attn), layer.norm2, eps)  # x += attention
            mlp = layer.down(hx.silu_and_mul(layer.gate_up(h)))
            h = hx.fused_add_rms_norm(x, mlp, next_norm, eps)  # x += MLP
        else:
            x = x + layer.o(attn)  # float32 + weight dtype: float32
            gate_up = layer.gate_up(_rms_norm(x, layer.norm2, eps, dt))
            i = w.intermediate
            x = x + layer.down(F.silu(gate_up[:, :i]) * gate_up[:, i:])
            h = _rms_norm(x, next_norm, eps, dt)
    target.forward_calls += 1
    target.forward_tokens += n
    if capture:
        target.captured_hidden = torch.cat([captured[i] for i in capture], dim=-1)
    if rows is not None:
        h = h[rows]
    return w.lm_head(h)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps).to(dtype)


class BatchGreedyGenerator:
    """Greedy answers for many prompts on the lean forward, with continuous batching: ``batch``
    sequences decode together (one forward of ``batch`` rows per step, the weights read once),
    and a finished sequence's slot takes the next prompt at once.

    :meth:`run` yields, per prompt in order of completion, the record the training pass needs:
    ``index`` (the prompt's), ``tokens`` (prompt + answer, EOS included when reached), and for
    every position the captured states ``[T, 3H]`` and the target's top-``topk`` next-token
    log-probs and ids (``[T, topk]``), computed by the same forwards that chose the tokens."""

    def __init__(self, target: CausalLM, batch: int, capacity: int):
        reason = lean_unsupported_reason(target.model)
        if reason is not None:
            raise UnsupportedModelError(f"{target.name} cannot use the lean CPU path: {reason}")
        self.target = target
        self.w = LeanWeights.of(target)
        self.batch = int(batch)
        self.capacity = int(capacity)
        shape = (len(self.w.layers), self.batch, self.w.kv_heads, self.capacity, self.w.head_dim)
        with torch.inference_mode():
            self.k = torch.zeros(shape, dtype=self.w.dtype)
            self.v = torch.zeros(shape, dtype=self.w.dtype)

    def _prefill(self, slot: int, ids: torch.Tensor) -> torch.Tensor:
        n = int(ids.numel())
        mask = torch.ones((n, n), dtype=torch.bool).tril_()[None, None]
        w = self.w

        rope = w.rope.at(torch.arange(n))

        def attend(index, qkv):
            q, k, v = rotated_qkv(w, qkv, rope)
            self.k[index, slot, :, :n] = k.transpose(0, 1)
            self.v[index, slot, :, :n] = v.transpose(0, 1)
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None], self.k[index, slot:slot + 1, :, :n],
                self.v[index, slot:slot + 1, :, :n], attn_mask=mask,
                enable_gqa=w.kv_heads != w.heads)
            return out[0].transpose(0, 1).reshape(n, w.heads * w.head_dim)

        return decoder_forward(self.target, w, ids, attend)

    def _step(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """One decode step: ``tokens`` ``[B]`` at positions ``lengths`` ``[B]`` (each row's
        cached entries), every row attending to its own slot only."""
        w = self.w
        width = int(lengths.max()) + 1
        slots = torch.arange(tokens.numel())
        visible = (torch.arange(width)[None, :] <= lengths[:, None])[:, None, None, :]

        rope = w.rope.at(lengths)

        def attend(index, qkv):
            q, k, v = rotated_qkv(w, qkv, rope)
            self.k[index][slots, :, lengths] = k
            self.v[index][slots, :, lengths] = v
            out = F.scaled_dot_product_attention(
                q[:, :, None], self.k[index, :, :, :width], self.v[index, :, :, :width],
                attn_mask=visible, enable_gqa=w.kv_heads != w.heads)
            return out[:, :, 0].reshape(tokens.numel(), w.heads * w.head_dim)

        return decoder_forward(self.target, w, tokens, attend)

    def run(self, prompts, max_new: int, eos: Optional[int], topk: int):
        """Records for ``prompts`` (lists of token ids), indexed by position."""
        return self.run_stream(enumerate(prompts), max_new, eos, topk)

    @torch.inference_mode()
    def run_stream(self, prompts, max_new: int, eos: Optional[int], topk: int):
        """Records for an iterator of ``(index, prompt)``, read only as slots free up."""

        target = self.target
        pending = iter(prompts)
        exhausted = False
        live = {}  # slot -> state dict
        free = list(range(self.batch))[::-1]
        while live or not exhausted:
            while free and not exhausted:
                nxt = next(pending, None)
                if nxt is None:
                    exhausted = True
                    break
                index, prompt = nxt
                if len(prompt) + max_new > self.capacity:
                    raise GenerationConfigError(
                        f"prompt {index} ({len(prompt)} tokens) + max_new {max_new} exceed the "
                        f"generator's capacity {self.capacity}")
                slot = free.pop()
                target.captured_hidden = None
                logits = self._prefill(slot, torch.tensor(prompt, dtype=torch.int64))
                stats = hx.draft_topk_entropy(logits, topk, 1.0)
                live[slot] = {"index": index, "tokens": list(prompt), "answer": 0,
                              "states": [target.captured_hidden],
                              "ids": [stats.topk_ids], "logp": [stats.topk_logprobs],
                              "next": int(stats.topk_ids[-1, 0])}
            if not live:
                break
            # every slot decodes each step (rows of free slots, only at the tail, are ignored):
            # row r reads and writes cache slot r, so no cache ever moves
            slots = range(self.batch)
            feed = torch.tensor([live[s]["next"] if s in live else 0 for s in slots],
                                dtype=torch.int64)
            lengths = torch.tensor([len(live[s]["tokens"]) if s in live else 0 for s in slots],
                                   dtype=torch.int64)
            target.captured_hidden = None
            logits = self._step(feed, lengths)
            stats = hx.draft_topk_entropy(logits, topk, 1.0)
            hidden = target.captured_hidden
            for r in [s for s in slots if s in live]:
                st = live[r]
                tok = int(feed[r])
                st["tokens"].append(tok)
                st["answer"] += 1
                if hidden is not None:
                    st["states"].append(hidden[r:r + 1])
                st["ids"].append(stats.topk_ids[r:r + 1])
                st["logp"].append(stats.topk_logprobs[r:r + 1])
                st["next"] = int(stats.topk_ids[r, 0])
                if tok == eos or st["answer"] >= max_new:
                    done = live.pop(r)
                    free.append(r)
                    yield {"index": done["index"], "tokens": done["tokens"],
                           "states": torch.cat(done["states"]) if hidden is not None else None,
                           "top_ids": torch.cat(done["ids"]),
                           "top_logp": torch.cat(done["logp"])}
