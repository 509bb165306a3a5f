// NF4 host side: the codebooks, validation of NF4Tensor, the CPU reference quantize/dequantize
// (plain loops over blocks, the oracle for the CUDA kernels) and the device dispatch of the API.
#include "qlora/shape_str.h"
#include "qlora/nf4.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <string>

#include "qlora/error.h"
// The host reference uses the same scalar arithmetic as the CUDA kernels (kernels/ is on
// qlora_core's include path in every build).
#include "nf4_common.cuh"

#ifdef QLORA_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "nf4.cuh"
#endif

namespace qlora {

namespace kq = qlora::kernels;

// ---- codebooks --------------------------------------------------------------------------------

const std::array<float, 16>& nf4_codebook() {
  static const std::array<float, 16> code = [] {
    std::array<float, 16> c{};
    for (int i = 0; i < 16; ++i) c[i] = kq::kNF4Codebook[i];
    return c;
  }();
  return code;
}

// bitsandbytes/functional.py create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8),
// rebuilt step by step in the precision bnb (through torch, on the CPU) uses:
//  - for i in 0..6: boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=float32);
//    means = (boundaries[:-1] + boundaries[1:]) / 2.0 (fp32); data += 10**(i-6) * means and
//    -(10**(i-6)) * means (a python float scalar times an fp32 tensor: the scalar is rounded to
//    fp32 and the product is an fp32 multiply); no "additional items" (2**(7-7) - 1 == 0);
//  - data += [0, 1.0]; data.sort(); 256 values.
// torch's CPU linspace (aten/src/ATen/native/cpu/RangeFactoriesKernel.cpp) computes
// `start + step * idx` for the first half and `end - step * (steps - idx - 1)` for the second, with
// step = (end - start) / (steps - 1) in fp32. The kernel is built once per CPU capability, and
// the AVX2/AVX512 builds (every x86 machine bnb runs on in practice) contract these into FMAs;
// we use std::fma so the map matches theirs (checked against torch 2.11 in tests/test_nf4.cpp).
static std::array<float, 256> build_signed_dynamic_map() {
  std::vector<float> data;
  for (int i = 0; i < 7; ++i) {
    const int steps = (1 << i) + 1;
    const float start = 0.1f, end = 1.0f;
    const float step = (end - start) / static_cast<float>(steps - 1);
    std::vector<float> bounds(steps);
    for (int k = 0; k < steps; ++k)
      bounds[k] = k < steps / 2 ? std::fma(step, static_cast<float>(k), start)
                                : std::fma(-step, static_cast<float>(steps - k - 1), end);
    const float scale = static_cast<float>(std::pow(10.0, -6 + i));  // python: 10 ** (-(7 - 1) + i)
    for (int k = 0; k + 1 < steps; ++k) {
      const float mean = (bounds[k] + bounds[k + 1]) / 2.0f;
      data.push_back(scale * mean);
      data.push_back(-scale * mean);
    }
  }
  data.push_back(0.0f);
  data.push_back(1.0f);
  std::sort(data.begin(), data.end());
  std::array<float, 256> out{};
  TORCH_INTERNAL_ASSERT(data.size() == out.size());
  std::copy(data.begin(), data.end(), out.begin());
  return out;
}

const std::array<float, 256>& bnb_signed_dynamic_map() {
  static const std::array<float, 256> map = build_signed_dynamic_map();
  return map;
}

// ---- NF4Tensor ----------------------------------------------------------------------------------

int64_t NF4Tensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

int64_t NF4Tensor::nblocks() const { return nf4_num_blocks(numel(), blocksize); }

namespace {

bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

bool is_float_type(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

[[noreturn]] void fail(const std::string& msg) { throw UserError("NF4 tensor: " + msg); }

void check_blocksize(int64_t blocksize) {
  if (!is_pow2(blocksize) || blocksize < 32 || blocksize > 4096)
    fail("blocksize must be a power of two in 32..4096, found " + std::to_string(blocksize));
}

// One component tensor: defined, of `dtype`, contiguous, on `device`, with `expected` elements.
// `why` builds the explanation of `expected` only on failure (this runs before every dequant).
template <typename Why>
void check_part(const at::Tensor& x, const char* name, at::ScalarType dtype, int64_t expected, at::Device device,
                const Why& why) {
  if (!x.defined()) fail(std::string(name) + " is missing (expected " + std::to_string(expected) + " elements)");
  if (x.scalar_type() != dtype)
    fail(std::string(name) + " must be " + c10::toString(dtype) + ", found " + c10::toString(x.scalar_type()));
  if (x.numel() != expected)
    fail(std::string(name) + " has " + std::to_string(x.numel()) + " elements, expected " + std::to_string(expected) +
         " (" + why() + ")");
  if (x.device() != device)
    fail(std::string(name) + " is on " + x.device().str() + ", expected " + device.str() + " (the device of packed)");
  if (!x.is_contiguous()) fail(std::string(name) + " must be contiguous");
}

}  // namespace

void nf4_check(const NF4Tensor& t) {
  check_blocksize(t.blocksize);
  int64_t n = 1;
  for (int64_t d : t.shape) {
    if (d < 0) fail("shape " + shape_str(t.shape) + " has a negative dimension");
    if (d != 0 && n > std::numeric_limits<int64_t>::max() / d) fail("shape " + shape_str(t.shape) + " overflows");
    n *= d;
  }
  if (!is_float_type(t.dtype))
    fail(std::string("dtype must be float32, float16 or bfloat16, found ") + c10::toString(t.dtype));
  if (!t.packed.defined()) fail("packed is missing");
  const at::Device dev = t.packed.device();
  const int64_t nb = nf4_num_blocks(n, t.blocksize);
  const auto nb_why = [&] {
    return std::to_string(nb) + " blocks = ceil(" + std::to_string(n) + " elements of shape " + shape_str(t.shape) +
           " / blocksize " + std::to_string(t.blocksize) + ")";
  };
  check_part(t.packed, "packed", at::kByte, (n + 1) / 2, dev, [&] {
    return "(numel + 1) / 2 bytes for " + std::to_string(n) + " elements of shape " + shape_str(t.shape);
  });
  if (!t.nested) {
    check_part(t.absmax, "absmax", at::kFloat, nb, dev, nb_why);
    return;
  }
  if (!is_pow2(t.nested_blocksize) || t.nested_blocksize < 64 || t.nested_blocksize > 4096)
    fail("nested_blocksize must be a power of two in 64..4096, found " + std::to_string(t.nested_blocksize));
  check_part(t.absmax, "absmax", at::kByte, nb, dev, [&] { return "nested: one uint8 code per block, " + nb_why(); });
  const int64_t nb2 = nf4_num_blocks(nb, t.nested_blocksize);
  check_part(t.absmax2, "absmax2", at::kFloat, nb2, dev, [&] {
    return "ceil(" + std::to_string(nb) + " blocks / nested_blocksize " + std::to_string(t.nested_blocksize) + ")";
  });
  check_part(t.code2, "code2", at::kFloat, 256, dev, [] { return std::string("the 8-bit dynamic map"); });
  if (!std::isfinite(t.offset)) fail("offset must be finite, found " + std::to_string(t.offset));
}

// ---- CPU reference --------------------------------------------------------------------------------
namespace {

constexpr int64_t kGrainBlocks = 1024;

// 4-bit part: per-block absmax (fp32) and packed codes, high nibble first (bnb kQuantizeBlockwise).
template <typename T>
void quantize_cpu(const T* x, int64_t n, int64_t bs, uint8_t* packed, float* absmax) {
  at::parallel_for(0, nf4_num_blocks(n, bs), kGrainBlocks, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * bs, i1 = std::min(n, i0 + bs);
      float m = kq::kAbsmaxInit;
      for (int64_t i = i0; i < i1; ++i) m = kq::absmax_fold(m, static_cast<float>(x[i]));
      absmax[b] = m;
      const float inv = kq::inverse_absmax(m);
      // blocksize is even, so a byte never straddles two blocks; an odd numel pads the last low
      // nibble with a quantized 0.0 (bnb loads the tail zero-filled).
      for (int64_t i = i0; i < i1; i += 2) {
        const uint8_t hi = kq::nf4_quantize_scaled(static_cast<float>(x[i]), inv);
        const uint8_t lo = kq::nf4_quantize_scaled(i + 1 < i1 ? static_cast<float>(x[i + 1]) : 0.0f, inv);
        packed[i / 2] = static_cast<uint8_t>((hi << 4) | lo);
      }
    }
  });
}

// Double quantization of the fp32 absmax (bnb quantize_4bit with compress_statistics=True:
// offset = mean, then quantize_blockwise(absmax - offset, blocksize=256) with the dynamic map).
float double_quantize_cpu(const float* absmax, int64_t nb, int64_t nbs, const float* code2, uint8_t* codes,
                          float* absmax2) {
  const float offset = kq::absmax_mean_host(absmax, nb);
  at::parallel_for(0, nf4_num_blocks(nb, nbs), 16, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b0 = c * nbs, b1 = std::min(nb, b0 + nbs);
      float m = kq::kAbsmaxInit;
      for (int64_t b = b0; b < b1; ++b) m = kq::absmax_fold(m, kq::nested_centered(absmax[b], offset));
      absmax2[c] = m;
      const float inv = kq::inverse_absmax(m);
      for (int64_t b = b0; b < b1; ++b) codes[b] = kq::nested_quantize(code2, absmax[b], offset, inv);
    }
  });
  return offset;
}

