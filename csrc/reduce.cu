// The one reduction at the end of a HeBA backward: every buffer of per-block
// partial sums the op's kernels wrote ([slots, n] in the accumulation type) is
// summed over its slots and written in the weights' dtype, all buffers in one
// launch (dgamma, dbeta and the stencil's dWm: no ATen sum or cast launches).
//
// Block (kReduceTx, kReduceTy): x over 32 consecutive columns of the buffers'
// columns laid end to end (coalesced loads of a slot's row), y over 8 lanes
// that take every 8th slot; the 8 lane sums meet in shared memory in lane
// order, so every column is summed in the same order on every run.

#include "common.cuh"

namespace heba {
namespace {

struct PartialSums {
  PartialSum s[kMaxPartialSums];
  int count;
};

template <typename w_t>
__global__ void __launch_bounds__(kReduceTx * kReduceTy)
    _reduce_partials_kernel(PartialSums ps, int64_t columns) {
  using acc_t = acc_of<w_t>;
  __shared__ acc_t lanes[kReduceTy][kReduceTx];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kReduceTx + threadIdx.x;
  int j = 0;
  int64_t c = col;
  while (j + 1 < ps.count && c >= ps.s[j].n) {  // the buffer this column belongs to
    c -= ps.s[j].n;
    ++j;
  }
  const bool live = col < columns;
  acc_t sum = 0;
  if (live) {
    const acc_t* p = static_cast<const acc_t*>(ps.s[j].part) + c;
    const int64_t n = ps.s[j].n;
    for (int64_t k = threadIdx.y; k < ps.s[j].slots; k += kReduceTy) sum += p[k * n];
  }
  lanes[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && live) {
    acc_t total = lanes[0][threadIdx.x];
#pragma unroll
    for (int y = 1; y < kReduceTy; ++y) total += lanes[y][threadIdx.x];
    static_cast<w_t*>(ps.s[j].out)[c] = from_acc<w_t>(total);
  }
}

}  // namespace

cudaError_t reduce_partials_launch(DType wt, const PartialSum* sums, int count,
                                   cudaStream_t stream) {
  if (count < 1 || count > kMaxPartialSums) return cudaErrorInvalidValue;
  PartialSums ps{};
  ps.count = count;
  int64_t columns = 0;
  for (int i = 0; i < count; ++i) {
    ps.s[i] = sums[i];
    columns += sums[i].n;
  }
  if (columns == 0) return cudaSuccess;
  const LaunchDims d = reduce_partials_dims(columns);
  return dispatch_w(wt, [&](auto wtag) -> cudaError_t {
    using w_t = decltype(wtag);
    _reduce_partials_kernel<w_t><<<grid_of(d), block_of(d), 0, stream>>>(ps, columns);
    return cudaGetLastError();
  });
}

}  // namespace heba
