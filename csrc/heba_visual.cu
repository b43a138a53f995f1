// HeBA visual adapter: the kernels of the 3x3 depthwise stencil + GELU on the
// bottleneck, forward and backward, and their launchers. The op around them
// (checks, GEMMs, the residual + LayerNorm kernels) is heba_visual_* in ops.cpp.
//
// Forward (rows = tokens in x's memory order, prefix rows included so that
// every projection is one 2-D GEMM over x's memory, no copies):
//
//   u = x @ Wd^T                      [rows, h]   cuBLAS
//   g = gelu(dwconv3x3(u))            [rows, h]   _visual_stencil_kernel (0 on prefix rows)
//   z = g @ Wu^T                      [rows, D]   cuBLAS
//   out = residual_ln_fwd(x, z)                   (prefix rows copied)
//
// Backward (ga_scale, dx_scale = (1, scale) under the gradient rule, else (scale, 1)):
//
//   dy  = residual_ln_bwd(ga_scale * grad)        [rows, D]   (0 on prefix rows)
//   dWu = dy^T @ g,  dg = dy @ Wu
//   dv  = dg * gelu'(v)          (v recomputed from u)        _visual_stencil_bwd_kernel_dv
//   dWm[c, k] = sum_p dv[p, c] * u[p + off_k, c]              (same kernel, partial sums)
//   du[q, c]  = sum_k Wm[c, k] * dv[q - off_k, c]              _visual_stencil_kernel, mirrored
//   dWd = du^T @ x,  dx = grad + dx_scale * (dy + du @ Wd)

#include "common.cuh"
#include "stencil.h"

namespace heba {
namespace {

// The stencil and its adjoint, one kernel with a mirror switch (as the Triton
// kernel's MIRROR flag):
//   kMirror false: out[r, c] = gelu(sum_k Wm[c, k] * in[r + off_k, c]), in = u (w_t)
//   kMirror true:  out[r, c] = sum_k Wm[c, k] * in[r - off_k, c],       in = dv (float)
// zero padding, 0 on prefix rows. One thread per (row, channel), channel fastest
// (coalesced).
template <typename w_t, typename in_t, bool kMirror>
__global__ void __launch_bounds__(kElemThreads)
    _visual_stencil_kernel(const in_t* __restrict__ in, const w_t* __restrict__ wm,
                           w_t* __restrict__ out, TokenMap tm, PatchGrid grid, int64_t C) {
  using acc_t = acc_of<w_t>;
  const int64_t total = tm.B * tm.N * C;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / C, c = idx - r * C;
    int64_t b;
    int i, j;
    if (!stencil_patch_of_row(tm, grid, r, &b, &i, &j)) {
      out[idx] = from_acc<w_t>(acc_t(0));
      continue;
    }
    acc_t v = 0;
#pragma unroll
    for (int k = 0; k < 9; ++k) {
      const int64_t rr = kMirror ? stencil_adjoint_row(tm, grid, b, i, j, k)
                                 : stencil_tap_row(tm, grid, b, i, j, k);
      if (rr >= 0) v += acc_t(to_acc(wm[c * 9 + k])) * acc_t(to_acc(in[rr * C + c]));
    }
    out[idx] = from_acc<w_t>(kMirror ? v : gelu_fwd(v));
  }
}

// dv = dg * gelu'(v) on the patch rows (v recomputed), and per-chunk partial
// sums of dWm[c, k] = sum_p dv[p, c] * u[p + off_k, c].
// Block (32, 8): x over channels, y over the positions of chunk blockIdx.y
// (positions q = b*HW + p enumerate the patch tokens of all images).
// dwm_part: [gridDim.y, C, 9].
template <typename w_t>
__global__ void __launch_bounds__(kStencilTx * kStencilTy)
    _visual_stencil_bwd_kernel_dv(const w_t* __restrict__ dg, const w_t* __restrict__ u,
                                  const w_t* __restrict__ wm, acc_of<w_t>* __restrict__ dv,
                                  acc_of<w_t>* __restrict__ dwm_part, TokenMap tm,
                                  PatchGrid grid, int64_t C, int64_t chunk) {
  using acc_t = acc_of<w_t>;
  __shared__ acc_t red[kStencilTy][kStencilTx][9];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kStencilTx + tx;
  const int64_t npos = tm.B * static_cast<int64_t>(grid.H) * grid.W;
  acc_t acc[9];
#pragma unroll
  for (int k = 0; k < 9; ++k) acc[k] = 0;
  if (c < C) {
    acc_t w[9];
#pragma unroll
    for (int k = 0; k < 9; ++k) w[k] = to_acc(wm[c * 9 + k]);
    int64_t q0, q1;
    stencil_chunk_range(blockIdx.y, chunk, npos, &q0, &q1);
    for (int64_t q = q0 + ty; q < q1; q += kStencilTy) {
      int64_t b;
      int i, j;
      const int64_t r = stencil_row_of_position(tm, grid, q, &b, &i, &j);
      acc_t nb[9];
      acc_t v = 0;
#pragma unroll
      for (int k = 0; k < 9; ++k) {
        const int64_t rr = stencil_tap_row(tm, grid, b, i, j, k);
        nb[k] = rr >= 0 ? acc_t(to_acc(u[rr * C + c])) : acc_t(0);
        v += w[k] * nb[k];
      }
      const acc_t d = acc_t(to_acc(dg[r * C + c])) * gelu_grad(v);
      dv[r * C + c] = d;
#pragma unroll
      for (int k = 0; k < 9; ++k) acc[k] += d * nb[k];
    }
  }
#pragma unroll
  for (int k = 0; k < 9; ++k) red[ty][tx][k] = acc[k];
  __syncthreads();
  if (ty == 0 && c < C) {
#pragma unroll
    for (int k = 0; k < 9; ++k) {
      acc_t s = 0;
      for (int y = 0; y < kStencilTy; ++y) s += red[y][tx][k];
      dwm_part[(static_cast<int64_t>(blockIdx.y) * C + c) * 9 + k] = s;
    }
  }
}

}  // namespace

