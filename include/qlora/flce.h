// Fused chunked linear + cross-entropy (issue 5): the LM head's loss computed and differentiated one
// chunk of rows at a time, so that the N x V logits never exist; plus the generic form that takes
// any per-chunk loss written with ATen ops and gets its logits gradient from autograd.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <string>
#include <tuple>

namespace qlora {

struct FlceOptions {
  int64_t ignore_index = -100;
  enum class Reduction { mean, sum, none } reduction = Reduction::mean;
  // > 0 (reduction mean only): divide the summed loss by this (the global non-ignored token count
  // of the optimizer step across micro-batches and ranks) instead of the local count, so that
  // gradient accumulation over k micro-batches equals one batch k times larger.
  double normalizer = 0;
  double logit_scale = 1;  // z = logit_scale * (X W^T)
  double softcap = 0;      // > 0: z = softcap * tanh(z / softcap)
  double z_loss = 0;       // adds z_loss * logsumexp(z)^2 per token
  int64_t chunk_size = 0;  // rows per chunk; 0: chosen from free memory (CUDA) or a default (CPU)
};

// "mean" / "sum" / "none" -> Reduction; anything else is a UserError naming the value.
FlceOptions::Reduction flce_reduction_from_string(const std::string& s);

// Loss of logits = X W^T against labels. X [N,H] and W [V,H] of one dtype (fp32, fp16, bf16) on one
// device, labels [N] int64. Differentiable w.r.t. X and, when W.requires_grad(), W (no dW work or
// buffer otherwise). Returns an fp32 scalar (mean, sum) or fp32 [N] per-token losses (none;
// ignored tokens 0). Mean over zero non-ignored tokens is 0, with zero gradients.
// logsumexp/softmax in fp32; dW accumulated in fp32 and cast to W's dtype at the end.
// Rows labelled ignore_index are dropped before any GEMM (their dX is 0; nothing of them, not even
// a NaN, reaches dW); on CUDA that costs one read-back of the kept count per call.
at::Tensor fused_linear_cross_entropy(const at::Tensor& X, const at::Tensor& W, const at::Tensor& labels,
                                      const FlceOptions& options = {});

// The same loss with no autograd at all (no gradient work): the op's CPU/CUDA kernels.
at::Tensor fused_linear_cross_entropy_forward(const at::Tensor& X, const at::Tensor& W, const at::Tensor& labels,
                                              const FlceOptions& options);

// Closed-form cross-entropy over one chunk, in place: logits_chunk is fp32 [n,V] contiguous, labels
// [n] int64. Returns (loss_rows [n] fp32, 0 for ignored rows; lse [n] fp32, logsumexp of the
// transformed logits z, 0 for ignored rows). When grad_scale != 0,
// logits_chunk is overwritten with grad_scale * d(row loss)/d(logits) (0 on ignored rows); when it
// is 0 the chunk is left in an unspecified state. This is the CPU reference of
// kernels/cross_entropy.cuh (same arguments, same outputs).
std::tuple<at::Tensor, at::Tensor> cross_entropy_chunk_reference(at::Tensor& logits_chunk, const at::Tensor& labels,
                                                                 const FlceOptions& options, double grad_scale);

// Rows per chunk for N rows of a V-wide vocabulary in `dtype` on `device`: options.chunk_size when
// > 0, else from free device memory (CUDA) or a fixed budget (CPU); larger chunks when W is
// trainable (its dW GEMM is slow at small chunks), the rows spread evenly over the fewest chunks
// the budget allows. Always in [1, max(N,1)].
int64_t flce_chunk_rows(int64_t N, int64_t V, at::ScalarType dtype, const at::Device& device, int64_t chunk_size,
                        bool w_trainable = false);

// ---- generic form ------------------------------------------------------------------------------

// A loss over one chunk: logits_chunk [n,V] fp32 (a leaf that requires grad), labels_chunk [n];
// returns the SUM of the chunk's per-token losses as a scalar, written with differentiable ATen ops.
using ChunkLoss = std::function<at::Tensor(const at::Tensor& logits_chunk, const at::Tensor& labels_chunk)>;

// sum over chunks of loss(X_c W^T, labels_c), divided by divide_by (> 0). Differentiable w.r.t. X and
// (when it requires grad) W; d(loss)/d(logits) of each chunk comes from torch::autograd::grad on
// the user's function, never from a hand-written derivative. chunk_size 0: as flce_chunk_rows.
at::Tensor chunked_linear_loss(const at::Tensor& X, const at::Tensor& W, const at::Tensor& labels,
                               const ChunkLoss& loss, int64_t chunk_size = 0, double divide_by = 1);

// Three losses for the generic form, written plainly (the tests compare them with the CE path).
ChunkLoss cross_entropy_chunk_loss(int64_t ignore_index = -100);
ChunkLoss softcap_cross_entropy_chunk_loss(double softcap, int64_t ignore_index = -100);
ChunkLoss z_loss_cross_entropy_chunk_loss(double z_loss, int64_t ignore_index = -100);

}  // namespace qlora
