// Fused chunked linear + cross-entropy and its generic form (include/qlora/flce.h): one loop over
// chunks of rows computes logits = X_c W^T, the loss and d(loss)/d(logits) of the chunk, and turns
// the latter into dX_c = dlogits W and dW += dlogits^T X_c, so only one chunk of logits exists.
//
// When the gradients are made. Here they are made during the forward (as Liger does): the forward
// stores dX [N,H] (X's dtype) and, when W is trainable, dW [V,H] fp32; the backward only scales
// them by grad_output (and 1/token count). Cost: one GEMM for logits + two for the gradients, and
// dX/dW held from forward to backward. The other way, recomputing in the backward, saves only X,
// W and labels (nothing extra between forward and backward) but runs the logits GEMM twice (4
// GEMMs instead of 3), and is required when the gradient weights differ per token: reduction
// "none" recomputes in the backward here, since grad_output [N] scales each row of dlogits and dW
// cannot be rescaled afterwards. Measured on an H100 (docs/PERFORMANCE.md, side by side): the
// recomputing way is 1.4-1.7x slower for mean/sum, so those make the gradients in the forward.
//
// The cross-entropy step of a chunk: kernels/cross_entropy.cuh on CUDA (in place on the GEMM's
// 16-bit output), the fp32 ATen reference of src/loss/cross_entropy_chunk.cpp elsewhere.
//
// Loss normalization (DESIGN.md): the forward makes gradients of the SUMMED loss and the backward
// multiplies by grad_output / denominator, a 0-dim device tensor, so the token count never has to
// be read back to the host (no sync) and 16-bit dX holds O(1) values rather than tiny ones.
#include <ATen/ATen.h>
#include <ATen/TracerMode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include <algorithm>
#include <string>

#include "loss/flce_internal.h"
#include "qlora/flce.h"

#ifdef QLORA_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "cross_entropy.cuh"
#endif

namespace qlora {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Reduction = FlceOptions::Reduction;

void check_inputs(const char* who, const at::Tensor& X, const at::Tensor& W, const at::Tensor& labels) {
  TORCH_CHECK(X.defined() && X.dim() == 2, who, ": X must be [N,H], found ", X.defined() ? X.sizes() : at::IntArrayRef{});
  TORCH_CHECK(W.defined() && W.dim() == 2 && W.size(1) == X.size(1), who, ": W must be [V,", X.size(1), "], found ",
              W.defined() ? W.sizes() : at::IntArrayRef{});
  TORCH_CHECK(labels.defined() && labels.dim() == 1 && labels.size(0) == X.size(0) && labels.scalar_type() == at::kLong,
              who, ": labels must be int64 [", X.size(0), "], found ",
              labels.defined() ? c10::toString(labels.scalar_type()) : "undefined", " ",
              labels.defined() ? labels.sizes() : at::IntArrayRef{});
  const auto t = X.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, who,
              ": X must be float32, float16 or bfloat16, found ", t);
  TORCH_CHECK(W.scalar_type() == t, who, ": W must have X's dtype ", t, ", found ", W.scalar_type());
  TORCH_CHECK(W.device() == X.device() && labels.device() == X.device(), who,
              ": X, W and labels must be on one device, found ", X.device(), ", ", W.device(), ", ", labels.device());
}

// Labels are checked on CPU only: on CUDA the check would read back to the host (a sync per step).
void check_label_range(const char* who, const at::Tensor& labels, int64_t V, int64_t ignore_index) {
  if (!labels.device().is_cpu() || labels.numel() == 0) return;
  const at::Tensor bad = labels.ne(ignore_index).logical_and(labels.lt(0).logical_or(labels.ge(V)));
  if (bad.any().item<bool>()) {
    const int64_t i = bad.nonzero()[0][0].item<int64_t>();
    TORCH_CHECK(false, who, ": labels[", i, "] = ", labels[i].item<int64_t>(), " is outside [0, ", V,
                ") and is not ignore_index ", ignore_index);
  }
}

