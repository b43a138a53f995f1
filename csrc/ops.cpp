// The ATen side of the heba CUDA extension: input checks, the projections
// (cuBLAS through at::mm), the kernel launches (kernels.h) and the
// registration of the ops heba::cuda_* with torch (CUDA dispatch key).
//
// All ATen code of the extension is in this one file on purpose: every
// translation unit that includes ATen costs a full parse of its headers (20 s
// with g++, minutes with nvcc), so the kernels (.cu) include none and
// the three ops share this file, one section each, in the order
// visual, text, low-rank. heba_kernels/cuda_ops.py holds the fake (meta)
// implementations and the autograd formulas; csrc/README.md the math.
//
// Row layout: a token tensor is used through its [rows, D] memory view, which
// exists when it is contiguous or when x.transpose(0, 1) is ([N, B, D] views
// of [B, N, D] memory and the reverse); every intermediate shares that row
// order, so each projection is one plain 2-D GEMM and no layout is copied.

#include <Python.h>  // first, as Python asks

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "kernels.h"
#include "stencil.h"

namespace heba {
namespace {

using at::Tensor;

// ---------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::Float;
    case at::kHalf: return DType::Half;
    case at::kBFloat16: return DType::BFloat16;
    case at::kDouble: return DType::Double;
    default: TORCH_CHECK(false, "heba: unsupported dtype ", t, "; expected float32, float16, "
                         "bfloat16 or float64");
  }
  return DType::Float;
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The (x, weights) dtype pairs the kernels take: one dtype, or float32 x with
// float16/bfloat16 weights (autocast). cuda_ops.py brings other pairs to these.
void check_dtype_pair(at::ScalarType xt, at::ScalarType wt, const char* op) {
  to_dtype(xt);
  to_dtype(wt);
  TORCH_CHECK(xt == wt || (xt == at::kFloat && (wt == at::kHalf || wt == at::kBFloat16)), op,
              ": unsupported dtypes x=", xt, " with weights=", wt, "; supported: x and weights "
              "of one dtype, or float32 x with float16/bfloat16 weights (autocast)");
}

void check_x(const Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() >= 1 && x.stride(-1) == 1, op,
              ": x must be contiguous in its last dimension, got strides ", x.strides());
}

void check_on(const Tensor& t, const char* name, const Tensor& x) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
}

