// CUDA kernel of fused_verify: temperature, top-k, top-p, the tree walk,
// recursive rejection and the residual / bonus draw in one launch.
//
// Layout: one request per thread-block cluster of kCluster CTAs (kCluster = 1
// on sm_80 and for large batches; 2-8 on sm_90 when the batch leaves SMs
// idle). The CTAs of a cluster split each visited row into contiguous slices
// and combine partial results through distributed shared memory; every CTA
// then takes the same (cluster-uniform) decisions, so the walk needs no
// broadcast. Rank 0 writes the outputs. Logits are read in their own dtype
// with 16-byte loads; no probability row is written (the real-q mode keeps its
// residual p' in a [B, V] float32 workspace row).
//
// Per visited row:
//   greedy      one pass: argmax (value desc, id asc) + NaN / +inf check.
//   sampling    pass A: max logit and sum of weights (online rescale), NaN
//               check; top-k: radix select of the k-th largest logit over
//               the order-preserving key of the logit (2 passes for 16-bit
//               dtypes, 4 for fp32) + one sum pass; top-p: radix select over
//               the same keys with fixed-point weight masses (the weight is
//               monotone in the logit, so the largest logit l* whose upper
//               mass reaches top_p * total gives tau = w(l*) exactly as the
//               sorted definition does). Later passes hit L2.
//   children    read their logits directly; accept tests are the core
//               header's coin_accepts.
//   final draw  per-warp-tile fixed-point masses, a cluster scan over tile
//               totals, then one warp scans the single tile holding the
//               target: integer arithmetic, so the pick never runs off the
//               CDF and does not depend on the cluster size.
//
// Performance structure: radix-select histograms accumulate runs of equal
// digits in registers and combine them per warp (__match_any_sync) before one
// shared atomic (the first digit of N(0, s^2) logits lands in one or two bins,
// so per-element atomics serialised the CTA); block reductions combine warp
// partials with a shuffle tree; sweeps keep 128 bytes (16-bit) / 64 bytes
// (fp32) of raw vectors in flight per thread; the final draw's tile totals
// keep 4 tiles per warp in flight; for small batches the children rows of the
// current node are prefetched into L2 while it is decided.
//
// Agreement with the CPU kernel: identical rules (core/fused_verify.h) and the
// same uniforms. Weights here are exp2((l - max) * log2(e) / T) with the
// hardware ex2 (relative error ~2^-22 plus |argument| * 2^-24) and sums are in
// float / 40-bit fixed point in a different order than the CPU's double sums.
// Decisions can therefore differ only where a comparison is within about 1e-5
// relative of its threshold: u * remaining vs w(x) (accept), the top-p
// cumulative mass vs top_p * total, and u0 * total vs the CDF at a token
// boundary. Greedy decisions are bit-identical (exact float comparisons).
//
// Invalid data (NaN / +inf / all -inf in a visited row, malformed parents,
// out-of-range token on a real node, uniforms outside [0, 1) for a sampling
// request, invalid temperature / top_p, NaN / negative / inf draft_probs in a
// visited row with children): that request's outputs are the sentinel of
// core::verify::write_request_sentinel (num_accepted 0, every slot -1).
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/fused_verify.h"
#include "core/tree.h"
#include "cuda/common.cuh"
#include "cuda/fused_verify.cuh"

namespace heterospec {
namespace cuda {
namespace {

namespace hv = core::verify;
namespace cg = cooperative_groups;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxCluster = 8;
// Final-draw tiles per CTA (a tile is 32 * tile_mult consecutive vectors).
constexpr int kMaxTiles = 1024;
// Fixed-point scale of masses: weights are <= 1, so a row sums to < 2^63.
constexpr float kFxScale = 1099511627776.0f;  // 2^40
constexpr double kFxInv = 1.0 / 1099511627776.0;
// 16-byte vectors in flight per thread in a row sweep: 128 bytes for 16-bit
// logits; fp32 keeps 64 (8 would spill under the 128-register cap).
template <typename T>
constexpr int kSweepUnroll = sizeof(T) == 2 ? 8 : 4;

// ------------------------------------------------------------ dtype traits

__device__ __forceinline__ uint32_t order_key16(uint32_t bits) {
  return (bits & 0x8000u) ? (~bits & 0xffffu) : (bits | 0x8000u);
}
__device__ __forceinline__ uint32_t unorder_key16(uint32_t key) {
  return (key & 0x8000u) ? (key & 0x7fffu) : (~key & 0xffffu);
}

template <typename T>
struct Traits;

template <>
struct Traits<float> {
  static constexpr int kVec = 4;
  static constexpr int kKeyBits = 32;
  __device__ static float load1(const float* p) { return __ldg(p); }
  __device__ static void decode(const uint4& v, float (&out)[kVec]) {
    out[0] = __uint_as_float(v.x);
    out[1] = __uint_as_float(v.y);
    out[2] = __uint_as_float(v.z);
    out[3] = __uint_as_float(v.w);
  }
  __device__ static void load_vec(const float* p, float (&out)[kVec]) {
    decode(__ldg(reinterpret_cast<const uint4*>(p)), out);
  }
  __device__ static uint32_t key(float x) { return core::float_order_key(__float_as_uint(x)); }
  __device__ static float from_key(uint32_t k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
  }
};

template <>
struct Traits<__nv_bfloat16> {
  static constexpr int kVec = 8;
  static constexpr int kKeyBits = 16;
  __device__ static float load1(const __nv_bfloat16* p) {
    const uint32_t raw = __ldg(reinterpret_cast<const unsigned short*>(p));
    return __uint_as_float(raw << 16);
  }
  __device__ static void decode(const uint4& v, float (&out)[kVec]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = __uint_as_float(w[i] << 16);
      out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
  __device__ static void load_vec(const __nv_bfloat16* p, float (&out)[kVec]) {
    decode(__ldg(reinterpret_cast<const uint4*>(p)), out);
  }
  // bf16 -> float is exact, so the upper half of the float is the bf16.
  __device__ static uint32_t key(float x) { return order_key16(__float_as_uint(x) >> 16); }
  __device__ static float from_key(uint32_t k) { return __uint_as_float(unorder_key16(k) << 16); }
};

template <>
struct Traits<__half> {
  static constexpr int kVec = 8;
  static constexpr int kKeyBits = 16;
  __device__ static float load1(const __half* p) {
    return __half2float(__ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(p))));
  }
  __device__ static void decode(const uint4& v, float (&out)[kVec]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
  __device__ static void load_vec(const __half* p, float (&out)[kVec]) {
    decode(__ldg(reinterpret_cast<const uint4*>(p)), out);
  }
  // half -> float -> half round-trips exactly for values read from a half row.
  __device__ static uint32_t key(float x) {
    return order_key16(__half_as_ushort(__float2half_rn(x)));
  }
  __device__ static float from_key(uint32_t k) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(unorder_key16(k))));
  }
};