template <typename T>
void dequantize_cpu(const NF4Tensor& t, T* out) {
  const int64_t n = t.numel(), bs = t.blocksize, nbs = t.nested_blocksize;
  const uint8_t* packed = t.packed.data_ptr<uint8_t>();
  const float* absmax = t.nested ? nullptr : t.absmax.data_ptr<float>();
  const uint8_t* codes = t.nested ? t.absmax.data_ptr<uint8_t>() : nullptr;
  const float* absmax2 = t.nested ? t.absmax2.data_ptr<float>() : nullptr;
  const float* code2 = t.nested ? t.code2.data_ptr<float>() : nullptr;
  const float offset = static_cast<float>(t.offset);
  at::parallel_for(0, nf4_num_blocks(n, bs), kGrainBlocks, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float am = t.nested ? kq::nested_absmax(code2[codes[b]], absmax2[b / nbs], offset) : absmax[b];
      const int64_t i1 = std::min(n, (b + 1) * bs);
      for (int64_t i = b * bs; i < i1; ++i) {
        const uint8_t byte = packed[i / 2];
        const int code = (i % 2 == 0) ? (byte >> 4) : (byte & 15);
        out[i] = static_cast<T>(kq::nf4_dequant_value(code, am));  // c10 Half/BFloat16: round to nearest even
      }
    }
  });
}

