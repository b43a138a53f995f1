// AdapterTune low-rank residual: out = x + alpha * (Wu gelu(Wd x + bd) + bu).
// The kernels and their launchers; the op around them is low_rank_* in ops.cpp.
//
// Forward, rank r <= 64 (and x not float64): one fused kernel. A block takes
// 32 tokens; the down projection streams D in chunks of 64 through shared
// memory (x tile [32, 64] and Wd chunk [r, 64], 16-byte vector loads when the
// row length and base pointers allow, scalar loads otherwise), keeps the
// [32, r] pre-activations in registers, applies bias + GELU into shared memory,
// then streams Wu in [64, r] chunks to write out = x + alpha * (h @ Wu^T + bu).
// x is read twice and out written once; the rank-r activation never touches
// global memory. Larger ranks (and float64) use cuBLAS + ATen instead.
//
// Backward (all ranks): the pre-activation u = x @ Wd^T + bd is recomputed by
// one thin GEMM, then
//
//   dh  = alpha * grad @ Wu            [rows, r]   (alpha: cuBLAS's own)
//   g, du = gelu(u), dh * gelu'(u)     _low_rank_bwd_kernel_gelu (fused)
//   dWu = alpha * grad^T @ g,   dbu = alpha * grad^T @ 1
//   dWd = du^T @ x,             dbd = du^T @ 1
//   dx  = grad + du @ Wd

#include "common.cuh"