// One row of V elements split into "virtual vectors": vector 0 is the
// unaligned head (ids [head - kVec, head) clipped to >= 0), vectors 1..nfull
// are aligned 16-byte loads, vector nfull + 1 the tail. Partial vectors are
// loaded element by element; missing lanes read -inf and are skipped by ids.
template <typename T>
struct RowView {
  static constexpr int kVec = Traits<T>::kVec;
  const T* ptr;
  int64_t vocab;
  int64_t head;
  int64_t nfull;

  __device__ RowView(const T* p, int64_t v) : ptr(p), vocab(v) {
    const int64_t misalign =
        static_cast<int64_t>((reinterpret_cast<uintptr_t>(p) / sizeof(T)) % kVec);
    head = (kVec - misalign) % kVec;
    if (head > vocab) head = vocab;
    nfull = (vocab - head) / kVec;
  }
  __device__ int64_t num_vecs() const { return nfull + 2; }
  __device__ int64_t first_id(int64_t j) const { return head + (j - 1) * kVec; }
  __device__ bool is_full(int64_t j) const { return j >= 1 && j <= nfull; }
  // The virtual vector holding token id.
  __device__ int64_t vec_of(int64_t id) const {
    return id < head ? 0 : (id - head) / kVec + 1;
  }
  __device__ float at(int64_t id) const { return Traits<T>::load1(ptr + id); }
  // Raw 16 bytes of vector j (decode with Traits<T>::decode); elements of a
  // partial vector outside [0, vocab) are 0 bits and must be skipped by id.
  __device__ uint4 load_raw(int64_t j) const {
    const int64_t id0 = first_id(j);
    if (is_full(j)) return __ldg(reinterpret_cast<const uint4*>(ptr + id0));
    uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const int64_t id = id0 + e;
      if (id < 0 || id >= vocab) continue;
      if constexpr (sizeof(T) == 4) {
        w[e] = __ldg(reinterpret_cast<const unsigned int*>(ptr + id));
      } else {
        static_assert(sizeof(T) == 2, "16- or 32-bit logits");
        w[e >> 1] |= uint32_t(__ldg(reinterpret_cast<const unsigned short*>(ptr + id)))
                     << (16 * (e & 1));
      }
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
  __device__ void load(int64_t j, float (&out)[kVec]) const {
    const int64_t id0 = first_id(j);
    if (is_full(j)) {
      Traits<T>::load_vec(ptr + id0, out);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const int64_t id = id0 + e;
        out[e] = (id >= 0 && id < vocab) ? Traits<T>::load1(ptr + id) : -INFINITY;
      }
    }
  }
};

// Calls f(value, id) for every element of vectors [vbeg, vend), vectors
// strided over the CTA's threads (coalesced), kUnroll loads in flight.
template <int kUnroll, typename T, typename F>
__device__ __forceinline__ void sweep(const RowView<T>& row, int64_t vbeg, int64_t vend,
                                      F&& f) {
  constexpr int kVec = Traits<T>::kVec;
  for (int64_t j0 = vbeg + threadIdx.x; j0 < vend; j0 += int64_t(kThreads) * kUnroll) {
    // Raw vectors keep kUnroll * 16 bytes in flight in 4 * kUnroll registers
    // (decoding to float at load time would double that for 16-bit dtypes).
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = j0 + int64_t(u) * kThreads;
      if (j < vend) raw[u] = row.load_raw(j);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = j0 + int64_t(u) * kThreads;
      if (j >= vend) continue;
      float vals[kVec];
      Traits<T>::decode(raw[u], vals);
      const int64_t id0 = row.first_id(j);
      const bool full = row.is_full(j);
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const int64_t id = id0 + e;
        if (full || (id >= 0 && id < row.vocab)) f(vals[e], id);
      }
    }
  }
}

constexpr int64_t kPrefetchLine = 128;

// Generic-address L2 prefetch (no register result: the thread never waits).
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.L2 [%0];" ::"l"(p));
}

// --------------------------------------------------------------- weights

// exp((l - max) / T) as exp2((l - max) * c), c = log2(e) / T. l == max gives
// exactly 1 (also when c overflows for a tiny T); -inf gives 0.
__device__ __forceinline__ float weight_of(float l, float max_logit, float c) {
  const float d = l - max_logit;
  return d == 0.0f ? 1.0f : fast_exp2(d * c);
}

__device__ __forceinline__ uint64_t to_fx(float mass) {
  return __float2ull_rn(mass * kFxScale);
}

// --------------------------------------------------- cluster / block group

template <int kCluster>
struct Group {
  __device__ static unsigned rank() {
    if constexpr (kCluster == 1) {
      return 0;
    } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      return cg::this_cluster().block_rank();
#else
      return 0;
#endif
    }
  }
  // Barrier over every thread of the group, with release / acquire ordering
  // of shared and global memory at cluster scope.
  __device__ static void sync() {
    if constexpr (kCluster == 1) {
      __syncthreads();
    } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      cg::this_cluster().sync();
#else
      __trap();  // cluster kernels are only launched on sm_90+
#endif
    }
  }
  template <typename P>
  __device__ static P* remote(P* local, unsigned r) {
    if constexpr (kCluster == 1) {
      return local;
    } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      return cg::this_cluster().map_shared_rank(local, r);
#else
      (void)r;
      return local;
#endif
    }
  }
};

