// CUDA kernel of draft_topk_entropy: one read of every logit, one launch.
//
// Grid: rows * splits CTAs of kThreads threads; CTA (row, split) reads one
// contiguous chunk of the row with 16-byte loads (scalar head / tail for an
// unaligned start or a chunk that is not a whole number of vectors, scalar
// strided loads when the row is not dense).
//  * Softmax statistics: each thread keeps a core::EntropyState<float>;
//    states merge over the warp (shuffles), the CTA (shared memory) and the
//    row's CTAs (workspace), always in a fixed order, so results are
//    deterministic.
//  * Top-k: each warp keeps one sorted list of up to 64 entries spread over
//    its lanes (SLOTS entries per lane, position = slot * 32 + lane). Lanes
//    propose elements that rank before the list's k-th entry (ballot); they
//    are inserted one at a time with shuffles, so the k-th entry (the
//    threshold) rises quickly and most elements cost one comparison. The 8
//    warp lists are merged with a bitonic sort in shared memory, and the
//    splits' lists the same way by the row's last CTA.
//  * When a row is split, every CTA writes its partial state and top-k list to
//    the workspace, takes a ticket from the row's counter (zeroed by the
//    caller), and the CTA that takes the last ticket merges and writes the
//    outputs (threadfence reduction; no second launch, no host sync).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "core/draft_topk_entropy.h"
#include "cuda/draft_topk_entropy.cuh"

namespace heterospec {
namespace {

using core::EntropyState;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxSplits = 32;
// Each CTA of a split row reads at least this many logits, so the per-CTA
// merge work stays small next to the reads.
constexpr int64_t kMinChunk = 4096;
// Vectors each thread loads before using them (bytes in flight per thread:
// 16 * kUnroll).
constexpr int kUnroll = 4;
// Shared top-k buffer: the largest bitonic merge is kMaxSplits lists of 64.
constexpr int kMergeCapacity = kMaxSplits * static_cast<int>(core::kMaxTopK);
static_assert(kWarps * core::kMaxTopK <= kMergeCapacity, "CTA merge must fit");

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// z = logit / temperature in float32, exactly as the CPU kernel computes it: a
// power-of-two temperature divides exactly by multiplying with its reciprocal.
struct Scaler {
  float temperature;
  float reciprocal;
  bool exact_reciprocal;
  __device__ __forceinline__ float operator()(float x) const {
    return exact_reciprocal ? x * reciprocal : __fdiv_rn(x, temperature);
  }
};

// ------------------------------------------------------------ warp top-k list

template <int SLOTS>
struct WarpTopK {
  float value[SLOTS];
  int32_t id[SLOTS];
  float kth_value;  // entry at position k - 1, the same in every lane
  int32_t kth_id;
};

template <int SLOTS>
__device__ __forceinline__ void refresh_kth(WarpTopK<SLOTS>& list, int k) {
  const int slot = (k - 1) >> 5;
  const int lane = (k - 1) & 31;
  float v = list.value[0];
  int32_t i = list.id[0];
#pragma unroll
  for (int s = 1; s < SLOTS; ++s) {
    if (slot == s) {
      v = list.value[s];
      i = list.id[s];
    }
  }
  list.kth_value = __shfl_sync(kFullMask, v, lane);
  list.kth_id = __shfl_sync(kFullMask, i, lane);
}

template <int SLOTS>
__device__ __forceinline__ void init_list(WarpTopK<SLOTS>& list, int k) {
  const core::TopKEntry pad = core::topk_pad();
#pragma unroll
  for (int s = 0; s < SLOTS; ++s) {
    list.value[s] = pad.value;
    list.id[s] = pad.id;
  }
  refresh_kth(list, k);
}

// Inserts (v, i), which ranks before the k-th entry, keeping the list sorted;
// the entry at the last position falls off. Warp-uniform arguments.
template <int SLOTS>
__device__ __forceinline__ void insert(WarpTopK<SLOTS>& list, float v, int32_t i, int lane,
                                       int k) {
  int pos = 0;
#pragma unroll
  for (int s = 0; s < SLOTS; ++s) {
    pos += __popc(__ballot_sync(kFullMask, core::ranks_before(list.value[s], list.id[s], v, i)));
  }
#pragma unroll
  for (int s = SLOTS - 1; s >= 0; --s) {
    float up_v = __shfl_up_sync(kFullMask, list.value[s], 1);
    int32_t up_i = __shfl_up_sync(kFullMask, list.id[s], 1);
    if (s > 0) {
      const float carry_v = __shfl_sync(kFullMask, list.value[s > 0 ? s - 1 : 0], 31);
      const int32_t carry_i = __shfl_sync(kFullMask, list.id[s > 0 ? s - 1 : 0], 31);
      if (lane == 0) {
        up_v = carry_v;
        up_i = carry_i;
      }
    }
    const int p = s * 32 + lane;
    if (p == pos) {
      list.value[s] = v;
      list.id[s] = i;
    } else if (p > pos) {
      list.value[s] = up_v;
      list.id[s] = up_i;
    }
  }
  refresh_kth(list, k);
}

// Every lane of the warp calls this with its element (has = false for lanes
// without one this round).
template <int SLOTS>
__device__ __forceinline__ void offer(WarpTopK<SLOTS>& list, float z, int32_t id, bool has,
                                      int lane, int k) {
  const bool wants = has && core::ranks_before(z, id, list.kth_value, list.kth_id);
  unsigned pending = __ballot_sync(kFullMask, wants);
  while (pending != 0u) {
    const int src = __ffs(pending) - 1;
    pending &= pending - 1u;
    const float v = __shfl_sync(kFullMask, z, src);
    const int32_t i = __shfl_sync(kFullMask, id, src);
    // The threshold may have risen since the ballot.
    if (core::ranks_before(v, i, list.kth_value, list.kth_id)) insert(list, v, i, lane, k);
  }
}

// ------------------------------------------------------------ per-element work

template <int N, int SLOTS>
__device__ __forceinline__ void consume(const float (&z)[N], int64_t first_id, bool has,
                                        EntropyState<float>& state, WarpTopK<SLOTS>& list,
                                        int lane, int k) {
  if (has) {
    float group_max = -INFINITY;
    bool bad = false;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      bad = bad || EntropyState<float>::is_bad(z[j]);
      group_max = fmaxf(group_max, z[j]);
    }
    state.invalid = state.invalid || bad;
    state.rescale_to(group_max);
    if (state.max != -INFINITY) {
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const float d = z[j] - state.max;
        state.add_shifted(d, __expf(d));
      }
    }
  }
#pragma unroll
  for (int j = 0; j < N; ++j) {
    offer(list, z[j], static_cast<int32_t>(first_id + j), has, lane, k);
  }
}