#ifdef QLORA_WITH_CUDA
kq::FloatType float_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kq::FloatType::f32;
    case at::kHalf: return kq::FloatType::f16;
    case at::kBFloat16: return kq::FloatType::bf16;
    default: TORCH_CHECK(false, "NF4: unsupported floating type ", t);
  }
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " launch failed: ", cudaGetErrorString(err));
}
#endif

}  // namespace

// ---- API ------------------------------------------------------------------------------------------

NF4Tensor nf4_quantize(const at::Tensor& weight, int64_t blocksize, bool nested) {
  check_blocksize(blocksize);
  TORCH_CHECK(weight.defined(), "nf4_quantize: weight is undefined");
  if (!is_float_type(weight.scalar_type()))
    throw UserError(std::string("nf4_quantize: weight must be float32, float16 or bfloat16, found ") +
                    c10::toString(weight.scalar_type()));
  const at::Tensor x = weight.contiguous();
  const int64_t n = x.numel(), nb = nf4_num_blocks(n, blocksize);
  const auto f32 = x.options().dtype(at::kFloat), u8 = x.options().dtype(at::kByte);

  NF4Tensor t;
  t.blocksize = blocksize;
  t.nested = nested;
  t.shape = x.sizes().vec();
  t.dtype = x.scalar_type();
  t.packed = at::empty({(n + 1) / 2}, u8);
  at::Tensor absmax = at::empty({nb}, f32);
  const auto& map = bnb_signed_dynamic_map();

  if (x.device().is_cpu()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "nf4_quantize_cpu", [&] {
      quantize_cpu(x.data_ptr<scalar_t>(), n, blocksize, t.packed.data_ptr<uint8_t>(), absmax.data_ptr<float>());
    });
    if (!nested) {
      t.absmax = absmax;
      return t;
    }
    t.code2 = at::empty({256}, f32);
    std::copy(map.begin(), map.end(), t.code2.data_ptr<float>());
    t.absmax = at::empty({nb}, u8);
    t.absmax2 = at::empty({nf4_num_blocks(nb, t.nested_blocksize)}, f32);
    t.offset = double_quantize_cpu(absmax.data_ptr<float>(), nb, t.nested_blocksize, t.code2.data_ptr<float>(),
                                   t.absmax.data_ptr<uint8_t>(), t.absmax2.data_ptr<float>());
    return t;
  }
