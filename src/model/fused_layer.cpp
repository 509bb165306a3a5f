// Fused RMSNorm, SwiGLU and RoPE (include/qlora/fused_layer.h): CPU references in ATen ops, CUDA
// launches of kernels/fused_layer.cu, and the autograd functions the layer loop uses on CUDA.
#include "qlora/fused_layer.h"

#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include <atomic>
#include <vector>

#ifdef QLORA_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "fused_layer.cuh"
#endif

namespace qlora {

namespace {
std::atomic<bool> g_fused_kernels{true};

void check_float(const at::Tensor& t, const char* what, const char* op) {
  const at::ScalarType s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, op, ": ", what,
              " must be float32, float16 or bfloat16, found ", s);
}

void check_same(const at::Tensor& a, const at::Tensor& b, const char* what_a, const char* what_b, const char* op) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && a.device() == b.device(), op, ": ", what_a, " (",
              a.scalar_type(), ", ", a.device(), ") and ", what_b, " (", b.scalar_type(), ", ", b.device(),
              ") must have one type and device");
}

void check_norm_args(const at::Tensor& x, const at::Tensor& w, const char* op) {
  check_float(x, "x", op);
  check_same(x, w, "x", "w", op);
  TORCH_CHECK(x.dim() >= 1 && w.dim() == 1 && w.size(0) == x.size(-1), op, ": w must be [", x.size(-1),
              "] for x ", x.sizes(), ", found ", w.sizes());
}

#ifdef QLORA_WITH_CUDA
kernels::FloatType float_type(at::ScalarType t) {
  return t == at::kFloat ? kernels::FloatType::f32 : t == at::kHalf ? kernels::FloatType::f16 : kernels::FloatType::bf16;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " launch failed: ", cudaGetErrorString(err));
}

// The forward kernel on contiguous x [..., hidden] and w: (sum, out, rstd); with delta (x's shape,
// contiguous) the row normalized is x + delta, returned as sum (add_rms_norm), else sum is undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_forward_cuda(const at::Tensor& x, const at::Tensor& delta,
                                                                     const at::Tensor& w, double eps, bool want_rstd) {
  const int64_t hidden = x.size(-1), rows = x.numel() / hidden;
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  at::Tensor sum = delta.defined() ? at::empty_like(x) : at::Tensor();
  at::Tensor rstd = want_rstd ? at::empty({rows}, x.options().dtype(at::kFloat)) : at::Tensor();
  kernels::RmsNormForwardArgs a;
  a.x = x.data_ptr();
  a.delta = delta.defined() ? delta.data_ptr() : nullptr;
  a.sum = delta.defined() ? sum.data_ptr() : nullptr;
  a.w = w.data_ptr();
  a.out = out.data_ptr();
  a.rstd = want_rstd ? rstd.data_ptr<float>() : nullptr;
  a.type = float_type(x.scalar_type());
  a.rows = rows;
  a.hidden = hidden;
  a.eps = static_cast<float>(eps);
  check_launch(kernels::rms_norm_forward(a, at::cuda::getCurrentCUDAStream(x.device().index())),
               delta.defined() ? "add_rms_norm" : "rms_norm_forward");
  return {sum, out, rstd};
}
#endif
}  // namespace

