// NF4: 4-bit NormalFloat weights in bitsandbytes' exact layout (bnb.functional.quantize_4bit,
// quant_type="nf4"), optionally with double-quantized ("nested") absmax. Host-side type and the
// C++ API; the CUDA kernels live in kernels/nf4_*.cu, the CPU reference in src/quant/.
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <vector>

namespace qlora {

// One quantized weight. Layout (facts from bitsandbytes):
//  - blocks of `blocksize` consecutive elements of the row-major flattened weight; the last
//    block may be partial;
//  - packed byte j = (q[2j] << 4) | q[2j+1]: the first element in the high nibble;
//  - absmax: fp32 [nblocks] when !nested; when nested, uint8 codes [nblocks] into code2, with
//    absmax[b] = code2[absmax[b]] * absmax2[b / nested_blocksize] + offset.
struct NF4Tensor {
  at::Tensor packed;                 // uint8 [(numel + 1) / 2]
  at::Tensor absmax;                 // fp32 [nblocks] or uint8 [nblocks] (nested)
  at::Tensor absmax2;                // fp32 [ceil(nblocks / nested_blocksize)] (nested only)
  at::Tensor code2;                  // fp32 [256], the signed dynamic map (nested only)
  double offset = 0.0;               // mean of the fp32 absmax (nested only); stored as fp32
  bool nested = false;
  int64_t blocksize = 64;            // 32..4096, a power of two
  int64_t nested_blocksize = 256;
  std::vector<int64_t> shape;        // the original weight's shape, e.g. [out, in]
  at::ScalarType dtype = at::kBFloat16;  // the original weight's dtype (bnb's quant_state.dtype)

  int64_t numel() const;
  int64_t nblocks() const;
  at::Device device() const { return packed.device(); }
};

// The 16 NF4 code values (index 7 is 0.0).
const std::array<float, 16>& nf4_codebook();

// bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): 256 fp32 values.
const std::array<float, 256>& bnb_signed_dynamic_map();

// Quantize a fp32/fp16/bf16 weight of any shape, on CPU or CUDA (outputs on the same device; CUDA
// work is queued on the current stream). blocksize: 32..4096, a power of two. nested: double-
// quantize absmax as bitsandbytes' compress_statistics=True does (blocks of 256, signed dynamic
// map, offset = mean(absmax) in the deterministic order of kernels/nf4_common.cuh).
NF4Tensor nf4_quantize(const at::Tensor& weight, int64_t blocksize = 64, bool nested = true);

// Dequantize to a new tensor of t.shape and out_dtype (fp32, fp16 or bf16), on t's device.
at::Tensor nf4_dequantize(const NF4Tensor& t, at::ScalarType out_dtype);
inline at::Tensor nf4_dequantize(const NF4Tensor& t) { return nf4_dequantize(t, t.dtype); }

// Dequantize into a caller's buffer (the trainer reuses one scratch): `out` must be contiguous,
// fp32/fp16/bf16, on t's device, with t.numel() elements (its shape is left as it is).
void nf4_dequantize_out(const NF4Tensor& t, at::Tensor& out);

// Validate a (possibly untrusted, e.g. loaded from a file) NF4Tensor: blocksize, shape, dtypes,
// devices, contiguity and the lengths of packed/absmax/absmax2/code2 against shape and blocksize.
// Throws UserError naming the field, what was expected and what was found.
void nf4_check(const NF4Tensor& t);

// Number of quantization blocks of `numel` elements: ceil(numel / blocksize).
inline int64_t nf4_num_blocks(int64_t numel, int64_t blocksize) { return (numel + blocksize - 1) / blocksize; }

}  // namespace qlora
