// Kernels of qlora::nf4_quantize and qlora::nf4_dequantize(.out) (schemas in library.cpp): CPU and
// CUDA both go through the C++ API of include/qlora/nf4.h, which dispatches on the device; Meta
// computes output shapes only. Not differentiable (NF4 weights are frozen): the Autograd key is a
// fallthrough, so that quantizing a weight that requires grad (an nn.Parameter) gives outputs that
// do not, rather than autograd's not-implemented fallback, whose float outputs claim a gradient.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "qlora/nf4.h"

namespace qlora {
namespace {

using Tensor5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Tensor5 nf4_quantize_op(const at::Tensor& weight, int64_t blocksize, bool nested) {
  NF4Tensor t = nf4_quantize(weight, blocksize, nested);
  const auto f32 = weight.options().dtype(at::kFloat);
  if (!nested) return {t.packed, t.absmax, at::empty({0}, f32), at::empty({0}, f32), at::empty({0}, f32)};
  // at::full fills on the device from a host scalar: no copy, no sync.
  return {t.packed, t.absmax, t.absmax2, t.code2, at::full({}, static_cast<float>(t.offset), f32)};
}

// Op inputs -> NF4Tensor. Nested is told by absmax's dtype (uint8 codes vs fp32), as in bnb's
// checkpoints; the lengths are then checked by nf4_check.
NF4Tensor nf4_from_op_args(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& absmax2,
                           const at::Tensor& code2, const at::Tensor& offset, int64_t blocksize,
                           c10::SymIntArrayRef shape, at::ScalarType dtype) {
  NF4Tensor t;
  t.packed = packed;
  t.absmax = absmax;
  t.nested = absmax.defined() && absmax.scalar_type() == at::kByte;
  t.blocksize = blocksize;
  t.shape = C10_AS_INTARRAYREF_SLOW(shape).vec();
  t.dtype = dtype;
  if (t.nested) {
    t.absmax2 = absmax2;
    t.code2 = code2;
    TORCH_CHECK(offset.defined() && offset.numel() == 1 && offset.scalar_type() == at::kFloat,
                "nf4_dequantize: offset must be one fp32 value when absmax is uint8 (nested), found ",
                offset.defined() ? std::to_string(offset.numel()) + " elements of " + c10::toString(offset.scalar_type())
                                 : std::string("undefined"));
    // A device-to-host read when offset lives on the GPU; the trainer calls the C++ API with the
    // offset already on the host and never pays it.
    t.offset = offset.item<float>();
  }
  return t;
}

at::Tensor nf4_dequantize_op(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& absmax2,
                             const at::Tensor& code2, const at::Tensor& offset, int64_t blocksize,
                             c10::SymIntArrayRef shape, at::ScalarType dtype) {
  return nf4_dequantize(nf4_from_op_args(packed, absmax, absmax2, code2, offset, blocksize, shape, dtype), dtype);
}

// Returns nothing (schema "-> ()"), as bitsandbytes' own out-variant does: a custom op returning
// its mutated `Tensor(a!)` cannot be functionalized by torch.compile.
void nf4_dequantize_out_op(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& absmax2,
                           const at::Tensor& code2, const at::Tensor& offset, int64_t blocksize,
                           c10::SymIntArrayRef shape, at::ScalarType dtype, at::Tensor& out) {
  TORCH_CHECK(out.scalar_type() == dtype, "nf4_dequantize.out: out is ", out.scalar_type(), ", expected dtype ",
              dtype);
  nf4_dequantize_out(nf4_from_op_args(packed, absmax, absmax2, code2, offset, blocksize, shape, dtype), out);
}

// ---- Meta: shapes only --------------------------------------------------------------------------

void check_blocksize_meta(int64_t blocksize) {
  TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
              "nf4: blocksize must be a power of two in 32..4096, found ", blocksize);
}

Tensor5 nf4_quantize_meta(const at::Tensor& weight, int64_t blocksize, bool nested) {
  check_blocksize_meta(blocksize);
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kHalf ||
                  weight.scalar_type() == at::kBFloat16,
              "nf4_quantize: weight must be float32, float16 or bfloat16, found ", weight.scalar_type());
  const c10::SymInt n = weight.sym_numel();
  const c10::SymInt nb = (n + blocksize - 1) / blocksize;
  const auto u8 = weight.options().dtype(at::kByte), f32 = weight.options().dtype(at::kFloat);
  at::Tensor packed = at::empty_symint({(n + 1) / 2}, u8);
  if (!nested)
    return {packed, at::empty_symint({nb}, f32), at::empty({0}, f32), at::empty({0}, f32), at::empty({0}, f32)};
  constexpr int64_t kNestedBlocksize = 256;
  return {packed, at::empty_symint({nb}, u8), at::empty_symint({(nb + kNestedBlocksize - 1) / kNestedBlocksize}, f32),
          at::empty({256}, f32), at::empty({}, f32)};
}

at::Tensor nf4_dequantize_meta(const at::Tensor& packed, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, int64_t blocksize, c10::SymIntArrayRef shape, at::ScalarType dtype) {
  check_blocksize_meta(blocksize);
  return at::empty_symint(shape, packed.options().dtype(dtype));
}

void nf4_dequantize_out_meta(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, int64_t blocksize, c10::SymIntArrayRef shape, at::ScalarType dtype,
                             at::Tensor& out) {
  check_blocksize_meta(blocksize);
  TORCH_CHECK(out.scalar_type() == dtype, "nf4_dequantize.out: out is ", out.scalar_type(), ", expected dtype ",
              dtype);
  c10::SymInt n = 1;
  for (const c10::SymInt& d : shape) n = n * d;
  TORCH_SYM_CHECK(out.sym_numel().sym_eq(n), "nf4_dequantize.out: out has ", out.sym_numel(),
                  " elements, expected ", n);
}

}  // namespace
}  // namespace qlora

TORCH_LIBRARY_IMPL(qlora, CPU, m) {
  m.impl("nf4_quantize", &qlora::nf4_quantize_op);
  m.impl("nf4_dequantize", &qlora::nf4_dequantize_op);
  m.impl("nf4_dequantize.out", &qlora::nf4_dequantize_out_op);
}

#ifdef QLORA_WITH_CUDA
TORCH_LIBRARY_IMPL(qlora, CUDA, m) {
  m.impl("nf4_quantize", &qlora::nf4_quantize_op);
  m.impl("nf4_dequantize", &qlora::nf4_dequantize_op);
  m.impl("nf4_dequantize.out", &qlora::nf4_dequantize_out_op);
}
#endif

TORCH_LIBRARY_IMPL(qlora, Meta, m) {
  m.impl("nf4_quantize", &qlora::nf4_quantize_meta);
  m.impl("nf4_dequantize", &qlora::nf4_dequantize_meta);
  m.impl("nf4_dequantize.out", &qlora::nf4_dequantize_out_meta);
}

TORCH_LIBRARY_IMPL(qlora, Autograd, m) {
  m.impl("nf4_quantize", torch::CppFunction::makeFallthrough());
  m.impl("nf4_dequantize", torch::CppFunction::makeFallthrough());
  m.impl("nf4_dequantize.out", torch::CppFunction::makeFallthrough());
}
