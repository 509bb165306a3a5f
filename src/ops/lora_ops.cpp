// Kernels of qlora::nf4_lora_linear (schema in library.cpp):
//   y = x deq(W)^T (+ bias) + scale (x A^T) B^T,   x [..., in], W [out, in] NF4, A [r, in], B [out, r].
// CPU and CUDA: qlora::nf4_dequantize (to x's dtype) and the GEMMs of lora_linear_forward
// (src/model/lora.cpp, dropout off), in the same order, so both give the same numbers. Meta: the
// output's shape only, with symbolic sizes. Autograd: a custom function whose forward calls the op
// below autograd and whose backward is dispatcher calls only (qlora::nf4_dequantize and ATen ops;
// X A^T is recomputed rather than saved, one [N, in] x [in, r] GEMM), with no host reads of tensor
// data, so that AOTAutograd / torch.compile trace both with fake tensors. Gradients: x, and lora_a /
// lora_b in their own dtype; the NF4 pieces and the bias are frozen (no gradient).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "model/internal.h"  // mm_as

namespace qlora {
namespace {

using OptTensor = std::optional<at::Tensor>;

using DequantSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, int64_t, c10::SymIntArrayRef, at::ScalarType);
using LoraSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, int64_t, c10::SymIntArrayRef, const OptTensor&,
                           const OptTensor&, const OptTensor&, double);

const c10::TypedOperatorHandle<DequantSig>& dequant_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("qlora::nf4_dequantize", "").typed<DequantSig>();
  return op;
}

const c10::TypedOperatorHandle<LoraSig>& lora_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("qlora::nf4_lora_linear", "").typed<LoraSig>();
  return op;
}

bool has(const OptTensor& t) { return t.has_value() && t->defined(); }

// Shape checks that hold for real and symbolic sizes alike (the Meta kernel runs them under
// torch.compile's fake tensors).
void check_args(const at::Tensor& x, c10::SymIntArrayRef shape, const OptTensor& bias, const OptTensor& A,
                const OptTensor& B) {
  TORCH_CHECK(shape.size() == 2, "nf4_lora_linear: shape must be [out, in], found ", shape);
  TORCH_CHECK(x.dim() >= 1, "nf4_lora_linear: x must be [..., in], found a 0-dim tensor");
  const at::ScalarType t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
              "nf4_lora_linear: x must be float32, float16 or bfloat16, found ", t);
  TORCH_SYM_CHECK(x.sym_size(-1).sym_eq(shape[1]), "nf4_lora_linear: x has ", x.sym_size(-1),
                  " features, the weight [out, in] = ", shape, " expects ", shape[1]);
  if (has(bias)) {
    TORCH_CHECK(bias->dim() == 1, "nf4_lora_linear: bias must be [out], found ", bias->sym_sizes());
    TORCH_SYM_CHECK(bias->sym_size(0).sym_eq(shape[0]), "nf4_lora_linear: bias must be [", shape[0], "], found ",
                    bias->sym_sizes());
  }
  TORCH_CHECK(has(A) == has(B), "nf4_lora_linear: lora_a and lora_b must be given together, found lora_a ",
              has(A) ? "given" : "absent", " and lora_b ", has(B) ? "given" : "absent");
  if (!has(A)) return;
  TORCH_CHECK(A->dim() == 2 && B->dim() == 2, "nf4_lora_linear: lora_a must be [r, in] and lora_b [out, r], found ",
              A->sym_sizes(), " and ", B->sym_sizes());
  TORCH_SYM_CHECK(A->sym_size(1).sym_eq(shape[1]), "nf4_lora_linear: lora_a must be [r, ", shape[1], "], found ",
                  A->sym_sizes());
  TORCH_SYM_CHECK(B->sym_size(0).sym_eq(shape[0]), "nf4_lora_linear: lora_b must be [", shape[0], ", r], found ",
                  B->sym_sizes());
  TORCH_SYM_CHECK(B->sym_size(1).sym_eq(A->sym_size(0)), "nf4_lora_linear: lora_a ", A->sym_sizes(),
                  " and lora_b ", B->sym_sizes(), " differ in r");
}

// ---- CPU / CUDA ---------------------------------------------------------------------------------

at::Tensor nf4_lora_linear_op(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                              const at::Tensor& absmax2, const at::Tensor& code2, const at::Tensor& offset,
                              int64_t blocksize, c10::SymIntArrayRef shape, const OptTensor& bias, const OptTensor& A,
                              const OptTensor& B, double scale) {
  check_args(x, shape, bias, A, B);
  const at::ScalarType dtype = x.scalar_type();
  // The dequantize kernel of x's device (reached below autograd, as this kernel is).
  const at::Tensor W = dequant_op().call(packed, absmax, absmax2, code2, offset, blocksize, shape, dtype);
  // As LoraLinearFunction::forward with dropout off: the same ops in the same order.
  at::Tensor y = at::linear(x, W, bias);
  if (has(A)) {
    const at::Tensor u = at::linear(x, A->to(dtype));
    const int64_t r = A->size(0), out = B->size(0);
    y.view({-1, out}).addmm_(u.reshape({-1, r}), B->to(dtype).t(), /*beta=*/1, /*alpha=*/scale);
  }
  return y;
}

// ---- Meta ---------------------------------------------------------------------------------------

