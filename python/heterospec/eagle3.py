"""EAGLE-3 drafter: the official EAGLE-3 head (SafeAILab/EAGLE ``eagle/model/cnets.py``) on top of
hidden states captured from the target.

Checkpoint layout (a directory, as published e.g. for ``yuhuili/EAGLE3-LLaMA3.1-Instruct-8B``):

``config.json``
    LlamaConfig-like: ``hidden_size`` H, ``intermediate_size`` I, ``num_attention_heads``,
    ``num_key_value_heads``, ``rms_norm_eps``, ``vocab_size`` V (the target's),
    ``draft_vocab_size`` Vd (default V), optional ``head_dim`` (default H / heads),
    ``target_hidden_size`` (default H), ``rope_theta`` / ``rope_scaling``, and optionally
    ``eagle_aux_hidden_state_layer_ids`` (top level or under ``eagle_config``) to override the
    captured target layers. ``num_hidden_layers`` is 1 (also when absent); 2 marks a
    ``train-draft --head-layers 2`` experiment, which the drafter refuses.
``model.safetensors`` or ``pytorch_model.bin``
    ============================================  =====================
    ``fc.weight``                                 ``[H, 3 * target_H]``
    ``midlayer.hidden_norm.weight``               ``[H]``
    ``midlayer.input_layernorm.weight``           ``[H]``
    ``midlayer.post_attention_layernorm.weight``  ``[H]``
    ``midlayer.self_attn.q_proj.weight``          ``[heads * hd, 2H]``
    ``midlayer.self_attn.k_proj.weight``          ``[kv_heads * hd, 2H]``
    ``midlayer.self_attn.v_proj.weight``          ``[kv_heads * hd, 2H]``
    ``midlayer.self_attn.o_proj.weight``          ``[H, heads * hd]``
    ``midlayer.mlp.gate_proj.weight``             ``[I, H]``
    ``midlayer.mlp.up_proj.weight``               ``[I, H]``
    ``midlayer.mlp.down_proj.weight``             ``[H, I]``
    ``norm.weight``                               ``[H]``
    ``lm_head.weight``                            ``[Vd, H]``
    ``d2t``  int64                                ``[Vd]`` target id = draft id + d2t[draft id]
    ``t2d``  bool                                 ``[V]``  (unused for drafting; checked)
    ``embed_tokens.weight`` (optional)            ``[V, H]``; default: the target's embedding
    ============================================  =====================

``d2t``/``t2d`` may be absent when Vd == V (the official loader deletes them then).

Computation (one draft step, per token; official semantics):

    e = embed(token)                       # the target's input embedding unless stored
    g = fc(concat(h_low, h_mid, h_high))   # only for target states; deeper tree steps feed
                                           # the head's own output state g' (already H wide)
    x = concat(input_layernorm(e), hidden_norm(g))            # [2H], embedding first
    g' = g + o_proj(attention(x))           # residual is g, not x
    g' = g' + mlp(post_attention_layernorm(g'))
    logits = lm_head(norm(g'))             # over the draft vocabulary

Sequence alignment: the draft entry at position j pairs the target state of token j with the
embedding of token j + 1 and predicts token j + 2. The captured target states are the *inputs*
of decoder layers (2, L // 2, L - 3), ascending (HF ``output_hidden_states[i]``), as the
official ``modeling_llama_kv.py`` collects them.
"""
from __future__ import annotations

import json
import math
import os
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

import heterospec_ext as hx

from .drafter import Drafter
from .errors import DraftCheckpointError, ModelLoadError
from .expansion import CandidatePool, TreeExpansion
from .lean_target import RopeTable, rotated_qkv
from .packed_linear import PackedLinear
from .target import CausalLM

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# the head trained with `heterospec train-draft` for SmolLM2-135M-Instruct (see its TRAINING.json)
SHIPPED_HEAD_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "heads",
                                "smollm2-135m-instruct-eagle3")