template <typename T>
struct VecLoad {
  static constexpr int kWidth = 16 / sizeof(T);
  __device__ __forceinline__ static void load(const T* p, const Scaler& scale,
                                              float (&z)[kWidth]) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const T* elems = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < kWidth; ++j) z[j] = scale(to_float(elems[j]));
  }
};

// Processes row[begin, end) of one row with all threads of the CTA.
template <typename T, int SLOTS>
__device__ __forceinline__ void scan_chunk(const T* row, int64_t col_stride, int64_t begin,
                                           int64_t end, const Scaler& scale,
                                           EntropyState<float>& state, WarpTopK<SLOTS>& list,
                                           int k) {
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  constexpr int W = VecLoad<T>::kWidth;

  // Scalar rounds over [from, to): one element per thread per round.
  auto scalar_range = [&](int64_t from, int64_t to, int64_t stride) {
    for (int64_t base = from; base < to; base += kThreads) {
      const int64_t c = base + tid;
      const bool has = c < to;
      float z[1] = {0.0f};
      if (has) z[0] = scale(to_float(row[c * stride]));
      consume<1>(z, c, has, state, list, lane, k);
    }
  };

  if (col_stride != 1) {
    scalar_range(begin, end, col_stride);
    return;
  }
  const uintptr_t address = reinterpret_cast<uintptr_t>(row + begin);
  int64_t head = static_cast<int64_t>(((16 - (address & 15)) & 15) / sizeof(T));
  if (head > end - begin) head = end - begin;
  scalar_range(begin, begin + head, 1);

  const int64_t body_begin = begin + head;
  const int64_t num_vecs = (end - body_begin) / W;
  const T* body = row + body_begin;
  for (int64_t base = 0; base < num_vecs; base += static_cast<int64_t>(kThreads) * kUnroll) {
    float z[kUnroll][W];
    bool has[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = base + static_cast<int64_t>(u) * kThreads + tid;
      has[u] = v < num_vecs;
      if (has[u]) {
        VecLoad<T>::load(body + v * W, scale, z[u]);
      } else {
#pragma unroll
        for (int j = 0; j < W; ++j) z[u][j] = 0.0f;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = base + static_cast<int64_t>(u) * kThreads + tid;
      consume<W>(z[u], body_begin + v * W, has[u], state, list, lane, k);
    }
  }
  scalar_range(body_begin + num_vecs * W, end, 1);
}

// ------------------------------------------------------------ CTA-level merges

__device__ __forceinline__ EntropyState<float> shfl_xor_state(const EntropyState<float>& s,
                                                              int mask) {
  EntropyState<float> o;
  o.max = __shfl_xor_sync(kFullMask, s.max, mask);
  o.sum = __shfl_xor_sync(kFullMask, s.sum, mask);
  o.shifted = __shfl_xor_sync(kFullMask, s.shifted, mask);
  o.invalid = __shfl_xor_sync(kFullMask, static_cast<int>(s.invalid), mask) != 0;
  return o;
}

// Butterfly merge: every lane ends with the warp's state (lane order fixed, so
// deterministic).
__device__ __forceinline__ EntropyState<float> warp_merge(EntropyState<float> s) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) {
    const EntropyState<float> o = shfl_xor_state(s, mask);
    // Merge in lane order so both partners compute the same value.
    if ((threadIdx.x & mask) == 0) {
      s.merge(o);
    } else {
      EntropyState<float> lower = o;
      lower.merge(s);
      s = lower;
    }
  }
  return s;
}

