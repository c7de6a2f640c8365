"""Drop-in adapters that let inference engines call heterospec's ops through their own interfaces.

* :mod:`heterospec_ext.integrations.sglang` - sgl-kernel's speculative functions
  (``build_tree_kernel_efficient``, ``verify_tree_greedy``,
  ``tree_speculative_sampling_target_only``), a fused logits-to-verdict sampling verify, per-request
  tree budgets in SGLang's format, and ``install()`` to swap them into ``sgl_kernel``.
* :mod:`heterospec_ext.integrations.vllm` - vLLM V1's ``RejectionSampler`` / ``rejection_sample``
  chain verify on ``fused_verify``, and ``install()`` for ``vllm``.
* :mod:`heterospec_ext.integrations.reference` - float64 oracles of each engine's documented
  semantics, for the tests.

Neither engine needs to be installed to import these modules; only ``install()`` imports them.
"""