void check_options(const FlceOptions& o) {
  const char* who = "fused_linear_cross_entropy";
  TORCH_CHECK(o.normalizer >= 0, who, ": normalizer must be >= 0, found ", o.normalizer);
  TORCH_CHECK(o.normalizer == 0 || o.reduction == Reduction::mean, who,
              ": normalizer applies to reduction \"mean\" only, found normalizer ", o.normalizer);
  TORCH_CHECK(o.softcap >= 0, who, ": softcap must be >= 0 (0: off), found ", o.softcap);
  TORCH_CHECK(o.logit_scale != 0, who, ": logit_scale must not be 0");
  TORCH_CHECK(o.chunk_size >= 0, who, ": chunk_size must be >= 0 (0: automatic), found ", o.chunk_size);
}

struct Grads {
  at::Tensor dx;  // [N,H] X's dtype, or undefined when not wanted
  at::Tensor dw;  // [V,H] fp32, or undefined when not wanted
};

// dW += g^T X_c, accumulated in fp32 whatever X's dtype (g: the gradient in X's dtype; gf: the
// fp32 gradient when the step made one, else undefined). `first`: dW holds nothing yet (it is
// allocated uninitialized) and the GEMM writes it with beta = 0, which saves a memset and a read
// of the whole fp32 [V,H] accumulator (4.2 GB of traffic at V=128256, H=4096). On an H100 that was
// within the noise (3.25x -> 3.24x one GEMM, docs/PERFORMANCE.md): the GEMM hides the traffic.
void accumulate_dw(at::Tensor& dw, const at::Tensor& g, const at::Tensor& gf, const at::Tensor& xc, bool first) {
  if (xc.scalar_type() == at::kFloat) {
    if (first)
      at::mm_out(dw, gf.t(), xc);
    else
      dw.addmm_(gf.t(), xc);
    return;
  }
#ifdef QLORA_WITH_CUDA
  if (xc.is_cuda()) {  // cuBLAS: 16-bit inputs, fp32 accumulate and output (aten::mm/addmm.dtype_out)
    if (first)
      at::mm_out(dw, g.t(), xc, at::kFloat);
    else
      at::addmm_out(dw, dw, g.t(), xc, at::kFloat);
    return;
  }
#endif
  // CPU has no addmm.dtype: upcast the chunk (the fp32 gradient itself when the step made one).
  const at::Tensor g32 = gf.defined() ? gf : g.to(at::kFloat);
  if (first)
    at::mm_out(dw, g32.t(), xc.to(at::kFloat));
  else
    dw.addmm_(g32.t(), xc.to(at::kFloat));
}

// The chunk loop. step(logits, labels_c, begin, n) gets the chunk's logits [n,V] as the GEMM made
// them (X's dtype, a fresh tensor it may overwrite) and returns the chunk's d(loss)/d(logits) (fp32
// or X's dtype), or an undefined tensor for "no gradient from this chunk".
template <class Step>
void chunk_loop(const at::Tensor& X, const at::Tensor& W, const at::Tensor& labels, int64_t rows, Grads& out,
                Step&& step) {
  const int64_t N = X.size(0);
  const at::Tensor Wt = W.t();
  bool dw_written = false;
  for (int64_t b = 0; b < N; b += rows) {
    const int64_t n = std::min(rows, N - b);
    const at::Tensor xc = X.narrow(0, b, n);
    at::Tensor logits = at::mm(xc, Wt);
    const at::Tensor grad = step(logits, labels.narrow(0, b, n), b, n);
    if (!grad.defined()) {
      if (out.dx.defined()) out.dx.narrow(0, b, n).zero_();
      continue;
    }
    const at::Tensor g = grad.scalar_type() == X.scalar_type() ? grad : grad.to(X.scalar_type());
    const at::Tensor gf = grad.scalar_type() == at::kFloat ? grad : at::Tensor();
    if (out.dx.defined()) {
      at::Tensor dxc = out.dx.narrow(0, b, n);
      at::mm_out(dxc, g, W);
    }
    if (out.dw.defined()) {
      accumulate_dw(out.dw, g, gf, xc, !dw_written);
      dw_written = true;
    }
  }
  if (out.dw.defined() && !dw_written) out.dw.zero_();  // no chunk had a gradient (e.g. N = 0)
}

