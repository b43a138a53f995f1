// Residual + LayerNorm + scaled residual (+ prefix copy), forward and backward.
// Shared by the HeBA visual and text ops. Math (per row = token, width D):
//
//   y    = x + z                      z = up(...) in the weights' dtype
//   mean = sum(y) / D,  rstd = 1 / sqrt(sum((y - mean)^2) / D + eps)
//   yhat = (y - mean) * rstd
//   out  = x + scale * (yhat * gamma + beta)          (prefix rows: out = x)
//
// Backward with ga = ga_scale * grad_out (ga_scale = 1 under the HeBA
// gradient rule, scale otherwise):
//
//   dgamma = sum_rows ga * yhat,  dbeta = sum_rows ga
//   dyhat  = ga * gamma
//   dy     = rstd * (dyhat - mean_D(dyhat) - yhat * mean_D(dyhat * yhat))
//
// gamma and beta are read in the weights' dtype (no cast launch); the backward's
// per-block partial sums of dgamma and dbeta are summed, with the op's other
// partials, by one reduce_partials launch (reduce.cu).
//
// One block per row (grid-stride over rows); y is recomputed from x and z in
// each pass instead of being staged, so any D works without shared memory
// (the re-reads of a row just read hit L1/L2).

#include "common.cuh"

namespace heba {
namespace {

template <typename x_t, typename w_t>
__global__ void __launch_bounds__(kLnMaxThreads) _residual_ln_fwd_kernel(const x_t* __restrict__ x, const w_t* __restrict__ z,
                                        const w_t* __restrict__ gamma,
                                        const w_t* __restrict__ beta,
                                        x_t* __restrict__ out, acc_of<x_t>* __restrict__ mean,
                                        acc_of<x_t>* __restrict__ rstd, TokenMap tm,
                                        int64_t num_prefix, int64_t rows, int64_t D,
                                        ScaleArg scale_arg, acc_of<x_t> eps) {
  using acc_t = acc_of<x_t>;
  const acc_t scale = load_scale<acc_t>(scale_arg);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const x_t* xr = x + r * D;
    x_t* orow = out + r * D;
    if (tm.token_of(r) < num_prefix) {  // uniform over the block
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x) orow[d] = xr[d];
      if (threadIdx.x == 0) {
        mean[r] = acc_t(0);
        rstd[r] = acc_t(0);
      }
      continue;
    }
    const w_t* zr = z + r * D;
    acc_t s = 0, unused = 0;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) s += acc_t(to_acc(xr[d])) + acc_t(to_acc(zr[d]));
    block_sum2(s, unused);
    const acc_t mu = s / acc_t(D);
    acc_t ss = 0;
    unused = 0;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      const acc_t c = acc_t(to_acc(xr[d])) + acc_t(to_acc(zr[d])) - mu;
      ss += c * c;
    }
    block_sum2(ss, unused);
    const acc_t rs = acc_t(1) / sqrt(ss / acc_t(D) + eps);
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      const acc_t xv = to_acc(xr[d]);
      const acc_t yh = (xv + acc_t(to_acc(zr[d])) - mu) * rs;
      orow[d] = from_acc<x_t>(xv + scale * (yh * acc_t(to_acc(gamma[d])) +
                                            acc_t(to_acc(beta[d]))));
    }
    if (threadIdx.x == 0) {
      mean[r] = mu;
      rstd[r] = rs;
    }
  }
}

// dgamma_part / dbeta_part: [gridDim.x, D]; block k owns row k of each (zeroed
// here first), and the thread owning column d is the only one touching [k, d].
template <typename x_t, typename w_t>
__global__ void __launch_bounds__(kLnMaxThreads) _residual_ln_bwd_kernel(const x_t* __restrict__ grad, const x_t* __restrict__ x,
                                        const w_t* __restrict__ z,
                                        const w_t* __restrict__ gamma,
                                        const acc_of<x_t>* __restrict__ mean,
                                        const acc_of<x_t>* __restrict__ rstd,
                                        w_t* __restrict__ dy, acc_of<x_t>* __restrict__ dgamma_part,
                                        acc_of<x_t>* __restrict__ dbeta_part, TokenMap tm,
                                        int64_t num_prefix, int64_t rows, int64_t D,
                                        ScaleArg ga_scale_arg) {
  using acc_t = acc_of<x_t>;
  const acc_t ga_scale = load_scale<acc_t>(ga_scale_arg);
  acc_t* dgp = dgamma_part + static_cast<int64_t>(blockIdx.x) * D;
  acc_t* dbp = dbeta_part + static_cast<int64_t>(blockIdx.x) * D;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    dgp[d] = acc_t(0);
    dbp[d] = acc_t(0);
  }
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    w_t* dyr = dy + r * D;
    if (tm.token_of(r) < num_prefix) {  // uniform over the block
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x) dyr[d] = from_acc<w_t>(acc_of<w_t>(0));
      continue;
    }
    const x_t* gr = grad + r * D;
    const x_t* xr = x + r * D;
    const w_t* zr = z + r * D;
    const acc_t mu = mean[r], rs = rstd[r];
    acc_t s1 = 0, s2 = 0;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      const acc_t yh = (acc_t(to_acc(xr[d])) + acc_t(to_acc(zr[d])) - mu) * rs;
      const acc_t dyh = ga_scale * acc_t(to_acc(gr[d])) * acc_t(to_acc(gamma[d]));
      s1 += dyh;
      s2 += dyh * yh;
    }
    block_sum2(s1, s2);
    const acc_t m1 = s1 / acc_t(D), m2 = s2 / acc_t(D);
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      const acc_t yh = (acc_t(to_acc(xr[d])) + acc_t(to_acc(zr[d])) - mu) * rs;
      const acc_t ga = ga_scale * acc_t(to_acc(gr[d]));
      const acc_t dyh = ga * acc_t(to_acc(gamma[d]));
      dyr[d] = from_acc<w_t>(acc_of<w_t>(rs * (dyh - m1 - yh * m2)));
      dgp[d] += ga * yh;
      dbp[d] += ga;
    }
  }
}

