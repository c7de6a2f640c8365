// Torch-free launcher of the fused_verify CUDA kernel (see csrc/cuda/fused_verify.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/macros.h"

namespace heterospec {
namespace cuda {

// Largest tree the CUDA kernel takes (per-request tree arrays live in shared
// memory, 24 bytes per node).
constexpr int64_t kFusedVerifyMaxNodes = 4096;
// Largest vocabulary: masses are summed as 40-bit fixed point in uint64.
constexpr int64_t kFusedVerifyMaxVocab = int64_t(1) << 23;

// Raw views of the arguments of heterospec::fused_verify. Element strides;
// the vocab dimension of logits / draft_probs must be contiguous. The small
// [B, N] / [B] tensors and the outputs must be contiguous.
struct FusedVerifyArgs {
  const void* logits;  // [B, N, V] in `dtype`
  int64_t logits_stride_b;
  int64_t logits_stride_n;
  core::LogitDType dtype;
  const int64_t* candidates;  // [B, N]
  const int64_t* parents;     // [B, N]
  const float* temperature;   // [B]
  const int64_t* top_k;       // [B]
  const float* top_p;         // [B]
  const float* uniforms;      // [B, N]
  const float* draft_probs;   // [B, N, V] or nullptr (deterministic drafts)
  int64_t draft_stride_b;
  int64_t draft_stride_n;
  float* workspace;  // [B, V] float32 when draft_probs != nullptr, else unused
  int64_t* out_tokens;      // [B, N]
  int64_t* accepted_nodes;  // [B, N]
  int64_t* num_accepted;    // [B]
  int64_t batch;
  int64_t nodes;
  int64_t vocab;
};

// One launch on `stream`, no host synchronisation, no allocation. Returns the
// launch status (cudaErrorInvalidValue for sizes outside the limits above).
cudaError_t launch_fused_verify(const FusedVerifyArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace heterospec
