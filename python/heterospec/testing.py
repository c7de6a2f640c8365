"""Helpers for testing the driver (and code built on it) without real checkpoints: tiny randomly
initialised Llamas, a stand-in tokenizer, model wrappers that lack a feature the driver needs,
EAGLE-3 heads in the official checkpoint layout, KV-cache comparison, the target processing of
the sampling contract in float64, and the ``heterospec`` command in a subprocess.

Needs the driver's extra dependencies (``pip install "heterospec[driver]"``); nothing here is
imported by the driver itself."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from typing import Sequence

import torch


# ----------------------------------------------------------------------------- models


def tiny_llama(vocab=32, seed=0, layers=2, hidden=32, logit_scale=1.0):
    """A randomly initialised small Llama (eager attention, fp32) for fast exact tests; the
    lm_head is scaled by ``logit_scale`` (large: peaked, high-acceptance distributions)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=False,
                      attn_implementation="eager", bos_token_id=0, eos_token_id=1,
                      pad_token_id=None)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    return model


class FakeTokenizer:
    """Just enough tokenizer for the vocabulary check: ``get_vocab()`` of a fixed mapping."""

    def __init__(self, vocab):
        self._vocab = dict(vocab)

    def get_vocab(self):
        return dict(self._vocab)


class _WrappedLM(torch.nn.Module):
    """A causal LM forwarding to ``inner`` with a reduced ``forward`` signature."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()


class IgnoresMask(_WrappedLM):
    """A causal LM that silently ignores custom attention masks and positions."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                use_cache=None, logits_to_keep=0):
        return self.inner(input_ids=input_ids, cache=cache, use_cache=use_cache)


class NoPositions(_WrappedLM):
    """A causal LM whose forward takes no ``position_ids``."""

    def forward(self, input_ids=None, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def greedy_by_full_forwards(lm, prompt: Sequence[int], n: int) -> list:
    """The ``n`` greedy tokens after ``prompt``, each from a full forward of the whole sequence
    without a cache: independent of every driver code path. ``lm`` is a ``CausalLM`` (on any
device)."""
    device = next(lm.model.parameters()).device
    seq = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([seq], device=device)).logits[0, -1]
        seq.append(int(torch.argmax(logits)))
    return seq[len(prompt):]


# ----------------------------------------------------------------------------- EAGLE-3 heads


def eagle3_official_shapes(h, inter, heads, kv_heads, vd, target_h=None) -> dict:
    """Parameter name -> shape of an official EAGLE-3 head (SafeAILab/EAGLE
    eagle/model/cnets.py, EAGLE-3 Model: fc, midlayer = LlamaDecoderLayeremb, norm, lm_head),
    written out here rather than taken from the driver's loader."""
    hd = h // heads
    th = target_h or h
    return {
        "fc.weight": (h, 3 * th),
        "midlayer.hidden_norm.weight": (h,),
        "midlayer.input_layernorm.weight": (h,),
        "midlayer.post_attention_layernorm.weight": (h,),
        "midlayer.self_attn.q_proj.weight": (heads * hd, 2 * h),
        "midlayer.self_attn.k_proj.weight": (kv_heads * hd, 2 * h),
        "midlayer.self_attn.v_proj.weight": (kv_heads * hd, 2 * h),
        "midlayer.self_attn.o_proj.weight": (h, heads * hd),
        "midlayer.mlp.gate_proj.weight": (inter, h),
        "midlayer.mlp.up_proj.weight": (inter, h),
        "midlayer.mlp.down_proj.weight": (h, inter),
        "norm.weight": (h,),
        "lm_head.weight": (vd, h),
    }


def official_eagle3_config(h=32, inter=64, heads=4, kv_heads=2, vocab=64, vd=48, **extra) -> dict:
    """config.json as the official EAGLE-3 checkpoints write it (LlamaForCausalLMEagle3):
    hidden size ``h``, target vocabulary ``vocab``, draft vocabulary ``vd``."""
    cfg = {"architectures": ["LlamaForCausalLMEagle3"], "bos_token_id": 0, "eos_token_id": 1,
           "hidden_act": "silu", "hidden_size": h, "initializer_range": 0.02,
           "intermediate_size": inter, "max_position_embeddings": 2048, "model_type": "llama",
           "num_attention_heads": heads, "num_hidden_layers": 1, "num_key_value_heads": kv_heads,
           "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
           "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float32",
           "use_cache": True, "vocab_size": vocab, "draft_vocab_size": vd}
    cfg.update(extra)
    return cfg