cudaError_t visual_stencil_fwd_launch(DType wt, const void* u, const void* wm, void* g,
                                      TokenMap tm, PatchGrid grid, int64_t C,
                                      cudaStream_t stream) {
  const int64_t n = tm.B * tm.N * C;
  if (n == 0) return cudaSuccess;
  return dispatch_w(wt, [&](auto wtag) -> cudaError_t {
    using w_t = decltype(wtag);
    const LaunchDims d = visual_stencil_dims(tm.B * tm.N, C, num_sms());
    _visual_stencil_kernel<w_t, w_t, false><<<grid_of(d), block_of(d), 0, stream>>>(
        static_cast<const w_t*>(u), static_cast<const w_t*>(wm), static_cast<w_t*>(g), tm, grid, C);
    return cudaGetLastError();
  });
}

// Up to 256 chunks of about 64 positions each (8 per position lane), longer
// once 256 are reached: the partial sums stay small ([nchunks, C, 9]) and each
// thread still loops a while.
void visual_stencil_bwd_chunks(int64_t positions, int64_t* nchunks, int64_t* chunk) {
  int64_t n = ceil_div(positions, 64);
  n = n < 1 ? 1 : (n > 256 ? 256 : n);
  const int64_t len = positions > 0 ? ceil_div(positions, n) : 1;
  // as many chunks as that length needs: no trailing block without positions
  *nchunks = positions > 0 ? ceil_div(positions, len) : 1;
  *chunk = len;
}

cudaError_t visual_stencil_bwd_launch(DType wt, const void* dg, const void* u, const void* wm,
                                      void* dv, void* dwm_part, void* du, TokenMap tm,
                                      PatchGrid grid, int64_t C, int64_t nchunks, int64_t chunk,
                                      cudaStream_t stream) {
  const int64_t n = tm.B * tm.N * C;
  if (n == 0) return cudaSuccess;
  return dispatch_w(wt, [&](auto wtag) -> cudaError_t {
    using w_t = decltype(wtag);
    using acc_t = acc_of<w_t>;
    const LaunchDims dv_dims = visual_stencil_bwd_dv_dims(C, nchunks);
    _visual_stencil_bwd_kernel_dv<w_t><<<grid_of(dv_dims), block_of(dv_dims), 0, stream>>>(
        static_cast<const w_t*>(dg), static_cast<const w_t*>(u), static_cast<const w_t*>(wm),
        static_cast<acc_t*>(dv), static_cast<acc_t*>(dwm_part), tm, grid, C, chunk);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    const LaunchDims du_dims = visual_stencil_dims(tm.B * tm.N, C, num_sms());
    _visual_stencil_kernel<w_t, acc_t, true><<<grid_of(du_dims), block_of(du_dims), 0, stream>>>(
        static_cast<const acc_t*>(dv), static_cast<const w_t*>(wm), static_cast<w_t*>(du), tm, grid, C);
    return cudaGetLastError();
  });
}

}  // namespace heba
