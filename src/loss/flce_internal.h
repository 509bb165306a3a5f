// The fused linear cross-entropy's pieces for the qlora::fused_linear_cross_entropy op
// (src/ops/flce_ops.cpp), whose Autograd kernel must be traceable by AOTAutograd: it calls these
// through the helper ops _fused_linear_cross_entropy_fwd/_bwd, never directly. Same arithmetic as
// the C++ API's autograd function in src/loss/flce.cpp (the same chunk loop), so the op's numbers
// equal the trainer's. No autograd anywhere here.
#pragma once
#include <ATen/ATen.h>

#include <tuple>

#include "qlora/flce.h"

namespace qlora {

// True while the current stream of `device` is capturing a CUDA graph (torch.compile's
// "reduce-overhead", at::cuda::CUDAGraph): no read-back to the host and no driver query that may
// synchronize (cudaMemGetInfo) are allowed then. False on CPU.
bool flce_stream_capturing(const at::Device& device);

// The option checks of fused_linear_cross_entropy (host values only).
void flce_check_options(const FlceOptions& o);

// Per-token losses [N] fp32 (ignored tokens 0) and, when asked, the gradients of their SUM: dx
// [N,H] in X's dtype, dw [V,H] fp32; an empty [0] tensor for a gradient not asked for. Checks the
// inputs (labels' range on CPU). o.reduction and o.normalizer are not used.
std::tuple<at::Tensor, at::Tensor, at::Tensor> flce_loss_rows_and_grads(const at::Tensor& X, const at::Tensor& W,
                                                                        const at::Tensor& labels, const FlceOptions& o,
                                                                        bool need_dx, bool need_dw);

// The gradients of sum(grad_rows * loss_rows) (reduction "none"), recomputing the logits chunk by
// chunk: dx [N,H] in X's dtype, dw [V,H] in W's dtype; [0] when not asked.
std::tuple<at::Tensor, at::Tensor> flce_loss_rows_backward(const at::Tensor& grad_rows, const at::Tensor& X,
                                                           const at::Tensor& W, const at::Tensor& labels,
                                                           const FlceOptions& o, bool need_dx, bool need_dw);

}  // namespace qlora