// 32-byte payload of the generic all-reduce.
struct alignas(16) Payload {
  uint32_t w[8];
};

struct SharedState {
  Payload warp_part[kWarps];
  Payload slot[2];  // exchange slots, alternated (see all_reduce)
  unsigned long long hist[2][256];
  unsigned long long comb[256];
  unsigned long long scan_ws[kWarps];
  unsigned long long agg[kWarps][32];  // warp_aggregated_add scratch
  unsigned long long tile_total[kMaxTiles];
  unsigned long long cta_total[2];
  unsigned long long found_base;
  int found_tile;
  int nchild;
  int sel_digit;
  int sel_ok;
  unsigned long long sel_above;
  unsigned long long sel_mass;
};

template <typename V>
__device__ __forceinline__ V shfl_xor_any(V v, int mask) {
  static_assert(sizeof(V) % 4 == 0 && sizeof(V) <= sizeof(Payload), "payload size");
  union {
    V v;
    uint32_t w[sizeof(V) / 4];
  } u;
  u.v = v;
#pragma unroll
  for (int i = 0; i < int(sizeof(V) / 4); ++i) u.w[i] = __shfl_xor_sync(kFullMask, u.w[i], mask);
  return u.v;
}

// Reduces v over the whole cluster with the commutative op; every thread of
// every CTA gets the same value (fixed combination order: deterministic).
// The exchange slots alternate: a slot is rewritten two exchanges later, and
// the intervening Group::sync orders that after every remote read of it.
template <int kCluster, typename V, typename Op>
__device__ V all_reduce(V v, Op op, SharedState& sm, int& parity) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v = op(v, shfl_xor_any(v, m));
  if (lane == 0) *reinterpret_cast<V*>(&sm.warp_part[warp]) = v;
  __syncthreads();
  if (warp == 0) {
    // Tree over the kWarps partials (both half-warps hold the same copy), a
    // fixed order: deterministic.
    static_assert(kWarps == 16, "tree below combines 16 warp partials");
    V acc = *reinterpret_cast<V*>(&sm.warp_part[lane & (kWarps - 1)]);
#pragma unroll
    for (int m = kWarps / 2; m > 0; m >>= 1) acc = op(acc, shfl_xor_any(acc, m));
    if (lane == 0) *reinterpret_cast<V*>(&sm.slot[parity]) = acc;
  }
  Group<kCluster>::sync();
  V acc = *reinterpret_cast<V*>(Group<kCluster>::remote(&sm.slot[parity], 0));
  for (int r = 1; r < kCluster; ++r) {
    acc = op(acc, *reinterpret_cast<V*>(Group<kCluster>::remote(&sm.slot[parity], r)));
  }
  parity ^= 1;
  return acc;
}

struct SumF {
  __device__ float operator()(float a, float b) const { return a + b; }
};
struct OrI {
  __device__ int operator()(int a, int b) const { return a | b; }
};
struct MaxI64 {
  __device__ long long operator()(long long a, long long b) const { return a > b ? a : b; }
};

__device__ __forceinline__ unsigned long long warp_incl_scan_u64(unsigned long long v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const unsigned long long o = __shfl_up_sync(kFullMask, v, d);
    if (lane >= d) v += o;
  }
  return v;
}

// Exclusive prefix sum over the CTA's threads (in thread order).
__device__ unsigned long long block_excl_scan_u64(unsigned long long v, SharedState& sm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned long long incl = warp_incl_scan_u64(v);
  __syncthreads();  // scan_ws may still be read by a previous call
  if (lane == 31) sm.scan_ws[warp] = incl;
  __syncthreads();
  unsigned long long offset = 0;
  for (int w = 0; w < warp; ++w) offset += sm.scan_ws[w];
  return offset + incl - v;
}

// ------------------------------------------------------------ row stats

// Pass-A partial: running max, weight sum relative to it, the smallest
// per-thread max (a lower bound for the k-th largest logit when k <= the
// number of threads) and the invalid-data flag.
struct RowPartial {
  float max_logit;
  float sum;
  float min_thread_max;
  int bad;
};

struct CombineRow {
  float c;
  __device__ RowPartial operator()(const RowPartial& a, const RowPartial& b) const {
    RowPartial r;
    r.max_logit = fmaxf(a.max_logit, b.max_logit);
    r.sum = 0.0f;
    if (r.max_logit > -INFINITY) {
      const float sa = a.max_logit > -INFINITY ? a.sum * weight_of(a.max_logit, r.max_logit, c) : 0.0f;
      const float sb = b.max_logit > -INFINITY ? b.sum * weight_of(b.max_logit, r.max_logit, c) : 0.0f;
      r.sum = sa + sb;
    }
    r.min_thread_max = fminf(a.min_thread_max, b.min_thread_max);
    r.bad = a.bad | b.bad;
    return r;
  }
};

struct ArgMax {
  float value;
  int bad;
  long long id;
};

struct CombineArgMax {
  __device__ ArgMax operator()(const ArgMax& a, const ArgMax& b) const {
    ArgMax r = hv::argmax_better(b.value, b.id, a.value, a.id) ? b : a;
    r.bad = a.bad | b.bad;
    return r;
  }
};

// Processed target distribution of one row: weight w(l) = weight_of(l, max,
// c) on kept tokens (l >= kth and w >= tau_w), total kept weight `total`.
struct RowDist {
  float max_logit;
  float c;
  float kth;    // -inf when top-k is off
  float tau_w;  // 0 when top-p is off (or rounding never reached the target)
  float total;
  __device__ bool kept(float l, float w) const {
    return hv::top_k_keeps(l, kth) && hv::top_p_keeps(w, tau_w);
  }
  __device__ float kept_weight(float l) const {
    const float w = weight_of(l, max_logit, c);
    return kept(l, w) ? w : 0.0f;
  }
};

