// Kernels of qlora::fused_linear_cross_entropy (schema in library.cpp): CPU and CUDA compute the loss
// only (no gradient work: they are reached below autograd, or when nothing requires grad); Meta
// gives the shape; Autograd runs the differentiable C++ API of include/qlora/flce.h, whose forward
// also makes the gradients (see src/loss/flce.cpp).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>

#include "qlora/flce.h"

namespace qlora {
namespace {

FlceOptions options_from_op(int64_t ignore_index, c10::string_view reduction, double normalizer, double logit_scale,
                            double softcap, double z_loss, int64_t chunk_size) {
  FlceOptions o;
  o.ignore_index = ignore_index;
  o.reduction = flce_reduction_from_string(std::string(reduction));
  o.normalizer = normalizer;
  o.logit_scale = logit_scale;
  o.softcap = softcap;
  o.z_loss = z_loss;
  o.chunk_size = chunk_size;
  return o;
}

at::Tensor flce_op(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels, int64_t ignore_index,
                   c10::string_view reduction, double normalizer, double logit_scale, double softcap, double z_loss,
                   int64_t chunk_size) {
  return fused_linear_cross_entropy_forward(
      x, w, labels, options_from_op(ignore_index, reduction, normalizer, logit_scale, softcap, z_loss, chunk_size));
}

at::Tensor flce_op_autograd(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels, int64_t ignore_index,
                            c10::string_view reduction, double normalizer, double logit_scale, double softcap,
                            double z_loss, int64_t chunk_size) {
  const bool grad = at::GradMode::is_enabled() && (x.requires_grad() || w.requires_grad());
  if (!grad) {
    // Nothing to differentiate: hand over to the backend kernel (CPU, CUDA or Meta) below autograd.
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("qlora::fused_linear_cross_entropy", "")
                               .typed<decltype(flce_op)>();
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(x, w, labels, ignore_index, reduction, normalizer, logit_scale, softcap, z_loss, chunk_size);
  }
  return fused_linear_cross_entropy(
      x, w, labels, options_from_op(ignore_index, reduction, normalizer, logit_scale, softcap, z_loss, chunk_size));
}

at::Tensor flce_op_meta(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels, int64_t ignore_index,
                        c10::string_view reduction, double normalizer, double logit_scale, double softcap,
                        double z_loss, int64_t chunk_size) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && labels.dim() == 1,
              "fused_linear_cross_entropy: expected x [N,H], w [V,H], labels [N], found ", x.sizes(), ", ", w.sizes(),
              ", ", labels.sizes());
  TORCH_SYM_CHECK(w.sym_size(1).sym_eq(x.sym_size(1)), "fused_linear_cross_entropy: w and x differ in H");
  TORCH_SYM_CHECK(labels.sym_size(0).sym_eq(x.sym_size(0)), "fused_linear_cross_entropy: labels and x differ in N");
  const auto f32 = x.options().dtype(at::kFloat);
  if (flce_reduction_from_string(std::string(reduction)) == FlceOptions::Reduction::none)
    return at::empty_symint({x.sym_size(0)}, f32);
  return at::empty({}, f32);
}

}  // namespace
}  // namespace qlora

TORCH_LIBRARY_IMPL(qlora, CPU, m) { m.impl("fused_linear_cross_entropy", &qlora::flce_op); }

#ifdef QLORA_WITH_CUDA
TORCH_LIBRARY_IMPL(qlora, CUDA, m) { m.impl("fused_linear_cross_entropy", &qlora::flce_op); }
#endif

TORCH_LIBRARY_IMPL(qlora, Meta, m) { m.impl("fused_linear_cross_entropy", &qlora::flce_op_meta); }

TORCH_LIBRARY_IMPL(qlora, Autograd, m) { m.impl("fused_linear_cross_entropy", &qlora::flce_op_autograd); }