Grads make_grads(const at::Tensor& X, const at::Tensor& W, bool need_dx, bool need_dw) {
  Grads g;
  if (need_dx) g.dx = at::empty(X.sizes(), X.options());
  if (need_dw) g.dw = at::empty(W.sizes(), W.options().dtype(at::kFloat));  // chunk_loop writes every element
  return g;
}

#ifdef QLORA_WITH_CUDA
// kernels/cross_entropy.cuh on one chunk: loss rows into `loss` (fp32 [n], contiguous), and the
// gradient (times grad_scale) over the logits in place when grad_scale != 0.
void cross_entropy_chunk_cuda(at::Tensor& logits, const at::Tensor& labels, const FlceOptions& o, double grad_scale,
                              at::Tensor loss) {
  TORCH_CHECK(logits.is_contiguous() && labels.is_contiguous() && loss.is_contiguous(),
              "fused_linear_cross_entropy: internal: non-contiguous chunk");
  const c10::cuda::CUDAGuard guard(logits.device());
  kernels::CrossEntropyChunkArgs a;
  a.logits = logits.data_ptr();
  a.logits_type = logits.scalar_type() == at::kFloat  ? kernels::FloatType::f32
                  : logits.scalar_type() == at::kHalf ? kernels::FloatType::f16
                                                       : kernels::FloatType::bf16;
  a.rows = logits.size(0);
  a.vocab = logits.size(1);
  a.ld = logits.size(1);
  a.labels = labels.data_ptr<int64_t>();
  a.ignore_index = o.ignore_index;
  a.logit_scale = static_cast<float>(o.logit_scale);
  a.softcap = static_cast<float>(o.softcap);
  a.z_loss = static_cast<float>(o.z_loss);
  a.loss = loss.data_ptr<float>();
  a.grad_scale = static_cast<float>(grad_scale);
  const cudaError_t err = kernels::cross_entropy_chunk(a, at::cuda::getCurrentCUDAStream(logits.device().index()));
  TORCH_CHECK(err == cudaSuccess, "cross_entropy_chunk launch failed: ", cudaGetErrorString(err));
}
#endif

// ce_pass over every row of X (see ce_pass).
at::Tensor ce_pass_all_rows(const at::Tensor& X, const at::Tensor& W, const at::Tensor& labels, const FlceOptions& o,
                            const at::Tensor& row_weight, Grads& grads) {
  const int64_t rows = flce_chunk_rows(X.size(0), W.size(0), X.scalar_type(), X.device(), o.chunk_size, grads.dw.defined());
  at::Tensor loss_rows = at::empty({X.size(0)}, X.options().dtype(at::kFloat));
  const double grad_scale = (grads.dx.defined() || grads.dw.defined()) ? 1.0 : 0.0;
  chunk_loop(X, W, labels.contiguous(), rows, grads, [&](at::Tensor& logits, const at::Tensor& lab, int64_t b, int64_t n) {
#ifdef QLORA_WITH_CUDA
    if (logits.is_cuda()) {
      // The kernel works on the GEMM's output in its own dtype, in place: no fp32 copy of the chunk.
      cross_entropy_chunk_cuda(logits, lab, o, grad_scale, loss_rows.narrow(0, b, n));
    } else
#endif
    {
      if (logits.scalar_type() != at::kFloat) logits = logits.to(at::kFloat);
      auto [loss, lse] = cross_entropy_chunk_reference(logits, lab, o, grad_scale);
      loss_rows.narrow(0, b, n).copy_(loss);
    }
    if (grad_scale == 0) return at::Tensor();
    if (row_weight.defined()) logits.mul_(row_weight.narrow(0, b, n).unsqueeze(1));
    return logits;
  });
  return loss_rows;
}

