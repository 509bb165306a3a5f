// linear_forward: y = x W^T + b for a dense or an NF4 weight. NF4 weights are dequantized into one
// reusable scratch buffer (grown to the largest weight, never shrunk) and multiplied with
// at::linear (cuBLAS on CUDA), so the forward allocates nothing for the weight. The NF4 case is a
// custom autograd function: the scratch is overwritten by the next projection long before a
// backward pass runs, so the backward dequantizes the weight again instead of keeping it.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include <algorithm>
#include <string>

#include "model/internal.h"
#include "qlora/error.h"
#include "qlora/lora.h"
#include "qlora/model.h"

namespace qlora {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// A [out, in] view of the scratch holding `t` dequantized to `dtype`.
at::Tensor dequantize_into_scratch(const NF4Tensor& t, DequantScratch& scratch, at::ScalarType dtype) {
  const int64_t n = t.numel();
  at::Tensor& buf = scratch.buffer;
  if (!buf.defined() || buf.scalar_type() != dtype || buf.device() != t.device()) {
    buf = at::empty({n}, at::TensorOptions().dtype(dtype).device(t.device()));
  } else if (buf.numel() < n) {
    buf = at::Tensor();  // release the old buffer before the new one is allocated
    buf = at::empty({n}, at::TensorOptions().dtype(dtype).device(t.device()));
  }
  at::Tensor slice = buf.narrow(0, 0, n);
  nf4_dequantize_out(t, slice);
  return slice.view(t.shape);
}

// The NF4Tensor travels through saved_data as plain IValues (tensors, numbers, lists), so the
// backward needs neither the LinearWeight nor the scratch to be alive or unchanged.
void save_nf4(AutogradContext* ctx, const NF4Tensor& t, const std::string& k) {
  auto& d = ctx->saved_data;
  d["packed" + k] = t.packed;
  d["absmax" + k] = t.absmax;
  d["absmax2" + k] = t.absmax2.defined() ? t.absmax2 : at::Tensor();
  d["code2" + k] = t.code2.defined() ? t.code2 : at::Tensor();
  d["offset" + k] = t.offset;
  d["nested" + k] = t.nested;
  d["blocksize" + k] = t.blocksize;
  d["nested_blocksize" + k] = t.nested_blocksize;
  d["shape" + k] = c10::IValue(t.shape);
  d["dtype" + k] = static_cast<int64_t>(t.dtype);
}

NF4Tensor load_nf4(AutogradContext* ctx, const std::string& k) {
  auto& d = ctx->saved_data;
  NF4Tensor t;
  t.packed = d["packed" + k].toTensor();
  t.absmax = d["absmax" + k].toTensor();
  t.absmax2 = d["absmax2" + k].toTensor();
  t.code2 = d["code2" + k].toTensor();
  t.offset = d["offset" + k].toDouble();
  t.nested = d["nested" + k].toBool();
  t.blocksize = d["blocksize" + k].toInt();
  t.nested_blocksize = d["nested_blocksize" + k].toInt();
  t.shape = d["shape" + k].toIntVector();
  t.dtype = static_cast<at::ScalarType>(d["dtype" + k].toInt());
  return t;
}

namespace {

struct NF4LinearFunction : public torch::autograd::Function<NF4LinearFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const LinearWeight* w, DequantScratch* scratch) {
    const at::Tensor weight = dequantize_into_scratch(*w->nf4, *scratch, x.scalar_type());
    save_nf4(ctx, *w->nf4);
    return at::linear(x, weight, w->bias.defined() ? std::optional<at::Tensor>(w->bias) : std::nullopt);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor& g = grad_outputs[0];
    // dL/dx = dL/dy W; the frozen weight and bias get no gradient.
    const at::Tensor weight = nf4_dequantize(load_nf4(ctx), g.scalar_type());
    return {at::matmul(g, weight), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor linear_forward(const at::Tensor& x, const LinearWeight& w, DequantScratch& scratch) {
  TORCH_CHECK(x.size(-1) == w.in_features, "linear_forward: input has ", x.size(-1), " features, the weight expects ",
              w.in_features);
  // While the C++ tracer records (qlora export / check-compile), lora_linear_forward routes an NF4
  // weight through the registered op qlora::nf4_lora_linear, so the trace holds one op node.
  if (w.nf4 && torch::jit::tracer::isTracing()) return lora_linear_forward(x, w, nullptr, scratch, false);
  if (w.nf4) return NF4LinearFunction::apply(x, &w, &scratch);
  TORCH_CHECK(w.dense.defined(), "linear_forward: the weight holds neither NF4 nor dense data");
  return at::linear(x, w.dense, w.bias.defined() ? std::optional<at::Tensor>(w.bias) : std::nullopt);
}

}  // namespace qlora
