// Kernels of qlora::rms_norm, qlora::swiglu, qlora::rope and their pieces (schemas in library.cpp). CPU and
// CUDA go through include/qlora/fused_layer.h (the ATen reference on CPU, the fused kernels on
// CUDA); Meta gives shapes only. Autograd: custom functions whose forward calls the op below
// autograd and whose backward calls _rms_norm_bwd / _swiglu_bwd / _rope_bwd through the dispatcher.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

#include "qlora/fused_layer.h"

namespace qlora {
namespace {

using Tensor2 = std::tuple<at::Tensor, at::Tensor>;

// ---- CPU / CUDA ---------------------------------------------------------------------------------
// Outputs are contiguous, as the Meta kernels promise (inductor checks the strides it was told;
// the C++ functions keep x's layout for a strided input, which the layer loop wants).

at::Tensor rms_norm_op(const at::Tensor& x, const at::Tensor& w, double eps) {
  return std::get<0>(rms_norm_fused_forward(x, w, eps, /*want_rstd=*/false)).contiguous();
}
Tensor2 rms_norm_fwd_op(const at::Tensor& x, const at::Tensor& w, double eps) {
  auto [out, rstd] = rms_norm_fused_forward(x, w, eps, /*want_rstd=*/true);
  return {out.contiguous(), rstd.contiguous()};
}
at::Tensor rms_norm_bwd_op(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w, const at::Tensor& rstd) {
  return rms_norm_fused_backward(grad, x, w, rstd).contiguous();
}
at::Tensor swiglu_op(const at::Tensor& gate, const at::Tensor& up) {
  return swiglu_fused_forward(gate, up).contiguous();
}
Tensor2 swiglu_bwd_op(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up) {
  auto [d_gate, d_up] = swiglu_fused_backward(grad, gate, up);
  return {d_gate.contiguous(), d_up.contiguous()};
}

at::Tensor rope_op(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  return rope_fused_forward(x, cos, sin).contiguous();
}
at::Tensor rope_bwd_op(const at::Tensor& grad, const at::Tensor& cos, const at::Tensor& sin) {
  return rope_fused_backward(grad, cos, sin).contiguous();
}

// ---- Meta ---------------------------------------------------------------------------------------

void check_rope_meta(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 4 && cos.dim() == 3 && sin.dim() == 3,
              "rope: x must be [batch, heads, seq, head_dim] and cos/sin [batch, seq, head_dim], found ", x.sym_sizes(),
              ", ", cos.sym_sizes(), ", ", sin.sym_sizes());
  for (const at::Tensor* t : {&cos, &sin}) {
    TORCH_SYM_CHECK(t->sym_size(0).sym_eq(x.sym_size(0)), "rope: cos/sin batch must be ", x.sym_size(0));
    TORCH_SYM_CHECK(t->sym_size(1).sym_eq(x.sym_size(2)), "rope: cos/sin seq must be ", x.sym_size(2));
    TORCH_SYM_CHECK(t->sym_size(2).sym_eq(x.sym_size(3)), "rope: cos/sin head_dim must be ", x.sym_size(3));
  }
}
at::Tensor rope_meta(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_rope_meta(x, cos, sin);
  return at::empty_symint(x.sym_sizes(), x.options());
}

void check_norm_meta(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() >= 1 && w.dim() == 1, "rms_norm: x must be [..., hidden] and weight [hidden], found ",
              x.sym_sizes(), " and ", w.sym_sizes());
  TORCH_SYM_CHECK(w.sym_size(0).sym_eq(x.sym_size(-1)), "rms_norm: weight must be [", x.sym_size(-1), "], found ",
                  w.sym_sizes());
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "rms_norm: x (", x.scalar_type(), ") and weight (", w.scalar_type(),
              ") must have one type");
}

at::Tensor rms_norm_meta(const at::Tensor& x, const at::Tensor& w, double) {
  check_norm_meta(x, w);
  return at::empty_symint(x.sym_sizes(), x.options());
}
Tensor2 rms_norm_fwd_meta(const at::Tensor& x, const at::Tensor& w, double) {
  check_norm_meta(x, w);
  return {at::empty_symint(x.sym_sizes(), x.options()),
          at::empty_symint({x.sym_numel() / x.sym_size(-1)}, x.options().dtype(at::kFloat))};
}
at::Tensor rms_norm_bwd_meta(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w, const at::Tensor&) {
  check_norm_meta(x, w);
  return at::empty_symint(grad.sym_sizes(), x.options());
}
void check_swiglu_meta(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.dim() == up.dim(), "swiglu: gate ", gate.sym_sizes(), " and up ", up.sym_sizes(),
              " must have one shape");
  for (int64_t i = 0; i < gate.dim(); ++i)
    TORCH_SYM_CHECK(gate.sym_size(i).sym_eq(up.sym_size(i)), "swiglu: gate ", gate.sym_sizes(), " and up ",
                    up.sym_sizes(), " must have one shape");
  TORCH_CHECK(gate.scalar_type() == up.scalar_type(), "swiglu: gate (", gate.scalar_type(), ") and up (",
              up.scalar_type(), ") must have one type");
}
at::Tensor swiglu_meta(const at::Tensor& gate, const at::Tensor& up) {
  check_swiglu_meta(gate, up);
  return at::empty_symint(gate.sym_sizes(), gate.options());
}
Tensor2 swiglu_bwd_meta(const at::Tensor&, const at::Tensor& gate, const at::Tensor& up) {
  check_swiglu_meta(gate, up);
  return {at::empty_symint(gate.sym_sizes(), gate.options()), at::empty_symint(up.sym_sizes(), up.options())};
}

