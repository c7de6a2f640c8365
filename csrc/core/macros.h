// Torch-free helpers shared by the CPU and CUDA kernels.
#pragma once

#include <cstdint>

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

}  // namespace core
}  // namespace heterospec
