// Fused RMSNorm, SwiGLU and RoPE (issue 11): the decoder layer's elementwise pieces as single kernels on
// CUDA (kernels/fused_layer.cu), with ATen references of the same arithmetic on CPU. Used by
// rms_norm(), apply_rotary() and the MLP of the layer loop on CUDA unless switched off (set_fused_kernels(false),
// config `fused_kernels: false`, `qlora bench train --no-fused-kernels`).
#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace qlora {

// Process-wide switch (default on): whether the layer loop uses the fused kernels on CUDA.
void set_fused_kernels(bool on);
bool fused_kernels();
// Whether the layer loop takes the fused kernels for a tensor: on CUDA, the switch on, and the C++
// tracer not recording (qlora export / check-compile keep plain ATen ops in their graphs).
bool use_fused_kernels(const at::Tensor& x);

// RMSNorm as transformers computes it (see kernels/fused_layer.cuh): x [..., hidden], w [hidden],
// both of one float type. Returns out (x's shape and type) and, when want_rstd, 1/rms per row
// (fp32, [rows]) for the backward. CPU: ATen ops of the same arithmetic (the reference); CUDA: the
// kernel.
std::tuple<at::Tensor, at::Tensor> rms_norm_fused_forward(const at::Tensor& x, const at::Tensor& w, double eps,
                                                          bool want_rstd);
// dx of RMSNorm (w frozen) from dy, x, w and the forward's rstd; with residual_grad (x's shape and
// type: the gradient reaching x by another path), dx + residual_grad as autograd would sum them.
at::Tensor rms_norm_fused_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                                   const at::Tensor& rstd, const at::Tensor& residual_grad = at::Tensor());
// The residual add and the norm after it: (sum = h + delta in their type, RMSNorm(sum), rstd).
std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_fused_forward(const at::Tensor& h, const at::Tensor& delta,
                                                                          const at::Tensor& w, double eps, bool want_rstd);
// silu(gate) * up, rounded as at::silu then a product of two tensors of their type.
at::Tensor swiglu_fused_forward(const at::Tensor& gate, const at::Tensor& up);
// (d_gate, d_up) of silu(gate) * up, as autograd computes them.
std::tuple<at::Tensor, at::Tensor> swiglu_fused_backward(const at::Tensor& dout, const at::Tensor& gate,
                                                         const at::Tensor& up);

// Rotary embedding x * cos + rotate_half(x) * sin (transformers' half split) for x [B, heads, T,
// head_dim] (any strides, e.g. a transposed projection output) and cos/sin [B, T, head_dim] of x's
// type; head_dim even. The output has x's shape and layout. rope_fused_backward: dx from dy.
at::Tensor rope_fused_forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor rope_fused_backward(const at::Tensor& dy, const at::Tensor& cos, const at::Tensor& sin);

// Differentiable forms (custom autograd functions over the above): RMSNorm differentiable in x
// only (w frozen: QLoRA trains adapters, not norms); SwiGLU in gate and up. Saved for the
// backward: x and rstd; gate and up (not silu(gate)).
at::Tensor rms_norm_fused(const at::Tensor& x, const at::Tensor& w, double eps);
at::Tensor swiglu_fused(const at::Tensor& gate, const at::Tensor& up);
at::Tensor rope_fused(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);  // in x; cos/sin frozen
// The decoder layer's norms with the residual stream's gradient folded into the norm's backward
// kernel (values and gradients bit for bit those of rms_norm_fused and a separate add):
// rms_norm_fused_keep_input returns (norm(x), x), x to be read by the residual add instead of the
// caller's x; add_rms_norm_fused returns (h + delta, norm(h + delta)).
std::tuple<at::Tensor, at::Tensor> rms_norm_fused_keep_input(const at::Tensor& x, const at::Tensor& w, double eps);
std::tuple<at::Tensor, at::Tensor> add_rms_norm_fused(const at::Tensor& h, const at::Tensor& delta, const at::Tensor& w,
                                                      double eps);

}  // namespace qlora