void set_fused_kernels(bool on) { g_fused_kernels = on; }
bool fused_kernels() { return g_fused_kernels; }
bool use_fused_kernels(const at::Tensor& x) {
  return x.is_cuda() && g_fused_kernels && !torch::jit::tracer::isTracing();
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fused_forward(const at::Tensor& x_in, const at::Tensor& w_in, double eps,
                                                          bool want_rstd) {
  check_norm_args(x_in, w_in, "rms_norm");
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const int64_t hidden = x.size(-1), rows = x.numel() / hidden;
#ifdef QLORA_WITH_CUDA
  if (x.is_cuda()) {
    auto [sum, out, rstd] = rms_norm_forward_cuda(x, at::Tensor(), w, eps, want_rstd);
    return {out, rstd};
  }
#endif
  // The reference: transformers' arithmetic, the fp32 1/rms kept.
  const at::Tensor h = x.to(at::kFloat);
  const at::Tensor r = at::rsqrt(h.pow(2).mean(-1, /*keepdim=*/true) + eps);
  const at::Tensor out = w * (h * r).to(x.scalar_type());
  return {out, want_rstd ? r.reshape({rows}) : at::Tensor()};
}

at::Tensor rms_norm_fused_backward(const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& w_in,
                                   const at::Tensor& rstd, const at::Tensor& residual_grad) {
  check_norm_args(x_in, w_in, "rms_norm backward");
  check_same(dy_in, x_in, "dy", "x", "rms_norm backward");
  TORCH_CHECK(dy_in.sizes() == x_in.sizes(), "rms_norm backward: dy ", dy_in.sizes(), " must have x's shape ",
              x_in.sizes());
  if (residual_grad.defined()) {
    check_same(residual_grad, x_in, "residual_grad", "x", "rms_norm backward");
    TORCH_CHECK(residual_grad.sizes() == x_in.sizes(), "rms_norm backward: residual_grad ", residual_grad.sizes(),
                " must have x's shape ", x_in.sizes());
  }
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous(), dy = dy_in.contiguous();
  const at::Tensor dres = residual_grad.defined() ? residual_grad.contiguous() : at::Tensor();
  const int64_t hidden = x.size(-1), rows = x.numel() / hidden;
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.numel() == rows && rstd.device() == x.device(),
              "rms_norm backward: rstd must be fp32 [", rows, "] on ", x.device(), ", found ", rstd.scalar_type(), " ",
              rstd.sizes());
#ifdef QLORA_WITH_CUDA
  if (x.is_cuda()) {
    const c10::cuda::CUDAGuard guard(x.device());
    at::Tensor dx = at::empty_like(x);
    const at::Tensor r = rstd.contiguous();
    kernels::RmsNormBackwardArgs a;
    a.dy = dy.data_ptr();
    a.x = x.data_ptr();
    a.w = w.data_ptr();
    a.rstd = r.data_ptr<float>();
    a.dres = dres.defined() ? dres.data_ptr() : nullptr;
    a.dx = dx.data_ptr();
    a.type = float_type(x.scalar_type());
    a.rows = rows;
    a.hidden = hidden;
    check_launch(kernels::rms_norm_backward(a, at::cuda::getCurrentCUDAStream(x.device().index())), "rms_norm_backward");
    return dx;
  }
#endif
  const at::Tensor r = rstd.reshape({rows, 1});
  const at::Tensor g = w.to(at::kFloat) * dy.reshape({rows, hidden}).to(at::kFloat);
  const at::Tensor n = x.reshape({rows, hidden}).to(at::kFloat) * r;
  const at::Tensor mean_dot = (g * n).sum(-1, /*keepdim=*/true) / static_cast<double>(hidden);
  const at::Tensor dx = (r * (g - n * mean_dot)).to(x.scalar_type()).view(x.sizes());
  return dres.defined() ? dx + dres : dx;  // autograd's sum of the two gradients, in x's type
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_fused_forward(const at::Tensor& h_in, const at::Tensor& delta_in,
                                                                          const at::Tensor& w, double eps, bool want_rstd) {
  check_norm_args(h_in, w, "add_rms_norm");
  check_same(h_in, delta_in, "h", "delta", "add_rms_norm");
  TORCH_CHECK(h_in.sizes() == delta_in.sizes(), "add_rms_norm: h ", h_in.sizes(), " and delta ", delta_in.sizes(),
              " must have one shape");
#ifdef QLORA_WITH_CUDA
  if (h_in.is_cuda()) return rms_norm_forward_cuda(h_in.contiguous(), delta_in.contiguous(), w.contiguous(), eps, want_rstd);
#endif
  const at::Tensor sum = h_in + delta_in;
  auto [out, rstd] = rms_norm_fused_forward(sum, w, eps, want_rstd);
  return {sum, out, rstd};
}

namespace {
void check_swiglu_args(const at::Tensor& gate, const at::Tensor& up, const char* op) {
  check_float(gate, "gate", op);
  check_same(gate, up, "gate", "up", op);
  TORCH_CHECK(gate.sizes() == up.sizes(), op, ": gate ", gate.sizes(), " and up ", up.sizes(), " must have one shape");
}
}  // namespace

at::Tensor swiglu_fused_forward(const at::Tensor& gate_in, const at::Tensor& up_in) {
  check_swiglu_args(gate_in, up_in, "swiglu");
#ifdef QLORA_WITH_CUDA
  if (gate_in.is_cuda()) {
    const at::Tensor gate = gate_in.contiguous(), up = up_in.contiguous();
    const c10::cuda::CUDAGuard guard(gate.device());
    at::Tensor out = at::empty_like(gate);
    kernels::SwigluForwardArgs a;
    a.gate = gate.data_ptr();
    a.up = up.data_ptr();
    a.out = out.data_ptr();
    a.type = float_type(gate.scalar_type());
    a.n = gate.numel();
    check_launch(kernels::swiglu_forward(a, at::cuda::getCurrentCUDAStream(gate.device().index())), "swiglu_forward");
    return out;
  }
#endif
  return at::silu(gate_in) * up_in;
}

std::tuple<at::Tensor, at::Tensor> swiglu_fused_backward(const at::Tensor& dout_in, const at::Tensor& gate_in,
                                                         const at::Tensor& up_in) {
  check_swiglu_args(gate_in, up_in, "swiglu backward");
  check_swiglu_args(dout_in, gate_in, "swiglu backward");
#ifdef QLORA_WITH_CUDA
  if (gate_in.is_cuda()) {
    const at::Tensor dout = dout_in.contiguous(), gate = gate_in.contiguous(), up = up_in.contiguous();
    const c10::cuda::CUDAGuard guard(gate.device());
    at::Tensor d_gate = at::empty_like(gate), d_up = at::empty_like(up);
    kernels::SwigluBackwardArgs a;
    a.dout = dout.data_ptr();
    a.gate = gate.data_ptr();
    a.up = up.data_ptr();
    a.d_gate = d_gate.data_ptr();
    a.d_up = d_up.data_ptr();
    a.type = float_type(gate.scalar_type());
    a.n = gate.numel();
    check_launch(kernels::swiglu_backward(a, at::cuda::getCurrentCUDAStream(gate.device().index())), "swiglu_backward");
    return {d_gate, d_up};
  }
#endif
  // Autograd's arithmetic for silu(gate) * up: the product rule, then silu_backward.
  const at::Tensor d_up = dout_in * at::silu(gate_in);
  const at::Tensor d_gate = at::silu_backward(dout_in * up_in, gate_in);
  return {d_gate, d_up};
}

namespace {

void check_rope_args(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const char* op) {
  check_float(x, "x", op);
  check_same(x, cos, "x", "cos", op);
  check_same(x, sin, "x", "sin", op);
  TORCH_CHECK(x.dim() == 4 && x.size(-1) % 2 == 0, op, ": x must be [batch, heads, seq, head_dim] with an even head_dim, found ",
              x.sizes());
  const std::vector<int64_t> want = {x.size(0), x.size(2), x.size(3)};
  TORCH_CHECK(cos.sizes() == at::IntArrayRef(want) && sin.sizes() == at::IntArrayRef(want), op, ": cos and sin must be ",
              at::IntArrayRef(want), " for x ", x.sizes(), ", found ", cos.sizes(), " and ", sin.sizes());
}

// The rotation's other half: forward rotate_half(v) = cat(-v[h:], v[:h]); the backward's
// transpose cat(v[h:], -v[:h]).
at::Tensor rotate_half(const at::Tensor& v, bool transpose) {
  const int64_t h = v.size(-1) / 2;
  const at::Tensor lo = v.narrow(-1, 0, h), hi = v.narrow(-1, h, h);
  return transpose ? at::cat({hi, -lo}, -1) : at::cat({-hi, lo}, -1);
}

#ifdef QLORA_WITH_CUDA
at::Tensor rope_cuda(const at::Tensor& x_in, const at::Tensor& cos_in, const at::Tensor& sin_in, bool backward) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.stride(-1) == 1 ? x_in : x_in.contiguous();
  const at::Tensor cos = cos_in.contiguous(), sin = sin_in.contiguous();
  // Output in x's layout (e.g. [B, T, heads, D] memory seen as [B, heads, T, D]).
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Preserve);
  if (out.stride(-1) != 1) out = at::empty(x.sizes(), x.options());
  kernels::RopeArgs a;
  a.x = x.data_ptr();
  a.cos = cos.data_ptr();
  a.sin = sin.data_ptr();
  a.out = out.data_ptr();
  a.type = float_type(x.scalar_type());
  a.backward = backward;
  a.batch = x.size(0), a.heads = x.size(1), a.seq = x.size(2), a.head_dim = x.size(3);
  for (int d = 0; d < 3; ++d) a.x_stride[d] = x.stride(d), a.out_stride[d] = out.stride(d);
  a.cs_stride[0] = cos.stride(0), a.cs_stride[1] = cos.stride(1);
  check_launch(kernels::rope(a, at::cuda::getCurrentCUDAStream(x.device().index())), "rope");
  return out;
}
#endif

}  // namespace

