// The kernel launchers of the heba CUDA extension: plain C++ over raw
// pointers, included by the .cu files (kernels) and by ops.cpp (the ATen side).
//
// Why the split: the .cu files include no ATen/torch header. nvcc parses every
// header once per target architecture plus once for the host, and ATen's are
// huge: a .cu file holding only ATen host code took 307 s to compile for
// sm_80 + sm_90 on 2 busy cores, where g++ parses the same headers in 20-25 s.
// So all ATen code (checks, GEMMs, op registration) lives in ops.cpp, and the
// .cu files hold the kernels and these launchers only (4-8 s each).
//
// Every launcher returns cudaGetLastError() after its launches (the caller
// wraps it in C10_CUDA_CHECK), or cudaErrorInvalidValue for a dtype it does not
// handle (the caller checks dtypes first).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "launch_dims.h"

#ifdef __CUDACC__
#define HEBA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define HEBA_HOST_DEVICE inline
#endif

namespace heba {

enum class DType : int { Float = 0, Half = 1, BFloat16 = 2, Double = 3 };

// Where token n of image b lives among the rows of a token tensor's [rows, D]
// memory: row = b*N + n when bn (batch-major memory), n*B + b otherwise.
struct TokenMap {
  int64_t B, N;
  bool bn;
  HEBA_HOST_DEVICE int64_t row(int64_t b, int64_t n) const { return bn ? b * N + n : n * B + b; }
  HEBA_HOST_DEVICE int64_t token_of(int64_t r) const { return bn ? r % N : r / B; }
  HEBA_HOST_DEVICE int64_t batch_of(int64_t r) const { return bn ? r / N : r % B; }
};

// The patch grid of one image: token P + i*W + j is row i, column j.
struct PatchGrid {
  int64_t P;
  int H, W;
};

// A scale factor of a kernel: *ptr when ptr is set (a float32 in device memory,
// read by the kernel when it runs, so a captured CUDA graph replays with the
// value the tensor holds then), `value` otherwise. Both give bitwise the same
// result for the same float32 number (the value is rounded to the kernel's
// accumulation type either way; for float64 data a tensor scale carries
// float32 precision).
struct ScaleArg {
  double value;
  const float* ptr;
};

// ---- residual + LayerNorm + scaled residual (residual_ln.cu) ---------------
// Pointer dtypes: x/out/grad in xt; z/dy, gamma and beta in wt; mean, rstd and
// the partial sums in the accumulation type (float; double when xt is Double).
cudaError_t residual_ln_fwd_launch(DType xt, DType wt, const void* x, const void* z,
                                   const void* gamma, const void* beta, void* out, void* mean,
                                   void* rstd, TokenMap tm, int64_t num_prefix, int64_t rows,
                                   int64_t D, ScaleArg scale, double eps, cudaStream_t stream);

// dgamma_part, dbeta_part: [blocks, D] with blocks = residual_ln_bwd_dims(rows, D,
// sms).grid[0] (launch_dims.h), every element written (summed by reduce_partials_launch).
cudaError_t residual_ln_bwd_launch(DType xt, DType wt, const void* grad, const void* x,
                                   const void* z, const void* gamma, const void* mean,
                                   const void* rstd, void* dy, void* dgamma_part,
                                   void* dbeta_part, TokenMap tm, int64_t num_prefix,
                                   int64_t rows, int64_t D, ScaleArg ga_scale, int sms,
                                   cudaStream_t stream);

// ---- the backward's partial sums (reduce.cu) ---------------------------------
// One buffer of partial sums [slots, n] in the accumulation type of wt (float;
// double for Double), summed over its slots into out [n] in wt.
struct PartialSum {
  const void* part;
  void* out;
  int64_t slots, n;
};
constexpr int kMaxPartialSums = 4;

// Sums `count` (1..kMaxPartialSums) buffers in one launch, each column in a fixed
// order (deterministic): an op's dgamma, dbeta (and stencil dWm) with their casts.
cudaError_t reduce_partials_launch(DType wt, const PartialSum* sums, int count,
                                   cudaStream_t stream);

// out = a + k * b elementwise over n elements (a, out in xt; b in wt), in the
// accumulation type: the backward's dx = grad + dx_scale * (dy + du @ Wd).
cudaError_t scaled_add_launch(DType xt, DType wt, const void* a, const void* b, void* out,
                              int64_t n, ScaleArg k, cudaStream_t stream);

// ---- HeBA visual stencil (heba_visual.cu) ----------------------------------
// u, g: [rows, C] in wt; wm: [C, 9] in wt.
cudaError_t visual_stencil_fwd_launch(DType wt, const void* u, const void* wm, void* g,
                                      TokenMap tm, PatchGrid grid, int64_t C,
                                      cudaStream_t stream);

// Number of position chunks (and the chunk length) of the backward's dWm partial sums.
void visual_stencil_bwd_chunks(int64_t positions, int64_t* nchunks, int64_t* chunk);

// dg, u, du: [rows, C] in wt; dv: [rows, C] and dwm_part: [nchunks, C, 9] in acc type.
cudaError_t visual_stencil_bwd_launch(DType wt, const void* dg, const void* u, const void* wm,
                                      void* dv, void* dwm_part, void* du, TokenMap tm,
                                      PatchGrid grid, int64_t C, int64_t nchunks, int64_t chunk,
                                      cudaStream_t stream);

// ---- low-rank residual (low_rank.cu) ---------------------------------------
constexpr int kLowRankMaxFusedRank = 64;

// Elements per 16-byte vector of dtype t.
int vec16_elems(DType t);

// out = x + alpha * (Wu gelu(Wd x + bd) + bu) for rank R <= kLowRankMaxFusedRank;
// xt in {Float, Half, BFloat16}; bd/bu may be null. vec_x / vec_w: whether x / Wd
// may be read with 16-byte loads (D % vec16_elems == 0 and 16-byte aligned).
cudaError_t low_rank_fwd_launch(DType xt, DType wt, const void* x, const void* wd,
                                const void* bd, const void* wu, const void* bu, void* out,
                                int64_t M, int D, int R, float alpha, bool vec_x, bool vec_w,
                                cudaStream_t stream);

// g = gelu(u), du = dh * gelu'(u), elementwise over n elements of dtype wt.
cudaError_t low_rank_bwd_gelu_launch(DType wt, const void* u, const void* dh, void* g, void* du,
                                     int64_t n, cudaStream_t stream);

}  // namespace heba
