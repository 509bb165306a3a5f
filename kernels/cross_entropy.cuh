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
};

cudaError_t cross_entropy_chunk(const CrossEntropyChunkArgs& args, cudaStream_t stream);

}  // namespace qlora::kernels
