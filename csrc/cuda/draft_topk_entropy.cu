// CUDA kernel of draft_topk_entropy: one read of every logit, one kernel
// launch (when rows are split, the binding zeroes the workspace's tickets
// with a memset before it).
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
//    its lanes (SLOTS entries per lane, position = slot * 32 + lane). Each
//    thread compares every element of its batch once against a threshold
//    (the largest k-th value of the CTA's warp lists, read from shared
//    memory); only when some lane has an element at or above it does the
//    warp ballot element by element and insert (shuffles) the ones that rank
//    before its k-th entry. The warps' top-k lists, and the splits' lists in
//    the row's last CTA, are merged by rank (binary searches), not sorted.
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
#include "cuda/common.cuh"
#include "cuda/draft_topk_entropy.cuh"

namespace heterospec {
namespace cuda {
namespace {

using core::EntropyState;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxSplits = 32;
// Register cap (65536 / (256 * 3) -> 80 per thread) so three CTAs fit an SM.
constexpr int kMinBlocksPerSm = 3;
// Each CTA of a split row reads at least this many logits, so the per-CTA
// merge work stays small next to the reads.
constexpr int64_t kMinChunk = 4096;
// Shared top-k buffer: the largest merge is kMaxSplits lists of 64.
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
  // kDivide == !exact_reciprocal, chosen once per launch (no per-element branch).
  template <bool kDivide>
  __device__ __forceinline__ float apply(float x) const {
    return kDivide ? __fdiv_rn(x, temperature) : x * reciprocal;
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

using core::kFloatMax;

// Descending sort of one float per lane (no NaN) over the warp; returns the
// value at lane `rank` of the sorted order.
__device__ __forceinline__ float warp_kth_largest(float v, int lane, int rank) {
#pragma unroll
  for (int size = 2; size <= 32; size <<= 1) {
#pragma unroll
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      const float other = __shfl_xor_sync(kFullMask, v, stride);
      const bool lower = (lane & stride) == 0;
      const bool descending = (lane & size) == 0;
      v = (lower == descending) ? fmaxf(v, other) : fminf(v, other);
    }
  }
  return __shfl_sync(kFullMask, v, rank);
}

// One batch of a thread's elements: z[u][j] has id first_id[u] + j when
// has[u]; elements of vectors without data are -inf (they add nothing to the
// statistics) and are never offered to the top-k list. Warp-uniform call.
//  * Statistics: one max over the batch, at most one rescale, then per element
//    d = z - max (clamped so a -inf value adds exactly 0 instead of 0 * inf),
//    e = 2^(d log2 e), sum += e, shifted += e * d.
//  * Top-k: one compare per element against a threshold t (a value no larger
//    than some list's k-th value, so an element below t cannot be in the
//    CTA's top-k); only if some lane has an element >= t does the warp take
//    the exact per-element path.
//  * `first`: the warp's first vector batch; its threshold also uses the k-th
//    largest of the 32 lane maxima (k <= 32), so the empty list does not make
//    every element of the batch a candidate.
template <int U, int W, bool kAllValid, int SLOTS>
__device__ __forceinline__ void process_batch(const float (&z)[U][W], const int32_t (&first_id)[U],
                                              const bool (&has)[U], bool first,
                                              EntropyState<float>& state, WarpTopK<SLOTS>& list,
                                              volatile float* s_warp_kth, int lane, int warp,
                                              int k) {
  float batch_max = -INFINITY;
  bool bad = false;
#pragma unroll
  for (int u = 0; u < U; ++u) {
#pragma unroll
    for (int j = 0; j < W; ++j) {
      batch_max = fmaxf(batch_max, z[u][j]);
      bad = bad || !(z[u][j] <= kFloatMax);
    }
  }
  state.invalid = state.invalid || bad;
  if (batch_max > state.max) state.rescale_to(batch_max);
  const float row_max = state.max;
  float sum = state.sum;
  float shifted = state.shifted;
#pragma unroll
  for (int u = 0; u < U; ++u) {
#pragma unroll
    for (int j = 0; j < W; ++j) {
      // NaN (max still -inf, or a NaN logit) and -inf both clamp to the
      // lowest finite value, whose exp is exactly 0 and adds exactly 0.
      const float d = fmaxf(z[u][j] - row_max, -kFloatMax);
      const float e = fast_exp2(d * kLog2e);
      sum += e;
      shifted = fmaf(e, d, shifted);
    }
  }
  state.sum = sum;
  state.shifted = shifted;

  float threshold = list.kth_value;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) threshold = fmaxf(threshold, s_warp_kth[w]);
  if (SLOTS == 1 && first) {
    // Lanes without a finite maximum count as -inf (NaN never ranks).
    const float lane_max = batch_max == batch_max ? batch_max : -INFINITY;
    threshold = fmaxf(threshold, warp_kth_largest(lane_max, lane, k - 1));
  }
  bool maybe = false;
#pragma unroll
  for (int u = 0; u < U; ++u) {
#pragma unroll
    for (int j = 0; j < W; ++j) maybe = maybe || z[u][j] >= threshold;
  }
  if (__any_sync(kFullMask, maybe)) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int j = 0; j < W; ++j) {
        offer(list, z[u][j], first_id[u] + j, (kAllValid || has[u]) && z[u][j] >= threshold,
              lane, k);
      }
    }
    if (lane == 0) s_warp_kth[warp] = list.kth_value;
  }
}