constexpr uint32_t kNoDigit = 256;

// hist[digit] += amount for every lane of the (converged) warp, one shared
// atomic per distinct digit; kNoDigit lanes add nothing.
__device__ __forceinline__ void warp_aggregated_add(unsigned long long* hist, uint32_t digit,
                                                    unsigned long long amount,
                                                    SharedState& sm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned peers = __match_any_sync(kFullMask, digit);
  sm.agg[warp][lane] = amount;
  __syncwarp();
  if (digit != kNoDigit && lane == __ffs(peers) - 1) {
    unsigned long long total = 0;
    for (unsigned m = peers; m != 0; m &= m - 1) total += sm.agg[warp][__ffs(m) - 1];
    atomicAdd(&hist[digit], total);
  }
  __syncwarp();  // agg is rewritten by the next call
}

// Radix select over order keys of the logits: the largest key K such that the
// summed contribution of elements with key >= K reaches `target`
// (contribution(l) == 0 skips the element). Returns false when even all
// elements do not reach it. `mass_at` = contribution of keys >= K.
template <int kCluster, int kUnroll, typename T, typename Contrib>
__device__ bool radix_select(const RowView<T>& row, int64_t vbeg, int64_t vend,
                             unsigned long long target, Contrib contrib, SharedState& sm,
                             int& hist_parity, uint32_t& key_out,
                             unsigned long long& mass_at) {
  constexpr int kKeyBits = Traits<T>::kKeyBits;
  const int lane = threadIdx.x & 31;
  uint32_t prefix = 0, prefix_mask = 0;
  unsigned long long above = 0;
  for (int shift = kKeyBits - 8; shift >= 0; shift -= 8) {
    unsigned long long* hist = sm.hist[hist_parity];
    hist_parity ^= 1;
    for (int i = threadIdx.x; i < 256; i += kThreads) hist[i] = 0;
    __syncthreads();
    // Logits ~ N(0, s^2) put nearly every contributing key of the first
    // digit into one or two bins: per-element shared atomics on the same
    // address serialise the whole CTA. Each thread therefore accumulates runs
    // in two register slots (most recent digits), spills a slot to shared
    // memory only when a third digit evicts it, and the final slots are
    // combined per warp (one atomic per distinct digit and warp). Integer
    // sums: the histogram is identical to per-element atomics.
    uint32_t digit0 = kNoDigit, digit1 = kNoDigit;
    unsigned long long acc0 = 0, acc1 = 0;
    sweep<kUnroll>(row, vbeg, vend, [&](float l, int64_t) {
      const uint32_t key = Traits<T>::key(l);
      if ((key & prefix_mask) != prefix) return;
      const unsigned long long amount = contrib(l);
      if (amount == 0) return;
      const uint32_t digit = (key >> shift) & 255u;
      if (digit == digit0) {
        acc0 += amount;
      } else if (digit == digit1) {
        acc1 += amount;
      } else {
        if (digit1 != kNoDigit) atomicAdd(&hist[digit1], acc1);
        digit1 = digit0;
        acc1 = acc0;
        digit0 = digit;
        acc0 = amount;
      }
    });
    warp_aggregated_add(hist, digit0, acc0, sm);
    warp_aggregated_add(hist, digit1, acc1, sm);
    Group<kCluster>::sync();
    for (int i = threadIdx.x; i < 256; i += kThreads) {
      unsigned long long s = 0;
      for (int r = 0; r < kCluster; ++r) s += *Group<kCluster>::remote(&hist[i], r);
      sm.comb[i] = s;
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      // Lane l holds digits 255 - 8l ... 248 - 8l (descending).
      unsigned long long bins[8];
      unsigned long long lane_sum = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        bins[i] = sm.comb[255 - 8 * lane - i];
        lane_sum += bins[i];
      }
      const unsigned long long incl = warp_incl_scan_u64(lane_sum);
      const unsigned ballot = __ballot_sync(kFullMask, above + incl >= target);
      if (ballot == 0) {
        if (lane == 0) sm.sel_ok = 0;
      } else if (lane == __ffs(ballot) - 1) {
        unsigned long long running = above + incl - lane_sum;
        int digit = 255 - 8 * lane - 7;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          if (running + bins[i] >= target) {
            digit = 255 - 8 * lane - i;
            sm.sel_mass = running + bins[i];
            break;
          }
          running += bins[i];
        }
        sm.sel_ok = 1;
        sm.sel_digit = digit;
        sm.sel_above = running;
      }
    }
    __syncthreads();
    if (!sm.sel_ok) return false;  // cluster-uniform (combined histograms)
    prefix |= uint32_t(sm.sel_digit) << shift;
    prefix_mask |= 255u << shift;
    above = sm.sel_above;
    mass_at = sm.sel_mass;
  }
  key_out = prefix;
  return true;
}

