// Cross-entropy over one chunk of logits, computed and differentiated in place (the fast path of
// the fused linear + cross-entropy loss): plain CUDA launchers, raw pointers, sizes, a stream.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "nf4.cuh"  // FloatType

namespace qlora::kernels {

struct CrossEntropyChunkArgs {
  void* logits = nullptr;          // [rows, vocab] of logits_type, row stride `ld` elements;
                                   // overwritten with d(loss)/d(logits) when grad_scale != 0
  FloatType logits_type = FloatType::bf16;
  int64_t rows = 0;
  int64_t vocab = 0;
  int64_t ld = 0;                  // row stride in elements (>= vocab)
  const int64_t* labels = nullptr; // [rows]; ignore_index rows contribute 0 loss and 0 gradient
  int64_t ignore_index = -100;
  float logit_scale = 1.0f;        // z = logit_scale * logits
  float softcap = 0.0f;            // > 0: z = softcap * tanh(z / softcap)
  float z_loss = 0.0f;             // adds z_loss * logsumexp(z)^2 per row
  float* loss = nullptr;           // out: [rows] fp32 per-row loss (0 for ignored rows)
  float* lse = nullptr;            // out (optional): [rows] fp32 logsumexp of z (0 for ignored rows)
  float grad_scale = 0.0f;         // gradient written = grad_scale * d(row loss)/d(logits); 0: no gradient
  const float* grad_row_scale = nullptr;  // optional [rows] fp32 device: row r's gradient is also
                                          // multiplied by grad_row_scale[r] (per-token weights, e.g.
                                          // grad_output of reduction "none"); read only when grad_scale != 0
  int cluster_ctas = 0;            // which kernel (kernels/cross_entropy.cu): 0 = the launcher's choice (the
                                   // one-read kernel where it applies, else the two-pass one); -1 = the
                                   // two-pass kernel; 1..8 = the one-read kernel with this many CTAs per row
                                   // (cudaErrorNotSupported where the device or the row cannot take it).
                                   // Forced values are for tests and `qlora bench ce`; ignored when
                                   // grad_scale == 0 (loss only reads each row once anyway).
};

// Errors: cudaErrorInvalidValue for bad arguments (nothing launched), cudaErrorNotSupported for a
// forced cluster_ctas the device cannot run, else the launch's status.
cudaError_t cross_entropy_chunk(const CrossEntropyChunkArgs& args, cudaStream_t stream);

// The CTAs per row the launcher uses for rows x vocab of `type` (gradient: grad_scale != 0) with
// cluster_ctas = `requested`: 0 = the two-pass kernel, 1..8 = the one-read kernel, -1 = a forced
// size that cannot run here. On the current CUDA device.
int cross_entropy_resident_ctas(int64_t rows, int64_t vocab, FloatType type, bool gradient, int requested);

}  // namespace qlora::kernels