// Sorts vals/ids[0, n) (n a power of two) so that the best entries come
// first by core::ranks_before. All threads of the CTA call it.
__device__ void bitonic_sort_best_first(float* vals, int32_t* ids, int n) {
  for (int size = 2; size <= n; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < (n >> 1); i += kThreads) {
        const int lo = 2 * i - (i & (stride - 1));
        const int hi = lo + stride;
        const bool best_first = (lo & size) == 0;
        const bool hi_better = core::ranks_before(vals[hi], ids[hi], vals[lo], ids[lo]);
        const bool lo_better = core::ranks_before(vals[lo], ids[lo], vals[hi], ids[hi]);
        if (best_first ? hi_better : lo_better) {
          const float tv = vals[lo];
          vals[lo] = vals[hi];
          vals[hi] = tv;
          const int32_t ti = ids[lo];
          ids[lo] = ids[hi];
          ids[hi] = ti;
        }
      }
      __syncthreads();
    }
  }
}

struct WorkspaceView {
  int32_t* tickets;  // [rows]
  float4* states;    // [rows, splits]: max, sum, shifted, invalid
  float* values;     // [rows, splits, k]
  int32_t* ids;      // [rows, splits, k]
};

__host__ __device__ inline int64_t align16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

__host__ __device__ inline WorkspaceView workspace_view(void* base, int64_t rows, int64_t splits,
                                                        int64_t k) {
  char* p = static_cast<char*>(base);
  WorkspaceView w;
  w.tickets = reinterpret_cast<int32_t*>(p);
  p += align16(rows * static_cast<int64_t>(sizeof(int32_t)));
  w.states = reinterpret_cast<float4*>(p);
  p += align16(rows * splits * static_cast<int64_t>(sizeof(float4)));
  w.values = reinterpret_cast<float*>(p);
  p += align16(rows * splits * k * static_cast<int64_t>(sizeof(float)));
  w.ids = reinterpret_cast<int32_t*>(p);
  return w;
}

__host__ __device__ inline int64_t workspace_size(int64_t rows, int64_t splits, int64_t k) {
  return align16(rows * static_cast<int64_t>(sizeof(int32_t))) +
         align16(rows * splits * static_cast<int64_t>(sizeof(float4))) +
         align16(rows * splits * k * static_cast<int64_t>(sizeof(float))) +
         align16(rows * splits * k * static_cast<int64_t>(sizeof(int32_t)));
}

struct Outputs {
  float* topk_logprobs;
  int64_t* topk_ids;
  float* topk_entropy;
  float* entropy;
  float* logsumexp;
};