at::Tensor rope_fused_forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_rope_args(x, cos, sin, "rope");
#ifdef QLORA_WITH_CUDA
  if (x.is_cuda()) return rope_cuda(x, cos, sin, false);
#endif
  return x * cos.unsqueeze(1) + rotate_half(x, false) * sin.unsqueeze(1);  // = apply_rotary's ATen ops
}

at::Tensor rope_fused_backward(const at::Tensor& dy, const at::Tensor& cos, const at::Tensor& sin) {
  check_rope_args(dy, cos, sin, "rope backward");
#ifdef QLORA_WITH_CUDA
  if (dy.is_cuda()) return rope_cuda(dy, cos, sin, true);
#endif
  // Autograd's arithmetic: dy * cos, plus the transposed rotation of dy * sin.
  return dy * cos.unsqueeze(1) + rotate_half(dy * sin.unsqueeze(1), true);
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct RmsNormFunction : public torch::autograd::Function<RmsNormFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, double eps) {
    auto [out, rstd] = rms_norm_fused_forward(x, w, eps, /*want_rstd=*/true);
    ctx->save_for_backward({x, w, rstd});
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list s = ctx->get_saved_variables();
    return {rms_norm_fused_backward(grad_outputs[0], s[0], s[1], s[2]), at::Tensor(), at::Tensor()};
  }
};