// Per-token losses [N] fp32; gradients of the summed loss (rows weighted by row_weight when given)
// into `grads` where defined.
//
// Rows whose label is ignore_index have no loss and no gradient, so they are dropped before the
// chunk loop: all three GEMMs (logits, dX, dW) and the cross-entropy kernel run over the kept rows
// only. Prompt masking and padding often ignore a third or more of a fine-tuning batch's tokens. The
// cost is copying the kept rows of X (and scattering dX back), per row well under 1 % of what the
// GEMMs spend on it at any LM vocabulary (4H bytes moved against 4-6 H V flops), so a few ignored
// rows already pay; and, on CUDA, one read-back of the kept count per call (nonzero), since the
// GEMMs' sizes are host values. While a CUDA graph is being captured that read-back is not allowed,
// and every row goes through as before: ignored rows then still give 0 loss and a 0 dX row, but a
// non-finite hidden state there reaches dW again (0 x NaN inside the dW GEMM).
at::Tensor ce_pass(const at::Tensor& X, const at::Tensor& W, const at::Tensor& labels, const FlceOptions& o,
                   const at::Tensor& row_weight, Grads& grads) {
  const int64_t N = X.size(0);
  const at::Tensor kept =
      N == 0 || flce_stream_capturing(X.device()) ? at::Tensor() : labels.ne(o.ignore_index).nonzero().squeeze(1);
  if (!kept.defined() || kept.size(0) == N) return ce_pass_all_rows(X, W, labels, o, row_weight, grads);
  Grads part;
  part.dw = grads.dw;  // dW sums over rows: the kept rows' sum is the whole sum
  if (grads.dx.defined()) part.dx = at::empty({kept.size(0), X.size(1)}, X.options());
  const at::Tensor loss_kept = ce_pass_all_rows(X.index_select(0, kept), W, labels.index_select(0, kept), o,
                                                row_weight.defined() ? row_weight.index_select(0, kept) : at::Tensor(),
                                                part);
  if (grads.dx.defined()) grads.dx.zero_().index_copy_(0, kept, part.dx);
  return at::zeros({N}, loss_kept.options()).index_copy_(0, kept, loss_kept);
}

// 1 / denominator of the mean as a 0-dim fp32 device tensor: the external normalizer, or the local
// non-ignored count (clamped to 1: a mean over no tokens is 0, not NaN, since the sum is then 0).
at::Tensor inv_denominator(const at::Tensor& labels, const FlceOptions& o) {
  const auto f32 = labels.options().dtype(at::kFloat);
  if (o.normalizer > 0) return at::full({}, 1.0 / o.normalizer, f32);
  return labels.ne(o.ignore_index).sum().to(at::kFloat).clamp_min(1).reciprocal();
}

at::Tensor reduce(const at::Tensor& loss_rows, const at::Tensor& labels, const FlceOptions& o) {
  switch (o.reduction) {
    case Reduction::none: return loss_rows;
    case Reduction::sum: return loss_rows.sum();
    case Reduction::mean: break;
  }
  return loss_rows.sum() * inv_denominator(labels, o);
}

// dW * s in W's dtype in one pass (read fp32, write 16-bit): a separate multiply then cast would
// write and read a second fp32 [V, H] (2.1 GB at Llama-3's vocabulary).
at::Tensor scaled_dw(const at::Tensor& dw, const at::Tensor& s, int64_t w_dtype) {
  at::Tensor out = at::empty_like(dw, dw.options().dtype(static_cast<at::ScalarType>(w_dtype)));
  return at::mul_out(out, dw, s);
}