// Writes one row's outputs from its merged state and its sorted top-k in
// shared memory. All threads call it.
__device__ void write_row(const EntropyState<float>& state, const float* vals,
                          const int32_t* ids, int64_t row, int k, const Outputs& out) {
  const bool valid = state.valid();
  const float nan = __int_as_float(0x7fc00000);
  const float log_sum = valid ? logf(state.sum) : nan;
  for (int i = threadIdx.x; i < k; i += kThreads) {
    const bool real = valid && ids[i] != core::kTopKPadId;
    // (z - max) - log S keeps full precision when the logits are huge.
    out.topk_logprobs[row * k + i] = real ? (vals[i] - state.max) - log_sum : nan;
    out.topk_ids[row * k + i] = real ? static_cast<int64_t>(ids[i]) : int64_t{-1};
  }
  if (threadIdx.x < 32) {
    EntropyState<float> top = EntropyState<float>::empty();
    for (int i = threadIdx.x; i < k; i += 32) top.push(vals[i]);
    top = warp_merge(top);
    if (threadIdx.x == 0) {
      out.topk_entropy[row] = valid ? top.entropy() : nan;
      out.entropy[row] = valid ? state.entropy() : nan;
      out.logsumexp[row] = valid ? state.max + log_sum : nan;
    }
  }
}

template <typename T, int SLOTS>
__global__ void __launch_bounds__(kThreads)
    draft_topk_entropy_kernel(const T* __restrict__ logits, int64_t vocab, int64_t row_stride,
                              int64_t col_stride, int k, Scaler scale, int64_t splits,
                              void* workspace, Outputs out) {
  __shared__ float s_vals[kMergeCapacity];
  __shared__ int32_t s_ids[kMergeCapacity];
  __shared__ EntropyState<float> s_states[kMaxSplits > kWarps ? kMaxSplits : kWarps];
  __shared__ bool s_is_last;

  const int64_t row = static_cast<int64_t>(blockIdx.x) / splits;
  const int64_t split = static_cast<int64_t>(blockIdx.x) % splits;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int list_width = core::next_pow2(k);  // <= 32 * SLOTS

  // This CTA's chunk: a whole number of 16-byte vectors where possible.
  constexpr int64_t W = 16 / sizeof(T);
  const int64_t chunk = ((vocab + splits - 1) / splits + W - 1) / W * W;
  const int64_t begin = split * chunk < vocab ? split * chunk : vocab;
  const int64_t end = begin + chunk < vocab ? begin + chunk : vocab;

  EntropyState<float> state = EntropyState<float>::empty();
  WarpTopK<SLOTS> list;
  init_list(list, k);
  scan_chunk<T, SLOTS>(logits + row * row_stride, col_stride, begin, end, scale, state, list, k);

  // CTA merge of the states (warp butterflies, then warps in order).
  state = warp_merge(state);
  if (lane == 0) s_states[warp] = state;
  // CTA merge of the warp lists: each warp's first list_width positions.
#pragma unroll
  for (int s = 0; s < SLOTS; ++s) {
    const int p = s * 32 + lane;
    if (p < list_width) {
      s_vals[warp * list_width + p] = list.value[s];
      s_ids[warp * list_width + p] = list.id[s];
    }
  }
  __syncthreads();
  bitonic_sort_best_first(s_vals, s_ids, kWarps * list_width);
  if (tid == 0) {
    EntropyState<float> cta = s_states[0];
    for (int w = 1; w < kWarps; ++w) cta.merge(s_states[w]);
    s_states[0] = cta;
  }
  __syncthreads();

  if (splits == 1) {
    write_row(s_states[0], s_vals, s_ids, row, k, out);
    return;
  }

  // Split row: publish this CTA's partial result, then the last CTA merges.
  const WorkspaceView ws = workspace_view(workspace, static_cast<int64_t>(gridDim.x) / splits,
                                          splits, k);
  const int64_t slot = row * splits + split;
  if (tid == 0) {
    const EntropyState<float>& cta = s_states[0];
    ws.states[slot] = make_float4(cta.max, cta.sum, cta.shifted, cta.invalid ? 1.0f : 0.0f);
  }
  for (int i = tid; i < k; i += kThreads) {
    ws.values[slot * k + i] = s_vals[i];
    ws.ids[slot * k + i] = s_ids[i];
  }
  __threadfence();
  __syncthreads();
  if (tid == 0) s_is_last = atomicAdd(&ws.tickets[row], 1) == static_cast<int>(splits) - 1;
  __syncthreads();
  if (!s_is_last) return;
  __threadfence();

  // Last CTA of the row: every other CTA's partials are visible. Read them
  // through L2 (__ldcg), never a stale L1 line.
  const int lists = core::next_pow2(static_cast<int>(splits));
  const int merge_size = lists * list_width;
  for (int idx = tid; idx < merge_size; idx += kThreads) {
    const int src = idx / list_width;
    const int pos = idx - src * list_width;
    if (src < splits && pos < k) {
      const int64_t from = (row * splits + src) * k + pos;
      s_vals[idx] = __ldcg(ws.values + from);
      s_ids[idx] = __ldcg(ws.ids + from);
    } else {
      s_vals[idx] = core::topk_pad().value;
      s_ids[idx] = core::kTopKPadId;
    }
  }
  if (tid < splits) {
    const float4 p = __ldcg(ws.states + row * splits + tid);
    EntropyState<float> s;
    s.max = p.x;
    s.sum = p.y;
    s.shifted = p.z;
    s.invalid = p.w != 0.0f;
    s_states[tid] = s;
  }
  __syncthreads();
  bitonic_sort_best_first(s_vals, s_ids, merge_size);
  if (tid == 0) {
    EntropyState<float> total = s_states[0];
    for (int i = 1; i < splits; ++i) total.merge(s_states[i]);
    s_states[0] = total;
  }
  __syncthreads();
  write_row(s_states[0], s_vals, s_ids, row, k, out);
}

