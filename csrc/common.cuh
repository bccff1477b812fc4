// Device helpers shared by the kernels: conversions, vector loads, warp and block reductions.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace gavamoe {
namespace detail {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T, int N>
struct alignas(sizeof(T) * N) Packed {
  T v[N];
};

// VEC consecutive elements as fp32; p must be aligned to VEC elements.
template <typename T, int VEC>
__device__ __forceinline__ void load_as_float(const T* __restrict__ p, float (&out)[VEC]) {
  const Packed<T, VEC> packed = *reinterpret_cast<const Packed<T, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_float(packed.v[i]);
}

__device__ __forceinline__ int64_t load_index(const void* ids, bool int64, int64_t i) {
  return int64 ? static_cast<const int64_t*>(ids)[i] : static_cast<int64_t>(static_cast<const int32_t*>(ids)[i]);
}

// Reductions over groups of WIDTH consecutive lanes (WIDTH a power of two <= 32).
template <int WIDTH = kWarp>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int offset = WIDTH / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset, WIDTH);
  return v;
}

// fmaxf drops a NaN operand; the callers let NaN through the sum instead.
template <int WIDTH = kWarp>
__device__ __forceinline__ float group_max(float v) {
#pragma unroll
  for (int offset = WIDTH / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset, WIDTH));
  return v;
}

// Exclusive prefix sum over the threads of a block of BLOCK threads (a multiple of 32);
// *total receives the sum over the block. Every thread of the block must call it.
template <int BLOCK>
__device__ __forceinline__ int block_exclusive_scan(int value, int* total) {
  static_assert(BLOCK % kWarp == 0 && BLOCK / kWarp <= kWarp, "BLOCK must be 32..1024, a multiple of 32");
  __shared__ int warp_totals[BLOCK / kWarp];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  int inclusive = value;
#pragma unroll
  for (int offset = 1; offset < kWarp; offset *= 2) {
    const int up = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += up;
  }
  if (lane == kWarp - 1) warp_totals[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int t = lane < BLOCK / kWarp ? warp_totals[lane] : 0;
#pragma unroll
    for (int offset = 1; offset < kWarp; offset *= 2) {
      const int up = __shfl_up_sync(kFullMask, t, offset);
      if (lane >= offset) t += up;
    }
    if (lane < BLOCK / kWarp) warp_totals[lane] = t;  // inclusive over warps
  }
  __syncthreads();
  const int before_warp = warp == 0 ? 0 : warp_totals[warp - 1];
  *total = warp_totals[BLOCK / kWarp - 1];
  __syncthreads();  // warp_totals is reused by the next call
  return before_warp + inclusive - value;
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace detail
}  // namespace gavamoe