struct FlceFunction : torch::autograd::Function<FlceFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& X, const at::Tensor& W, const at::Tensor& labels,
                            const FlceOptions& o, bool need_dx, bool need_dw) {
    ctx->saved_data["need_dx"] = need_dx;
    ctx->saved_data["need_dw"] = need_dw;
    if (o.reduction == Reduction::none) {
      // Recompute in the backward (see the top of the file): keep the inputs and the options.
      Grads none;
      at::Tensor loss_rows = ce_pass(X, W, labels, o, {}, none);
      ctx->save_for_backward({X, W, labels});
      ctx->saved_data["ignore_index"] = o.ignore_index;
      ctx->saved_data["logit_scale"] = o.logit_scale;
      ctx->saved_data["softcap"] = o.softcap;
      ctx->saved_data["z_loss"] = o.z_loss;
      ctx->saved_data["chunk_size"] = o.chunk_size;
      ctx->saved_data["none"] = true;
      return loss_rows;
    }
    Grads grads = make_grads(X, W, need_dx, need_dw);
    at::Tensor loss_rows = ce_pass(X, W, labels, o, {}, grads);
    at::Tensor scale = o.reduction == Reduction::mean ? inv_denominator(labels, o)
                                                      : at::ones({}, labels.options().dtype(at::kFloat));
    if (grads.dx.defined()) ctx->saved_data["dx"] = grads.dx;
    if (grads.dw.defined()) ctx->saved_data["dw"] = grads.dw;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["w_dtype"] = static_cast<int64_t>(W.scalar_type());
    return loss_rows.sum() * scale;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list out(6);  // X, W, labels, options, need_dx, need_dw
    const at::Tensor& go = grad_outputs[0];
    if (ctx->saved_data.count("none")) {
      const variable_list saved = ctx->get_saved_variables();
      const at::Tensor &X = saved[0], &W = saved[1], &labels = saved[2];
      FlceOptions o;
      o.reduction = Reduction::sum;
      o.ignore_index = ctx->saved_data["ignore_index"].toInt();
      o.logit_scale = ctx->saved_data["logit_scale"].toDouble();
      o.softcap = ctx->saved_data["softcap"].toDouble();
      o.z_loss = ctx->saved_data["z_loss"].toDouble();
      o.chunk_size = ctx->saved_data["chunk_size"].toInt();
      Grads grads = make_grads(X, W, ctx->saved_data["need_dx"].toBool(), ctx->saved_data["need_dw"].toBool());
      ce_pass(X, W, labels, o, go.to(at::kFloat).contiguous(), grads);
      out[0] = grads.dx;
      if (grads.dw.defined()) out[1] = grads.dw.to(W.scalar_type());
      return out;
    }
    const at::Tensor s = go.to(at::kFloat) * ctx->saved_data["scale"].toTensor();
    if (ctx->saved_data.count("dx")) out[0] = ctx->saved_data["dx"].toTensor() * s;
    if (ctx->saved_data.count("dw"))
      out[1] = scaled_dw(ctx->saved_data["dw"].toTensor(), s, ctx->saved_data["w_dtype"].toInt());
    return out;
  }
};

