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

}  // namespace qlora