// Draws from the residual with the inverse CDF over token ids (smallest id
// whose cumulative mass exceeds u * total) on 40-bit fixed-point masses.
// mass(l, id) is the residual weight ignoring `rejected` (a list of n_rej
// distinct tokens whose mass is removed). Returns -1 when the total is 0.
template <int kCluster, typename T, typename Mass>
__device__ long long draw_token(const RowView<T>& row, int64_t vbeg, int64_t vend,
                                int64_t vecs_per_cta, Mass mass, const int* rejected,
                                int n_rej, float u, SharedState& sm, int& parity) {
  constexpr int kVec = Traits<T>::kVec;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t tile_mult = (vecs_per_cta + 32 * kMaxTiles - 1) / (32 * kMaxTiles);
  const int64_t tile_vecs = 32 * tile_mult;
  const int n_tiles = static_cast<int>((vend - vbeg + tile_vecs - 1) / tile_vecs);
  auto fx_of = [&](float l, int64_t id) -> unsigned long long {
    return (id >= 0 && id < row.vocab) ? to_fx(mass(l, id)) : 0ull;
  };

  // 1. Per-tile totals: warp w owns tiles w, w + kWarps, ...; it works on
  // kTilesInFlight of them at once (tile_mult is 1 up to 2^20 elements per
  // CTA, so one tile alone would leave a single load in flight per thread).
  constexpr int kTilesInFlight = 4;
  for (int g0 = warp; g0 < n_tiles; g0 += kWarps * kTilesInFlight) {
    unsigned long long acc[kTilesInFlight];
#pragma unroll
    for (int k = 0; k < kTilesInFlight; ++k) acc[k] = 0;
    for (int64_t s = 0; s < tile_mult; ++s) {
      float vals[kTilesInFlight][kVec];
#pragma unroll
      for (int k = 0; k < kTilesInFlight; ++k) {
        const int g = g0 + k * kWarps;
        const int64_t j = vbeg + g * tile_vecs + s * 32 + lane;
        if (g < n_tiles && j < vend) row.load(j, vals[k]);
      }
#pragma unroll
      for (int k = 0; k < kTilesInFlight; ++k) {
        const int g = g0 + k * kWarps;
        const int64_t j = vbeg + g * tile_vecs + s * 32 + lane;
        if (g < n_tiles && j < vend) {
          const int64_t id0 = row.first_id(j);
#pragma unroll
          for (int e = 0; e < kVec; ++e) acc[k] += fx_of(vals[k][e], id0 + e);
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kTilesInFlight; ++k) {
      const int g = g0 + k * kWarps;
      const unsigned long long tile_sum = warp_sum(acc[k]);  // whole warp
      if (lane == 0 && g < n_tiles) sm.tile_total[g] = tile_sum;
    }
  }
  __syncthreads();
  // Remove the rejected tokens' masses from their tiles (recomputed with the
  // same arithmetic, so the integers cancel exactly).
  if (threadIdx.x == 0) {
    for (int i = 0; i < n_rej; ++i) {
      const int64_t id = rejected[i];
      const int64_t j = row.vec_of(id);
      if (j >= vbeg && j < vend) {
        sm.tile_total[(j - vbeg) / tile_vecs] -= fx_of(row.at(id), id);
      }
    }
  }
  __syncthreads();

  // 2. CTA totals, cluster prefix, and the owner of the target.
  const int per_thread = (n_tiles + kThreads - 1) / kThreads;
  const int t_begin = min(n_tiles, int(threadIdx.x) * per_thread);
  const int t_end = min(n_tiles, t_begin + per_thread);
  unsigned long long mine = 0;
  for (int t = t_begin; t < t_end; ++t) mine += sm.tile_total[t];
  const unsigned long long before_me = block_excl_scan_u64(mine, sm);
  if (threadIdx.x == kThreads - 1) sm.cta_total[parity] = before_me + mine;
  Group<kCluster>::sync();
  const unsigned rank = Group<kCluster>::rank();
  unsigned long long total = 0, prefix = 0;
  for (int r = 0; r < kCluster; ++r) {
    const unsigned long long t = *Group<kCluster>::remote(&sm.cta_total[parity], r);
    if (r < int(rank)) prefix += t;
    total += t;
  }
  parity ^= 1;
  long long found = -1;
  if (total > 0) {
    unsigned long long target =
        static_cast<unsigned long long>(static_cast<double>(u) * static_cast<double>(total));
    if (target >= total) target = total - 1;
    const unsigned long long my_total = sm.cta_total[parity ^ 1];  // this CTA's own
    if (target >= prefix && target < prefix + my_total) {
      const unsigned long long local = target - prefix;
      // 3. The thread whose tile range holds `local` finds the tile.
      if (local >= before_me && local < before_me + mine) {
        unsigned long long run = before_me;
        for (int t = t_begin; t < t_end; ++t) {
          if (local < run + sm.tile_total[t]) {
            sm.found_tile = t;
            sm.found_base = run;
            break;
          }
          run += sm.tile_total[t];
        }
      }
      __syncthreads();
      // 4. Warp 0 scans that tile in id order.
      if (warp == 0) {
        const int g = sm.found_tile;
        unsigned long long run = sm.found_base;
        const int64_t tile_begin = vbeg + g * tile_vecs;
        for (int64_t s = 0; s < tile_mult; ++s) {
          const int64_t j = tile_begin + s * 32 + lane;
          float vals[kVec];
          unsigned long long fx[kVec];
          unsigned long long lane_sum = 0;
          int64_t id0 = 0;
          if (j < vend) {
            row.load(j, vals);
            id0 = row.first_id(j);
          }
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            fx[e] = 0;
            if (j < vend) {
              const int64_t id = id0 + e;
              bool is_rejected = false;
              for (int i = 0; i < n_rej; ++i) is_rejected |= rejected[i] == id;
              fx[e] = is_rejected ? 0ull : fx_of(vals[e], id);
            }
            lane_sum += fx[e];
          }
          const unsigned long long incl = warp_incl_scan_u64(lane_sum);
          const unsigned long long warp_total = __shfl_sync(kFullMask, incl, 31);
          const unsigned ballot = __ballot_sync(kFullMask, run + incl > local);
          if (ballot != 0) {
            if (lane == __ffs(ballot) - 1) {
              unsigned long long r = run + incl - lane_sum;
#pragma unroll
              for (int e = 0; e < kVec; ++e) {
                r += fx[e];
                if (fx[e] != 0 && hv::cdf_exceeds(r, local)) {
                  found = id0 + e;
                  break;
                }
              }
            }
            break;
          }
          run += warp_total;
        }
      }
    }
  }
  // 5. Every CTA learns the pick (only one CTA found it).
  return all_reduce<kCluster>(found, MaxI64{}, sm, parity);
}

// -------------------------------------------------------------- the kernel

struct TreeSmem {
  int* parents;   // [N] validated parents
  int* tokens;    // [N] candidate token (real non-root nodes), else -1
  int* children;  // [N] children of the current node, index order
  int* path;      // [N] root, then accepted nodes
  float* numer;   // [N] per-child residual weight (-1: duplicate sibling)
  int* rejected;  // [N] rejected tokens at the current node
};

// The kernel's parameters: the caller's arguments plus what the launcher
// decides per launch.
struct LaunchArgs : FusedVerifyArgs {
  // Prefetch the rows of the current node's children into L2 while the node
  // is decided (only when the batch leaves most of the memory bandwidth idle).
  int prefetch_children;
};

template <typename T, int kCluster>
__device__ __forceinline__ void fused_verify_body(const LaunchArgs& args) {
  __shared__ SharedState sm;
  extern __shared__ int dyn_smem[];
  const int64_t n = args.nodes, vocab = args.vocab;
  TreeSmem tree{dyn_smem,         dyn_smem + n,     dyn_smem + 2 * n,
                dyn_smem + 3 * n, reinterpret_cast<float*>(dyn_smem + 4 * n),
                dyn_smem + 5 * n};
  const int64_t b = blockIdx.x / kCluster;
  const unsigned rank = Group<kCluster>::rank();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int parity = 0, hist_parity = 0;

  const int64_t* parents_g = args.parents + b * n;
  const int64_t* cand_g = args.candidates + b * n;
  const float* u_g = args.uniforms + b * n;
  const float temperature = args.temperature[b];
  const int64_t top_k = args.top_k[b];
  const float top_p = args.top_p[b];
  const bool greedy = hv::is_greedy(temperature);
  const bool real_q = args.draft_probs != nullptr;

  // ---- walk-independent validation (same rules as core::first_malformed_node
  // and first_bad_candidate, one node per thread).
  int bad = !hv::valid_temperature(temperature) || !hv::valid_top_p(top_p);
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const int64_t p = parents_g[i];
    bool ok = core::check_tree_node(parents_g, i) == core::TreeDefect::kNone;
    const bool real = i > 0 && p >= 0;
    const int64_t tok = cand_g[i];
    if (real && (tok < 0 || tok >= vocab)) ok = false;
    if (!greedy && !hv::valid_uniform(u_g[i])) ok = false;
    bad |= !ok;
    tree.parents[i] = ok ? static_cast<int>(p) : -1;
    tree.tokens[i] = (ok && real) ? static_cast<int>(tok) : -1;
  }
  bad = __syncthreads_or(bad);

  int num_acc = 0;
  long long emitted = -1;
  if (!bad) {
    if (threadIdx.x == 0) tree.path[0] = 0;
    const float c = kLog2e / temperature;  // unused when greedy
    int v = 0;
    while (true) {
      __syncthreads();  // previous iteration done with children / numer
      const T* row_ptr = static_cast<const T*>(args.logits) + b * args.logits_stride_b +
                         v * args.logits_stride_n;
      const RowView<T> row(row_ptr, vocab);
      const int64_t nv = row.num_vecs();
      const int64_t per_cta = (nv + kCluster - 1) / kCluster;
      const int64_t vbeg = min(nv, per_cta * rank);
      const int64_t vend = min(nv, vbeg + per_cta);
      // Children of v in index order (warp 0, ballot compaction).
      if (warp == 0) {
        int count = 0;
        for (int64_t base = v + 1; base < n; base += 32) {
          const int64_t cidx = base + lane;
          const bool is_child = cidx < n && tree.parents[cidx] == v;
          const unsigned m = __ballot_sync(kFullMask, is_child);
          if (is_child) tree.children[count + __popc(m & ((1u << lane) - 1))] = int(cidx);
          count += __popc(m);
        }
        if (lane == 0) sm.nchild = count;
      }
      __syncthreads();
      const int nchild = sm.nchild;
      int accepted = -1;
      if (args.prefetch_children) {
        // One of the children is usually visited next: start pulling this
        // CTA's slice of their rows into L2 now (prefetches do not block).
        const int64_t row_bytes = vocab * int64_t(sizeof(T));
        const int64_t slice = (row_bytes + kCluster - 1) / kCluster;
        const int64_t lo = slice * rank;
        const int64_t hi = min(row_bytes, lo + slice);
        for (int j = 0; j < nchild; ++j) {
          const char* child_row = reinterpret_cast<const char*>(
              static_cast<const T*>(args.logits) + b * args.logits_stride_b +
              int64_t(tree.children[j]) * args.logits_stride_n);
          for (int64_t off = lo + int64_t(threadIdx.x) * kPrefetchLine; off < hi;
               off += int64_t(kThreads) * kPrefetchLine) {
            prefetch_l2(child_row + off);
          }
        }
      }

      if (greedy) {
        ArgMax best{-INFINITY, 0, 0x7fffffffffffffffLL};
        sweep<kSweepUnroll<T>>(row, vbeg, vend, [&](float l, int64_t id) {
          best.bad |= hv::invalid_logit(l);
          // ids grow along a thread's sweep: strict > keeps the lowest id.
          if (l > best.value) {
            best.value = l;
            best.id = id;
          }
        });
        best = all_reduce<kCluster>(best, CombineArgMax{}, sm, parity);
        if (best.bad || !(best.value > -INFINITY)) {
          bad = 1;
          break;
        }
        for (int j = 0; j < nchild; ++j) {
          if (tree.tokens[tree.children[j]] == best.id) {
            accepted = tree.children[j];
            break;
          }
        }
        if (accepted < 0) {
          emitted = best.id;
          break;
        }
      } else {
        // ---- pass A: max, weight sum, NaN / +inf.
        RowPartial part{-INFINITY, 0.0f, 0.0f, 0};
        sweep<kSweepUnroll<T>>(row, vbeg, vend, [&](float l, int64_t) {
          part.bad |= hv::invalid_logit(l);
          if (l > part.max_logit) {
            part.sum = (part.max_logit > -INFINITY
                            ? part.sum * weight_of(part.max_logit, l, c)
                            : 0.0f) + 1.0f;
            part.max_logit = l;
          } else if (l > -INFINITY) {
            part.sum += weight_of(l, part.max_logit, c);
          }
        });
        part.min_thread_max = part.max_logit;
        part = all_reduce<kCluster>(part, CombineRow{c}, sm, parity);
        int q_bad = 0;
        const float* q_row = nullptr;
        if (real_q) {
          q_row = args.draft_probs + b * args.draft_stride_b + v * args.draft_stride_n;
          if (nchild > 0) {
            const RowView<float> qv(q_row, vocab);
            const int64_t qn = qv.num_vecs();
            const int64_t qper = (qn + kCluster - 1) / kCluster;
            const int64_t qb = min(qn, qper * rank);
            const int64_t qe = min(qn, qb + qper);
            sweep<4>(qv, qb, qe, [&](float q, int64_t) { q_bad |= !hv::valid_draft_prob(q); });
            q_bad = all_reduce<kCluster>(q_bad, OrI{}, sm, parity);
          }
        }
        if (part.bad || !(part.max_logit > -INFINITY) || q_bad) {
          bad = 1;
          break;
        }
        RowDist dist{part.max_logit, c, -INFINITY, 0.0f, part.sum};

        // ---- top-k: k-th largest logit (ties counted separately).
        if (hv::top_k_active(top_k, vocab)) {
          // Each thread's max is a distinct element >= min_thread_max, so
          // when k <= #threads elements below it never reach the k-th place.
          const float bound = top_k <= int64_t(kThreads) * kCluster ? part.min_thread_max
                                                                     : -INFINITY;
          uint32_t key = 0;
          unsigned long long count_at = 0;
          radix_select<kCluster, kSweepUnroll<T>>(
              row, vbeg, vend, static_cast<unsigned long long>(top_k),
              [&](float l) -> unsigned long long { return l >= bound ? 1ull : 0ull; }, sm,
              hist_parity, key, count_at);
          dist.kth = Traits<T>::from_key(key);
          float s = 0.0f;
          sweep<kSweepUnroll<T>>(row, vbeg, vend, [&](float l, int64_t) {
            if (hv::top_k_keeps(l, dist.kth)) s += weight_of(l, dist.max_logit, c);
          });
          dist.total = all_reduce<kCluster>(s, SumF{}, sm, parity);
        }

        // ---- top-p: largest logit l* whose upper kept mass reaches
        // top_p * total; tau = w(l*).
        if (hv::top_p_active(top_p)) {
          const double target_d =
              ceil(double(top_p) * double(dist.total) * double(kFxScale));
          const unsigned long long target =
              target_d < 1.0 ? 1ull : static_cast<unsigned long long>(target_d);
          // Tokens lighter than (1 - top_p) * total / (2 V) cannot reach tau:
          // all of them together weigh less than (1 - top_p) * total.
          const float light = float((1.0 - double(top_p)) * double(dist.total) /
                                    (2.0 * double(vocab)));
          const float bound = light > 0.0f ? dist.max_logit + log2f(light) / c : -INFINITY;
          uint32_t key = 0;
          unsigned long long mass_at = 0;
          const bool reached = radix_select<kCluster, kSweepUnroll<T>>(
              row, vbeg, vend, target,
              [&](float l) -> unsigned long long {
                if (!(l >= bound) || !hv::top_k_keeps(l, dist.kth)) return 0ull;
                return to_fx(weight_of(l, dist.max_logit, c));
              },
              sm, hist_parity, key, mass_at);
          if (reached) {
            dist.tau_w = weight_of(Traits<T>::from_key(key), dist.max_logit, c);
            dist.total = float(double(mass_at) * kFxInv);
          }
        }

        const int64_t* par64 = parents_g;
        if (!real_q) {
          // ---- deterministic drafts: u < r(x), r = residual renormalised.
          for (int j = threadIdx.x; j < nchild; j += kThreads) {
            const int cn = tree.children[j];
            const bool dup = hv::is_duplicate_sibling(par64, cand_g, v, cn);
            tree.numer[j] = dup ? -1.0f : dist.kept_weight(row.at(tree.tokens[cn]));
          }
          __syncthreads();
          float remaining = dist.total;
          int n_rej = 0;
          for (int j = 0; j < nchild; ++j) {
            const float w = tree.numer[j];
            if (w < 0.0f) continue;  // duplicate sibling: skipped
            const int cn = tree.children[j];
            if (hv::coin_accepts<float>(u_g[cn], w, remaining)) {
              accepted = cn;
              break;
            }
            remaining -= w;
            if (threadIdx.x == 0) tree.rejected[n_rej] = tree.tokens[cn];
            ++n_rej;
          }
          if (accepted < 0) {
            __syncthreads();  // rejected list visible
            auto mass = [&](float l, int64_t) { return dist.kept_weight(l); };
            emitted = draw_token<kCluster>(row, vbeg, vend, per_cta, mass, tree.rejected,
                                           n_rej, u_g[0], sm, parity);
            if (emitted < 0) {
              // Rounding rejected every token with mass: draw from p (as CPU).
              emitted = draw_token<kCluster>(row, vbeg, vend, per_cta, mass, tree.rejected,
                                             0, u_g[0], sm, parity);
            }
            if (emitted < 0) bad = 1;
            break;
          }
        } else {
          // ---- real q: u < p'(x) / q(x); p' <- norm(max(p' - q, 0)).
          float* w_row = args.workspace + b * vocab;
          bool has_w = false;  // p' = w_row / z_prev once a rejection changed it
          float z_prev = 1.0f;
          const float inv_total = 1.0f / dist.total;
          auto p_prime = [&](float l, int64_t id) -> float {
            return has_w ? __ldcg(w_row + id) / z_prev : dist.kept_weight(l) * inv_total;
          };
          for (int j = 0; j < nchild; ++j) {
            const int cn = tree.children[j];
            const int tok = tree.tokens[cn];
            const float px = p_prime(row.at(tok), tok);
            const float qx = __ldg(q_row + tok);
            if (hv::coin_accepts<float>(u_g[cn], px, qx)) {
              accepted = cn;
              break;
            }
            float z = 0.0f;
            sweep<kSweepUnroll<T>>(row, vbeg, vend, [&](float l, int64_t id) {
              z += hv::residual_minus_draft<float>(p_prime(l, id), __ldg(q_row + id));
            });
            z = all_reduce<kCluster>(z, SumF{}, sm, parity);
            if (z > 0.0f) {
              sweep<kSweepUnroll<T>>(row, vbeg, vend, [&](float l, int64_t id) {
                __stcg(w_row + id,
                       hv::residual_minus_draft<float>(p_prime(l, id), __ldg(q_row + id)));
              });
              __threadfence();
              Group<kCluster>::sync();
              has_w = true;
              z_prev = z;
            }
          }
          if (accepted < 0) {
            // Scale does not move an inverse-CDF pick: draw on w_row / w.
            auto mass = [&](float l, int64_t id) -> float {
              return has_w ? __ldcg(w_row + id) : dist.kept_weight(l);
            };
            emitted = draw_token<kCluster>(row, vbeg, vend, per_cta, mass, tree.rejected, 0,
                                           u_g[0], sm, parity);
            if (emitted < 0) bad = 1;
            break;
          }
        }
      }
      ++num_acc;
      if (threadIdx.x == 0) tree.path[num_acc] = accepted;
      v = accepted;
    }
  }

  __syncthreads();  // path visible
  if (rank == 0) {
    int64_t* out_tok = args.out_tokens + b * n;
    int64_t* out_node = args.accepted_nodes + b * n;
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      if (bad) {
        out_tok[i] = hv::kPad;
        out_node[i] = hv::kPad;
      } else {
        out_node[i] = i <= num_acc ? tree.path[i] : hv::kPad;
        out_tok[i] = i < num_acc ? cand_g[tree.path[i + 1]] : (i == num_acc ? emitted : hv::kPad);
      }
    }
    if (threadIdx.x == 0) args.num_accepted[b] = bad ? 0 : num_acc;
  }
  // No CTA may exit while another can still read its shared memory.
  if constexpr (kCluster > 1) Group<kCluster>::sync();
}