struct ChunkLossFunction : torch::autograd::Function<ChunkLossFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& X, const at::Tensor& W, const at::Tensor& labels,
                            const ChunkLoss& fn, int64_t chunk_size, double divide_by, bool need_dx, bool need_dw) {
    const int64_t rows = flce_chunk_rows(X.size(0), W.size(0), X.scalar_type(), X.device(), chunk_size, need_dw);
    Grads grads = make_grads(X, W, need_dx, need_dw);
    at::Tensor total = at::zeros({}, X.options().dtype(at::kFloat));
    chunk_loop(X, W, labels, rows, grads, [&](at::Tensor& logits, const at::Tensor& lab, int64_t, int64_t) {
      // Autograd is off inside a Function's forward; the user's loss needs it on a leaf copy.
      c10::AutoGradMode grad_on(true);
      const at::Tensor leaf = logits.to(at::kFloat).detach().requires_grad_(true);
      const at::Tensor l = fn(leaf, lab);
      TORCH_CHECK(l.defined() && l.numel() == 1, "chunked_linear_loss: the chunk loss must return one value (the sum of ",
                  "the chunk's per-token losses), found ", l.defined() ? l.sizes() : at::IntArrayRef{});
      const at::Tensor l0 = l.reshape({});
      total.add_(l0.detach().to(at::kFloat));
      if (!(need_dx || need_dw) || !l0.requires_grad()) return at::Tensor();
      variable_list g = torch::autograd::grad({l0}, {leaf}, {}, /*retain_graph=*/false, /*create_graph=*/false,
                                              /*allow_unused=*/true);
      return g[0].defined() ? g[0].to(at::kFloat) : at::Tensor();
    });
    if (grads.dx.defined()) ctx->saved_data["dx"] = grads.dx;
    if (grads.dw.defined()) ctx->saved_data["dw"] = grads.dw;
    ctx->saved_data["divide_by"] = divide_by;
    ctx->saved_data["w_dtype"] = static_cast<int64_t>(W.scalar_type());
    return total / divide_by;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list out(8);  // X, W, labels, fn, chunk_size, divide_by, need_dx, need_dw
    const at::Tensor s = grad_outputs[0].to(at::kFloat) / ctx->saved_data["divide_by"].toDouble();
    if (ctx->saved_data.count("dx")) out[0] = ctx->saved_data["dx"].toTensor() * s;
    if (ctx->saved_data.count("dw"))
      out[1] = scaled_dw(ctx->saved_data["dw"].toTensor(), s, ctx->saved_data["w_dtype"].toInt());
    return out;
  }
};

bool wants_grad(const at::Tensor& t) { return at::GradMode::is_enabled() && t.requires_grad(); }

// While torch::jit::tracer traces (the C++ exporter): one qlora::fused_linear_cross_entropy node
// in the graph instead of the chunk loop's ATen calls (the op is registered by libqlora_ops). Not
// below the tracer (the op's own kernels, run with tracer dispatch off, never come back here).
bool tracing_here() { return torch::jit::tracer::isTracing() && at::tracer::impl::is_dispatch_enabled(); }

at::Tensor flce_through_op(const at::Tensor& X, const at::Tensor& W, const at::Tensor& labels, const FlceOptions& o) {
  using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, c10::string_view, double,
                         double, double, double, int64_t);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qlora::fused_linear_cross_entropy", "")
                             .typed<Sig>();
  const char* reduction = o.reduction == Reduction::mean ? "mean" : o.reduction == Reduction::sum ? "sum" : "none";
  return op.call(X, W, labels, o.ignore_index, reduction, o.normalizer, o.logit_scale, o.softcap, o.z_loss,
                 o.chunk_size);
}

}  // namespace

at::Tensor fused_linear_cross_entropy_forward(const at::Tensor& X, const at::Tensor& W, const at::Tensor& labels,
                                              const FlceOptions& o) {
  if (tracing_here()) {
    at::NoGradGuard no_grad;  // the no-autograd variant: the op's backend kernel
    return flce_through_op(X, W, labels, o);
  }
  check_inputs("fused_linear_cross_entropy", X, W, labels);
  check_options(o);
  check_label_range("fused_linear_cross_entropy", labels, W.size(0), o.ignore_index);
  at::NoGradGuard no_grad;
  Grads none;
  return reduce(ce_pass(X, W, labels, o, {}, none), labels, o);
}

