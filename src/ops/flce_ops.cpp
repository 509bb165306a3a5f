// Kernels of qlora::fused_linear_cross_entropy (schema in library.cpp): CPU and CUDA compute the loss
// only (no gradient work: they are reached below autograd, or when nothing requires grad); Meta
// gives the shape. Autograd: a custom function whose forward and backward are dispatcher calls
// only -- the helper ops _fused_linear_cross_entropy_fwd (per-token losses and, for mean/sum, the
// gradients of their sum, made in the forward as the C++ API does) and _fused_linear_cross_entropy_bwd
// (reduction "none": recompute, row-weighted), plus ATen ops -- and that never reads tensor data
// on the host, so AOTAutograd / torch.compile trace it with fake tensors. Its numbers are those of
// the C++ API (include/qlora/flce.h): the same chunk loop (src/loss/flce_internal.h) and the same
// scaling ops.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "loss/flce_internal.h"
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

using FwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                                 int64_t, double, double, double, int64_t, bool, bool);
using BwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                  const at::Tensor&, int64_t, double, double, double, int64_t, bool,
                                                  bool);

std::tuple<at::Tensor, at::Tensor, at::Tensor> flce_fwd_op(const at::Tensor& x, const at::Tensor& w,
                                                           const at::Tensor& labels, int64_t ignore_index,
                                                           double logit_scale, double softcap, double z_loss,
                                                           int64_t chunk_size, bool need_dx, bool need_dw) {
  return flce_loss_rows_and_grads(x, w, labels,
                                  options_from_op(ignore_index, "mean", 0, logit_scale, softcap, z_loss, chunk_size),
                                  need_dx, need_dw);
}

std::tuple<at::Tensor, at::Tensor> flce_bwd_op(const at::Tensor& grad_rows, const at::Tensor& x, const at::Tensor& w,
                                               const at::Tensor& labels, int64_t ignore_index, double logit_scale,
                                               double softcap, double z_loss, int64_t chunk_size, bool need_dx,
                                               bool need_dw) {
  return flce_loss_rows_backward(grad_rows, x, w, labels,
                                 options_from_op(ignore_index, "mean", 0, logit_scale, softcap, z_loss, chunk_size),
                                 need_dx, need_dw);
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Reduction = FlceOptions::Reduction;

// 1 / the mean's denominator as a 0-dim fp32 tensor on labels' device (as src/loss/flce.cpp).
at::Tensor inv_denominator(const at::Tensor& labels, const FlceOptions& o) {
  const auto f32 = labels.options().dtype(at::kFloat);
  if (o.normalizer > 0) return at::full({}, 1.0 / o.normalizer, f32);
  return labels.ne(o.ignore_index).sum().to(at::kFloat).clamp_min(1).reciprocal();
}

struct FlceOpFunction : torch::autograd::Function<FlceOpFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels,
                            const FlceOptions& o, bool need_dx, bool need_dw) {
    static const auto fwd = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("qlora::_fused_linear_cross_entropy_fwd", "")
                                .typed<FwdSig>();
    ctx->saved_data["need_dx"] = need_dx;
    ctx->saved_data["need_dw"] = need_dw;
    ctx->saved_data["ignore_index"] = o.ignore_index;
    ctx->saved_data["logit_scale"] = o.logit_scale;
    ctx->saved_data["softcap"] = o.softcap;
    ctx->saved_data["z_loss"] = o.z_loss;
    ctx->saved_data["chunk_size"] = o.chunk_size;
    const bool none = o.reduction == Reduction::none;
    ctx->saved_data["none"] = none;
    at::AutoDispatchBelowADInplaceOrView below;
    // "none" recomputes in the backward (src/loss/flce.cpp says why): no gradients now.
    auto [loss_rows, dx, dw] = fwd.call(x, w, labels, o.ignore_index, o.logit_scale, o.softcap, o.z_loss, o.chunk_size,
                                        need_dx && !none, need_dw && !none);
    if (none) {
      ctx->save_for_backward({x, w, labels});
      return loss_rows;
    }
    const at::Tensor scale = o.reduction == Reduction::mean ? inv_denominator(labels, o)
                                                            : at::ones({}, labels.options().dtype(at::kFloat));
    ctx->save_for_backward({dx, dw, scale});
    ctx->saved_data["w_dtype"] = static_cast<int64_t>(w.scalar_type());
    return loss_rows.sum() * scale;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list out(6);  // x, w, labels, options, need_dx, need_dw
    const at::Tensor& go = grad_outputs[0];
    const bool need_dx = ctx->saved_data["need_dx"].toBool(), need_dw = ctx->saved_data["need_dw"].toBool();
    const variable_list saved = ctx->get_saved_variables();
    if (ctx->saved_data["none"].toBool()) {
      static const auto bwd = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("qlora::_fused_linear_cross_entropy_bwd", "")
                                  .typed<BwdSig>();
      auto [dx, dw] = bwd.call(go.to(at::kFloat).contiguous(), saved[0], saved[1], saved[2],
                               ctx->saved_data["ignore_index"].toInt(), ctx->saved_data["logit_scale"].toDouble(),
                               ctx->saved_data["softcap"].toDouble(), ctx->saved_data["z_loss"].toDouble(),
                               ctx->saved_data["chunk_size"].toInt(), need_dx, need_dw);
      if (need_dx) out[0] = dx;
      if (need_dw) out[1] = dw;
      return out;
    }
    // dx * s in x's dtype; dw * s computed in fp32 and rounded once to w's dtype (what the C++
    // API's mul_out into a w-dtype buffer does, as one functional op).
    const at::Tensor s = go.to(at::kFloat) * saved[2];
    if (need_dx) out[0] = saved[0] * s;
    if (need_dw) out[1] = (saved[1] * s).to(static_cast<at::ScalarType>(ctx->saved_data["w_dtype"].toInt()));
    return out;
  }
};

