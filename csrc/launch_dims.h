// The grid and block of every heba kernel launch, as plain functions of the
// sizes (and of the GPU's SM count where a grid is capped by it).
//
// The launchers (.cu) take their dims from these functions, and so does the
// host-only plan `heba::_cuda_launch_plan` (ops.cpp), which lists the launches
// of an op call for the roofline model (benchmarks/roofline.py): a change to a
// launcher's grid is a change to the modelled launches. No CUDA header here,
// so the plan builds and runs without a GPU.
#pragma once

#include <cstdint>

namespace heba {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A launch's grid (blocks) and block (threads), x fastest.
struct LaunchDims {
  int64_t grid[3];
  int block[3];
};

constexpr int kElemThreads = 256;  // block of the grid-stride elementwise kernels
constexpr int kStencilTx = 32;     // stencil backward: channels per block
constexpr int kStencilTy = 8;      //                   positions in flight per block
constexpr int kLnMaxThreads = 256; // residual LayerNorm: the block for D >= 2048
constexpr int kReduceTx = 32;      // reduce_partials: columns per block
constexpr int kReduceTy = 8;       //                  slot lanes per column
constexpr int kLrTok = 32;         // fused low-rank forward: tokens per block
constexpr int kLrThreads = 256;    //                         its block

// A grid-stride elementwise kernel over n elements: one thread per element up
// to 32 blocks per SM, then each thread loops.
inline LaunchDims elementwise_dims(int64_t n, int threads, int sms) {
  const int64_t cap = static_cast<int64_t>(sms) * 32;
  const int64_t want = ceil_div(n, threads);
  return {{want < cap ? (want > 0 ? want : 1) : cap, 1, 1}, {threads, 1, 1}};
}

// _visual_stencil_kernel, forward and mirrored: one thread per (row, channel).
inline LaunchDims visual_stencil_dims(int64_t rows, int64_t C, int sms) {
  return elementwise_dims(rows * C, kElemThreads, sms);
}

// _visual_stencil_bwd_kernel_dv: x over 32-channel groups, y over the dWm chunks.
inline LaunchDims visual_stencil_bwd_dv_dims(int64_t C, int64_t nchunks) {
  return {{ceil_div(C, kStencilTx), nchunks, 1}, {kStencilTx, kStencilTy, 1}};
}

// Threads of a residual LayerNorm block over a row of D.
inline int ln_threads(int64_t D) { return D >= 2048 ? kLnMaxThreads : 128; }

// _residual_ln_fwd_kernel: one block per row, grid-stride beyond 2^20 rows.
inline LaunchDims residual_ln_fwd_dims(int64_t rows, int64_t D) {
  return {{rows < (1LL << 20) ? rows : (1LL << 20), 1, 1}, {ln_threads(D), 1, 1}};
}

// _residual_ln_bwd_kernel: ~2 blocks per SM fill the GPU and keep the
// [2, blocks, D] partial sums of dgamma and dbeta small; grid-stride over rows.
inline LaunchDims residual_ln_bwd_dims(int64_t rows, int64_t D, int sms) {
  const int64_t two = 2LL * sms;
  const int64_t blocks = rows < two ? rows : two;
  return {{blocks > 1 ? blocks : 1, 1, 1}, {ln_threads(D), 1, 1}};
}

// _scaled_add_kernel and _low_rank_bwd_kernel_gelu: elementwise over n.
inline LaunchDims scaled_add_dims(int64_t n, int sms) {
  return elementwise_dims(n, kElemThreads, sms);
}

inline LaunchDims low_rank_bwd_gelu_dims(int64_t n, int sms) {
  return elementwise_dims(n, kElemThreads, sms);
}

// _reduce_partials_kernel: 32 columns (of all the buffers' columns together) per
// block, each summed by 8 lanes over the slots, then in shared memory.
inline LaunchDims reduce_partials_dims(int64_t columns) {
  return {{columns > 0 ? ceil_div(columns, kReduceTx) : 1, 1, 1}, {kReduceTx, kReduceTy, 1}};
}

// _low_rank_fwd_kernel: one block per 32 tokens.
inline LaunchDims low_rank_fwd_dims(int64_t M) {
  return {{ceil_div(M, kLrTok), 1, 1}, {kLrThreads, 1, 1}};
}

}  // namespace heba