void flce_check_options(const FlceOptions& o) { check_options(o); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> flce_loss_rows_and_grads(const at::Tensor& X, const at::Tensor& W,
                                                                        const at::Tensor& labels, const FlceOptions& o,
                                                                        bool need_dx, bool need_dw) {
  check_inputs("fused_linear_cross_entropy", X, W, labels);
  check_options(o);
  check_label_range("fused_linear_cross_entropy", labels, W.size(0), o.ignore_index);
  at::NoGradGuard no_grad;
  Grads grads = make_grads(X, W, need_dx, need_dw);
  at::Tensor loss_rows = ce_pass(X, W, labels, o, {}, grads);
  return {loss_rows, grads.dx.defined() ? grads.dx : at::empty({0}, X.options()),
          grads.dw.defined() ? grads.dw : at::empty({0}, W.options().dtype(at::kFloat))};
}

std::tuple<at::Tensor, at::Tensor> flce_loss_rows_backward(const at::Tensor& grad_rows, const at::Tensor& X,
                                                           const at::Tensor& W, const at::Tensor& labels,
                                                           const FlceOptions& o, bool need_dx, bool need_dw) {
  check_inputs("fused_linear_cross_entropy", X, W, labels);
  check_options(o);
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == X.size(0) && grad_rows.device() == X.device(),
              "fused_linear_cross_entropy: grad_rows must be [", X.size(0), "] on ", X.device(), ", found ",
              grad_rows.sizes(), " on ", grad_rows.device());
  at::NoGradGuard no_grad;
  // As FlceFunction's backward for reduction "none" (the same ce_pass, row-weighted).
  FlceOptions so = o;
  so.reduction = Reduction::sum;
  so.normalizer = 0;
  Grads grads = make_grads(X, W, need_dx, need_dw);
  ce_pass(X, W, labels, so, grad_rows.to(at::kFloat).contiguous(), grads);
  return {grads.dx.defined() ? grads.dx : at::empty({0}, X.options()),
          grads.dw.defined() ? grads.dw.to(W.scalar_type()) : at::empty({0}, W.options())};
}

at::Tensor fused_linear_cross_entropy(const at::Tensor& X, const at::Tensor& W, const at::Tensor& labels,
                                      const FlceOptions& o) {
  if (tracing_here()) return flce_through_op(X, W, labels, o);
  const bool need_dx = wants_grad(X), need_dw = wants_grad(W);
  if (!need_dx && !need_dw) return fused_linear_cross_entropy_forward(X, W, labels, o);
  check_inputs("fused_linear_cross_entropy", X, W, labels);
  check_options(o);
  check_label_range("fused_linear_cross_entropy", labels, W.size(0), o.ignore_index);
  return FlceFunction::apply(X, W, labels, o, need_dx, need_dw);
}

at::Tensor chunked_linear_loss(const at::Tensor& X, const at::Tensor& W, const at::Tensor& labels,
                               const ChunkLoss& loss, int64_t chunk_size, double divide_by) {
  check_inputs("chunked_linear_loss", X, W, labels);
  TORCH_CHECK(loss, "chunked_linear_loss: no loss function given");
  TORCH_CHECK(divide_by > 0, "chunked_linear_loss: divide_by must be > 0, found ", divide_by);
  TORCH_CHECK(chunk_size >= 0, "chunked_linear_loss: chunk_size must be >= 0 (0: automatic), found ", chunk_size);
  return ChunkLossFunction::apply(X, W, labels, loss, chunk_size, divide_by, wants_grad(X), wants_grad(W));
}

// ---- three losses for the generic form, written with plain differentiable ATen ops -------------

ChunkLoss cross_entropy_chunk_loss(int64_t ignore_index) {
  return [ignore_index](const at::Tensor& logits, const at::Tensor& labels) {
    return at::cross_entropy_loss(logits, labels, {}, at::Reduction::Sum, ignore_index);
  };
}

ChunkLoss softcap_cross_entropy_chunk_loss(double softcap, int64_t ignore_index) {
  return [softcap, ignore_index](const at::Tensor& logits, const at::Tensor& labels) {
    return at::cross_entropy_loss(at::tanh(logits / softcap) * softcap, labels, {}, at::Reduction::Sum, ignore_index);
  };
}

ChunkLoss z_loss_cross_entropy_chunk_loss(double z_loss, int64_t ignore_index) {
  return [z_loss, ignore_index](const at::Tensor& logits, const at::Tensor& labels) {
    const at::Tensor lse = at::logsumexp(logits, {1});
    const at::Tensor kept = labels.ne(ignore_index).to(at::kFloat);
    return at::cross_entropy_loss(logits, labels, {}, at::Reduction::Sum, ignore_index) +
           (lse * lse * kept).sum() * z_loss;
  };
}

}  // namespace qlora
