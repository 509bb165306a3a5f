// Fused elementwise pieces of the decoder layer: RMSNorm and SwiGLU, forward and backward, as plain
// CUDA launchers (raw pointers, sizes, a stream). Semantics (what each output equals, rounding
// included) are written next to each launcher; the CPU references are in src/model/fused_layer.cpp.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "nf4.cuh"  // FloatType

namespace qlora::kernels {

// RMSNorm as transformers' LlamaRMSNorm computes it, per row of x [rows, hidden]:
//   r = rsqrt(mean(x^2) + eps)             (fp32; x read as fp32)
//   y = round_T(x * r);  out = round_T(w * y)   (w and out of x's type T)
// and r is stored in rstd [rows] (fp32) when rstd != nullptr, for the backward. With delta (and
// sum) given, the row normalized is the residual add s = round_T(x + delta), also written to sum
// (add_rms_norm: the layer's residual stream and its norm in one pass).
struct RmsNormForwardArgs {
  const void* x = nullptr;   // [rows, hidden], row stride hidden (contiguous)
  const void* delta = nullptr;  // nullptr, or [rows, hidden] added to x first
  void* sum = nullptr;       // [rows, hidden] when delta is given (x + delta), else nullptr
  const void* w = nullptr;   // [hidden]
  void* out = nullptr;       // [rows, hidden]
  float* rstd = nullptr;     // [rows] or nullptr
  FloatType type = FloatType::bf16;
  int64_t rows = 0;
  int64_t hidden = 0;
  float eps = 1e-6f;
};
cudaError_t rms_norm_forward(const RmsNormForwardArgs& args, cudaStream_t stream);

// d(loss)/dx of RMSNorm (w frozen), fp32 math, per row: g = w * dy; n = x * r;
//   dx = round_T(r * (g - n * mean(g * n))),
// or with dres (the gradient reaching x by the residual path), dx = round_T(that + dres): the sum
// autograd would make of the two T tensors, without the separate add.
struct RmsNormBackwardArgs {
  const void* dy = nullptr;    // [rows, hidden]
  const void* x = nullptr;     // [rows, hidden]
  const void* w = nullptr;     // [hidden]
  const float* rstd = nullptr; // [rows]
  const void* dres = nullptr;  // nullptr or [rows, hidden]
  void* dx = nullptr;          // [rows, hidden]
  FloatType type = FloatType::bf16;
  int64_t rows = 0;
  int64_t hidden = 0;
};
cudaError_t rms_norm_backward(const RmsNormBackwardArgs& args, cudaStream_t stream);

// SwiGLU of the Llama MLP, elementwise over n values: s = round_T(g / (1 + exp(-g))) (at::silu),
// out = round_T(s * u) (the product of two T tensors).
struct SwigluForwardArgs {
  const void* gate = nullptr;
  const void* up = nullptr;
  void* out = nullptr;
  FloatType type = FloatType::bf16;
  int64_t n = 0;
};
cudaError_t swiglu_forward(const SwigluForwardArgs& args, cudaStream_t stream);

// Its backward, as autograd computes silu(g) * u: d_up = round_T(dout * s) with s as above;
// t = round_T(dout * u); sig = 1 / (1 + exp(-g)); d_gate = round_T(t * sig * (1 + g * (1 - sig))).
struct SwigluBackwardArgs {
  const void* dout = nullptr;
  const void* gate = nullptr;
  const void* up = nullptr;
  void* d_gate = nullptr;
  void* d_up = nullptr;
  FloatType type = FloatType::bf16;
  int64_t n = 0;
};
cudaError_t swiglu_backward(const SwigluBackwardArgs& args, cudaStream_t stream);

// Rotary embedding as transformers applies it (half-split rotate_half), over x viewed as
// [batch, heads, seq, head_dim] with any strides but a contiguous last dim, cos/sin [batch, seq,
// head_dim] (row strides given, contiguous last dim). With h = head_dim / 2 and i < h:
//   forward:  out[i]   = round_T(round_T(x[i] c[i])     - round_T(x[i+h] s[i]))
//             out[i+h] = round_T(round_T(x[i+h] c[i+h]) + round_T(x[i] s[i+h]))
//   backward: dx[i]    = round_T(round_T(dy[i] c[i])     + round_T(dy[i+h] s[i+h]))
//             dx[i+h]  = round_T(round_T(dy[i+h] c[i+h]) - round_T(dy[i] s[i]))
// (x * cos + rotate_half(x) * sin and its autograd backward, each op rounded to T as ATen does).
// out is written with its own strides (same layout rules as x). head_dim must be even.
struct RopeArgs {
  const void* x = nullptr;  // forward: x; backward: dy
  const void* cos = nullptr;
  const void* sin = nullptr;
  void* out = nullptr;      // forward: out; backward: dx
  FloatType type = FloatType::bf16;
  bool backward = false;
  int64_t batch = 0, heads = 0, seq = 0, head_dim = 0;
  int64_t x_stride[3] = {0, 0, 0};    // batch, head, seq strides of x (elements)
  int64_t out_stride[3] = {0, 0, 0};  // the same for out
  int64_t cs_stride[2] = {0, 0};      // batch, seq strides of cos and sin (elements; one layout for both)
};
cudaError_t rope(const RopeArgs& args, cudaStream_t stream);

}  // namespace qlora::kernels