template <typename T>
struct VecLoad {
  static constexpr int kWidth = 16 / sizeof(T);
  __device__ __forceinline__ static uint4 load(const T* p) {
    return __ldg(reinterpret_cast<const uint4*>(p));
  }
  template <bool kDivide>
  __device__ __forceinline__ static void convert(const uint4& raw, const Scaler& scale,
                                                 float (&z)[kWidth]) {
    const T* elems = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < kWidth; ++j) z[j] = scale.apply<kDivide>(to_float(elems[j]));
  }
};

// Processes row[begin, end) of one row with all threads of the CTA.
template <typename T, bool kDivide, int SLOTS>
__device__ __forceinline__ void scan_chunk(const T* row, int64_t col_stride, int64_t begin,
                                           int64_t end, const Scaler& scale,
                                           EntropyState<float>& state, WarpTopK<SLOTS>& list,
                                           volatile float* s_warp_kth, int k) {
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  constexpr int W = VecLoad<T>::kWidth;
  // Vectors per thread per batch: 64 bytes in flight per thread before any
  // is used (32 16-bit or 16 fp32 elements; more fp32 ones spill at the
  // register cap).
  constexpr int U = 4;

  // Scalar rounds over [from, to): one element per thread per round.
  auto scalar_range = [&](int64_t from, int64_t to, int64_t stride) {
    for (int64_t base = from; base < to; base += kThreads) {
      const int64_t c = base + tid;
      bool has[1] = {c < to};
      float z[1][1] = {{-INFINITY}};
      if (has[0]) z[0][0] = scale.apply<kDivide>(to_float(row[c * stride]));
      const int32_t id[1] = {static_cast<int32_t>(c)};
      process_batch<1, 1, false, SLOTS>(z, id, has, false, state, list, s_warp_kth, lane, warp,
                                        k);
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
  bool first = true;
  for (int64_t base = 0; base < num_vecs; base += static_cast<int64_t>(kThreads) * U) {
    const bool full = base + static_cast<int64_t>(kThreads) * U <= num_vecs;  // CTA-uniform
    uint4 raw[U];
    bool has[U];
    int32_t first_id[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t v = base + static_cast<int64_t>(u) * kThreads + tid;
      has[u] = full || v < num_vecs;
      first_id[u] = static_cast<int32_t>(body_begin + v * W);
      if (has[u]) raw[u] = VecLoad<T>::load(body + v * W);
    }
    float z[U][W];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (has[u]) {
        VecLoad<T>::template convert<kDivide>(raw[u], scale, z[u]);
      } else {
#pragma unroll
        for (int j = 0; j < W; ++j) z[u][j] = -INFINITY;
      }
    }
    if (full) {
      process_batch<U, W, true, SLOTS>(z, first_id, has, first, state, list, s_warp_kth, lane,
                                       warp, k);
    } else {
      process_batch<U, W, false, SLOTS>(z, first_id, has, first, state, list, s_warp_kth, lane,
                                        warp, k);
    }
    first = false;
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

// Merges `lists` sorted lists of k entries, list a at vals/ids[a * k, a * k + k),
// into the sorted top-k in out_vals/out_ids[0, k). Every entry's rank is its
// position in the list plus, for every other list, the length of the prefix
// that ranks before it (binary search); entries equal in value and id (only
// padding) are ordered by list index, so the ranks are a permutation and the
// entries with rank < k are exactly the best k in order. All threads of the
// CTA call it; out must not alias the input.
__device__ void rank_merge(const float* vals, const int32_t* ids, int lists, int k,
                           float* out_vals, int32_t* out_ids) {
  const int total = lists * k;
  for (int idx = threadIdx.x; idx < total; idx += kThreads) {
    const int a = idx / k;
    const int pos = idx - a * k;
    const float v = vals[idx];
    const int32_t id = ids[idx];
    int rank = pos;
    for (int b = 0; b < lists; ++b) {
      if (b == a) continue;
      const float* bv = vals + b * k;
      const int32_t* bi = ids + b * k;
      int lo = 0;
      int hi = k;
      while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        const bool before = core::ranks_before(bv[mid], bi[mid], v, id) ||
                            (b < a && bv[mid] == v && bi[mid] == id);
        if (before) {
          lo = mid + 1;
        } else {
          hi = mid;
        }
      }
      rank += lo;
    }
    if (rank < k) {
      out_vals[rank] = v;
      out_ids[rank] = id;
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

template <typename T, bool kDivide, int SLOTS>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    draft_topk_entropy_kernel(const T* __restrict__ logits, int64_t vocab, int64_t row_stride,
                              int64_t col_stride, int k, Scaler scale, int64_t splits,
                              void* workspace, Outputs out) {
  __shared__ float s_vals[kMergeCapacity];
  __shared__ int32_t s_ids[kMergeCapacity];
  __shared__ float s_top_vals[core::kMaxTopK];
  __shared__ int32_t s_top_ids[core::kMaxTopK];
  __shared__ EntropyState<float> s_states[kMaxSplits > kWarps ? kMaxSplits : kWarps];
  // Each warp's current k-th value (non-decreasing); any of them bounds the
  // CTA's top-k from below, so every warp filters with their maximum. Read
  // while other warps write it: a stale value is only a weaker bound.
  __shared__ float s_warp_kth[kWarps];
  __shared__ bool s_is_last;

  const int64_t row = static_cast<int64_t>(blockIdx.x) / splits;
  const int64_t split = static_cast<int64_t>(blockIdx.x) % splits;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;

  // This CTA's chunk: a whole number of 16-byte vectors where possible.
  constexpr int64_t W = 16 / sizeof(T);
  const int64_t chunk = ((vocab + splits - 1) / splits + W - 1) / W * W;
  const int64_t begin = split * chunk < vocab ? split * chunk : vocab;
  const int64_t end = begin + chunk < vocab ? begin + chunk : vocab;

  if (tid < kWarps) s_warp_kth[tid] = -INFINITY;
  __syncthreads();

  EntropyState<float> state = EntropyState<float>::empty();
  WarpTopK<SLOTS> list;
  init_list(list, k);
  scan_chunk<T, kDivide, SLOTS>(logits + row * row_stride, col_stride, begin, end, scale, state,
                                list, s_warp_kth, k);

  // CTA merge of the states (warp butterflies, then warps in order).
  state = warp_merge(state);
  if (lane == 0) s_states[warp] = state;
  // CTA merge of the warp lists: each warp's first k positions are its top-k.
#pragma unroll
  for (int s = 0; s < SLOTS; ++s) {
    const int p = s * 32 + lane;
    if (p < k) {
      s_vals[warp * k + p] = list.value[s];
      s_ids[warp * k + p] = list.id[s];
    }
  }
  __syncthreads();
  rank_merge(s_vals, s_ids, kWarps, k, s_top_vals, s_top_ids);
  if (tid == 0) {
    EntropyState<float> cta = s_states[0];
    for (int w = 1; w < kWarps; ++w) cta.merge(s_states[w]);
    s_states[0] = cta;
  }
  __syncthreads();

  if (splits == 1) {
    write_row(s_states[0], s_top_vals, s_top_ids, row, k, out);
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
    ws.values[slot * k + i] = s_top_vals[i];
    ws.ids[slot * k + i] = s_top_ids[i];
  }
  __threadfence();
  __syncthreads();
  if (tid == 0) s_is_last = atomicAdd(&ws.tickets[row], 1) == static_cast<int>(splits) - 1;
  __syncthreads();
  if (!s_is_last) return;
  __threadfence();

  // Last CTA of the row: every other CTA's partials are visible. Read them
  // through L2 (__ldcg), never a stale L1 line.
  const int merge_size = static_cast<int>(splits) * k;
  for (int idx = tid; idx < merge_size; idx += kThreads) {
    const int64_t from = row * splits * k + idx;
    s_vals[idx] = __ldcg(ws.values + from);
    s_ids[idx] = __ldcg(ws.ids + from);
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
  rank_merge(s_vals, s_ids, static_cast<int>(splits), k, s_top_vals, s_top_ids);
  if (tid == 0) {
    EntropyState<float> total = s_states[0];
    for (int i = 1; i < splits; ++i) total.merge(s_states[i]);
    s_states[0] = total;
  }
  __syncthreads();
  write_row(s_states[0], s_top_vals, s_top_ids, row, k, out);
}

template <typename T, bool kDivide>
void launch_scaled(const T* data, const dim3& grid, int64_t vocab, int64_t row_stride,
                   int64_t col_stride, int k, const Scaler& scale, int64_t splits,
                   void* workspace, const Outputs& out, cudaStream_t stream) {
  if (k <= 32) {
    draft_topk_entropy_kernel<T, kDivide, 1><<<grid, kThreads, 0, stream>>>(
        data, vocab, row_stride, col_stride, k, scale, splits, workspace, out);
  } else {
    draft_topk_entropy_kernel<T, kDivide, 2><<<grid, kThreads, 0, stream>>>(
        data, vocab, row_stride, col_stride, k, scale, splits, workspace, out);
  }
}

template <typename T>
cudaError_t launch_typed(const void* logits, int64_t rows, int64_t vocab, int64_t row_stride,
                         int64_t col_stride, int k, const Scaler& scale, int64_t splits,
                         void* workspace, const Outputs& out, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(rows * splits));
  const T* data = static_cast<const T*>(logits);
  if (scale.exact_reciprocal) {
    launch_scaled<T, false>(data, grid, vocab, row_stride, col_stride, k, scale, splits,
                            workspace, out, stream);
  } else {
    launch_scaled<T, true>(data, grid, vocab, row_stride, col_stride, k, scale, splits,
                           workspace, out, stream);
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
  // With few rows, split them so the grid fills one wave of resident CTAs
  // (kMinBlocksPerSm per SM) without spilling into a second, mostly idle one.
  const int64_t target_ctas = kMinBlocksPerSm * static_cast<int64_t>(num_sms > 0 ? num_sms : 1);
  int64_t splits = target_ctas / rows;
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

cudaError_t launch_draft_topk_entropy(const DraftTopKEntropyArgs& args, cudaStream_t stream) {
  const int64_t rows = args.rows, k = args.k;
  const DraftTopKEntropyPlan& plan = args.plan;
  if (rows == 0) return cudaSuccess;
  if (k < 1 || k > core::kMaxTopK || k > args.vocab || plan.splits < 1 ||
      plan.splits > kMaxSplits || rows * plan.splits > INT32_MAX ||
      (plan.splits > 1 && args.workspace == nullptr)) {
    return cudaErrorInvalidValue;
  }
  Scaler scale;
  scale.temperature = args.temperature;
  scale.reciprocal = 1.0f / args.temperature;
  scale.exact_reciprocal = is_power_of_two(args.temperature);
  const Outputs out{args.topk_logprobs, args.topk_ids, args.topk_entropy, args.entropy,
                    args.logsumexp};
  const int k32 = static_cast<int>(k);
  switch (args.dtype) {
    case core::LogitDType::kFloat32:
      return launch_typed<float>(args.logits, rows, args.vocab, args.row_stride,
                                 args.col_stride, k32, scale, plan.splits, args.workspace, out,
                                 stream);
    case core::LogitDType::kFloat16:
      return launch_typed<__half>(args.logits, rows, args.vocab, args.row_stride,
                                  args.col_stride, k32, scale, plan.splits, args.workspace, out,
                                  stream);
    case core::LogitDType::kBFloat16:
      return launch_typed<__nv_bfloat16>(args.logits, rows, args.vocab, args.row_stride,
                                         args.col_stride, k32, scale, plan.splits,
                                         args.workspace, out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace heterospec
