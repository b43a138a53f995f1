// Device helpers of the heba kernels: dtype conversion, GELU, block
// reductions, 16-byte vector loads, launch sizes. No ATen here (see kernels.h
// for why); the .cu files include only this and kernels.h.
//
// Arithmetic is done in acc_t: float for float/half/bfloat16, double for double.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kernels.h"

namespace heba {

using half = __half;
using bf16 = __nv_bfloat16;

template <typename T>
using acc_of = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

// ---- conversions -----------------------------------------------------------
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(bf16 v) { return __bfloat162float(v); }

__device__ __forceinline__ void from_acc_to(float a, float& o) { o = a; }
__device__ __forceinline__ void from_acc_to(double a, double& o) { o = a; }
__device__ __forceinline__ void from_acc_to(float a, half& o) { o = __float2half_rn(a); }
__device__ __forceinline__ void from_acc_to(float a, bf16& o) { o = __float2bfloat16_rn(a); }

template <typename T, typename A>
__device__ __forceinline__ T from_acc(A a) {
  T o;
  from_acc_to(a, o);
  return o;
}

// The value of a ScaleArg (kernels.h) in the accumulation type A: read from
// device memory when it comes as a pointer. Call once per thread, up front.
template <typename A>
__device__ __forceinline__ A load_scale(const ScaleArg& s) {
  return s.ptr != nullptr ? static_cast<A>(*s.ptr) : static_cast<A>(s.value);
}

// ---- math ------------------------------------------------------------------
// Exact (erf) GELU and its derivative.
template <typename T>
__device__ __forceinline__ T gelu_fwd(T v) {
  const T k = T(0.70710678118654752440);  // 1/sqrt(2)
  return T(0.5) * v * (T(1) + erf(v * k));
}

template <typename T>
__device__ __forceinline__ T gelu_grad(T v) {
  const T k = T(0.70710678118654752440);   // 1/sqrt(2)
  const T kp = T(0.39894228040143267794);  // 1/sqrt(2*pi)
  return T(0.5) * (T(1) + erf(v * k)) + v * kp * exp(T(-0.5) * v * v);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum of (a, b) over the whole block; every thread gets the result. blockDim.x
// must be a multiple of 32 (at most 1024). Safe to call repeatedly.
template <typename T>
__device__ __forceinline__ void block_sum2(T& a, T& b) {
  __shared__ T buf[2][32];
  a = warp_sum(a);
  b = warp_sum(b);
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  __syncthreads();  // the previous call's readers are done with buf
  if (lane == 0) {
    buf[0][wid] = a;
    buf[1][wid] = b;
  }
  __syncthreads();
  a = T(0);
  b = T(0);
  for (int i = 0; i < nw; ++i) {
    a += buf[0][i];
    b += buf[1][i];
  }
}

// ---- vector loads ----------------------------------------------------------
// Loads VEC = 16 / sizeof(T) consecutive elements with one 16-byte load and
// converts them to float. `p` must be 16-byte aligned.
template <typename T>
struct Vec16 {
  static constexpr int VEC = 16 / sizeof(T);
  __device__ __forceinline__ static void load(const T* __restrict__ p, float* dst) {
    alignas(16) T tmp[VEC];
    *reinterpret_cast<uint4*>(tmp) = *reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int i = 0; i < VEC; ++i) dst[i] = static_cast<float>(to_acc(tmp[i]));
  }
};

// ---- dtype dispatch ----------------------------------------------------------
// Calls f(x_t{}, w_t{}) for the supported (x, weights) dtype pairs: (T, T) for
// T in {float, half, bfloat16, double}, and (float, half | bfloat16) (autocast:
// float32 activations, low-precision weights).
template <typename F>
inline cudaError_t dispatch_xw(DType xt, DType wt, F&& f) {
  if (xt == wt) {
    switch (xt) {
      case DType::Float: return f(float(), float());
      case DType::Half: return f(half(), half());
      case DType::BFloat16: return f(bf16(), bf16());
      case DType::Double: return f(double(), double());
    }
  } else if (xt == DType::Float) {
    if (wt == DType::Half) return f(float(), half());
    if (wt == DType::BFloat16) return f(float(), bf16());
  }
  return cudaErrorInvalidValue;
}

// Calls f(w_t{}) for one dtype.
template <typename F>
inline cudaError_t dispatch_w(DType wt, F&& f) {
  switch (wt) {
    case DType::Float: return f(float());
    case DType::Half: return f(half());
    case DType::BFloat16: return f(bf16());
    case DType::Double: return f(double());
  }
  return cudaErrorInvalidValue;
}

// ---- launch helpers ----------------------------------------------------------
// The dims themselves come from launch_dims.h (shared with the host-side plan).
inline int num_sms() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) {
    cudaGetLastError();  // clear; the launch that follows reports real errors
    n = 108;
  }
  return n;
}

inline dim3 grid_of(const LaunchDims& d) {
  return dim3(static_cast<unsigned int>(d.grid[0]), static_cast<unsigned int>(d.grid[1]),
              static_cast<unsigned int>(d.grid[2]));
}

inline dim3 block_of(const LaunchDims& d) {
  return dim3(static_cast<unsigned int>(d.block[0]), static_cast<unsigned int>(d.block[1]),
              static_cast<unsigned int>(d.block[2]));
}

}  // namespace heba