def default_capture_layers(num_layers: int) -> List[int]:
    """EAGLE-3's low / middle / high target layers (inputs of these decoder layers)."""
    return [2, num_layers // 2, num_layers - 3]


# ----------------------------------------------------------------------------- the head


class _RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class _Attention(nn.Module):
    """Llama attention whose q/k/v read ``in_width`` features: the 2H-wide [embedding ; state]
    of the mid layer, or H for a stacked layer."""

    def __init__(self, hidden, heads, kv_heads, head_dim, in_width):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(in_width, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(in_width, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(in_width, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)

    def qkv(self, x: torch.Tensor, rotary: nn.Module, positions: torch.Tensor):
        """q ``[B, heads, n, hd]`` and k, v ``[B, kv_heads, n, hd]`` of ``x`` ``[B, n, in]``,
        with ``rotary``'s RoPE at ``positions`` ``[B, n]`` applied to q and k."""
        b, n = x.shape[:2]
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rotary(v, positions)
        cos, sin = cos[:, None], sin[:, None]
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v


class _MLP(nn.Module):
    def __init__(self, hidden, intermediate, act):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act = act

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class _DecoderLayer(nn.Module):
    """The parts a head's decoder layers share: attention over ``in_width`` input features, the
    MLP and their norms (``hidden_norm`` too for the mid layer, which normalises the state apart
    from the embedding), and the update of the residual stream after the attention."""

    def __init__(self, cfg, in_width: int, hidden_norm: bool):
        super().__init__()
        self.self_attn = _Attention(cfg.hidden_size, cfg.num_attention_heads,
                                    cfg.num_key_value_heads, cfg.head_dim, in_width)
        from transformers.activations import ACT2FN

        self.mlp = _MLP(cfg.hidden_size, cfg.intermediate_size, ACT2FN[cfg.hidden_act])
        if hidden_norm:
            self.hidden_norm = _RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.input_layernorm = _RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = _RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def residual_update(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Output ``[B, n, H]`` from the residual input ``x`` ``[B, n, H]`` and the attention
        output ``[B, heads, n, hd]``: the residual plus the attention, then the MLP block."""
        b, _, n, _ = attn_out.shape
        x = x + self.self_attn.o_proj(attn_out.transpose(1, 2).reshape(b, n, -1))
        return x + self.mlp(self.post_attention_layernorm(x))


class _MidLayer(_DecoderLayer):
    """EAGLE-3's layer: q/k/v read the 2H-wide [embedding ; state]."""

    def __init__(self, cfg):
        super().__init__(cfg, 2 * cfg.hidden_size, hidden_norm=True)


class _StackedLayer(_DecoderLayer):
    """A plain Llama decoder layer over the H-wide state, stacked after the mid layer by
    ``num_hidden_layers`` = 2 (``layers.0.*``; a training-time capacity experiment of
    ``heterospec train-draft --head-layers 2``: the drafter runs one-layer heads)."""

    def __init__(self, cfg):
        super().__init__(cfg, cfg.hidden_size, hidden_norm=False)

    def attention_inputs(self, x: torch.Tensor, rotary: nn.Module, positions: torch.Tensor):
        """q, k, v (as :meth:`_Attention.qkv`) of the layer input ``x`` ``[B, n, H]``."""
        return self.self_attn.qkv(self.input_layernorm(x), rotary, positions)


# Stacked layers a head may have (num_hidden_layers - 1); the drafter itself needs 0.
MAX_STACKED_LAYERS = 1


class DraftKVCache:
    """The head's single-layer KV cache, batch 1, preallocated and grown on demand.

    ``keys``/``values``: views ``[1, kv_heads, length, head_dim]`` of the buffers."""

    def __init__(self, kv_heads, head_dim, dtype, device, capacity: int = 256):
        self._k = torch.zeros((1, kv_heads, capacity, head_dim), dtype=dtype, device=device)
        self._v = torch.zeros_like(self._k)
        self.length = 0

    @property
    def keys(self) -> torch.Tensor:
        return self._k[:, :, :self.length]

    @property
    def values(self) -> torch.Tensor:
        return self._v[:, :, :self.length]

    def get_seq_length(self) -> int:
        return self.length

    @property
    def key_buffer(self) -> torch.Tensor:
        """``[kv_heads, capacity, head_dim]``: the whole key buffer (rows past ``length`` are
        free), for kernels that write the new rows themselves."""
        return self._k[0]

    @property
    def value_buffer(self) -> torch.Tensor:
        return self._v[0]

    def reserve(self, n: int) -> int:
        """Grow the buffers (keeping the entries) to hold ``n`` more; returns ``length``."""
        end = self.length + n
        if end > self._k.shape[2]:
            cap = max(end, 2 * self._k.shape[2])
            grown_k = self._k.new_zeros(self._k.shape[:2] + (cap,) + self._k.shape[3:])
            grown_v = torch.zeros_like(grown_k)
            grown_k[:, :, :self.length] = self.keys
            grown_v[:, :, :self.length] = self.values
            self._k, self._v = grown_k, grown_v
        return self.length

    def append(self, k: torch.Tensor, v: torch.Tensor):
        """Write ``k``/``v`` ``[1, kv_heads, n, head_dim]`` after the entries; returns the whole
        ``(keys, values)`` including them."""
        end = self.reserve(k.shape[2]) + k.shape[2]
        self._k[:, :, self.length:end] = k
        self._v[:, :, self.length:end] = v
        self.length = end
        return self.keys, self.values

    def truncate(self, n: int) -> None:
        self.length = min(self.length, int(n))


class Eagle3Head(nn.Module):
    """The EAGLE-3 draft head with the official parameter names (see the module docstring).

    ``config`` is a ``transformers.LlamaConfig`` built from the checkpoint's config.json (with
    ``draft_vocab_size`` and ``target_hidden_size`` filled in). ``embed`` is the token embedding
    (the target's, unless the checkpoint stores ``embed_tokens``)."""

    def __init__(self, config, embed: Optional[nn.Module] = None):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.config = config
        h = config.hidden_size
        self.fc = nn.Linear(3 * config.target_hidden_size, h, bias=False)
        self.midlayer = _MidLayer(config)
        self.layers = nn.ModuleList(_StackedLayer(config) for _ in range(stacked_layers(config)))
        self.norm = _RMSNorm(h, config.rms_norm_eps)
        self.lm_head = nn.Linear(h, config.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.int64))
        self.register_buffer("t2d", torch.ones(config.vocab_size, dtype=torch.bool))
        self.rotary = LlamaRotaryEmbedding(config)
        self.embed = embed

    def new_cache(self) -> DraftKVCache:
        attn = self.midlayer.self_attn
        w = self.fc.weight
        return DraftKVCache(attn.kv_heads, attn.head_dim, w.dtype, w.device)

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, state: torch.Tensor, positions: torch.Tensor,
                visible: torch.Tensor, cache: DraftKVCache, from_target: bool) -> torch.Tensor:
        """One head pass over ``n`` entries appended to ``cache``.

        ``token_ids`` ``[n]`` int64 target ids; ``state`` ``[n, 3 * target_H]`` captured target
        states (``from_target``) or ``[n, H]`` the head's own output states; ``positions`` ``[n]``;
        ``visible`` ``[n, cache.length + n]`` bool (row i may attend to column j). Returns the
        output states ``[n, H]`` (before ``norm``); the cache grows by ``n``."""
        if len(self.layers):
            raise NotImplementedError("drafting runs one-layer heads; this head has "
                                      f"{1 + len(self.layers)} layers (train-draft only)")
        attn = self.midlayer.self_attn
        dtype = self.fc.weight.dtype
        emb = self.embed(token_ids).to(dtype)
        g = self.fc(state.to(dtype)) if from_target else state.to(dtype)
        q, k, v = self.attention_inputs(emb[None], g[None], positions[None])
        keys, values = cache.append(k, v)
        rep = attn.heads // attn.kv_heads
        keys = keys.repeat_interleave(rep, dim=1)
        values = values.repeat_interleave(rep, dim=1)
        scores = (q @ keys.transpose(2, 3)) / math.sqrt(attn.head_dim)
        scores = scores.masked_fill(~visible[None, None], torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
        return self.residual_update(g[None], probs @ values)[0]

    # The two halves of one head pass around the attention itself, shared by ``forward`` (a KV
    # cache, tree masks) and the training unroll (``train_draft.ttt_forward``), so training and
    # drafting cannot drift apart.
    def attention_inputs(self, emb: torch.Tensor, g: torch.Tensor, positions: torch.Tensor):
        """``emb``/``g`` ``[B, n, H]`` token embeddings and input states, ``positions``
        ``[B, n]``. Returns q ``[B, heads, n, hd]`` and k, v ``[B, kv_heads, n, hd]``, RoPE
        applied to q and k."""
        layer = self.midlayer
        x = torch.cat((layer.input_layernorm(emb), layer.hidden_norm(g)), dim=-1)
        return layer.self_attn.qkv(x, self.rotary, positions)

    def residual_update(self, g: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Output states ``[B, n, H]`` from input states ``g`` ``[B, n, H]`` and the attention
        output ``[B, heads, n, hd]``: the residual is ``g``, then the MLP block."""
        return self.midlayer.residual_update(g, attn_out)

    @torch.inference_mode()
    def logits(self, out_state: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits ``[n, Vd]`` from output states ``[n, H]``."""
        return self.lm_head(self.norm(out_state))

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# ----------------------------------------------------------------------------- loading


def stacked_layers(cfg) -> int:
    """Decoder layers after the mid layer (``num_hidden_layers`` - 1; official heads: 0)."""
    return int(getattr(cfg, "num_hidden_layers", 1)) - 1


def _expected_shapes(cfg) -> dict:
    h, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads

    def layer(prefix, in_width):
        return {f"{prefix}.input_layernorm.weight": (h,),
                f"{prefix}.post_attention_layernorm.weight": (h,),
                f"{prefix}.self_attn.q_proj.weight": (nh * hd, in_width),
                f"{prefix}.self_attn.k_proj.weight": (nkv * hd, in_width),
                f"{prefix}.self_attn.v_proj.weight": (nkv * hd, in_width),
                f"{prefix}.self_attn.o_proj.weight": (h, nh * hd),
                f"{prefix}.mlp.gate_proj.weight": (i, h),
                f"{prefix}.mlp.up_proj.weight": (i, h),
                f"{prefix}.mlp.down_proj.weight": (h, i)}

    shapes = {"fc.weight": (h, 3 * cfg.target_hidden_size), "midlayer.hidden_norm.weight": (h,),
              **layer("midlayer", 2 * h)}
    for li in range(stacked_layers(cfg)):
        shapes.update(layer(f"layers.{li}", h))
    shapes.update({"norm.weight": (h,), "lm_head.weight": (cfg.draft_vocab_size, h)})
    return shapes


def load_eagle3_config(path: str):
    """``transformers.LlamaConfig`` from an EAGLE-3 checkpoint's config.json, with
    ``draft_vocab_size``, ``target_hidden_size`` and ``head_dim`` resolved."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ModelLoadError(f"{path} has no config.json; not an EAGLE-3 checkpoint directory")
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as exc:
        raise DraftCheckpointError(f"{cfg_path} is not valid JSON: {exc}") from None
    return eagle3_config(raw, cfg_path)


def eagle3_config(raw, source: str = "config"):
    """``transformers.LlamaConfig`` from the dict of an EAGLE-3 config.json (``source`` names it
    in errors), with ``draft_vocab_size``, ``target_hidden_size`` and ``head_dim`` resolved."""
    cfg_path = source
    if not isinstance(raw, dict):
        raise DraftCheckpointError(f"{cfg_path} must hold a JSON object")
    need = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "vocab_size")
    missing = [k for k in need if not isinstance(raw.get(k), int)]
    if missing:
        raise DraftCheckpointError(f"{cfg_path} lacks integer field(s) {missing}")
    from transformers import LlamaConfig

    keep = {k: v for k, v in raw.items() if k not in ("architectures", "auto_map", "model_type")}
    keep.setdefault("draft_vocab_size", raw["vocab_size"])
    keep.setdefault("target_hidden_size", raw["hidden_size"])
    keep.setdefault("num_hidden_layers", 1)  # LlamaConfig's own default (32) is no head's
    layers = keep["num_hidden_layers"]
    if isinstance(layers, bool) or not isinstance(layers, int) or \
            not 1 <= layers <= 1 + MAX_STACKED_LAYERS:
        raise DraftCheckpointError(f"{cfg_path}: num_hidden_layers must be 1 (EAGLE-3) or, for "
                                   f"a train-draft experiment, 2; got {layers!r}")
    if keep.get("head_dim") is None:
        keep["head_dim"] = raw["hidden_size"] // raw["num_attention_heads"]
    try:
        cfg = LlamaConfig(**keep)
    except Exception as exc:  # noqa: BLE001 - any config the Llama code rejects
        raise DraftCheckpointError(f"{cfg_path}: {type(exc).__name__}: {exc}") from None
    cfg.draft_vocab_size = int(keep["draft_vocab_size"])
    cfg.target_hidden_size = int(keep["target_hidden_size"])
    cfg.head_dim = int(keep["head_dim"])
    eagle_cfg = raw.get("eagle_config") if isinstance(raw.get("eagle_config"), dict) else {}
    cfg.eagle_capture_layers = raw.get("eagle_aux_hidden_state_layer_ids",
                                       eagle_cfg.get("eagle_aux_hidden_state_layer_ids"))
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise DraftCheckpointError(
            f"{cfg_path}: num_attention_heads {cfg.num_attention_heads} is not a multiple of "
            f"num_key_value_heads {cfg.num_key_value_heads}")
    return cfg


def load_eagle3_state(path: str) -> dict:
    """The checkpoint's tensors by name (safetensors preferred; ``.bin`` loaded weights-only)."""
    for name in WEIGHT_FILES:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(file)
            return torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise DraftCheckpointError(
                f"could not read {file}: {type(exc).__name__}: {exc}") from None
    raise ModelLoadError(f"{path} holds none of {list(WEIGHT_FILES)}; not an EAGLE-3 checkpoint")


def build_eagle3_head(path: str, target: CausalLM) -> Eagle3Head:
    """Load and validate an EAGLE-3 head for ``target`` (every mismatch is a clear error)."""
    path = os.path.expanduser(str(path))
    if not os.path.isdir(path):
        raise ModelLoadError(f"EAGLE-3 checkpoint directory does not exist: {path}")
    cfg = load_eagle3_config(path)
    if stacked_layers(cfg):
        raise DraftCheckpointError(
            f"EAGLE-3 head {path} has num_hidden_layers {cfg.num_hidden_layers}: the drafter "
            "runs one-layer heads (the EAGLE-3 layout); train-draft --head-layers 2 is an "
            "experiment whose heads are evaluated in training only")
    state = load_eagle3_state(path)
    tcfg = target.config
    target_h = int(getattr(tcfg, "hidden_size"))
    if cfg.target_hidden_size != target_h:
        raise DraftCheckpointError(
            f"EAGLE-3 head {path} expects target hidden size {cfg.target_hidden_size} but the "
            f"target's hidden size is {target_h}: the head was trained for another model")
    if cfg.vocab_size != target.vocab_size:
        raise DraftCheckpointError(
            f"EAGLE-3 head {path} has vocab_size {cfg.vocab_size} but the target's vocabulary "
            f"has {target.vocab_size} tokens: the head was trained for another model")
    for name, shape in _expected_shapes(cfg).items():
        if name not in state:
            raise DraftCheckpointError(f"EAGLE-3 checkpoint {path} lacks tensor {name!r}")
        got = tuple(state[name].shape)
        if got != shape:
            raise DraftCheckpointError(
                f"EAGLE-3 checkpoint {path}: tensor {name!r} has shape {list(got)}, expected "
                f"{list(shape)} from config.json")
    vd, v = cfg.draft_vocab_size, cfg.vocab_size
    d2t = state.get("d2t")
    if d2t is None:
        if vd != v:
            raise DraftCheckpointError(
                f"EAGLE-3 checkpoint {path} lacks 'd2t' but draft_vocab_size {vd} != vocab_size {v}")
        d2t = torch.zeros(vd, dtype=torch.int64)
    if tuple(d2t.shape) != (vd,) or d2t.is_floating_point() or d2t.is_complex():
        raise DraftCheckpointError(
            f"EAGLE-3 checkpoint {path}: 'd2t' must be an integer tensor of shape [{vd}], got "
            f"{d2t.dtype} {list(d2t.shape)}")
    mapped = torch.arange(vd) + d2t.long()
    if vd and (int(mapped.min()) < 0 or int(mapped.max()) >= v):
        raise DraftCheckpointError(
            f"EAGLE-3 checkpoint {path}: 'd2t' maps draft ids outside the target vocabulary "
            f"[0, {v})")
    t2d = state.get("t2d")
    if t2d is not None and tuple(t2d.shape) != (v,):
        raise DraftCheckpointError(
            f"EAGLE-3 checkpoint {path}: 't2d' has shape {list(t2d.shape)}, expected [{v}]")
    emb_w = state.get("embed_tokens.weight")
    if emb_w is not None:
        if tuple(emb_w.shape) != (v, cfg.hidden_size):
            raise DraftCheckpointError(
                f"EAGLE-3 checkpoint {path}: tensor 'embed_tokens.weight' has shape "
                f"{list(emb_w.shape)}, expected {[v, cfg.hidden_size]}")
        embed = nn.Embedding(v, cfg.hidden_size)
        with torch.no_grad():
            embed.weight.copy_(emb_w)
    else:
        embed = target.model.get_input_embeddings()
        emb_dim = int(embed.weight.shape[1])
        if emb_dim != cfg.hidden_size:
            raise DraftCheckpointError(
                f"EAGLE-3 head {path} has hidden size {cfg.hidden_size} but the target's token "
                f"embedding is {emb_dim} wide and the checkpoint stores no embed_tokens")
    head = Eagle3Head(cfg)
    with torch.no_grad():
        params = dict(head.named_parameters())
        for name in _expected_shapes(cfg):
            params[name].copy_(state[name])
        head.d2t.copy_(d2t.long())
        if t2d is not None:
            head.t2d.copy_(t2d.bool())
    # float parameters only: .to(dtype) leaves the integer/bool d2t and t2d buffers alone
    head = head.to(device=target.device, dtype=target.dtype).eval()
    head.embed = embed.to(device=target.device, dtype=target.dtype) if emb_w is not None else embed
    return head


# ----------------------------------------------------------------------------- inference pass


# Rows up to which the head runs rope_cache_attention rather than torch's attention: a whole
# head pass over 200 cached rows (shipped head, bf16, 2 threads) took 0.75 against 1.23 ms at
# 1 row, 1.06 against 1.44 at 8, 1.39 against 1.73 at 16, and 2.39 against 2.43 at 32, with the
# op's first kernel (one query row at a time; the blocked kernel since is faster at every row
# count). Tree levels are top_k rows; the prompt's first pass goes to torch.
FUSED_ATTENTION_MAX_ROWS = 16


class PackedEagle3Head:
    """The head's inference pass on packed weights (:class:`~heterospec.packed_linear.
    PackedLinear`): the computation of :meth:`Eagle3Head.forward` with q/k/v and gate/up fused,
    the states ``g`` kept in float32 and RoPE from a float32 table. The drafter's hot path; the
    module stays the readable definition (training and the tests use it).

    On CPU, in float32 or bfloat16 with a SiLU MLP, the steps between the GEMMs are the
    decode-layer ops of :mod:`heterospec_ext` (one kernel each: the input norms, RoPE + cache
    append + attention for up to ``FUSED_ATTENTION_MAX_ROWS`` rows, the residual adds with their
    norms, SiLU * up); elsewhere they are the torch composition, with one
    ``scaled_dot_product_attention`` over the cache."""

    def __init__(self, head: Eagle3Head):
        layer, attn = head.midlayer, head.midlayer.self_attn
        dtype = head.fc.weight.dtype
        self.dtype = dtype
        self.heads, self.kv_heads, self.head_dim = attn.heads, attn.kv_heads, attn.head_dim
        self.hidden = head.config.hidden_size
        self.intermediate = head.config.intermediate_size
        self.eps = float(head.config.rms_norm_eps)
        self.fc = PackedLinear(head.fc.weight, None, dtype)
        self.qkv = PackedLinear.fuse([attn.q_proj, attn.k_proj, attn.v_proj], dtype)
        self.o = PackedLinear(attn.o_proj.weight, None, dtype)
        self.gate_up = PackedLinear.fuse([layer.mlp.gate_proj, layer.mlp.up_proj], dtype)
        self.down = PackedLinear(layer.mlp.down_proj.weight, None, dtype)
        self.lm_head = PackedLinear(head.lm_head.weight, None, dtype)
        self.input_norm = layer.input_layernorm.weight.detach().float()
        self.hidden_norm = layer.hidden_norm.weight.detach().float()
        self.post_norm = layer.post_attention_layernorm.weight.detach().float()
        self.final_norm = head.norm.weight.detach().float()
        self.embed = head.embed.weight.detach()
        self.act = layer.mlp.act
        self.rope = RopeTable(head.rotary)
        self.fused = (self.fc.weight.device.type == "cpu"
                      and dtype in hx.DECODE_LAYER_DTYPES and self.embed.dtype == dtype
                      and getattr(head.config, "hidden_act", "silu") in ("silu", "swish"))

    def _norm(self, x, weight):
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps).to(self.dtype)

    @torch.inference_mode()
    def __call__(self, token_ids: torch.Tensor, state: torch.Tensor,
                 positions: Union[torch.Tensor, int], visible: Optional[torch.Tensor],
                 cache: DraftKVCache, from_target: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`Eagle3Head.forward`: ``n`` entries appended to ``cache``; ``positions``
        ``[n]`` int64, or an int when every entry sits at that position (a tree level);
        ``visible`` ``[n, cache.length + n]`` bool or ``None`` (every entry visible).

        Returns ``(states, normed)``: the output states ``[n, H]`` float32 and their final
        norm ``[n, H]`` in the head's dtype, the input of :meth:`logits`."""
        n = int(token_ids.numel())
        if from_target:
            g = self.fc(state.to(self.dtype)).float()
        else:  # a copy: the fused path updates the residual stream in place
            g = state.to(torch.float32, copy=True)
        if self.fused:
            return self._fused(token_ids, g, positions, visible, cache)
        return self._composed(token_ids, g, positions, visible, cache)

    def _fused(self, token_ids, g, positions, visible, cache):
        n, eps = int(token_ids.numel()), self.eps
        x = hx.embed_hidden_rms_norm(token_ids, self.embed, g, self.input_norm, self.hidden_norm,
                                     eps)
        qkv = self.qkv(x)
        if n <= FUSED_ATTENTION_MAX_ROWS:
            if isinstance(positions, int):
                table = self.rope(positions + 1)
                positions = torch.full((n,), positions, dtype=torch.int64, device=g.device)
            else:
                table = self.rope(int(positions.max()) + 1)
            start = cache.reserve(n)
            out = hx.rope_cache_attention(qkv, table, positions, cache.key_buffer,
                                          cache.value_buffer, start, visible, self.heads,
                                          self.kv_heads)
            cache.length = start + n
        else:
            out = self._attention(qkv, positions, visible, cache)
        normed = hx.fused_add_rms_norm(g, self.o(out), self.post_norm, eps)  # g += attention
        mlp = self.down(hx.silu_and_mul(self.gate_up(normed)))
        return g, hx.fused_add_rms_norm(g, mlp, self.final_norm, eps)  # g += MLP

    def _attention(self, qkv, positions, visible, cache):
        """RoPE, cache append and torch's attention: ``[n, heads * head_dim]``."""
        n = qkv.shape[0]
        nh, nkv, hd = self.heads, self.kv_heads, self.head_dim
        rope = self.rope.at_position(positions, n) if isinstance(positions, int) \
            else self.rope.at(positions)
        q, k, v = rotated_qkv(self, qkv, rope)
        keys, values = cache.append(k[None].transpose(1, 2), v[None].transpose(1, 2))
        q = q.transpose(0, 1)[None]
        mask = None if visible is None else visible[None, None]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                             enable_gqa=nkv != nh)
        return out[0].transpose(0, 1).reshape(n, nh * hd)

    def _composed(self, token_ids, g, positions, visible, cache):
        x = torch.cat((self._norm(self.embed[token_ids].float(), self.input_norm),
                       self._norm(g, self.hidden_norm)), dim=-1)
        out = self._attention(self.qkv(x), positions, visible, cache)
        # float32 + bfloat16 promotes to float32: the residual stream stays float32
        g = g + self.o(out)
        gate_up = self.gate_up(self._norm(g, self.post_norm))
        i = self.intermediate
        g = g + self.down(self.act(gate_up[:, :i]) * gate_up[:, i:])
        return g, self._norm(g, self.final_norm)

    @torch.inference_mode()
    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits ``[n, Vd]`` (head dtype) from the normed output states
        ``[n, H]`` that :meth:`__call__` returns."""
        return self.lm_head(normed)


# ----------------------------------------------------------------------------- the drafter


class Eagle3Drafter(Drafter):
    """Tree drafter over an EAGLE-3 head fed by the target's captured hidden states.

    The expansion is :class:`~heterospec.expansion.TreeExpansion` (EAGLE-2, shared with
    :class:`~heterospec.ModelDrafter`): each level is one head pass over the ``top_k`` frontier
    nodes and one ``draft_topk_entropy`` launch over their draft-vocabulary logits. Draft ids
    become target ids through ``d2t``. A tree node at depth d sits at position ``root_pos + d``
    and feeds its parent's output state (the official EAGLE-3 tree step).

    KV cache: one entry per committed (target state of token j, token j + 1) pair, then the
    tree entries of the current cycle, tree-masked. After verification the tree entries are all
    dropped (they were computed from draft states, not target states) and the accepted
    tokens are re-fed with their target states at the next ``draft`` call. A one-token prompt
    has no target state before its token; a zero state stands in for it (only draft quality,
    never the output, depends on it)."""

    uses_target_hidden = True

    def __init__(self, head: Eagle3Head, target: CausalLM, top_k: int = 10,
                 capture_layers: Optional[List[int]] = None):
        if top_k < 1 or top_k > min(hx.ops.draft_topk_entropy.MAX_TOPK,
                                    head.config.draft_vocab_size):
            raise ValueError(f"top_k must be in [1, min(64, draft vocab)], got {top_k}")
        if len(head.layers):
            raise DraftCheckpointError(
                f"the head has {1 + len(head.layers)} decoder layers: the drafter runs one-layer "
                "heads (the EAGLE-3 layout)")
        num_layers = len(target.decoder_layers())
        layers = capture_layers
        if layers is None:
            layers = getattr(head.config, "eagle_capture_layers", None)
        if layers is None:
            layers = default_capture_layers(num_layers)
        layers = [int(i) for i in layers]
        if len(layers) != 3 or len(set(layers)) != 3 or not all(0 <= i < num_layers for i in layers):
            raise DraftCheckpointError(
                f"EAGLE-3 needs three distinct target layers in [0, {num_layers}), got {layers}; "
                f"the target has too few layers for the default (2, L//2, L-3): set "
                "eagle_aux_hidden_state_layer_ids in the head's config.json")
        target.capture_hidden_states(layers)
        self.head = head
        self.packed = PackedEagle3Head(head)
        # target id of every draft id (d2t applied once, one gather per level)
        self._target_ids = head.to_target_ids(torch.arange(head.config.draft_vocab_size,
                                                           device=target.device))
        self.target = target
        self.capture_layers = sorted(layers)
        self.top_k = top_k
        self.tokenizer = target.tokenizer
        self.vocab_size = target.vocab_size
        self.device = target.device
        self.cache: Optional[DraftKVCache] = None
        self.expansion = TreeExpansion(top_k, self.device)
        self.forward_calls = 0

    @classmethod
    def from_pretrained(cls, path: str, target: CausalLM, top_k: int = 10,
                        capture_layers: Optional[List[int]] = None) -> "Eagle3Drafter":
        """Load an official-layout EAGLE-3 checkpoint directory for ``target``."""
        return cls(build_eagle3_head(path, target), target, top_k=top_k,
                   capture_layers=capture_layers)

    # -- per request
    def reset(self, prompt_ids: torch.Tensor, target_hidden: Optional[torch.Tensor] = None):
        self.cache = self.head.new_cache()
        self.forward_calls = 0
        ids = torch.as_tensor(prompt_ids, dtype=torch.int64, device=self.device).reshape(-1)
        width = 3 * self.head.config.target_hidden_size
        if ids.numel() == 1:
            state = torch.zeros((1, width), dtype=self.head.fc.weight.dtype, device=self.device)
            self._queue(state, ids)
            return
        self._queue(target_hidden, ids[1:])

    def _queue(self, state, tokens):
        state = torch.as_tensor(state)
        if state.dim() != 2 or state.shape[0] != tokens.numel():
            raise ValueError(
                f"target_hidden must be [{tokens.numel()}, {3 * self.head.config.target_hidden_size}]"
                f" (one row per new token), got {list(state.shape)}")
        self._pending_state = state
        self._pending_tokens = tokens

    # -- per cycle
    def draft(self, root: int, levels: int) -> CandidatePool:
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        if int(self._pending_tokens[-1]) != int(root):
            raise ValueError(f"draft root {root} is not the last committed token "
                             f"{int(self._pending_tokens[-1])}")
        k, dev = self.top_k, self.device
        start = self.cache.length
        n = self._pending_tokens.numel()
        pos = torch.arange(start, start + n, device=dev)
        visible = None
        if n > 1:
            visible = torch.ones((n, start + n), dtype=torch.bool, device=dev).tril_(start)
        out, normed = self.packed(self._pending_tokens, self._pending_state, pos, visible,
                                  self.cache, from_target=True)
        self.forward_calls += 1
        self._prefix = self.cache.length  # committed entries; the root's is the last
        # output states: row 0 the root's, row 1 + s the node fed in tree slot s
        self._states = out[-1:]
        stats = hx.draft_topk_entropy(self.packed.logits(normed[-1:]), k, 1.0)
        self.expansion.start(root, self._target_ids[stats.topk_ids[0]],
                             stats.topk_logprobs[0], stats.topk_entropy[0])
        return self.extend(levels - 1)

    def extend(self, extra_levels: int) -> CandidatePool:
        k, exp = self.top_k, self.expansion
        for _ in range(extra_levels):
            visible = exp.frontier_visibility(self._prefix)
            states = self._states[exp.frontier_parent_slots() + 1]
            out, normed = self.packed(exp.frontier_tokens(), states,
                                      self._prefix - 1 + exp.levels, visible, self.cache,
                                      from_target=False)
            self.forward_calls += 1
            self._states = torch.cat((self._states, out))
            stats = hx.draft_topk_entropy(self.packed.logits(normed), k, 1.0)
            exp.grow(self._target_ids[stats.topk_ids], stats.topk_logprobs, stats.topk_entropy)
        return exp.pool()

    def commit(self, path_pool_nodes: List[int], new_tokens: List[int],
               target_hidden: Optional[torch.Tensor] = None) -> None:
        """Drop every tree entry; queue the new tokens with the target states before them
        (``target_hidden`` ``[len(new_tokens), 3 * target_H]``: root, then accepted nodes)."""
        if target_hidden is None:
            raise ValueError("Eagle3Drafter.commit needs target_hidden (the target's captured "
                             "states of the root and the accepted nodes)")
        self.cache.truncate(self._prefix)
        self._queue(target_hidden, torch.tensor([int(t) for t in new_tokens], dtype=torch.int64,
                                                device=self.device))
