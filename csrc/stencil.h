// The index math of the HeBA visual 3x3 stencil, shared by the CUDA kernels
// (heba_visual.cu) and their host-side probe (ops.cpp, `heba::_cuda_stencil_host`),
// so the CPU tests exercise the very functions the kernels call.
//
// Rows are tokens in x's memory order (TokenMap); patch (i, j) of image b is
// token P + i*W + j. Tap k = 3*ki + kj of the forward stencil reads the
// neighbour (i + ki - 1, j + kj - 1); the adjoint (the backward's du) at
// (i, j) reads (i - (ki - 1), j - (kj - 1)). Positions q = b*H*W + p list the
// patch tokens image by image (the backward's dWm partial sums walk them in
// chunks of `chunk` positions).
#pragma once

#include "kernels.h"

namespace heba {

// Patch coordinates (b, i, j) of row r; false for a prefix row.
HEBA_HOST_DEVICE bool stencil_patch_of_row(const TokenMap& tm, const PatchGrid& g, int64_t r,
                                           int64_t* b, int* i, int* j) {
  const int64_t n = tm.token_of(r);
  if (n < g.P) return false;
  const int64_t p = n - g.P;
  *b = tm.batch_of(r);
  *i = static_cast<int>(p / g.W);
  *j = static_cast<int>(p % g.W);
  return true;
}

// Row and coordinates of patch position q (0 <= q < B*H*W).
HEBA_HOST_DEVICE int64_t stencil_row_of_position(const TokenMap& tm, const PatchGrid& g,
                                                 int64_t q, int64_t* b, int* i, int* j) {
  const int64_t HW = static_cast<int64_t>(g.H) * g.W;
  *b = q / HW;
  const int64_t p = q - *b * HW;
  *i = static_cast<int>(p / g.W);
  *j = static_cast<int>(p % g.W);
  return tm.row(*b, g.P + p);
}

// Row of the patch (ii, jj) of image b, or -1 outside the grid (zero padding).
HEBA_HOST_DEVICE int64_t stencil_row_at(const TokenMap& tm, const PatchGrid& g, int64_t b, int ii,
                                        int jj) {
  if (ii < 0 || ii >= g.H || jj < 0 || jj >= g.W) return -1;
  return tm.row(b, g.P + static_cast<int64_t>(ii) * g.W + jj);
}

// The row forward tap k of output (b, i, j) reads, or -1 (padding).
HEBA_HOST_DEVICE int64_t stencil_tap_row(const TokenMap& tm, const PatchGrid& g, int64_t b, int i,
                                         int j, int k) {
  return stencil_row_at(tm, g, b, i + k / 3 - 1, j + k % 3 - 1);
}

// The row whose forward tap k reads (b, i, j): the adjoint's input, or -1.
HEBA_HOST_DEVICE int64_t stencil_adjoint_row(const TokenMap& tm, const PatchGrid& g, int64_t b,
                                             int i, int j, int k) {
  return stencil_row_at(tm, g, b, i - (k / 3 - 1), j - (k % 3 - 1));
}

// Positions [*q0, *q1) of partial-sum chunk `y` of length `chunk` over npos positions.
HEBA_HOST_DEVICE void stencil_chunk_range(int64_t y, int64_t chunk, int64_t npos, int64_t* q0,
                                          int64_t* q1) {
  *q0 = y * chunk;
  *q1 = *q0 + chunk < npos ? *q0 + chunk : npos;
}

}  // namespace heba
