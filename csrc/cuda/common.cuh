// Helpers shared by the CUDA kernels and their launchers (torch-free).
//
// Host part (also usable from the torch bindings, compiled by the host
// compiler): the per-device attributes the launchers size their grids with.
// Device part (nvcc only): warp reductions and the fast exp2 of the kernels.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace heterospec {
namespace cuda {

// Attributes of one device that launch decisions depend on.
struct DeviceInfo {
  int major = -1;  // compute capability major version (9: clusters available)
  int sms = 0;     // multiprocessor count
};

// The attributes of `device`, read once per device and then served from a
// cache (cudaDeviceGetAttribute neither synchronises nor breaks graph capture,
// but a launch path should not query every call). A failed query is returned
// and not cached; `info` then holds the values read so far (0 for a failed
// field). Devices beyond the cache's 64 slots are queried on every call.
inline cudaError_t cached_device_info(int device, DeviceInfo* info) {
  constexpr int kCachedDevices = 64;
  static DeviceInfo cache[kCachedDevices];
  const bool cacheable = device >= 0 && device < kCachedDevices;
  if (cacheable && cache[device].major >= 0) {
    *info = cache[device];
    return cudaSuccess;
  }
  int major = 0, sms = 0;
  cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  }
  info->major = major;
  info->sms = sms;
  if (err == cudaSuccess && cacheable) cache[device] = *info;
  return err;
}

#if defined(__CUDACC__)

constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;

// Maximum over the 32 lanes of a warp; every lane gets it (butterfly).
__device__ __forceinline__ uint64_t warp_max(uint64_t v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const uint64_t other = __shfl_xor_sync(kFullMask, v, offset);
    v = other > v ? other : v;
  }
  return v;
}

// Sum over the 32 lanes of a warp; every lane gets it (butterfly).
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// 2^x with the MUFU unit (flushes denormal inputs / results to 0, which is
// far below the rounding of a sum that is >= 1).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

#endif  // __CUDACC__

}  // namespace cuda
}  // namespace heterospec