template <typename T, int kCluster>
__global__ void __launch_bounds__(kThreads, 1)
    fused_verify_kernel(const LaunchArgs args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  // Clusters need sm_90; the launcher never picks them on older devices.
  if constexpr (kCluster > 1) {
    __trap();
  } else {
    fused_verify_body<T, 1>(args);
  }
#else
  fused_verify_body<T, kCluster>(args);
#endif
}

// The current device's attributes; all zero when they cannot be read, which
// picks the plain launch (no clusters, no prefetch).
DeviceInfo device_info() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return DeviceInfo{};
  DeviceInfo info;
  (void)cached_device_info(dev, &info);
  return info;
}

template <typename T, int kCluster>
cudaError_t launch_with(const FusedVerifyArgs& caller_args, size_t dyn_smem,
                        cudaStream_t stream) {
  // Child-row prefetch costs extra DRAM reads (every child of a visited node,
  // not only the accepted one): only worth it while the grid covers at most
  // half of the SMs, i.e. the walk is latency-bound.
  const DeviceInfo info = device_info();
  LaunchArgs args;
  static_cast<FusedVerifyArgs&>(args) = caller_args;
  args.prefetch_children = args.batch * kCluster * 2 <= info.sms ? 1 : 0;
  auto kernel = fused_verify_kernel<T, kCluster>;
  // The default dynamic limit is 48 KiB minus the static SharedState; opt in
  // (with a margin for other static shared memory) whenever the sum may pass it.
  if (dyn_smem + sizeof(SharedState) + 1024 > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dyn_smem));
    if (err != cudaSuccess) return err;
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(args.batch * kCluster));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = dyn_smem;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  if constexpr (kCluster > 1) {
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = kCluster;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    config.attrs = attr;
    config.numAttrs = 1;
  }
  const cudaError_t err = cudaLaunchKernelEx(&config, kernel, args);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const FusedVerifyArgs& args, cudaStream_t stream) {
  const size_t dyn_smem = static_cast<size_t>(args.nodes) * 6 * sizeof(int);
  // Clusters only where the batch leaves SMs idle and each CTA still gets
  // >= 2 vectors per thread.
  const DeviceInfo info = device_info();
  int cluster = 1;
  if (info.major >= 9) {
    const int64_t vecs = args.vocab / Traits<T>::kVec + 2;
    while (cluster < kMaxCluster && args.batch * cluster * 2 <= info.sms &&
           vecs / (cluster * 2) >= 2 * kThreads) {
      cluster *= 2;
    }
  }
  cudaError_t err = cudaSuccess;
  switch (cluster) {
    case 8: err = launch_with<T, 8>(args, dyn_smem, stream); break;
    case 4: err = launch_with<T, 4>(args, dyn_smem, stream); break;
    case 2: err = launch_with<T, 2>(args, dyn_smem, stream); break;
    default: return launch_with<T, 1>(args, dyn_smem, stream);
  }
  if (err == cudaSuccess) return err;
  // A cluster that cannot be scheduled (MIG slice, shared-memory limits) is
  // rejected at launch: clear that error and run one CTA per request.
  (void)cudaGetLastError();
  return launch_with<T, 1>(args, dyn_smem, stream);
}

}  // namespace

cudaError_t launch_fused_verify(const FusedVerifyArgs& args, cudaStream_t stream) {
  if (args.batch < 0 || args.nodes < 1 || args.nodes > kFusedVerifyMaxNodes ||
      args.vocab < 1 || args.vocab > kFusedVerifyMaxVocab ||
      args.batch * kMaxCluster > 0x7fffffffLL ||
      (args.draft_probs != nullptr && args.workspace == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (args.batch == 0) return cudaSuccess;
  switch (args.dtype) {
    case core::LogitDType::kFloat32: return launch_typed<float>(args, stream);
    case core::LogitDType::kFloat16: return launch_typed<__half>(args, stream);
    case core::LogitDType::kBFloat16: return launch_typed<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace heterospec