// ---- Autograd -----------------------------------------------------------------------------------

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <class Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

struct RmsNormOpFunction : public torch::autograd::Function<RmsNormOpFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, double eps) {
    static const auto fwd = op_handle<Tensor2(const at::Tensor&, const at::Tensor&, double)>("qlora::_rms_norm_fwd");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, rstd] = fwd.call(x, w, eps);
    ctx->save_for_backward({x, w, rstd});
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static const auto bwd =
        op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
            "qlora::_rms_norm_bwd");
    const variable_list s = ctx->get_saved_variables();
    return {bwd.call(grad_outputs[0], s[0], s[1], s[2]), at::Tensor(), at::Tensor()};
  }
};

at::Tensor rms_norm_autograd(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(!(at::GradMode::is_enabled() && w.requires_grad()),
              "qlora::rms_norm: the weight gets no gradient (QLoRA trains adapters only); pass a frozen weight");
  if (!(at::GradMode::is_enabled() && x.requires_grad())) {
    static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("qlora::rms_norm");
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(x, w, eps);
  }
  return RmsNormOpFunction::apply(x, w, eps);
}

struct SwigluOpFunction : public torch::autograd::Function<SwigluOpFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up) {
    static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&)>("qlora::swiglu");
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({gate, up});
    return op.call(gate, up);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static const auto bwd =
        op_handle<Tensor2(const at::Tensor&, const at::Tensor&, const at::Tensor&)>("qlora::_swiglu_bwd");
    const variable_list s = ctx->get_saved_variables();
    auto [d_gate, d_up] = bwd.call(grad_outputs[0], s[0], s[1]);
    return {d_gate, d_up};
  }
};

at::Tensor swiglu_autograd(const at::Tensor& gate, const at::Tensor& up) {
  if (!(at::GradMode::is_enabled() && (gate.requires_grad() || up.requires_grad()))) {
    static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&)>("qlora::swiglu");
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(gate, up);
  }
  return SwigluOpFunction::apply(gate, up);
}

struct RopeOpFunction : public torch::autograd::Function<RopeOpFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
    static const auto op =
        op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>("qlora::rope");
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({cos, sin});
    return op.call(x, cos, sin);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static const auto bwd =
        op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>("qlora::_rope_bwd");
    const variable_list s = ctx->get_saved_variables();
    return {bwd.call(grad_outputs[0], s[0], s[1]), at::Tensor(), at::Tensor()};
  }
};

at::Tensor rope_autograd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(!(at::GradMode::is_enabled() && (cos.requires_grad() || sin.requires_grad())),
              "qlora::rope: cos and sin get no gradient; pass them frozen");
  if (!(at::GradMode::is_enabled() && x.requires_grad())) {
    static const auto op =
        op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>("qlora::rope");
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(x, cos, sin);
  }
  return RopeOpFunction::apply(x, cos, sin);
}

}  // namespace
}  // namespace qlora

namespace qlora {
namespace {
// CPU and CUDA share their kernels (the C++ functions dispatch on the device).
void impl_backend(torch::Library& m) {
  m.impl("rms_norm", &rms_norm_op);
  m.impl("_rms_norm_fwd", &rms_norm_fwd_op);
  m.impl("_rms_norm_bwd", &rms_norm_bwd_op);
  m.impl("swiglu", &swiglu_op);
  m.impl("_swiglu_bwd", &swiglu_bwd_op);
  m.impl("rope", &rope_op);
  m.impl("_rope_bwd", &rope_bwd_op);
}
}  // namespace
}  // namespace qlora

TORCH_LIBRARY_IMPL(qlora, CPU, m) { qlora::impl_backend(m); }

#ifdef QLORA_WITH_CUDA
TORCH_LIBRARY_IMPL(qlora, CUDA, m) { qlora::impl_backend(m); }
#endif

TORCH_LIBRARY_IMPL(qlora, Meta, m) {
  m.impl("rms_norm", &qlora::rms_norm_meta);
  m.impl("_rms_norm_fwd", &qlora::rms_norm_fwd_meta);
  m.impl("_rms_norm_bwd", &qlora::rms_norm_bwd_meta);
  m.impl("swiglu", &qlora::swiglu_meta);
  m.impl("_swiglu_bwd", &qlora::swiglu_bwd_meta);
  m.impl("rope", &qlora::rope_meta);
  m.impl("_rope_bwd", &qlora::rope_meta);
}

TORCH_LIBRARY_IMPL(qlora, Autograd, m) {
  m.impl("rms_norm", &qlora::rms_norm_autograd);
  m.impl("swiglu", &qlora::swiglu_autograd);
  m.impl("_rms_norm_fwd", torch::CppFunction::makeFallthrough());
  m.impl("_rms_norm_bwd", torch::CppFunction::makeFallthrough());
  m.impl("_swiglu_bwd", torch::CppFunction::makeFallthrough());
  m.impl("rope", &qlora::rope_autograd);
  m.impl("_rope_bwd", torch::CppFunction::makeFallthrough());
}
