// NF4 (bitsandbytes layout) CUDA launchers: plain CUDA, raw pointers, sizes and a stream; no
// torch headers. Semantics and layout: include/qlora/nf4.h. Every launcher returns the launch
// status (cudaGetLastError after the launch).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace qlora::kernels {

enum class FloatType { f32, f16, bf16 };

struct NF4DequantizeArgs {
  const uint8_t* packed = nullptr;       // [(numel + 1) / 2], high nibble first
  int64_t numel = 0;
  int blocksize = 64;                    // 32..4096, power of two
  // plain absmax
  const float* absmax = nullptr;         // [nblocks] fp32, when !nested
  // nested (double-quantized) absmax: am = code2[absmax_code[b]] * absmax2[b / nested_blocksize] + offset
  bool nested = false;
  const uint8_t* absmax_code = nullptr;  // [nblocks]
  const float* code2 = nullptr;          // [256]
  const float* absmax2 = nullptr;        // [ceil(nblocks / nested_blocksize)]
  float offset = 0.f;
  int nested_blocksize = 256;
  void* out = nullptr;                   // [numel] of out_type
  FloatType out_type = FloatType::bf16;
  // Launch variant of the dequant kernel (same arithmetic, same output; see kernels/nf4.cu):
  // 0 = the runtime's: plain stores, programmatic dependent launch on sm_90 (placed while the
  // previous kernel drains, waits for it before its first load); 1 = 0 with streaming
  // (evict-first) stores; 2 = 0 without PDL; 3 = 0 with the input loads issued before that wait,
  // valid only when no kernel ahead in the stream writes this weight's packed data or scales.
  // Only `qlora bench nf4` and the tests set it, to time and check the variants on a device.
  int variant = 0;
};
inline constexpr int kDequantizeVariants = 4;

// One pass: reads packed bytes and absmax codes, writes out; no temporary buffers.
cudaError_t nf4_dequantize(const NF4DequantizeArgs& args, cudaStream_t stream);

struct NF4QuantizeArgs {
  const void* in = nullptr;              // [numel] of in_type
  FloatType in_type = FloatType::bf16;
  int64_t numel = 0;
  int blocksize = 64;
  uint8_t* packed = nullptr;             // out: [(numel + 1) / 2]
  float* absmax = nullptr;               // out: [nblocks] fp32 absmax (before any double quantization)
};

// 4-bit part: per-block absmax and packed codes.
cudaError_t nf4_quantize(const NF4QuantizeArgs& args, cudaStream_t stream);

// Double quantization of an fp32 absmax vector, in place of bitsandbytes' compress_statistics:
// offset = mean(absmax) (deterministic order, see nf4_common.cuh), then (absmax - offset) in blocks
// of nested_blocksize quantized to uint8 codes of code2 with per-block fp32 absmax2.
// `offset_out` is a device pointer to one float.
cudaError_t nf4_double_quantize(const float* absmax, int64_t nblocks, int nested_blocksize, const float* code2,
                                uint8_t* absmax_code, float* absmax2, float* offset_out, double* scratch_1024,
                                cudaStream_t stream);

}  // namespace qlora::kernels