// out = a + k * b, computed in the accumulation type of x_t.
template <typename x_t, typename w_t>
__global__ void __launch_bounds__(kElemThreads)
    _scaled_add_kernel(const x_t* __restrict__ a, const w_t* __restrict__ b,
                       x_t* __restrict__ out, int64_t n, ScaleArg k_arg) {
  using acc_t = acc_of<x_t>;
  const acc_t k = load_scale<acc_t>(k_arg);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = from_acc<x_t>(acc_t(to_acc(a[i])) + k * acc_t(to_acc(b[i])));
  }
}

}  // namespace

cudaError_t residual_ln_fwd_launch(DType xt, DType wt, const void* x, const void* z,
                                   const void* gamma, const void* beta, void* out, void* mean,
                                   void* rstd, TokenMap tm, int64_t num_prefix, int64_t rows,
                                   int64_t D, ScaleArg scale, double eps, cudaStream_t stream) {
  if (rows == 0 || D == 0) return cudaSuccess;
  const LaunchDims d = residual_ln_fwd_dims(rows, D);
  return dispatch_xw(xt, wt, [&](auto xtag, auto wtag) -> cudaError_t {
    using x_t = decltype(xtag);
    using w_t = decltype(wtag);
    using acc_t = acc_of<x_t>;
    _residual_ln_fwd_kernel<x_t, w_t><<<grid_of(d), block_of(d), 0, stream>>>(
        static_cast<const x_t*>(x), static_cast<const w_t*>(z), static_cast<const w_t*>(gamma),
        static_cast<const w_t*>(beta), static_cast<x_t*>(out), static_cast<acc_t*>(mean),
        static_cast<acc_t*>(rstd), tm, num_prefix, rows, D, scale, static_cast<acc_t>(eps));
    return cudaGetLastError();
  });
}

cudaError_t residual_ln_bwd_launch(DType xt, DType wt, const void* grad, const void* x,
                                   const void* z, const void* gamma, const void* mean,
                                   const void* rstd, void* dy, void* dgamma_part,
                                   void* dbeta_part, TokenMap tm, int64_t num_prefix,
                                   int64_t rows, int64_t D, ScaleArg ga_scale, int sms,
                                   cudaStream_t stream) {
  if (rows == 0 || D == 0) return cudaSuccess;
  const LaunchDims d = residual_ln_bwd_dims(rows, D, sms);
  return dispatch_xw(xt, wt, [&](auto xtag, auto wtag) -> cudaError_t {
    using x_t = decltype(xtag);
    using w_t = decltype(wtag);
    using acc_t = acc_of<x_t>;
    _residual_ln_bwd_kernel<x_t, w_t><<<grid_of(d), block_of(d), 0, stream>>>(
        static_cast<const x_t*>(grad), static_cast<const x_t*>(x), static_cast<const w_t*>(z),
        static_cast<const w_t*>(gamma), static_cast<const acc_t*>(mean),
        static_cast<const acc_t*>(rstd), static_cast<w_t*>(dy), static_cast<acc_t*>(dgamma_part),
        static_cast<acc_t*>(dbeta_part), tm, num_prefix, rows, D, ga_scale);
    return cudaGetLastError();
  });
}

cudaError_t scaled_add_launch(DType xt, DType wt, const void* a, const void* b, void* out,
                              int64_t n, ScaleArg k, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch_xw(xt, wt, [&](auto xtag, auto wtag) -> cudaError_t {
    using x_t = decltype(xtag);
    using w_t = decltype(wtag);
    const LaunchDims d = scaled_add_dims(n, num_sms());
    _scaled_add_kernel<x_t, w_t><<<grid_of(d), block_of(d), 0, stream>>>(
        static_cast<const x_t*>(a), static_cast<const w_t*>(b), static_cast<x_t*>(out), n, k);
    return cudaGetLastError();
  });
}

}  // namespace heba