at::Tensor flce_op_autograd(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels, int64_t ignore_index,
                            c10::string_view reduction, double normalizer, double logit_scale, double softcap,
                            double z_loss, int64_t chunk_size) {
  const bool need_dx = at::GradMode::is_enabled() && x.requires_grad();
  const bool need_dw = at::GradMode::is_enabled() && w.requires_grad();
  const FlceOptions o = options_from_op(ignore_index, reduction, normalizer, logit_scale, softcap, z_loss, chunk_size);
  if (!need_dx && !need_dw) {
    // Nothing to differentiate: hand over to the backend kernel (CPU, CUDA or Meta) below autograd.
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("qlora::fused_linear_cross_entropy", "")
                               .typed<decltype(flce_op)>();
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(x, w, labels, ignore_index, reduction, normalizer, logit_scale, softcap, z_loss, chunk_size);
  }
  flce_check_options(o);
  return FlceOpFunction::apply(x, w, labels, o, need_dx, need_dw);
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

void check_meta_inputs(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && labels.dim() == 1,
              "fused_linear_cross_entropy: expected x [N,H], w [V,H], labels [N], found ", x.sizes(), ", ", w.sizes(),
              ", ", labels.sizes());
  TORCH_SYM_CHECK(w.sym_size(1).sym_eq(x.sym_size(1)), "fused_linear_cross_entropy: w and x differ in H");
  TORCH_SYM_CHECK(labels.sym_size(0).sym_eq(x.sym_size(0)), "fused_linear_cross_entropy: labels and x differ in N");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flce_fwd_meta(const at::Tensor& x, const at::Tensor& w,
                                                             const at::Tensor& labels, int64_t, double, double, double,
                                                             int64_t, bool need_dx, bool need_dw) {
  check_meta_inputs(x, w, labels);
  const auto f32 = x.options().dtype(at::kFloat);
  return {at::empty_symint({x.sym_size(0)}, f32),
          need_dx ? at::empty_symint(x.sym_sizes(), x.options()) : at::empty({0}, x.options()),
          need_dw ? at::empty_symint(w.sym_sizes(), f32) : at::empty({0}, f32)};
}

std::tuple<at::Tensor, at::Tensor> flce_bwd_meta(const at::Tensor& grad_rows, const at::Tensor& x, const at::Tensor& w,
                                                 const at::Tensor& labels, int64_t, double, double, double, int64_t,
                                                 bool need_dx, bool need_dw) {
  check_meta_inputs(x, w, labels);
  TORCH_CHECK(grad_rows.dim() == 1, "fused_linear_cross_entropy: grad_rows must be [N], found ", grad_rows.sizes());
  return {need_dx ? at::empty_symint(x.sym_sizes(), x.options()) : at::empty({0}, x.options()),
          need_dw ? at::empty_symint(w.sym_sizes(), w.options()) : at::empty({0}, w.options())};
}

}  // namespace
}  // namespace qlora

TORCH_LIBRARY_IMPL(qlora, CPU, m) {
  m.impl("fused_linear_cross_entropy", &qlora::flce_op);
  m.impl("_fused_linear_cross_entropy_fwd", &qlora::flce_fwd_op);
  m.impl("_fused_linear_cross_entropy_bwd", &qlora::flce_bwd_op);
}

#ifdef QLORA_WITH_CUDA
TORCH_LIBRARY_IMPL(qlora, CUDA, m) {
  m.impl("fused_linear_cross_entropy", &qlora::flce_op);
  m.impl("_fused_linear_cross_entropy_fwd", &qlora::flce_fwd_op);
  m.impl("_fused_linear_cross_entropy_bwd", &qlora::flce_bwd_op);
}
#endif

TORCH_LIBRARY_IMPL(qlora, Meta, m) {
  m.impl("fused_linear_cross_entropy", &qlora::flce_op_meta);
  m.impl("_fused_linear_cross_entropy_fwd", &qlora::flce_fwd_meta);
  m.impl("_fused_linear_cross_entropy_bwd", &qlora::flce_bwd_meta);
}

// The helper ops are not differentiable themselves (they make gradients): a fallthrough, so their
// outputs never claim one.
TORCH_LIBRARY_IMPL(qlora, Autograd, m) {
  m.impl("fused_linear_cross_entropy", &qlora::flce_op_autograd);
  m.impl("_fused_linear_cross_entropy_fwd", torch::CppFunction::makeFallthrough());
  m.impl("_fused_linear_cross_entropy_bwd", torch::CppFunction::makeFallthrough());
}