namespace heba {
namespace {

constexpr int kLrKc = 64;        // D chunk of the down projection
constexpr int kLrDc = 64;        // D chunk of the up projection
constexpr int kLrRmax = 64;      // largest rank of the fused kernel
constexpr int kLrPairs = kLrTok * kLrRmax / kLrThreads;  // (token, rank) pairs per thread: 8
constexpr int kLrOuts = kLrTok * kLrDc / kLrThreads;     // outputs per thread per chunk: 8
static_assert(kLrDc * (kLrRmax + 1) <= kLrRmax * (kLrKc + 1), "Wu chunk must fit the Wd buffer");
static_assert(kLrRmax == kLowRankMaxFusedRank, "kernels.h and the kernel disagree");

// Stages a [rows_here, kLrKc] tile of a row-major [nrows, D] matrix (columns
// k0..k0+kLrKc) into shared memory as float, rows padded to kLrKc + 1. Rows
// past nrows and columns past D read as 0.
template <typename T>
__device__ __forceinline__ void stage_tile(const T* __restrict__ src, int64_t row0, int64_t nrows,
                                           int rows_here, int k0, int D, bool vec,
                                           float* __restrict__ dst) {
  if (vec) {  // D % VEC == 0 and src 16-byte aligned: every vector is in bounds or out whole
    constexpr int V = Vec16<T>::VEC;
    constexpr int per_row = kLrKc / V;
    for (int e = threadIdx.x; e < rows_here * per_row; e += kLrThreads) {
      const int t = e / per_row, kv = (e - t * per_row) * V;
      const int64_t row = row0 + t;
      const int col = k0 + kv;
      float tmp[V];
      if (row < nrows && col < D) {
        Vec16<T>::load(src + row * D + col, tmp);
      } else {
#pragma unroll
        for (int q = 0; q < V; ++q) tmp[q] = 0.f;
      }
#pragma unroll
      for (int q = 0; q < V; ++q) dst[t * (kLrKc + 1) + kv + q] = tmp[q];
    }
  } else {
    for (int e = threadIdx.x; e < rows_here * kLrKc; e += kLrThreads) {
      const int t = e / kLrKc, k = e - t * kLrKc;
      const int64_t row = row0 + t;
      const int col = k0 + k;
      dst[t * (kLrKc + 1) + k] =
          (row < nrows && col < D) ? static_cast<float>(to_acc(src[row * D + col])) : 0.f;
    }
  }
}

template <typename x_t, typename w_t>
__global__ void __launch_bounds__(kLrThreads)
    _low_rank_fwd_kernel(const x_t* __restrict__ x, const w_t* __restrict__ wd,
                         const w_t* __restrict__ bd, const w_t* __restrict__ wu,
                         const w_t* __restrict__ bu, x_t* __restrict__ out, int64_t M, int D,
                         int R, float alpha, bool vec_x, bool vec_w) {
  __shared__ float xs[kLrTok * (kLrKc + 1)];     // x tile      [32, 64 (+1)]
  __shared__ float ws[kLrRmax * (kLrKc + 1)];    // Wd chunk    [r, 64 (+1)], then Wu chunk [64, r (+1)]
  __shared__ float hs[kLrTok * (kLrRmax + 1)];   // activation  [32, r (+1)]
  const int tid = threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kLrTok;
  const int npairs = kLrTok * R;

  // ---- down projection: acc[i] = <x[t], Wd[j]> for pair p = tid + i*256 = t*R + j
  float acc[kLrPairs];
#pragma unroll
  for (int i = 0; i < kLrPairs; ++i) acc[i] = 0.f;
  for (int k0 = 0; k0 < D; k0 += kLrKc) {
    __syncthreads();  // the previous chunk is consumed
    stage_tile(x, row0, M, kLrTok, k0, D, vec_x, xs);
    stage_tile(wd, 0, R, R, k0, D, vec_w, ws);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kLrPairs; ++i) {
      const int p = tid + i * kLrThreads;
      if (p < npairs) {
        const int t = p / R, j = p - t * R;
        const float* xr = xs + t * (kLrKc + 1);
        const float* wr = ws + j * (kLrKc + 1);
        float s = 0.f;
#pragma unroll 16
        for (int k = 0; k < kLrKc; ++k) s += xr[k] * wr[k];
        acc[i] += s;
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kLrPairs; ++i) {
    const int p = tid + i * kLrThreads;
    if (p < npairs) {
      const int t = p / R, j = p - t * R;
      const float pre = acc[i] + (bd != nullptr ? static_cast<float>(to_acc(bd[j])) : 0.f);
      hs[t * (kLrRmax + 1) + j] = gelu_fwd(pre);
    }
  }

  // ---- up projection + residual, D in chunks of 64 output columns
  for (int d0 = 0; d0 < D; d0 += kLrDc) {
    __syncthreads();  // hs is written; ws (Wd or the previous Wu chunk) is consumed
    for (int e = tid; e < kLrDc * R; e += kLrThreads) {
      const int dd = e / R, j = e - dd * R;
      const int d = d0 + dd;
      ws[dd * (kLrRmax + 1) + j] =
          d < D ? static_cast<float>(to_acc(wu[static_cast<int64_t>(d) * R + j])) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kLrOuts; ++i) {
      const int p = tid + i * kLrThreads;
      const int t = p / kLrDc, dd = p - t * kLrDc;
      const int64_t row = row0 + t;
      const int d = d0 + dd;
      if (row < M && d < D) {
        const float* hr = hs + t * (kLrRmax + 1);
        const float* wr = ws + dd * (kLrRmax + 1);
        float s = 0.f;
        for (int j = 0; j < R; ++j) s += hr[j] * wr[j];
        if (bu != nullptr) s += static_cast<float>(to_acc(bu[d]));
        const int64_t o = row * D + d;
        out[o] = from_acc<x_t>(static_cast<float>(to_acc(x[o])) + alpha * s);
      }
    }
  }
}

// g = gelu(u), du = dh * gelu'(u), elementwise over [rows, r].
template <typename w_t>
__global__ void _low_rank_bwd_kernel_gelu(const w_t* __restrict__ u, const w_t* __restrict__ dh,
                                          w_t* __restrict__ g, w_t* __restrict__ du, int64_t n) {
  using acc_t = acc_of<w_t>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t v = to_acc(u[i]);
    g[i] = from_acc<w_t>(gelu_fwd(v));
    du[i] = from_acc<w_t>(acc_t(to_acc(dh[i])) * gelu_grad(v));
  }
}

}  // namespace

int vec16_elems(DType t) {
  switch (t) {
    case DType::Float: return 4;
    case DType::Half:
    case DType::BFloat16: return 8;
    case DType::Double: return 2;
  }
  return 1;
}

cudaError_t low_rank_fwd_launch(DType xt, DType wt, const void* x, const void* wd,
                                const void* bd, const void* wu, const void* bu, void* out,
                                int64_t M, int D, int R, float alpha, bool vec_x, bool vec_w,
                                cudaStream_t stream) {
  if (M == 0 || D == 0) return cudaSuccess;
  if (R < 1 || R > kLowRankMaxFusedRank || xt == DType::Double) return cudaErrorInvalidValue;
  const LaunchDims d = low_rank_fwd_dims(M);
  return dispatch_xw(xt, wt, [&](auto xtag, auto wtag) -> cudaError_t {
    using x_t = decltype(xtag);
    using w_t = decltype(wtag);
    if constexpr (std::is_same<x_t, double>::value) {
      return cudaErrorInvalidValue;  // float64 takes the cuBLAS path (ops.cpp)
    } else {
      _low_rank_fwd_kernel<x_t, w_t><<<grid_of(d), block_of(d), 0, stream>>>(
          static_cast<const x_t*>(x), static_cast<const w_t*>(wd), static_cast<const w_t*>(bd),
          static_cast<const w_t*>(wu), static_cast<const w_t*>(bu), static_cast<x_t*>(out), M, D,
          R, alpha, vec_x, vec_w);
      return cudaGetLastError();
    }
  });
}

cudaError_t low_rank_bwd_gelu_launch(DType wt, const void* u, const void* dh, void* g, void* du,
                                     int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch_w(wt, [&](auto wtag) -> cudaError_t {
    using w_t = decltype(wtag);
    const LaunchDims d = low_rank_bwd_gelu_dims(n, num_sms());
    _low_rank_bwd_kernel_gelu<w_t><<<grid_of(d), block_of(d), 0, stream>>>(
        static_cast<const w_t*>(u), static_cast<const w_t*>(dh), static_cast<w_t*>(g),
        static_cast<w_t*>(du), n);
    return cudaGetLastError();
  });
}

}  // namespace heba
