// Torch-free launcher of the draft_topk_entropy CUDA kernel.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/macros.h"

namespace heterospec {

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

// logits: element (r, c) at logits + r * row_stride + c * col_stride (in
// elements of `dtype`). Outputs are contiguous: topk_logprobs / topk_ids
// [rows, k], the others [rows]. Invalid rows (all -inf, NaN or +inf) get NaN
// values and -1 ids. One kernel launch on `stream`; no host synchronisation.
cudaError_t launch_draft_topk_entropy(const void* logits, core::LogitDType dtype, int64_t rows,
                                      int64_t vocab, int64_t row_stride, int64_t col_stride,
                                      int64_t k, float temperature,
                                      const DraftTopKEntropyPlan& plan, void* workspace,
                                      float* topk_logprobs, int64_t* topk_ids,
                                      float* topk_entropy, float* entropy, float* logsumexp,
                                      cudaStream_t stream);

}  // namespace heterospec
