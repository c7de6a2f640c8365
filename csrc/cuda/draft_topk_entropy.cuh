// Torch-free launcher of the draft_topk_entropy CUDA kernel (see
// csrc/cuda/draft_topk_entropy.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/macros.h"

namespace heterospec {
namespace cuda {

// How a launch splits rows over CTAs, and the workspace that needs: when a
// row is split, each CTA writes a partial state and a partial top-k list and
// the last CTA of the row (an atomic ticket per row) merges them. The
// workspace must be zero-filled before every launch (its first bytes are the
// per-row tickets); its size depends on the shapes and the SM count only.
struct DraftTopKEntropyPlan {
  int64_t splits;           // CTAs per row, >= 1
  int64_t workspace_bytes;  // 0 when splits == 1
};

DraftTopKEntropyPlan plan_draft_topk_entropy(int64_t rows, int64_t vocab, int64_t k,
                                             int num_sms);

// Raw views of the arguments of heterospec::draft_topk_entropy_out. logits:
// element (r, c) at logits + r * row_stride + c * col_stride (in elements of
// `dtype`). Outputs are contiguous device buffers.
struct DraftTopKEntropyArgs {
  const void* logits;  // [rows, vocab] in `dtype`
  core::LogitDType dtype;
  int64_t rows;
  int64_t vocab;
  int64_t row_stride;
  int64_t col_stride;
  int64_t k;
  float temperature;
  DraftTopKEntropyPlan plan;  // from plan_draft_topk_entropy for these shapes
  void* workspace;            // plan.workspace_bytes, zero-filled; nullptr when 0
  float* topk_logprobs;       // [rows, k]
  int64_t* topk_ids;          // [rows, k]
  float* topk_entropy;        // [rows]
  float* entropy;             // [rows]
  float* logsumexp;           // [rows]
};

// One kernel launch on `stream`, no host synchronisation (the caller zeroes
// the workspace, when the plan has one, before it). Invalid rows (all -inf,
// NaN or +inf) get NaN values and -1 ids. rows == 0 is a no-op.
cudaError_t launch_draft_topk_entropy(const DraftTopKEntropyArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace heterospec
