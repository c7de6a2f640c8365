// Torch-free definitions shared by every core header and by the CPU and CUDA
// kernels: host/device qualifiers, the logit dtypes of the launchers, and the
// float helpers (exp / log overloads, bit patterns, order keys) several ops use.
#pragma once

#include <math.h>

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define HX_HOST_DEVICE __host__ __device__
#define HX_INLINE __forceinline__
#else
#define HX_HOST_DEVICE
#define HX_INLINE inline
#endif

#define HX_HD_INLINE HX_HOST_DEVICE HX_INLINE

namespace heterospec {
namespace core {

// Logit storage types understood by the torch-free launchers. The .cpp
// bindings map at::ScalarType to this enum; the .cu files map it to
// float / __half / __nv_bfloat16.
enum class LogitDType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Upper bound on the top-k width of draft_topk_entropy (EAGLE uses 10;
// k lives in per-thread registers / a fixed-size heap on both backends).
constexpr int64_t kMaxTopK = 64;

// The largest finite float32: `x <= kFloatMax` is false exactly for NaN and +inf.
constexpr float kFloatMax = 3.402823466e38f;

// exp / log in the precision of the argument (float on CUDA, double on CPU).
HX_HD_INLINE float hx_exp(float x) { return expf(x); }
HX_HD_INLINE double hx_exp(double x) { return exp(x); }
HX_HD_INLINE float hx_log(float x) { return logf(x); }
HX_HD_INLINE double hx_log(double x) { return log(x); }

// The IEEE-754 bit pattern of a float.
HX_HD_INLINE uint32_t float_bits(float value) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(value);
#else
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
#endif
}

// Monotone map of float32 bit patterns to unsigned integers: for non-NaN a and
// b, a < b iff float_order_key(bits(a)) < float_order_key(bits(b)), except that
// -0.0 orders just below +0.0. Radix selects and rank keys compare these.
HX_HD_INLINE uint32_t float_order_key(uint32_t bits) {
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

}  // namespace core
}  // namespace heterospec