// (norm(x), x): x handed back as a second output so that the gradient reaching it by the residual
// path comes to this backward, which adds it in the norm's kernel (one pass instead of autograd's
// separate add of the two gradients).
struct RmsNormKeepInputFunction : public torch::autograd::Function<RmsNormKeepInputFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, double eps) {
    auto [out, rstd] = rms_norm_fused_forward(x, w, eps, /*want_rstd=*/true);
    ctx->save_for_backward({x, w, rstd});
    return {out, x};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list s = ctx->get_saved_variables();
    return {rms_norm_fused_backward(grad_outputs[0], s[0], s[1], s[2], grad_outputs[1]), at::Tensor(), at::Tensor()};
  }
};

// (h + delta, norm(h + delta)): the residual add and the next norm in one kernel; the backward adds
// the sum's own gradient into the norm's, and both inputs get that one gradient.
struct AddRmsNormFunction : public torch::autograd::Function<AddRmsNormFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& delta, const at::Tensor& w,
                               double eps) {
    auto [sum, out, rstd] = add_rms_norm_fused_forward(h, delta, w, eps, /*want_rstd=*/true);
    ctx->save_for_backward({sum, w, rstd});
    return {sum, out};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor d = rms_norm_fused_backward(grad_outputs[1], s[0], s[1], s[2], grad_outputs[0]);
    return {d, d, at::Tensor(), at::Tensor()};
  }
};

struct SwigluFunction : public torch::autograd::Function<SwigluFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up) {
    ctx->save_for_backward({gate, up});
    return swiglu_fused_forward(gate, up);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list s = ctx->get_saved_variables();
    auto [d_gate, d_up] = swiglu_fused_backward(grad_outputs[0], s[0], s[1]);
    return {d_gate, d_up};
  }
};

struct RopeFunction : public torch::autograd::Function<RopeFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
    ctx->save_for_backward({cos, sin});
    return rope_fused_forward(x, cos, sin);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list s = ctx->get_saved_variables();
    return {rope_fused_backward(grad_outputs[0], s[0], s[1]), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor rope_fused(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(!at::GradMode::is_enabled() || (!cos.requires_grad() && !sin.requires_grad()),
              "rope_fused: cos and sin must be frozen (they get no gradient)");
  if (!at::GradMode::is_enabled() || !x.requires_grad()) return rope_fused_forward(x, cos, sin);
  return RopeFunction::apply(x, cos, sin);
}

at::Tensor rms_norm_fused(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(!w.requires_grad() || !at::GradMode::is_enabled(),
              "rms_norm_fused: the norm weight must be frozen (it gets no gradient)");
  if (!at::GradMode::is_enabled() || !x.requires_grad()) return std::get<0>(rms_norm_fused_forward(x, w, eps, false));
  return RmsNormFunction::apply(x, w, eps);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fused_keep_input(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(!w.requires_grad() || !at::GradMode::is_enabled(),
              "rms_norm_fused_keep_input: the norm weight must be frozen (it gets no gradient)");
  if (!at::GradMode::is_enabled() || !x.requires_grad()) return {std::get<0>(rms_norm_fused_forward(x, w, eps, false)), x};
  const variable_list r = RmsNormKeepInputFunction::apply(x, w, eps);
  return {r[0], r[1]};
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_fused(const at::Tensor& h, const at::Tensor& delta, const at::Tensor& w,
                                                      double eps) {
  TORCH_CHECK(!w.requires_grad() || !at::GradMode::is_enabled(),
              "add_rms_norm_fused: the norm weight must be frozen (it gets no gradient)");
  if (!at::GradMode::is_enabled() || (!h.requires_grad() && !delta.requires_grad())) {
    auto [sum, out, rstd] = add_rms_norm_fused_forward(h, delta, w, eps, false);
    return {sum, out};
  }
  const variable_list r = AddRmsNormFunction::apply(h, delta, w, eps);
  return {r[0], r[1]};
}

at::Tensor swiglu_fused(const at::Tensor& gate, const at::Tensor& up) {
  if (!at::GradMode::is_enabled() || (!gate.requires_grad() && !up.requires_grad()))
    return swiglu_fused_forward(gate, up);
  return SwigluFunction::apply(gate, up);
}

}  // namespace qlora