at::Tensor nf4_lora_linear_meta(const at::Tensor& x, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, int64_t blocksize, c10::SymIntArrayRef shape,
                                const OptTensor& bias, const OptTensor& A, const OptTensor& B, double) {
  TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
              "nf4: blocksize must be a power of two in 32..4096, found ", blocksize);
  check_args(x, shape, bias, A, B);
  std::vector<c10::SymInt> sizes = x.sym_sizes().vec();
  sizes.back() = shape[0];
  return at::empty_symint(sizes, x.options());
}

// ---- Autograd -----------------------------------------------------------------------------------

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Tensor arguments first: x, A, B are inputs 0, 1, 2 of needs_input_grad (A and B are absent
// together, and then x is the only one asked about).
struct NF4LoraLinearFunction : public torch::autograd::Function<NF4LoraLinearFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& A, const OptTensor& B,
                            const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& absmax2,
                            const at::Tensor& code2, const at::Tensor& offset, const OptTensor& bias, int64_t blocksize,
                            const std::vector<c10::SymInt>& shape, double scale) {
    at::Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      y = lora_op().call(x, packed, absmax, absmax2, code2, offset, blocksize, shape, bias, A, B, scale);
    }
    const bool lora = has(A);
    ctx->save_for_backward(
        {x, lora ? *A : at::Tensor(), lora ? *B : at::Tensor(), packed, absmax, absmax2, code2, offset});
    ctx->saved_data["lora"] = lora;
    ctx->saved_data["blocksize"] = blocksize;
    ctx->saved_data["shape"] = c10::IValue(c10::SymIntArrayRef(shape));
    ctx->saved_data["scale"] = scale;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor& g = grad_outputs[0];
    const at::ScalarType dtype = g.scalar_type();
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &A = s[1], &B = s[2];
    const bool lora = ctx->saved_data["lora"].toBool();
    const bool need_dx = ctx->needs_input_grad(0);
    const bool need_dA = lora && ctx->needs_input_grad(1), need_dB = lora && ctx->needs_input_grad(2);
    at::Tensor dx, dA, dB;
    if (need_dx) {
      // W is dequantized again (never saved), through the dispatcher.
      const std::vector<c10::SymInt> shape = ctx->saved_data["shape"].toSymIntVector();
      const at::Tensor W =
          dequant_op().call(s[3], s[4], s[5], s[6], s[7], ctx->saved_data["blocksize"].toInt(), shape, dtype);
      dx = at::matmul(g, W);
    }
    if (lora && (need_dx || need_dA || need_dB)) {
      // The backward of LoraLinearFunction (src/model/lora.cpp) with dropout off, in symbolic sizes.
      const double scale = ctx->saved_data["scale"].toDouble();
      const c10::SymInt r = A.sym_size(0), in = A.sym_size(1), out = B.sym_size(0);
      const at::Tensor g2 = g.reshape_symint({-1, out});
      if (need_dB) {
        const at::Tensor u2 = at::linear(x, A.to(dtype)).reshape_symint({-1, r});  // X A^T, recomputed
        dB = mm_as(g2.t(), u2, B.scalar_type()).mul_(scale);
      }
      if (need_dx || need_dA) {
        const at::Tensor du = at::mm(g2, B.to(dtype)).mul_(scale);  // [N, r]
        if (need_dA) dA = mm_as(du.t(), x.reshape_symint({-1, in}), A.scalar_type());
        if (need_dx) dx.view_symint({-1, in}).addmm_(du, A.to(dtype));
      }
    }
    variable_list grads(12);  // x, A, B, packed, absmax, absmax2, code2, offset, bias, blocksize, shape, scale
    grads[0] = dx;
    grads[1] = dA;
    grads[2] = dB;
    return grads;
  }
};

at::Tensor nf4_lora_linear_autograd(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                    const at::Tensor& absmax2, const at::Tensor& code2, const at::Tensor& offset,
                                    int64_t blocksize, c10::SymIntArrayRef shape, const OptTensor& bias,
                                    const OptTensor& A, const OptTensor& B, double scale) {
  const bool lora = has(A) && has(B);
  const bool grad =
      at::GradMode::is_enabled() && (x.requires_grad() || (lora && (A->requires_grad() || B->requires_grad())));
  if (!grad) {
    // Nothing to differentiate (the bias is frozen): the backend kernel (CPU, CUDA or Meta).
    at::AutoDispatchBelowADInplaceOrView below;
    return lora_op().call(x, packed, absmax, absmax2, code2, offset, blocksize, shape, bias, A, B, scale);
  }
  return NF4LoraLinearFunction::apply(x, A, B, packed, absmax, absmax2, code2, offset, bias, blocksize, shape.vec(),
                                      scale);
}

}  // namespace
}  // namespace qlora

TORCH_LIBRARY_IMPL(qlora, CPU, m) { m.impl("nf4_lora_linear", &qlora::nf4_lora_linear_op); }

#ifdef QLORA_WITH_CUDA
TORCH_LIBRARY_IMPL(qlora, CUDA, m) { m.impl("nf4_lora_linear", &qlora::nf4_lora_linear_op); }
#endif

TORCH_LIBRARY_IMPL(qlora, Meta, m) { m.impl("nf4_lora_linear", &qlora::nf4_lora_linear_meta); }

TORCH_LIBRARY_IMPL(qlora, Autograd, m) { m.impl("nf4_lora_linear", &qlora::nf4_lora_linear_autograd); }