#ifdef QLORA_WITH_CUDA
  if (x.device().is_cuda()) {
    const c10::cuda::CUDAGuard guard(x.device());  // launches go to the current device
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream(x.device().index());
    kq::NF4QuantizeArgs a;
    a.in = x.data_ptr();
    a.in_type = float_type(x.scalar_type());
    a.numel = n;
    a.blocksize = static_cast<int>(blocksize);
    a.packed = t.packed.data_ptr<uint8_t>();
    a.absmax = absmax.data_ptr<float>();
    if (n > 0) check_launch(kq::nf4_quantize(a, stream), "nf4_quantize");
    if (!nested) {
      t.absmax = absmax;
      return t;
    }
    t.code2 = at::from_blob(const_cast<float*>(map.data()), {256}, at::kFloat).to(x.device());
    t.absmax = at::empty({nb}, u8);
    t.absmax2 = at::empty({nf4_num_blocks(nb, t.nested_blocksize)}, f32);
    at::Tensor offset = at::zeros({}, f32);
    at::Tensor scratch = at::empty({kq::kMeanPartials}, x.options().dtype(at::kDouble));
    if (nb > 0)
      check_launch(kq::nf4_double_quantize(absmax.data_ptr<float>(), nb, static_cast<int>(t.nested_blocksize),
                                           t.code2.data_ptr<float>(), t.absmax.data_ptr<uint8_t>(),
                                           t.absmax2.data_ptr<float>(), offset.data_ptr<float>(),
                                           scratch.data_ptr<double>(), stream),
                   "nf4_double_quantize");
    t.offset = offset.item<float>();  // a sync; quantization is not on the training hot path
    return t;
  }
#endif
  TORCH_CHECK(false, "nf4_quantize: unsupported device ", x.device());
}

void nf4_dequantize_out(const NF4Tensor& t, at::Tensor& out) {
  nf4_check(t);
  TORCH_CHECK(out.defined(), "nf4_dequantize_out: out is undefined");
  TORCH_CHECK(is_float_type(out.scalar_type()), "nf4_dequantize_out: out must be float32, float16 or bfloat16, found ",
              out.scalar_type());
  TORCH_CHECK(out.is_contiguous(), "nf4_dequantize_out: out must be contiguous");
  TORCH_CHECK(out.device() == t.device(), "nf4_dequantize_out: out is on ", out.device(), ", expected ", t.device(),
              " (the device of the NF4 tensor)");
  TORCH_CHECK(out.numel() == t.numel(), "nf4_dequantize_out: out has ", out.numel(), " elements, expected ", t.numel(),
              " (shape ", shape_str(t.shape), ")");
  if (out.device().is_cpu()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "nf4_dequantize_cpu",
                                    [&] { dequantize_cpu(t, out.data_ptr<scalar_t>()); });
    return;
  }
#ifdef QLORA_WITH_CUDA
  if (out.device().is_cuda()) {
    const c10::cuda::CUDAGuard guard(out.device());  // launches go to the current device
    kq::NF4DequantizeArgs a;
    a.packed = t.packed.data_ptr<uint8_t>();
    a.numel = t.numel();
    a.blocksize = static_cast<int>(t.blocksize);
    a.nested = t.nested;
    if (t.nested) {
      a.absmax_code = t.absmax.data_ptr<uint8_t>();
      a.code2 = t.code2.data_ptr<float>();
      a.absmax2 = t.absmax2.data_ptr<float>();
      a.offset = static_cast<float>(t.offset);
      a.nested_blocksize = static_cast<int>(t.nested_blocksize);
    } else {
      a.absmax = t.absmax.data_ptr<float>();
    }
    a.out = out.data_ptr();
    a.out_type = float_type(out.scalar_type());
    if (a.numel > 0)
      check_launch(kq::nf4_dequantize(a, at::cuda::getCurrentCUDAStream(out.device().index())), "nf4_dequantize");
    return;
  }
#endif
  TORCH_CHECK(false, "nf4_dequantize: unsupported device ", out.device());
}

at::Tensor nf4_dequantize(const NF4Tensor& t, at::ScalarType out_dtype) {
  nf4_check(t);
  if (!is_float_type(out_dtype))
    throw UserError(std::string("nf4_dequantize: output dtype must be float32, float16 or bfloat16, found ") +
                    c10::toString(out_dtype));
  at::Tensor out = at::empty(t.shape, t.packed.options().dtype(out_dtype));
  nf4_dequantize_out(t, out);
  return out;
}

}  // namespace qlora