template <typename T>
cudaError_t launch_typed(const void* logits, int64_t rows, int64_t vocab, int64_t row_stride,
                         int64_t col_stride, int k, const Scaler& scale, int64_t splits,
                         void* workspace, const Outputs& out, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(rows * splits));
  const T* data = static_cast<const T*>(logits);
  if (k <= 32) {
    draft_topk_entropy_kernel<T, 1><<<grid, kThreads, 0, stream>>>(
        data, vocab, row_stride, col_stride, k, scale, splits, workspace, out);
  } else {
    draft_topk_entropy_kernel<T, 2><<<grid, kThreads, 0, stream>>>(
        data, vocab, row_stride, col_stride, k, scale, splits, workspace, out);
  }
  return cudaGetLastError();
}

bool is_power_of_two(float x) {
  int exponent = 0;
  return std::frexp(x, &exponent) == 0.5f;
}

}  // namespace

DraftTopKEntropyPlan plan_draft_topk_entropy(int64_t rows, int64_t vocab, int64_t k,
                                             int num_sms) {
  DraftTopKEntropyPlan plan{1, 0};
  if (rows <= 0 || vocab <= 0) return plan;
  // Aim for about 4 CTAs per SM when there are few rows.
  const int64_t target_ctas = 4 * static_cast<int64_t>(num_sms > 0 ? num_sms : 1);
  int64_t splits = (target_ctas + rows - 1) / rows;
  const int64_t by_length = vocab / kMinChunk > 1 ? vocab / kMinChunk : 1;
  if (splits > by_length) splits = by_length;
  if (splits > kMaxSplits) splits = kMaxSplits;
  // The grid is one dimension of at most 2^31 - 1 CTAs.
  while (splits > 1 && rows * splits > INT32_MAX) --splits;
  if (splits < 1) splits = 1;
  plan.splits = splits;
  plan.workspace_bytes = splits > 1 ? workspace_size(rows, splits, k) : 0;
  return plan;
}

cudaError_t launch_draft_topk_entropy(const void* logits, core::LogitDType dtype, int64_t rows,
                                      int64_t vocab, int64_t row_stride, int64_t col_stride,
                                      int64_t k, float temperature,
                                      const DraftTopKEntropyPlan& plan, void* workspace,
                                      float* topk_logprobs, int64_t* topk_ids,
                                      float* topk_entropy, float* entropy, float* logsumexp,
                                      cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (k < 1 || k > core::kMaxTopK || k > vocab || plan.splits < 1 ||
      plan.splits > kMaxSplits || rows * plan.splits > INT32_MAX ||
      (plan.splits > 1 && workspace == nullptr)) {
    return cudaErrorInvalidValue;
  }
  Scaler scale;
  scale.temperature = temperature;
  scale.reciprocal = 1.0f / temperature;
  scale.exact_reciprocal = is_power_of_two(temperature);
  const Outputs out{topk_logprobs, topk_ids, topk_entropy, entropy, logsumexp};
  const int k32 = static_cast<int>(k);
  switch (dtype) {
    case core::LogitDType::kFloat32:
      return launch_typed<float>(logits, rows, vocab, row_stride, col_stride, k32, scale,
                                 plan.splits, workspace, out, stream);
    case core::LogitDType::kFloat16:
      return launch_typed<__half>(logits, rows, vocab, row_stride, col_stride, k32, scale,
                                  plan.splits, workspace, out, stream);
    case core::LogitDType::kBFloat16:
      return launch_typed<__nv_bfloat16>(logits, rows, vocab, row_stride, col_stride, k32,
                                         scale, plan.splits, workspace, out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace heterospec
