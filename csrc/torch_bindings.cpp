// The single place where heterospec's operator schemas are declared, plus the
// pybind11 module heterospec_ext._C that reports how the extension was built.
// Kernels register under these names at the end of csrc/cpu/<op>_cpu.cpp and
// csrc/cuda/<op>_cuda.cpp (one TORCH_LIBRARY_IMPL block per file, outside every
// namespace); fake (meta) kernels live in heterospec_ext/ops/<op>.py.
#include <torch/extension.h>
#include <torch/library.h>

#ifndef HX_VERSION
#define HX_VERSION "0.0.0"
#endif
#ifndef HX_CUDA_ARCHS
#define HX_CUDA_ARCHS ""
#endif
#ifndef HX_TORCH_VERSION
#define HX_TORCH_VERSION "unknown"
#endif

TORCH_LIBRARY(heterospec, m) {
  // Softmax statistics of draft logits in one pass over each row: top-k
  // log-probs and ids, renormalised top-k entropy, full entropy, logsumexp.
  m.def(
      "draft_topk_entropy(Tensor logits, int k, float temperature=1.0) -> "
      "(Tensor topk_logprobs, Tensor topk_ids, Tensor topk_entropy, "
      "Tensor entropy, Tensor logsumexp)");
  // Same as draft_topk_entropy; writes topk_logprobs, topk_ids, topk_entropy,
  // entropy and logsumexp.
  m.def(
      "draft_topk_entropy_out(Tensor logits, int k, float temperature, "
      "Tensor(a!) topk_logprobs, Tensor(b!) topk_ids, Tensor(c!) topk_entropy, "
      "Tensor(d!) entropy, Tensor(e!) logsumexp) -> ()");

  // Cumulative meta-path top-K entropy H(P*) and the HeteroSpec stratum with
  // its (extra_depth, top_n) policy, per request.
  m.def(
      "stratify(Tensor step_entropy, Tensor confidence, Tensor parents, "
      "Tensor thresholds, Tensor policy) -> (Tensor path_entropy, "
      "Tensor pstar, Tensor stratum, Tensor extra_depth, Tensor top_n)");
  // Same as stratify; writes path_entropy, pstar, stratum, extra_depth, top_n.
  m.def(
      "stratify_out(Tensor step_entropy, Tensor confidence, Tensor parents, "
      "Tensor thresholds, Tensor policy, Tensor(a!) path_entropy, "
      "Tensor(b!) pstar, Tensor(c!) stratum, Tensor(d!) extra_depth, "
      "Tensor(e!) top_n) -> ()");

  // Top-N subtree selection from an EAGLE-2 candidate pool plus everything the
  // tree forward and the verifier need (mask, positions, sibling lists, paths).
  m.def(
      "build_tree(Tensor pool_parents, Tensor pool_scores, Tensor pool_tokens, "
      "Tensor top_n, int n_max) -> (Tensor selected, Tensor tokens, "
      "Tensor parents, Tensor depth, Tensor mask, Tensor packed_mask, "
      "Tensor first_child, Tensor next_sibling, Tensor retrieve, "
      "Tensor num_nodes)");
  // Same as build_tree with n_max = selected.size(1); writes selected, tokens,
  // parents, depth, mask, packed_mask, first_child, next_sibling, retrieve and
  // num_nodes.
  m.def(
      "build_tree_out(Tensor pool_parents, Tensor pool_scores, "
      "Tensor pool_tokens, Tensor top_n, Tensor(a!) selected, "
      "Tensor(b!) tokens, Tensor(c!) parents, Tensor(d!) depth, "
      "Tensor(e!) mask, Tensor(f!) packed_mask, Tensor(g!) first_child, "
      "Tensor(h!) next_sibling, Tensor(i!) retrieve, Tensor(j!) num_nodes) "
      "-> ()");

  // Tree acceptance fused with temperature, top-k, top-p and softmax of the
  // target logits: greedy, deterministic-draft or recursive rejection sampling.
  m.def(
      "fused_verify(Tensor target_logits, Tensor candidates, Tensor parents, "
      "Tensor temperature, Tensor top_k, Tensor top_p, Tensor uniforms, "
      "Tensor? draft_probs=None) -> (Tensor out_tokens, "
      "Tensor accepted_nodes, Tensor num_accepted)");
  // Same as fused_verify; writes out_tokens, accepted_nodes and num_accepted.
  m.def(
      "fused_verify_out(Tensor target_logits, Tensor candidates, "
      "Tensor parents, Tensor temperature, Tensor top_k, Tensor top_p, "
      "Tensor uniforms, Tensor? draft_probs, Tensor(a!) out_tokens, "
      "Tensor(b!) accepted_nodes, Tensor(c!) num_accepted) -> ()");

  // The decode-layer ops: the steps between the GEMMs of a Llama-style decoder
  // layer at decode sizes (the lean CPU path's EAGLE-3 head). CPU kernels only.
  //
  // RMS norm of the embedding rows of token_ids beside the RMS norm of the
  // hidden rows; writes a new [n, 2 * H] tensor in embed's dtype.
  m.def(
      "embed_hidden_rms_norm(Tensor token_ids, Tensor embed, Tensor hidden, "
      "Tensor embed_weight, Tensor hidden_weight, float eps) -> Tensor");
  // residual += delta, then the RMS norm of the sum; writes residual (in
  // place) and a new normed tensor in delta's dtype.
  m.def(
      "fused_add_rms_norm(Tensor(a!) residual, Tensor delta, Tensor weight, "
      "float eps) -> Tensor");
  // silu(gate) * up of [gate | up] rows; writes a new [n, I] tensor.
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
  // RoPE of q and k, k and v appended to the caches at rows [cache_len,
  // cache_len + n), then each query's masked softmax attention over all
  // cache_len + n rows; writes k_cache, v_cache and a new [n, heads * head_dim]
  // output.
  m.def(
      "rope_cache_attention(Tensor qkv, Tensor rope, Tensor positions, "
      "Tensor(a!) k_cache, Tensor(b!) v_cache, int cache_len, Tensor? visible, "
      "int num_heads, int num_kv_heads) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "heterospec_ext compiled core: build information only; the "
                 "ops are registered with TORCH_LIBRARY under torch.ops.heterospec.";
  module.attr("__version__") = HX_VERSION;
#ifdef HX_WITH_CUDA
  module.attr("with_cuda") = true;
#else
  module.attr("with_cuda") = false;
#endif
  module.attr("cuda_arch_list") = HX_CUDA_ARCHS;
  module.attr("torch_version") = HX_TORCH_VERSION;
}