void check_shape(const Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

void check_dtype(const Tensor& t, const char* name, at::ScalarType wt) {
  TORCH_CHECK(t.scalar_type() == wt, name, " has dtype ", t.scalar_type(),
              " but the weights have ", wt, "; all weights must share one dtype");
}

void check_saved(const Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dt,
                 const Tensor& x, const char* op) {
  check_on(t, name, x);
  TORCH_CHECK(t.is_contiguous() && t.sizes() == shape && t.scalar_type() == dt, op, ": ", name,
              " must be a contiguous ", shape, " ", dt, " tensor saved by the forward, got ",
              t.sizes(), " ", t.scalar_type());
}

// The [rows, D] view of a token tensor's memory (no copy).
Tensor rows_view(const Tensor& t, const char* name) {
  const int64_t D = t.size(-1);
  if (t.is_contiguous()) return t.view({-1, D});
  // dim >= 3: in 2-D, transpose(0, 1) moves the D axis, and the view below would
  // read a [D, M] matrix as [M, D].
  TORCH_CHECK(t.dim() >= 3 && t.transpose(0, 1).is_contiguous(), name,
              " must be contiguous, or contiguous after transpose(0, 1) (a [N, B, D] view of "
              "[B, N, D] memory); got sizes ", t.sizes(), " and strides ", t.strides());
  return t.transpose(0, 1).view({-1, D});
}

// `g` (x's shape) laid out in memory like x, so that rows_view lists the
// tokens of both in the same order. Copies only if needed.
Tensor like_layout(const Tensor& g, const Tensor& x) {
  if (x.is_contiguous()) return g.contiguous();
  return g.transpose(0, 1).contiguous().transpose(0, 1);
}

// HEBA_DEBUG_NAN_FILL=1 fills every buffer a kernel is meant to write with NaN
// first, so a kernel that forgets part of its output fails the tests loudly.
bool debug_nan_fill() {
  const char* v = std::getenv("HEBA_DEBUG_NAN_FILL");
  return v != nullptr && *v != '\0' && std::strcmp(v, "0") != 0;
}

Tensor poisoned(Tensor t) {
  if (debug_nan_fill() && t.numel() > 0) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

Tensor new_buffer(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return poisoned(at::empty(sizes, opts));
}

Tensor new_like(const Tensor& t) { return poisoned(at::empty_like(t)); }

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Every op runs its ATen calls (at::mm, at::addmm, ...) with autocast off: the
// launchers reinterpret those results by the weights' dtype, so an at::mm that
// autocast silently turned into bf16/fp16 (a backward run inside an autocast
// region, the forward not) would be read as float32: wrong values and
// out-of-bounds reads. The Autocast keys fall through for these ops, so
// autocast is still on inside them unless excluded here.
#define HEBA_NO_AUTOCAST c10::impl::ExcludeDispatchKeyGuard heba_no_autocast_(c10::autocast_dispatch_keyset)

// The outer residual's scale of a HeBA op: the 0-d float32 tensor scale_t on
// x's device when given (its value is read by the kernels when they run, so a
// captured CUDA graph replays with the value it holds then), else the float.
ScaleArg scale_arg(double scale, const std::optional<Tensor>& scale_t, const Tensor& x,
                   const char* op) {
  if (!scale_t.has_value()) return ScaleArg{scale, nullptr};
  const Tensor& s = *scale_t;
  TORCH_CHECK(s.dim() == 0 && s.scalar_type() == at::kFloat, op,
              ": scale_t must be a 0-d float32 tensor, got shape ", s.sizes(), " and dtype ",
              s.scalar_type());
  check_on(s, "scale_t", x);
  return ScaleArg{0.0, s.data_ptr<float>()};
}

// The backward's two factors (csrc/README.md, "The gradient rule"): under the
// rule the parameters see grad as if scale were 1 (ga = 1) and x gets
// grad + scale * (the adapter's input gradient); otherwise plain autograd.
struct GradScales {
  ScaleArg ga, dx;
};

GradScales grad_scales(ScaleArg scale, bool rescale_param_grad) {
  const ScaleArg one{1.0, nullptr};
  return rescale_param_grad ? GradScales{one, scale} : GradScales{scale, one};
}

// dx = grad + k * s over [rows, D] memory (dx, grad in x's dtype, s in the weights').
void scaled_add(const Tensor& dx2d, const Tensor& g2d, const Tensor& s, ScaleArg k) {
  TORCH_INTERNAL_ASSERT(dx2d.is_contiguous() && g2d.is_contiguous() && s.is_contiguous() &&
                        dx2d.sizes() == s.sizes() && g2d.sizes() == s.sizes());
  C10_CUDA_CHECK(scaled_add_launch(to_dtype(dx2d.scalar_type()), to_dtype(s.scalar_type()),
                                   g2d.data_ptr(), s.data_ptr(), dx2d.data_ptr(), s.numel(), k,
                                   stream()));
}

// The LayerNorm backward: dy, and its [2, blocks, D] partial sums of dgamma
// and dbeta (every element written), for reduce_partials.
Tensor residual_ln_bwd(const Tensor& g2d, const Tensor& x2d, const Tensor& z,
                       const Tensor& norm_weight, const Tensor& mean, const Tensor& rstd,
                       const Tensor& dy, TokenMap tm, int64_t num_prefix, ScaleArg ga_scale) {
  const int64_t rows = x2d.size(0), D = x2d.size(1);
  int sms = 0, dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const int64_t blocks = residual_ln_bwd_dims(rows, D, sms).grid[0];
  Tensor part = new_buffer({2, blocks, D}, x2d.options().dtype(acc_type(x2d.scalar_type())));
  if (rows == 0) part.zero_();  // no launch below: nothing to sum
  const Tensor gamma = norm_weight.contiguous();
  C10_CUDA_CHECK(residual_ln_bwd_launch(
      to_dtype(x2d.scalar_type()), to_dtype(z.scalar_type()), g2d.data_ptr(), x2d.data_ptr(),
      z.data_ptr(), gamma.data_ptr(), mean.data_ptr(), rstd.data_ptr(), dy.data_ptr(),
      part.data_ptr(), static_cast<char*>(part.data_ptr()) + blocks * D * part.element_size(),
      tm, num_prefix, rows, D, ga_scale, sms, stream()));
  return part;
}

// Each partial-sum buffer [slots, n] summed over its slots into a new [n]
// tensor of dtype wt (returned in order), all in one launch.
std::vector<Tensor> reduce_partials(std::initializer_list<Tensor> parts, at::ScalarType wt) {
  std::vector<Tensor> outs;
  std::vector<PartialSum> sums;
  for (const Tensor& part : parts) {
    TORCH_INTERNAL_ASSERT(part.dim() == 2 && part.is_contiguous() && sums.size() < kMaxPartialSums);
    outs.push_back(new_buffer({part.size(1)}, part.options().dtype(wt)));
    sums.push_back({part.data_ptr(), outs.back().data_ptr(), part.size(0), part.size(1)});
  }
  C10_CUDA_CHECK(reduce_partials_launch(to_dtype(wt), sums.data(), static_cast<int>(sums.size()),
                                        stream()));
  return outs;
}

// ---------------------------------------------------------------------------
// HeBA visual
// ---------------------------------------------------------------------------

struct VisualGeometry {
  int64_t B, N, D, h;
  TokenMap tm;
  PatchGrid grid;
};

VisualGeometry visual_geometry(const Tensor& x, const Tensor& down_weight, int64_t P, int64_t H,
                               int64_t W, bool batch_first, const char* op) {
  check_x(x, op);
  TORCH_CHECK(x.dim() == 3, op, ": x must be 3-D tokens, got shape ", x.sizes());
  const int64_t B = batch_first ? x.size(0) : x.size(1);
  const int64_t N = batch_first ? x.size(1) : x.size(0);
  const int64_t D = x.size(2);
  TORCH_CHECK(down_weight.dim() == 4, op, ": down_weight must be [h, D, 1, 1], got ",
              down_weight.sizes());
  const int64_t h = down_weight.size(0);
  TORCH_CHECK(P >= 0 && H >= 1 && W >= 1 && P + H * W == N, op, ": x has ", N,
              " tokens per image, expected num_prefix_tokens + H*W = ", P, " + ", H, "*", W);
  TORCH_CHECK(N < (1LL << 31) && D < (1LL << 31), op, ": x is too large: ", x.sizes());
  // rows_view(x) lists the rows batch-major exactly when "x is contiguous"
  // agrees with batch_first.
  const bool batch_major = (batch_first == x.is_contiguous());
  return VisualGeometry{B, N, D, h, TokenMap{B, N, batch_major},
                        PatchGrid{P, static_cast<int>(H), static_cast<int>(W)}};
}

void check_visual_weights(const Tensor& x, const Tensor& down_weight, const Tensor& mid_weight,
                          const Tensor& up_weight, const Tensor& norm_weight, int64_t D,
                          int64_t h) {
  check_on(down_weight, "down_weight", x);
  check_on(mid_weight, "mid_weight", x);
  check_on(up_weight, "up_weight", x);
  check_on(norm_weight, "norm_weight", x);
  check_shape(down_weight, "down_weight", {h, D, 1, 1});
  check_shape(mid_weight, "mid_weight", {h, 1, 3, 3});
  check_shape(up_weight, "up_weight", {D, h, 1, 1});
  check_shape(norm_weight, "norm_weight", {D});
  const auto wt = down_weight.scalar_type();
  check_dtype(mid_weight, "mid_weight", wt);
  check_dtype(up_weight, "up_weight", wt);
  check_dtype(norm_weight, "norm_weight", wt);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> cuda_visual_fwd(
    const Tensor& x, const Tensor& down_weight, const Tensor& mid_weight,
    const Tensor& up_weight, const Tensor& norm_weight, const Tensor& norm_bias, double scale,
    const std::optional<Tensor>& scale_t, int64_t num_prefix_tokens, int64_t grid_h,
    int64_t grid_w, bool batch_first, double eps, bool rescale_param_grad) {
  (void)rescale_param_grad;  // read by the autograd glue only
  const char* op = "heba::cuda_visual_fwd";
  HEBA_NO_AUTOCAST;
  const auto geo = visual_geometry(x, down_weight, num_prefix_tokens, grid_h, grid_w,
                                   batch_first, op);
  const int64_t D = geo.D, h = geo.h, rows = geo.B * geo.N;
  check_visual_weights(x, down_weight, mid_weight, up_weight, norm_weight, D, h);
  check_on(norm_bias, "norm_bias", x);
  check_shape(norm_bias, "norm_bias", {D});
  const auto wt = down_weight.scalar_type();
  check_dtype(norm_bias, "norm_bias", wt);
  check_dtype_pair(x.scalar_type(), wt, op);
  const ScaleArg sc = scale_arg(scale, scale_t, x, op);
  const auto acc = acc_type(x.scalar_type());
  c10::cuda::CUDAGuard guard(x.device());

  const Tensor x2d = rows_view(x, "x");                          // [rows, D]
  const Tensor xw = x2d.scalar_type() == wt ? x2d : x2d.to(wt);  // GEMM operand
  const Tensor wm = mid_weight.contiguous();                     // [h, 9]

  Tensor u = at::mm(xw, down_weight.reshape({h, D}).t());        // [rows, h]
  Tensor g = new_like(u);                                        // [rows, h]
  C10_CUDA_CHECK(visual_stencil_fwd_launch(to_dtype(wt), u.data_ptr(), wm.data_ptr(),
                                           g.data_ptr(), geo.tm, geo.grid, h, stream()));
  Tensor z = at::mm(g, up_weight.reshape({D, h}).t());           // [rows, D]
  Tensor out = new_like(x);
  Tensor mean = new_buffer({rows}, x.options().dtype(acc));
  Tensor rstd = new_buffer({rows}, x.options().dtype(acc));
  const Tensor gamma = norm_weight.contiguous(), beta = norm_bias.contiguous();  // in wt
  C10_CUDA_CHECK(residual_ln_fwd_launch(
      to_dtype(x.scalar_type()), to_dtype(wt), x2d.data_ptr(), z.data_ptr(), gamma.data_ptr(),
      beta.data_ptr(), rows_view(out, "out").data_ptr(), mean.data_ptr(), rstd.data_ptr(),
      geo.tm, num_prefix_tokens, rows, D, sc, eps, stream()));
  return {out, u, g, z, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> cuda_visual_bwd(
    const Tensor& grad_out, const Tensor& x, const Tensor& down_weight, const Tensor& mid_weight,
    const Tensor& up_weight, const Tensor& norm_weight, const Tensor& u, const Tensor& g,
    const Tensor& z, const Tensor& mean, const Tensor& rstd, double scale,
    const std::optional<Tensor>& scale_t, int64_t num_prefix_tokens, int64_t grid_h,
    int64_t grid_w, bool batch_first, bool rescale_param_grad) {
  const char* op = "heba::cuda_visual_bwd";
  HEBA_NO_AUTOCAST;
  const auto geo = visual_geometry(x, down_weight, num_prefix_tokens, grid_h, grid_w,
                                   batch_first, op);
  const int64_t D = geo.D, h = geo.h, rows = geo.B * geo.N;
  check_visual_weights(x, down_weight, mid_weight, up_weight, norm_weight, D, h);
  const auto wt = down_weight.scalar_type();
  check_dtype_pair(x.scalar_type(), wt, op);
  const auto acc = acc_type(x.scalar_type());
  check_on(grad_out, "grad_out", x);
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type(), op,
              ": grad_out must match x in shape and dtype");
  check_saved(u, "u", {rows, h}, wt, x, op);
  check_saved(g, "g", {rows, h}, wt, x, op);
  check_saved(z, "z", {rows, D}, wt, x, op);
  check_saved(mean, "mean", {rows}, acc, x, op);
  check_saved(rstd, "rstd", {rows}, acc, x, op);
  const GradScales gs = grad_scales(scale_arg(scale, scale_t, x, op), rescale_param_grad);
  c10::cuda::CUDAGuard guard(x.device());

  const Tensor x2d = rows_view(x, "x");
  const Tensor g2d = rows_view(like_layout(grad_out, x), "grad_out");
  const Tensor wd = down_weight.reshape({h, D});
  const Tensor wm = mid_weight.contiguous();
  const Tensor wu = up_weight.reshape({D, h});

  Tensor dy = new_buffer({rows, D}, x.options().dtype(wt));
  const Tensor ln_part = residual_ln_bwd(g2d, x2d, z, norm_weight, mean, rstd, dy, geo.tm,
                                         num_prefix_tokens, gs.ga);
  Tensor d_up = at::mm(dy.t(), g);                               // [D, h]
  Tensor dg = at::mm(dy, wu);                                    // [rows, h]
  const int64_t npos = geo.B * static_cast<int64_t>(geo.grid.H) * geo.grid.W;
  int64_t nchunks = 1, chunk = 1;
  visual_stencil_bwd_chunks(npos, &nchunks, &chunk);
  Tensor dv = new_buffer({rows, h}, x.options().dtype(acc));
  Tensor dwm_part = new_buffer({nchunks, h, 9}, x.options().dtype(acc));
  Tensor du = new_buffer({rows, h}, x.options().dtype(wt));
  if (rows > 0 && h > 0) {
    C10_CUDA_CHECK(visual_stencil_bwd_launch(to_dtype(wt), dg.data_ptr(), u.data_ptr(),
                                             wm.data_ptr(), dv.data_ptr(), dwm_part.data_ptr(),
                                             du.data_ptr(), geo.tm, geo.grid, h, nchunks, chunk,
                                             stream()));
  } else {
    dwm_part.zero_();
  }
  const Tensor xw = x2d.scalar_type() == wt ? x2d : x2d.to(wt);
  Tensor d_down = at::mm(du.t(), xw).view({h, D, 1, 1});
  dy.addmm_(du, wd);                 // dy += du @ Wd in place (cuBLAS, beta = 1): no copy of dy
  Tensor dx = at::empty_like(x);
  scaled_add(rows_view(dx, "dx"), g2d, dy, gs.dx);               // grad + dx_scale * dy
  const auto sums = reduce_partials({ln_part[0], ln_part[1], dwm_part.view({nchunks, h * 9})},
                                    wt);                         // dgamma, dbeta, dWm
  return {dx, d_down, sums[2].view({h, 1, 3, 3}), d_up.view({D, h, 1, 1}), sums[0], sums[1]};
}

// ---------------------------------------------------------------------------
// HeBA text: token-wise over x [..., D], no stencil, no prefix.
// ---------------------------------------------------------------------------

void check_text_weights(const Tensor& x, const Tensor& down_weight, const Tensor& up_weight,
                        const Tensor& norm_weight, const char* op) {
  check_x(x, op);
  TORCH_CHECK(x.dim() >= 2, op, ": x must be tokens [..., D], got shape ", x.sizes());
  const int64_t D = x.size(-1);
  TORCH_CHECK(D < (1LL << 31), op, ": x is too large: ", x.sizes());
  check_on(down_weight, "down_weight", x);
  check_on(up_weight, "up_weight", x);
  check_on(norm_weight, "norm_weight", x);
  TORCH_CHECK(down_weight.dim() == 2 && down_weight.size(1) == D, op,
              ": down_weight must be [h, ", D, "], got ", down_weight.sizes());
  const int64_t h = down_weight.size(0);
  check_shape(up_weight, "up_weight", {D, h});
  check_shape(norm_weight, "norm_weight", {D});
  const auto wt = down_weight.scalar_type();
  check_dtype(up_weight, "up_weight", wt);
  check_dtype(norm_weight, "norm_weight", wt);
  check_dtype_pair(x.scalar_type(), wt, op);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> cuda_text_fwd(
    const Tensor& x, const Tensor& down_weight, const Tensor& up_weight,
    const Tensor& norm_weight, const Tensor& norm_bias, double scale,
    const std::optional<Tensor>& scale_t, double eps, bool rescale_param_grad) {
  (void)rescale_param_grad;  // read by the autograd glue only
  const char* op = "heba::cuda_text_fwd";
  HEBA_NO_AUTOCAST;
  check_text_weights(x, down_weight, up_weight, norm_weight, op);
  const int64_t D = x.size(-1);
  check_on(norm_bias, "norm_bias", x);
  check_shape(norm_bias, "norm_bias", {D});
  const auto wt = down_weight.scalar_type();
  check_dtype(norm_bias, "norm_bias", wt);
  const ScaleArg sc = scale_arg(scale, scale_t, x, op);
  const auto acc = acc_type(x.scalar_type());
  c10::cuda::CUDAGuard guard(x.device());

  const Tensor x2d = rows_view(x, "x");                          // [rows, D]
  const int64_t rows = x2d.size(0);
  const Tensor xw = x2d.scalar_type() == wt ? x2d : x2d.to(wt);
  Tensor u = at::mm(xw, down_weight.t());                        // [rows, h]
  Tensor g = at::gelu(u);                                        // exact (erf) GELU
  Tensor z = at::mm(g, up_weight.t());                           // [rows, D]
  Tensor out = new_like(x);
  Tensor mean = new_buffer({rows}, x.options().dtype(acc));
  Tensor rstd = new_buffer({rows}, x.options().dtype(acc));
  const Tensor gamma = norm_weight.contiguous(), beta = norm_bias.contiguous();  // in wt
  C10_CUDA_CHECK(residual_ln_fwd_launch(
      to_dtype(x.scalar_type()), to_dtype(wt), x2d.data_ptr(), z.data_ptr(), gamma.data_ptr(),
      beta.data_ptr(), rows_view(out, "out").data_ptr(), mean.data_ptr(), rstd.data_ptr(),
      TokenMap{1, rows, true}, 0, rows, D, sc, eps, stream()));
  return {out, u, g, z, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> cuda_text_bwd(
    const Tensor& grad_out, const Tensor& x, const Tensor& down_weight, const Tensor& up_weight,
    const Tensor& norm_weight, const Tensor& u, const Tensor& g, const Tensor& z,
    const Tensor& mean, const Tensor& rstd, double scale, const std::optional<Tensor>& scale_t,
    bool rescale_param_grad) {
  const char* op = "heba::cuda_text_bwd";
  HEBA_NO_AUTOCAST;
  check_text_weights(x, down_weight, up_weight, norm_weight, op);
  check_on(grad_out, "grad_out", x);
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type(), op,
              ": grad_out must match x in shape and dtype");
  const auto wt = down_weight.scalar_type();
  const auto acc = acc_type(x.scalar_type());
  const int64_t D = x.size(-1), h = down_weight.size(0);
  const Tensor x2d = rows_view(x, "x");
  const int64_t rows = x2d.size(0);
  check_saved(u, "u", {rows, h}, wt, x, op);
  check_saved(g, "g", {rows, h}, wt, x, op);
  check_saved(z, "z", {rows, D}, wt, x, op);
  check_saved(mean, "mean", {rows}, acc, x, op);
  check_saved(rstd, "rstd", {rows}, acc, x, op);
  const GradScales gs = grad_scales(scale_arg(scale, scale_t, x, op), rescale_param_grad);
  c10::cuda::CUDAGuard guard(x.device());
  const Tensor g2d = rows_view(like_layout(grad_out, x), "grad_out");

  Tensor dy = new_buffer({rows, D}, x.options().dtype(wt));
  const Tensor ln_part = residual_ln_bwd(g2d, x2d, z, norm_weight, mean, rstd, dy,
                                         TokenMap{1, rows, true}, 0, gs.ga);
  Tensor d_up = at::mm(dy.t(), g);                               // [D, h]
  Tensor du = at::gelu_backward(at::mm(dy, up_weight), u);       // [rows, h]
  const Tensor xw = x2d.scalar_type() == wt ? x2d : x2d.to(wt);
  Tensor d_down = at::mm(du.t(), xw);                            // [h, D]
  dy.addmm_(du, down_weight);        // dy += du @ Wd in place (cuBLAS, beta = 1): no copy
  Tensor dx = at::empty_like(x);
  scaled_add(rows_view(dx, "dx"), g2d, dy, gs.dx);               // grad + dx_scale * dy
  const auto sums = reduce_partials({ln_part[0], ln_part[1]}, wt);  // dgamma, dbeta
  return {dx, d_down, d_up, sums[0], sums[1]};
}

// ---------------------------------------------------------------------------
// Low-rank residual: x [..., D].
// ---------------------------------------------------------------------------

// Checks the op's inputs; returns the rank.
int64_t check_low_rank(const Tensor& x, const Tensor& down_weight,
                       const std::optional<Tensor>& down_bias, const Tensor& up_weight,
                       const std::optional<Tensor>& up_bias, const char* op) {
  check_x(x, op);
  const int64_t D = x.size(-1);
  TORCH_CHECK(D < (1LL << 31), op, ": x is too large: ", x.sizes());
  check_on(down_weight, "down_weight", x);
  check_on(up_weight, "up_weight", x);
  TORCH_CHECK(down_weight.dim() == 2 && down_weight.size(1) == D, op,
              ": down_weight must be [r, ", D, "], got ", down_weight.sizes());
  const int64_t R = down_weight.size(0);
  check_shape(up_weight, "up_weight", {D, R});
  const auto wt = down_weight.scalar_type();
  check_dtype(up_weight, "up_weight", wt);
  if (down_bias.has_value()) {
    check_on(*down_bias, "down_bias", x);
    check_shape(*down_bias, "down_bias", {R});
    check_dtype(*down_bias, "down_bias", wt);
  }
  if (up_bias.has_value()) {
    check_on(*up_bias, "up_bias", x);
    check_shape(*up_bias, "up_bias", {D});
    check_dtype(*up_bias, "up_bias", wt);
  }
  check_dtype_pair(x.scalar_type(), wt, op);
  return R;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

Tensor cuda_low_rank_fwd(const Tensor& x, const Tensor& down_weight,
                         const std::optional<Tensor>& down_bias, const Tensor& up_weight,
                         const std::optional<Tensor>& up_bias, double alpha) {
  const char* op = "heba::cuda_low_rank_fwd";
  HEBA_NO_AUTOCAST;
  const int64_t R = check_low_rank(x, down_weight, down_bias, up_weight, up_bias, op);
  c10::cuda::CUDAGuard guard(x.device());
  const auto wt = down_weight.scalar_type();
  const Tensor x2d = rows_view(x, "x");                          // [M, D]
  const int64_t M = x2d.size(0), D = x2d.size(1);
  Tensor out = new_like(x);
  Tensor out2d = rows_view(out, "out");
  if (M == 0 || D == 0) return out;

  if (R >= 1 && R <= kLowRankMaxFusedRank && x.scalar_type() != at::kDouble) {
    const Tensor wd = down_weight.contiguous(), wu = up_weight.contiguous();
    const Tensor bd = down_bias.has_value() ? down_bias->contiguous() : Tensor();
    const Tensor bu = up_bias.has_value() ? up_bias->contiguous() : Tensor();
    const DType xdt = to_dtype(x.scalar_type()), wdt = to_dtype(wt);
    const bool vec_x = D % vec16_elems(xdt) == 0 && aligned16(x2d.data_ptr());
    const bool vec_w = D % vec16_elems(wdt) == 0 && aligned16(wd.data_ptr());
    C10_CUDA_CHECK(low_rank_fwd_launch(
        xdt, wdt, x2d.data_ptr(), wd.data_ptr(), bd.defined() ? bd.data_ptr() : nullptr,
        wu.data_ptr(), bu.defined() ? bu.data_ptr() : nullptr, out2d.data_ptr(), M,
        static_cast<int>(D), static_cast<int>(R), static_cast<float>(alpha), vec_x, vec_w,
        stream()));
    return out;
  }
  // Ranks above 64 (or float64): cuBLAS for both projections, ATen's exact GELU.
  const Tensor xw = x2d.scalar_type() == wt ? x2d : x2d.to(wt);
  const Tensor u = down_bias.has_value() ? at::addmm(*down_bias, xw, down_weight.t())
                                         : at::mm(xw, down_weight.t());
  const Tensor hid = at::gelu(u);
  const Tensor zz = up_bias.has_value() ? at::addmm(*up_bias, hid, up_weight.t())
                                        : at::mm(hid, up_weight.t());
  at::add_out(out2d, x2d, zz, alpha);
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> cuda_low_rank_bwd(
    const Tensor& grad_out, const Tensor& x, const Tensor& down_weight,
    const std::optional<Tensor>& down_bias, const Tensor& up_weight,
    const std::optional<Tensor>& up_bias, double alpha) {
  const char* op = "heba::cuda_low_rank_bwd";
  HEBA_NO_AUTOCAST;
  const int64_t R = check_low_rank(x, down_weight, down_bias, up_weight, up_bias, op);
  check_on(grad_out, "grad_out", x);
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type(), op,
              ": grad_out must match x in shape and dtype");
  c10::cuda::CUDAGuard guard(x.device());
  const auto wt = down_weight.scalar_type();
  const int64_t D = x.size(-1);
  const Tensor x2d = rows_view(x, "x");
  const Tensor g2d = rows_view(like_layout(grad_out, x), "grad_out");
  const Tensor xw = x2d.scalar_type() == wt ? x2d : x2d.to(wt);

  // Recompute the rank-r pre-activation (one thin GEMM) instead of saving it.
  const Tensor u = down_bias.has_value() ? at::addmm(*down_bias, xw, down_weight.t())
                                         : at::mm(xw, down_weight.t());   // [M, r]
  // alpha rides in the GEMMs' own alpha (beta = 0: the output's old contents are not
  // read): no scaled copy of grad. A cast only where x's dtype is not the weights'.
  const Tensor gw = g2d.scalar_type() == wt ? g2d : g2d.to(wt);        // [M, D]
  Tensor dh = new_like(u);
  at::addmm_out(dh, dh, gw, up_weight, 0, alpha);                        // alpha grad @ Wu
  Tensor hid = new_like(u);
  Tensor du = new_like(u);
  C10_CUDA_CHECK(low_rank_bwd_gelu_launch(to_dtype(wt), u.data_ptr(), dh.data_ptr(),
                                          hid.data_ptr(), du.data_ptr(), u.numel(), stream()));
  Tensor d_up = new_buffer({D, R}, up_weight.options());
  at::addmm_out(d_up, d_up, gw.t(), hid, 0, alpha);                      // alpha grad^T @ gelu(u)
  Tensor d_down = at::mm(du.t(), xw);                                    // [r, D]
  // The bias gradients are column sums: two GEMVs against one vector of ones (float32
  // accumulation, one rounding to wt, as the GEMMs), only for an adapter with biases.
  Tensor d_up_b = new_buffer({D}, up_weight.options());
  Tensor d_down_b = new_buffer({R}, up_weight.options());
  if (down_bias.has_value() || up_bias.has_value()) {
    const Tensor ones = at::ones({x2d.size(0)}, up_weight.options());
    at::addmv_out(d_up_b, d_up_b, gw.t(), ones, 0, alpha);              // alpha sum of grad
    at::addmv_out(d_down_b, d_down_b, du.t(), ones, 0, 1);              // sum of du
  }
  Tensor dx = at::empty_like(x);
  Tensor dx2d = rows_view(dx, "dx");
  at::add_out(dx2d, g2d, at::mm(du, down_weight));                       // grad + du @ Wd
  return {dx, d_down, d_down_b, d_up, d_up_b};
}

// ---------------------------------------------------------------------------
// Launch plan (host only): the launches an op call makes, in order, for the
// roofline model (benchmarks/roofline.py). The heba kernels' dims come from
// launch_dims.h, as in their launchers; the ATen calls are listed as the op
// functions above issue them (one line here per ATen call there: keep the two
// in step). Assumes x and grad_out in a layout rows_view takes (no copies), the
// weights contiguous (no copies) and positive sizes. A GEMM (at::mm, and
// at::addmm with a 1-D bias, which cuBLASLt takes as its epilogue) counts as
// one launch, and so does C.addmm_(a, b) in place (C read and written by the GEMM; an
// out-of-place at::addmm(C, a, b) with a 2-D C would copy C first).
// ---------------------------------------------------------------------------

struct PlannedLaunch {
  std::string kernel;  // a heba kernel, "gemm" or the ATen op ("cast", "sum", ...)
  at::ScalarType dtype;  // GEMM operands; an ATen op's output
  LaunchDims dims;     // heba kernels; 0 where ATen / cuBLAS choose the grid
  int64_t m, n, k;     // GEMM: [m, k] @ [k, n]
  int64_t numel;       // elements the launch computes (GEMM: m * n)
  int64_t read, written, flops;  // bytes read and written (each tensor once), FLOPs
};

class LaunchPlan {
 public:
  LaunchPlan(at::ScalarType xt, at::ScalarType wt, int sms)
      : xt(xt), wt(wt), acc(acc_type(xt)), sms(sms) {}

  void kernel(const char* name, LaunchDims d, int64_t numel, int64_t read, int64_t written,
              int64_t flops = 0) {
    launches.push_back({name, wt, d, 0, 0, 0, numel, read, written, flops});
  }

  // An ATen elementwise op or reduction over `in` elements to `out` elements.
  void aten(const char* name, at::ScalarType out_t, int64_t in, int64_t in_bytes, int64_t out) {
    launches.push_back({name, out_t, kAtenDims, 0, 0, 0, out, in * in_bytes,
                        out * size(out_t), 0});
  }

  // t.to(to) of n elements: a launch only when the dtype changes.
  void cast(int64_t n, at::ScalarType from, at::ScalarType to) {
    if (from != to) aten("cast", to, n, size(from), n);
  }

  // [m, k] @ [k, n] in the weights' dtype; `c_bytes`: an added C or bias read.
  void gemm(int64_t m, int64_t n, int64_t k, int64_t c_bytes = 0) {
    const int64_t e = size(wt);
    launches.push_back({"gemm", wt, kAtenDims, m, n, k, m * n, (m * k + k * n) * e + c_bytes,
                        m * n * e, 2 * m * n * k});
  }

  int64_t size(at::ScalarType t) const { return static_cast<int64_t>(c10::elementSize(t)); }

  const at::ScalarType xt, wt, acc;
  const int sms;
  std::vector<PlannedLaunch> launches;

 private:
  static constexpr LaunchDims kAtenDims{{0, 0, 0}, {0, 0, 0}};
};

// The residual + LayerNorm forward (gamma and beta read in the weights' dtype).
void plan_residual_ln_fwd(LaunchPlan& p, int64_t rows, int64_t D) {
  const int64_t ex = p.size(p.xt), ew = p.size(p.wt), ea = p.size(p.acc);
  p.kernel("_residual_ln_fwd_kernel", residual_ln_fwd_dims(rows, D), rows * D,
           rows * D * (ex + ew) + 2 * D * ew, rows * D * ex + 2 * rows * ea);
}

// residual_ln_bwd above: the kernel, which writes its own partial sums.
void plan_residual_ln_bwd(LaunchPlan& p, int64_t rows, int64_t D) {
  const int64_t blocks = residual_ln_bwd_dims(rows, D, p.sms).grid[0];
  const int64_t ex = p.size(p.xt), ew = p.size(p.wt), ea = p.size(p.acc);
  p.kernel("_residual_ln_bwd_kernel", residual_ln_bwd_dims(rows, D, p.sms), rows * D,
           rows * D * (2 * ex + ew) + D * ew + 2 * rows * ea,
           rows * D * ew + 2 * blocks * D * ea);
}

// The end of both HeBA backwards: d_down, dx = g + scale * (dy + du @ Wd), then
// reduce_partials over the [slots, n] buffers `parts` (dgamma, dbeta, dWm).
void plan_dx_tail(LaunchPlan& p, int64_t rows, int64_t D, int64_t h,
                  std::initializer_list<std::pair<int64_t, int64_t>> parts) {
  const int64_t ex = p.size(p.xt), ew = p.size(p.wt), ea = p.size(p.acc);
  p.cast(rows * D, p.xt, p.wt);                           // xw
  p.gemm(h, D, rows);                                     // d_down = du^T @ xw
  p.gemm(rows, D, h, rows * D * ew);                      // dy += du @ Wd (in place)
  p.kernel("_scaled_add_kernel", scaled_add_dims(rows * D, p.sms), rows * D,
           rows * D * (ex + ew), rows * D * ex);
  int64_t columns = 0, read = 0;
  for (const auto& sn : parts) {
    columns += sn.second;
    read += sn.first * sn.second * ea;
  }
  p.kernel("_reduce_partials_kernel", reduce_partials_dims(columns), columns, read,
           columns * ew);
}

void plan_visual(LaunchPlan& p, bool backward, int64_t B, int64_t N, int64_t D, int64_t h,
                 int64_t H, int64_t W) {
  const int64_t rows = B * N, T = B * H * W;
  const int64_t ew = p.size(p.wt), ea = p.size(p.acc);
  if (!backward) {
    p.cast(rows * D, p.xt, p.wt);                         // xw
    p.gemm(rows, h, D);                                   // u = xw @ Wd^T
    p.kernel("_visual_stencil_kernel", visual_stencil_dims(rows, h, p.sms), rows * h,
             rows * h * ew + 9 * h * ew, rows * h * ew, 2 * 9 * T * h);
    p.gemm(rows, D, h);                                   // z = g @ Wu^T
    plan_residual_ln_fwd(p, rows, D);
    return;
  }
  plan_residual_ln_bwd(p, rows, D);
  p.gemm(D, h, rows);                                     // d_up = dy^T @ g
  p.gemm(rows, h, D);                                     // dg = dy @ Wu
  int64_t nchunks = 1, chunk = 1;
  visual_stencil_bwd_chunks(T, &nchunks, &chunk);
  p.kernel("_visual_stencil_bwd_kernel_dv", visual_stencil_bwd_dv_dims(h, nchunks), T * h,
           T * h * ew + rows * h * ew + 9 * h * ew, T * h * ea + nchunks * h * 9 * ea,
           2 * 2 * 9 * T * h);
  p.kernel("_visual_stencil_kernel[mirror]", visual_stencil_dims(rows, h, p.sms), rows * h,
           T * h * ea + 9 * h * ew, rows * h * ew, 2 * 9 * T * h);
  const int64_t blocks = residual_ln_bwd_dims(rows, D, p.sms).grid[0];
  plan_dx_tail(p, rows, D, h, {{blocks, D}, {blocks, D}, {nchunks, h * 9}});
}

void plan_text(LaunchPlan& p, bool backward, int64_t rows, int64_t D, int64_t h) {
  const int64_t ew = p.size(p.wt);
  if (!backward) {
    p.cast(rows * D, p.xt, p.wt);                         // xw
    p.gemm(rows, h, D);                                   // u = xw @ Wd^T
    p.aten("gelu", p.wt, rows * h, ew, rows * h);         // g = gelu(u)
    p.gemm(rows, D, h);                                   // z = g @ Wu^T
    plan_residual_ln_fwd(p, rows, D);
    return;
  }
  plan_residual_ln_bwd(p, rows, D);
  p.gemm(D, h, rows);                                     // d_up = dy^T @ g
  p.gemm(rows, h, D);                                     // dy @ Wu
  p.aten("gelu_backward", p.wt, 2 * rows * h, ew, rows * h);
  const int64_t blocks = residual_ln_bwd_dims(rows, D, p.sms).grid[0];
  plan_dx_tail(p, rows, D, h, {{blocks, D}, {blocks, D}});
}

void plan_low_rank(LaunchPlan& p, bool backward, int64_t M, int64_t D, int64_t R, bool bias) {
  const int64_t ex = p.size(p.xt), ew = p.size(p.wt);
  const int64_t bd = bias ? R * ew : 0, bu = bias ? D * ew : 0;  // bias reads by the GEMMs
  if (!backward && R <= kLowRankMaxFusedRank && p.xt != at::kDouble) {
    p.kernel("_low_rank_fwd_kernel", low_rank_fwd_dims(M), M * D,
             M * D * ex + 2 * R * D * ew + bd + bu, M * D * ex, 2 * 2 * M * D * R);
    return;
  }
  p.cast(M * D, p.xt, p.wt);                              // xw
  p.gemm(M, R, D, bd);                                    // u = xw @ Wd^T (+ bd)
  if (!backward) {
    p.aten("gelu", p.wt, M * R, ew, M * R);
    p.gemm(M, D, R, bu);                                  // gelu(u) @ Wu^T (+ bu)
    p.aten("add", p.xt, M * D, ex + ew, M * D);           // out = x + alpha * z
    return;
  }
  p.cast(M * D, p.xt, p.wt);                              // gw = grad in wt
  p.gemm(M, R, D);                                        // dh = alpha gw @ Wu
  p.kernel("_low_rank_bwd_kernel_gelu", low_rank_bwd_gelu_dims(M * R, p.sms), M * R,
           2 * M * R * ew, 2 * M * R * ew);
  p.gemm(D, R, M);                                        // d_up = alpha gw^T @ gelu(u)
  p.gemm(R, D, M);                                        // d_down = du^T @ xw
  if (bias) {
    p.aten("fill", p.wt, 0, 0, M);                        // ones [M]
    p.gemm(D, 1, M);                                      // d_up_b = alpha gw^T @ ones
    p.gemm(R, 1, M);                                      // d_down_b = du^T @ ones
  }
  p.gemm(M, D, R);                                        // du @ Wd
  p.aten("add", p.xt, M * D, ex + ew, M * D);             // dx = grad + du @ Wd
}

int64_t positive(c10::IntArrayRef v, size_t i, const char* name, const char* op) {
  TORCH_CHECK(i < v.size() && v[i] >= 1, op, ": ", name, " must list positive sizes, got ", v);
  return v[i];
}

// The launches of one call of heba::cuda_<op>_{fwd,bwd} (backward: the _bwd op)
// for x of x_shape (heba_visual: [B, N, D] batch-first with num_prefix_tokens
// and grid [H, W]; else [..., D]), hidden = h or the rank, on a GPU of `sms`
// SMs; bias: low_rank with both biases. Returns the kernel names, the dtypes
// (GEMM operands, an ATen op's output; heba kernels: the weights') and 13 ints
// per launch: grid x, y, z, block x, y, z, m, n, k, numel, bytes read, bytes
// written, FLOPs.
std::tuple<std::vector<std::string>, std::vector<std::string>, std::vector<int64_t>>
cuda_launch_plan(c10::string_view op, bool backward, c10::IntArrayRef x_shape, int64_t hidden,
                 at::ScalarType x_dtype, at::ScalarType w_dtype, int64_t num_prefix_tokens,
                 c10::IntArrayRef grid, bool bias, int64_t sms) {
  const char* name = "heba::_cuda_launch_plan";
  check_dtype_pair(x_dtype, w_dtype, name);
  TORCH_CHECK(hidden >= 1, name, ": hidden must be >= 1, got ", hidden);
  TORCH_CHECK(sms >= 1 && sms < (1 << 20), name, ": sms must be a positive SM count, got ", sms);
  TORCH_CHECK(x_shape.size() >= 2, name, ": x_shape must be [..., D], got ", x_shape);
  int64_t rows = 1;
  for (size_t i = 0; i < x_shape.size(); ++i) rows *= positive(x_shape, i, "x_shape", name);
  const int64_t D = x_shape.back();
  rows /= D;
  LaunchPlan p(x_dtype, w_dtype, static_cast<int>(sms));
  if (op == "heba_visual") {
    TORCH_CHECK(x_shape.size() == 3 && grid.size() == 2, name,
                ": heba_visual needs x_shape [B, N, D] and grid [H, W], got ", x_shape, ", ",
                grid);
    const int64_t H = positive(grid, 0, "grid", name), W = positive(grid, 1, "grid", name);
    TORCH_CHECK(num_prefix_tokens >= 0 && num_prefix_tokens + H * W == x_shape[1], name,
                ": x_shape has ", x_shape[1], " tokens per image, expected num_prefix_tokens + "
                "H*W = ", num_prefix_tokens, " + ", H, "*", W);
    plan_visual(p, backward, x_shape[0], x_shape[1], D, hidden, H, W);
  } else if (op == "heba_text") {
    plan_text(p, backward, rows, D, hidden);
  } else if (op == "low_rank") {
    plan_low_rank(p, backward, rows, D, hidden, bias);
  } else {
    TORCH_CHECK(false, name, ": op must be heba_visual, heba_text or low_rank, got ", op);
  }
  std::vector<std::string> kernels, dtypes;
  std::vector<int64_t> fields;
  for (const PlannedLaunch& l : p.launches) {
    kernels.push_back(l.kernel);
    dtypes.push_back(c10::toString(l.dtype));
    const int64_t f[] = {l.dims.grid[0], l.dims.grid[1],  l.dims.grid[2],  l.dims.block[0],
                         l.dims.block[1], l.dims.block[2], l.m, l.n, l.k, l.numel,
                         l.read, l.written, l.flops};
    fields.insert(fields.end(), std::begin(f), std::end(f));
  }
  return {kernels, dtypes, fields};
}

// ---------------------------------------------------------------------------
// Host probes of the kernels' index math (CPU, float64): the stencil, its
// adjoint and the dWm partial-sum chunks computed with the very functions of
// stencil.h (and visual_stencil_bwd_chunks) the kernels call, so a CPU test
// checks that index math against torch's conv2d without a GPU.
// ---------------------------------------------------------------------------

// v: [rows, C] stencil before GELU (0 on prefix rows); dwm_part: [nchunks, C, 9]
// partial sums of dWm from dv (as _visual_stencil_bwd_kernel_dv, gelu' left
// out); du: [rows, C] the adjoint applied to dv. u, dv: [rows, C] in x's
// memory order, wm: [C, 9], all float64 CPU.
std::tuple<Tensor, Tensor, Tensor> cuda_stencil_host(const Tensor& u, const Tensor& wm,
                                                     const Tensor& dv, int64_t B, int64_t N,
                                                     int64_t P, int64_t H, int64_t W,
                                                     bool batch_major) {
  const char* op = "heba::_cuda_stencil_host";
  for (const Tensor* t : {&u, &wm, &dv})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kDouble && t->dim() == 2, op,
                ": u, wm, dv must be 2-D float64 CPU tensors");
  const int64_t C = u.size(1), rows = B * N;
  TORCH_CHECK(P >= 0 && H >= 1 && W >= 1 && P + H * W == N, op, ": N must be P + H*W");
  check_shape(u, "u", {rows, C});
  check_shape(dv, "dv", {rows, C});
  check_shape(wm, "wm", {C, 9});
  const TokenMap tm{B, N, batch_major};
  const PatchGrid grid{P, static_cast<int>(H), static_cast<int>(W)};
  const Tensor uc = u.contiguous(), wc = wm.contiguous(), dc = dv.contiguous();
  const double *up = uc.data_ptr<double>(), *wp = wc.data_ptr<double>(), *dp = dc.data_ptr<double>();
  Tensor v = at::zeros({rows, C}, u.options()), du = at::zeros({rows, C}, u.options());
  double *vp = v.data_ptr<double>(), *dup = du.data_ptr<double>();
  for (int64_t r = 0; r < rows; ++r) {
    int64_t b;
    int i, j;
    if (!stencil_patch_of_row(tm, grid, r, &b, &i, &j)) continue;
    for (int k = 0; k < 9; ++k) {
      const int64_t rt = stencil_tap_row(tm, grid, b, i, j, k);
      const int64_t ra = stencil_adjoint_row(tm, grid, b, i, j, k);
      for (int64_t c = 0; c < C; ++c) {
        if (rt >= 0) vp[r * C + c] += wp[c * 9 + k] * up[rt * C + c];
        if (ra >= 0) dup[r * C + c] += wp[c * 9 + k] * dp[ra * C + c];
      }
    }
  }
  const int64_t npos = B * H * W;
  int64_t nchunks = 1, chunk = 1;
  visual_stencil_bwd_chunks(npos, &nchunks, &chunk);
  Tensor part = at::zeros({nchunks, C, 9}, u.options());
  double* pp = part.data_ptr<double>();
  for (int64_t y = 0; y < nchunks; ++y) {
    int64_t q0, q1;
    stencil_chunk_range(y, chunk, npos, &q0, &q1);
    for (int64_t q = q0; q < q1; ++q) {
      int64_t b;
      int i, j;
      const int64_t r = stencil_row_of_position(tm, grid, q, &b, &i, &j);
      for (int k = 0; k < 9; ++k) {
        const int64_t rt = stencil_tap_row(tm, grid, b, i, j, k);
        if (rt < 0) continue;
        for (int64_t c = 0; c < C; ++c) pp[(y * C + c) * 9 + k] += dp[r * C + c] * up[rt * C + c];
      }
    }
  }
  return {v, part, du};
}

// [nchunks, chunk] of the dWm partial sums over `positions` patch positions.
std::vector<int64_t> cuda_stencil_chunks(int64_t positions) {
  int64_t nchunks = 0, chunk = 0;
  visual_stencil_bwd_chunks(positions, &nchunks, &chunk);
  return {nchunks, chunk};
}

}  // namespace
}  // namespace heba

// ---------------------------------------------------------------------------
// registration
// ---------------------------------------------------------------------------

// heba:: is shared with the Triton backend's ops (heba::triton_*): ours are cuda_*.
TORCH_LIBRARY_FRAGMENT(heba, m) {
  m.def(
      "cuda_visual_fwd(Tensor x, Tensor down_weight, Tensor mid_weight, Tensor up_weight, "
      "Tensor norm_weight, Tensor norm_bias, float scale, Tensor? scale_t, int num_prefix_tokens, "
      "int grid_h, int grid_w, bool batch_first, float eps, bool rescale_param_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cuda_visual_bwd(Tensor grad_out, Tensor x, Tensor down_weight, Tensor mid_weight, "
      "Tensor up_weight, Tensor norm_weight, Tensor u, Tensor g, Tensor z, Tensor mean, "
      "Tensor rstd, float scale, Tensor? scale_t, int num_prefix_tokens, int grid_h, int grid_w, "
      "bool batch_first, bool rescale_param_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cuda_text_fwd(Tensor x, Tensor down_weight, Tensor up_weight, Tensor norm_weight, "
      "Tensor norm_bias, float scale, Tensor? scale_t, float eps, bool rescale_param_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cuda_text_bwd(Tensor grad_out, Tensor x, Tensor down_weight, Tensor up_weight, "
      "Tensor norm_weight, Tensor u, Tensor g, Tensor z, Tensor mean, Tensor rstd, "
      "float scale, Tensor? scale_t, bool rescale_param_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cuda_low_rank_fwd(Tensor x, Tensor down_weight, Tensor? down_bias, Tensor up_weight, "
      "Tensor? up_bias, float alpha) -> Tensor");
  m.def(
      "cuda_low_rank_bwd(Tensor grad_out, Tensor x, Tensor down_weight, Tensor? down_bias, "
      "Tensor up_weight, Tensor? up_bias, float alpha) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // host probes of the kernels' index math, for the CPU tests
  m.def(
      "_cuda_stencil_host(Tensor u, Tensor wm, Tensor dv, int B, int N, int P, int H, int W, "
      "bool batch_major) -> (Tensor, Tensor, Tensor)");
  m.def("_cuda_stencil_chunks(int positions) -> int[]", &heba::cuda_stencil_chunks);
  // host-only: the launches of an op call, for the roofline model (benchmarks/roofline.py)
  m.def(
      "_cuda_launch_plan(str op, bool backward, int[] x_shape, int hidden, ScalarType x_dtype, "
      "ScalarType w_dtype, int num_prefix_tokens, int[] grid, bool bias, int sms) "
      "-> (str[], str[], int[])",
      &heba::cuda_launch_plan);
}

TORCH_LIBRARY_IMPL(heba, CPU, m) { m.impl("_cuda_stencil_host", &heba::cuda_stencil_host); }

TORCH_LIBRARY_IMPL(heba, CUDA, m) {
  m.impl("cuda_visual_fwd", &heba::cuda_visual_fwd);
  m.impl("cuda_visual_bwd", &heba::cuda_visual_bwd);
  m.impl("cuda_text_fwd", &heba::cuda_text_fwd);
  m.impl("cuda_text_bwd", &heba::cuda_text_bwd);
  m.impl("cuda_low_rank_fwd", &heba::cuda_low_rank_fwd);
  m.impl("cuda_low_rank_bwd", &heba::cuda_low_rank_bwd);
}

// A bare Python module: importing heba_kernels._C loads this library, which
// runs the registrations above. No pybind11 needed (and none of its compile time).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C",
      "heba CUDA kernels; importing this module registers torch.ops.heba.cuda_*", -1, nullptr};
  return PyModule_Create(&module_def);
}