def random_eagle3_state(cfg: dict, seed=0, draft_ids=None) -> dict:
    """A random state dict for ``cfg`` in the official layout, with ``d2t`` / ``t2d`` mapping
    the draft vocabulary to ``draft_ids`` (sorted target ids; default a random subset)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in eagle3_official_shapes(cfg["hidden_size"], cfg["intermediate_size"],
                                              cfg["num_attention_heads"],
                                              cfg["num_key_value_heads"],
                                              cfg["draft_vocab_size"]).items():
        if name.endswith("norm.weight"):
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            state[name] = torch.randn(shape, generator=g) / math.sqrt(shape[-1])
    vd, v = cfg["draft_vocab_size"], cfg["vocab_size"]
    if draft_ids is None:
        draft_ids = torch.randperm(v, generator=g)[:vd]
    draft_ids = torch.as_tensor(draft_ids).sort().values
    state["d2t"] = draft_ids - torch.arange(vd)  # target id = draft id + d2t[draft id]
    t2d = torch.zeros(v, dtype=torch.bool)
    t2d[draft_ids] = True
    state["t2d"] = t2d
    return state


def save_eagle3_head(path, cfg: dict, state: dict, fmt="safetensors") -> str:
    """Writes ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin`` with
    ``fmt="bin"``) into ``path``; returns it as a string."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()},
                  os.path.join(path, "model.safetensors"))
    else:
        torch.save(state, os.path.join(path, "pytorch_model.bin"))
    return str(path)


# ----------------------------------------------------------------------------- caches


def cache_tensors(cache):
    """Per layer (keys, values) ``[1, kv_heads, length, head_dim]`` of a HF cache or of a
    verifier (anything with ``committed()``)."""
    if hasattr(cache, "committed"):
        keys, values = cache.committed()
        return list(zip(keys, values))
    return [(layer.keys, layer.values) for layer in cache.layers]


def assert_cache_matches_fresh(lm, cache, committed, atol=1e-4):
    """The committed cache equals a plain causal forward over the same tokens."""
    n = cache.get_seq_length()
    fresh = lm.new_cache()
    lm.causal_forward(torch.tensor(committed[:n], dtype=torch.int64), fresh)
    for (k, v), (fk, fv) in zip(cache_tensors(cache), cache_tensors(fresh)):
        assert k.shape == fk.shape, (k.shape, fk.shape)
        torch.testing.assert_close(k, fk, atol=atol, rtol=1e-4)
        torch.testing.assert_close(v, fv, atol=atol, rtol=1e-4)


# ----------------------------------------------------------------------------- sampling


def processed_probs(z_row, temperature, top_k, top_p):
    """The fused_verify contract's target processing of one row (temperature, top-k, softmax,
    top-p, renormalise) in float64, written independently of heterospec_ext.reference for the
    driver's distribution tests."""
    z = z_row.double() / temperature
    v = z.numel()
    if 0 < top_k < v:
        kth = torch.topk(z, top_k).values[-1]
        z = torch.where(z >= kth, z, torch.full_like(z, -math.inf))
    p = torch.softmax(z, dim=-1)
    if top_p < 1.0:
        sp = torch.sort(p, descending=True).values
        cum = torch.cumsum(sp, 0)
        idx = int(torch.searchsorted(cum, torch.tensor(top_p, dtype=cum.dtype)))
        idx = min(idx, v - 1)
        cut = sp[idx]
        p = torch.where(p >= cut, p, torch.zeros_like(p))
    return p / p.sum()


# ----------------------------------------------------------------------------- the command


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(*args, timeout=300, path_first=(), popen=False):
    """``python -m heterospec.cli ARGS`` in a subprocess of this interpreter: the
    ``subprocess.run`` result, or the running ``Popen`` with ``popen``. ``path_first``
    directories go first on ``PYTHONPATH`` (for example one holding a ``sitecustomize``)."""
    env = dict(os.environ)
    if path_first:
        env["PYTHONPATH"] = os.pathsep.join([*map(str, path_first), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "heterospec.cli", *args]
    if popen:
        # The running CLI is the one tests signal: give it the default SIGINT disposition. A
        # suite launched in the background by a shell without job control (`cmd &` in a
        # script) inherits SIGINT ignored, and a Python started that way never raises
        # KeyboardInterrupt, so the Ctrl-C test would wait on a CLI that cannot hear it.
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env, preexec_fn=_default_sigint)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
