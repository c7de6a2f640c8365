// Portable float vectors (GCC/Clang vector extensions) and the vectorised
// exp shared by the CPU kernels that take softmaxes: draft_topk_entropy and
// the decode-layer ops (silu, attention).
//
// Include only from .cpp files, inside no namespace; the functions are
// always_inline so that each caller compiles them for its own target (a
// target("avx2,fma") function or a target_clones clone gets wide code).
#pragma once

#include <cstdint>
#include <cstring>

// Every function taking vector types is internal, so their ABI never crosses
// a translation unit (setup.py builds with -Wno-psabi).

namespace heterospec {
namespace cpu {

#define HX_CPU_ALWAYS_INLINE inline __attribute__((always_inline))

// GCC/Clang vector extensions of `Lanes` floats: 4 lanes are one SSE2 / NEON
// register (the portable baseline), 8 lanes one AVX2 register (two SSE2 ones
// in code compiled for the baseline).
template <int Lanes>
struct VecTypes;
template <>
struct VecTypes<4> {
  typedef float F __attribute__((vector_size(16)));
  typedef int32_t I __attribute__((vector_size(16)));
};
template <>
struct VecTypes<8> {
  typedef float F __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
};
// 16 lanes: one AVX-512 register (two AVX2 ones, four SSE2 ones in code compiled for those).
template <>
struct VecTypes<16> {
  typedef float F __attribute__((vector_size(64)));
  typedef int32_t I __attribute__((vector_size(64)));
};

template <int Lanes>
struct Simd {
  using F = typename VecTypes<Lanes>::F;
  using I = typename VecTypes<Lanes>::I;

  static HX_CPU_ALWAYS_INLINE F splat(float x) { return F{} + x; }

  static HX_CPU_ALWAYS_INLINE F load(const float* p) {
    F v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }

  // exp(d) for d <= 0 (d may be -inf), Cephes-style: d = n ln2 + r with
  // |r| <= ln2/2, exp(r) by a degree-7 polynomial, 2^n through the exponent
  // bits; about 1 ulp. Inputs below -87 (exp < 1.7e-38, -inf included) give
  // 0, and `clamped` receives max(d, -87) so e * clamped is never 0 * inf.
  static HX_CPU_ALWAYS_INLINE F exp_nonpositive(F d, F* clamped) {
    const F lowest = splat(-87.0f);
    const I underflow = d < lowest;
    const F x = underflow ? lowest : d;
    *clamped = x;
    // Round x * log2(e) to the nearest integer with the 1.5 * 2^23 trick.
    const F magic = splat(12582912.0f);
    const F n = (x * splat(1.44269504088896341f) + magic) - magic;
    F r = x - n * splat(0.693359375f);
    r = r - n * splat(-2.12194440e-4f);
    const F r2 = r * r;
    F p = splat(1.9875691500e-4f);
    p = p * r + splat(1.3981999507e-3f);
    p = p * r + splat(8.3334519073e-3f);
    p = p * r + splat(4.1665795894e-2f);
    p = p * r + splat(1.6666665459e-1f);
    p = p * r + splat(5.0000001201e-1f);
    p = p * r2 + r + splat(1.0f);
    const I exponent = (__builtin_convertvector(n, I) + 127) << 23;
    const F result = p * reinterpret_cast<F>(exponent);
    return underflow ? splat(0.0f) : result;
  }

  static HX_CPU_ALWAYS_INLINE double horizontal_sum(F v) {
    double s = 0.0;
    for (int i = 0; i < Lanes; ++i) s += static_cast<double>(v[i]);
    return s;
  }

  static HX_CPU_ALWAYS_INLINE float horizontal_max(F v) {
    float m = v[0];
    for (int i = 1; i < Lanes; ++i) m = v[i] > m ? v[i] : m;
    return m;
  }

  static HX_CPU_ALWAYS_INLINE bool any(I v) {
    bool a = false;
    for (int i = 0; i < Lanes; ++i) a = a || v[i] != 0;
    return a;
  }
};

}  // namespace cpu
}  // namespace heterospec
