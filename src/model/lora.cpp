// LoRA: options, PEFT's initialization, parameter names, and the LoRA linear as one autograd
// function  Y = X deq(W)^T (+ b) + s (drop(X) A^T) B^T  with its own backward:
//   dB = s g^T U          (U = drop(X) A^T, saved: [..., r])
//   dU = s g B
//   dA = dU^T drop(X)     (drop(X) rebuilt from X and the saved mask)
//   dX = g deq(W) + drop'(dU A)
// W is dequantized into the shared scratch in the forward and again in the backward; no copy of
// it is saved (the scratch has been overwritten by the next projection by then) -- except in a
// checkpointed layer's recompute (DequantScratch::keep_for_backward), whose backward follows at once.
//
// Facts from PEFT 0.21 (read, not copied): LoraLayer.update_layer: scaling = lora_alpha / r, or
// lora_alpha / sqrt(r) with use_rslora; lora_dropout = nn.Dropout(p) when p > 0 else Identity.
// reset_lora_parameters(init_lora_weights=True): nn.init.kaiming_uniform_(lora_A.weight,
// a=math.sqrt(5)); nn.init.zeros_(lora_B.weight). Linear.forward: result = base_layer(x);
// result = result + lora_B(lora_A(dropout(x))) * scaling.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/TracerMode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "model/internal.h"
#include "qlora/config.h"
#include "qlora/error.h"
#include "qlora/lora.h"

namespace qlora {

const std::vector<std::string>& lora_projection_names() {
  static const std::vector<std::string> names = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  return names;
}

namespace {

template <class Layer>
auto& projection_by_name(Layer& l, const std::string& name, const char* what) {
  if (name == "q_proj") return l.q_proj;
  if (name == "k_proj") return l.k_proj;
  if (name == "v_proj") return l.v_proj;
  if (name == "o_proj") return l.o_proj;
  if (name == "gate_proj") return l.gate_proj;
  if (name == "up_proj") return l.up_proj;
  if (name == "down_proj") return l.down_proj;
  throw UserError(std::string(what) + " '" + name +
                  "' is not a projection; expected one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj");
}

bool is_target(const LoraOptions& o, const std::string& name) {
  for (const auto& t : o.target_modules)
    if (t == name) return true;
  return false;
}

}  // namespace

std::optional<LoraLinear>& lora_projection(LoraLayer& layer, const std::string& name) {
  return projection_by_name<LoraLayer>(layer, name, "LoRA target");
}
const std::optional<LoraLinear>& lora_projection(const LoraLayer& layer, const std::string& name) {
  return projection_by_name<const LoraLayer>(layer, name, "LoRA target");
}
const LinearWeight& base_projection(const DecoderLayerWeights& layer, const std::string& name) {
  return projection_by_name<const DecoderLayerWeights>(layer, name, "LoRA target");
}
LinearWeight& base_projection(DecoderLayerWeights& layer, const std::string& name) {
  return projection_by_name<DecoderLayerWeights>(layer, name, "LoRA target");
}

LoraOptions lora_options_from_config(const TrainConfig& config) {
  LoraOptions o;
  o.r = config.lora_r;
  o.alpha = config.lora_alpha;
  o.dropout = config.lora_dropout;
  o.use_rslora = config.use_rslora;
  o.target_modules = config.lora_target_linear ? lora_projection_names() : config.lora_target_modules;
  return o;
}

void validate_lora_options(const LoraOptions& o) {
  if (o.r < 1) throw UserError("lora_r: expected a rank >= 1, found " + std::to_string(o.r));
  if (!(o.alpha > 0.0) || !std::isfinite(o.alpha))
    throw UserError("lora_alpha: expected a finite number > 0, found " + std::to_string(o.alpha));
  if (!(o.dropout >= 0.0 && o.dropout < 1.0))
    throw UserError("lora_dropout: expected a probability in [0, 1), found " + std::to_string(o.dropout));
  if (o.target_modules.empty()) throw UserError("lora_target_modules: expected at least one projection, found none");
  LoraLayer probe;
  for (const auto& t : o.target_modules) lora_projection(probe, t);  // throws for a name outside the seven
}

double lora_scale(const LoraOptions& o) {
  return o.use_rslora ? o.alpha / std::sqrt(static_cast<double>(o.r)) : o.alpha / static_cast<double>(o.r);
}

LoraModel make_lora(const LlamaWeights& model, const LoraOptions& options, uint64_t seed) {
  validate_lora_options(options);
  LoraModel lora;
  lora.options = options;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const at::TensorOptions fp32 = at::TensorOptions().dtype(at::kFloat);
  const double a = std::sqrt(5.0);
  const double gain = std::sqrt(2.0 / (1.0 + a * a));  // torch calculate_gain("leaky_relu", a)
  for (const DecoderLayerWeights& layer : model.layers) {
    LoraLayer& out = lora.layers.emplace_back();
    for (const std::string& name : lora_projection_names()) {
      if (!is_target(options, name)) continue;
      const LinearWeight& base = base_projection(layer, name);
      const double bound = std::sqrt(3.0) * gain / std::sqrt(static_cast<double>(base.in_features));
      LoraLinear l;
      l.A = at::empty({options.r, base.in_features}, fp32).uniform_(-bound, bound, gen).to(model.device).requires_grad_(true);
      l.B = at::zeros({base.out_features, options.r}, fp32.device(model.device)).requires_grad_(true);
      l.scale = lora_scale(options);
      l.dropout = options.dropout;
      lora_projection(out, name) = std::move(l);
    }
  }
  return lora;
}

std::string peft_module_name(int64_t layer, const std::string& projection) {
  const bool attn = projection == "q_proj" || projection == "k_proj" || projection == "v_proj" || projection == "o_proj";
  return "base_model.model.model.layers." + std::to_string(layer) + (attn ? ".self_attn." : ".mlp.") + projection;
}

std::vector<std::pair<std::string, at::Tensor>> named_lora_parameters(const LoraModel& lora) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (size_t i = 0; i < lora.layers.size(); ++i)
    for (const std::string& name : lora_projection_names()) {
      const auto& l = lora_projection(lora.layers[i], name);
      if (!l) continue;
      const std::string m = peft_module_name(static_cast<int64_t>(i), name);
      out.emplace_back(m + ".lora_A.weight", l->A);
      out.emplace_back(m + ".lora_B.weight", l->B);
    }
  return out;
}

int64_t lora_parameter_count(const LoraModel& lora) {
  int64_t n = 0;
  for (const auto& [name, t] : named_lora_parameters(lora)) n += t.numel();
  return n;
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// What the backward needs of the frozen base weight, under the key suffix `k` (a group's member
// index): the NF4 pieces (the packed bytes and absmax -- the model's own tensors, not copies -- in
// saved_data) or the dense weight itself (the model's own), plus the scratch's address.
void save_base_weight(AutogradContext* ctx, const LinearWeight& base, DequantScratch& scratch, const std::string& k = "") {
  ctx->saved_data["scratch"] = static_cast<int64_t>(reinterpret_cast<intptr_t>(&scratch));
  if (base.nf4) {
    save_nf4(ctx, *base.nf4, k);
    return;
  }
  TORCH_CHECK(base.dense.defined(), "lora_linear_forward: the base weight holds neither NF4 nor dense data");
  ctx->saved_data["dense" + k] = base.dense;
}

// The frozen base weight in a forward: a view of the scratch holding deq(W), or the dense weight;
// with scratch.keep_for_backward, deq(W) in a tensor of its own, kept for the backward ("kept" + k).
at::Tensor base_weight_forward(AutogradContext* ctx, const LinearWeight& base, DequantScratch& scratch, at::ScalarType dtype,
                               const std::string& k = "") {
  save_base_weight(ctx, base, scratch, k);
  if (!base.nf4) return base.dense;
  if (!scratch.keep_for_backward) return dequantize_into_scratch(*base.nf4, scratch, dtype);
  at::Tensor w = nf4_dequantize(*base.nf4, dtype);
  ctx->saved_data["kept" + k] = w;
  return w;
}

// The result of a projection whose output is never read (output_read = false): the shape of
// x W^T, one zero element expanded, so that nothing of its size is allocated or written.
at::Tensor unread_output(const at::Tensor& x, const LinearWeight& base) {
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = base.out_features;
  return at::zeros({}, x.options()).expand(shape);
}

// The same weight in the backward: the one the forward kept (handed over: the context lets go of it,
// so it is freed once this GEMM has read it), else -- the scratch holds some other projection's
// weight by now -- an NF4 weight is dequantized again, into the scratch.
at::Tensor base_weight_backward(AutogradContext* ctx, at::ScalarType dtype, const std::string& k = "") {
  if (ctx->saved_data.count("dense" + k)) return ctx->saved_data["dense" + k].toTensor();
  if (auto kept = ctx->saved_data.find("kept" + k); kept != ctx->saved_data.end()) {
    at::Tensor w = kept->second.toTensor();
    ctx->saved_data.erase(kept);
    if (w.scalar_type() == dtype) return w;
  }
  auto* scratch = reinterpret_cast<DequantScratch*>(static_cast<intptr_t>(ctx->saved_data["scratch"].toInt()));
  return dequantize_into_scratch(load_nf4(ctx, k), *scratch, dtype);
}

std::optional<at::Tensor> bias_of(const LinearWeight& w) {
  return w.bias.defined() ? std::optional<at::Tensor>(w.bias) : std::nullopt;
}

// The base alone (an untargeted projection of a LoRA model, NF4): x -> x deq(W)^T + b.
struct BaseLinearFunction : public torch::autograd::Function<BaseLinearFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const LinearWeight* base, DequantScratch* scratch,
                            bool output_read) {
    if (!output_read) {
      save_base_weight(ctx, *base, *scratch);
      return unread_output(x, *base);
    }
    return at::linear(x, base_weight_forward(ctx, *base, *scratch, x.scalar_type()), bias_of(*base));
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor& g = grad_outputs[0];
    return {at::matmul(g, base_weight_backward(ctx, g.scalar_type())), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The projections of one LoraLinearFunction: member i's base weight and its adapter (or none).
struct LoraGroup {
  std::vector<const LinearWeight*> bases;
  std::vector<const LoraLinear*> loras;
};

// One or more projections of the same input x (q/k/v, or gate/up), each Y_i = X deq(W_i)^T (+ b_i)
// + s_i (drop_i(X) A_i^T) B_i^T or its base alone. One function for the group so that x's gradient
// is summed inside the GEMMs (each base and LoRA term accumulated into one dx with beta = 1)
// instead of autograd adding the members' separate gradients afterwards, and so that adapters
// reading the same input share their skinny GEMMs: the adapters are cut into segments, one per
// distinct input -- all adapters without dropout share x (one segment: U = x [A_1; A_2; ..]^T, one
// GEMM reading x once instead of once per adapter, and likewise dA and dx += dU A in the backward);
// an adapter with dropout reads its own drop_i(x) (a segment of its own).
// Inputs: x [..., in] (compute dtype); ab: A_i fp32 [r_i, in], B_i fp32 [out_i, r_i] of the members
// with an adapter, in member order; the rest are not differentiable. Saved: x; per segment U_s
// [..., sum r] and A_s (compute dtype) and its bool dropout mask; per adapter B_i in the compute
// dtype; per member what save_base_weight keeps (key suffix: the member index). output_read =
// false: no y_i (U is still computed: the backward's dB needs it).
struct LoraLinearFunction : public torch::autograd::Function<LoraLinearFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList ab, const LoraGroup* group,
                               DequantScratch* scratch, bool training, bool output_read) {
    const at::ScalarType dtype = x.scalar_type();
    const size_t n = group->bases.size();
    // Segments: member lists; the shared one (no dropout) first, then one per dropout adapter.
    std::vector<std::vector<int64_t>> segments(1);
    std::vector<int64_t> ab_index(n, -1);  // where member i's A is in ab
    for (size_t i = 0, next = 0; i < n; ++i) {
      const LoraLinear* lora = group->loras[i];
      if (lora == nullptr) continue;
      ab_index[i] = static_cast<int64_t>(next);
      next += 2;
      if (training && lora->dropout > 0.0) segments.push_back({static_cast<int64_t>(i)});
      else segments[0].push_back(static_cast<int64_t>(i));
    }
    if (segments[0].empty()) segments.erase(segments.begin());

    variable_list ys(n), saved = {x};
    std::vector<at::Tensor> u_of(n);  // [N, r_i] slices of the segments' U
    for (size_t j = 0; j < segments.size(); ++j) {
      const std::vector<int64_t>& members = segments[j];
      at::Tensor mask, input = x;
      if (members.size() == 1 && training && group->loras[members[0]]->dropout > 0.0) {
        const double p = group->loras[members[0]]->dropout;
        mask = at::empty(x.sizes(), x.options().dtype(at::kBool)).bernoulli_(1.0 - p);
        input = (x * mask).mul_(1.0 / (1.0 - p));  // as at::dropout: x * mask / (1 - p)
        ctx->saved_data["keep" + std::to_string(j)] = 1.0 / (1.0 - p);
      }
      std::vector<at::Tensor> as;
      for (int64_t i : members) as.push_back(ab[static_cast<size_t>(ab_index[i])]);
      const at::Tensor a_seg = (as.size() == 1 ? as[0] : at::cat(as)).to(dtype);  // [sum r, in]
      const at::Tensor u = at::linear(input, a_seg).reshape({-1, a_seg.size(0)});  // [N, sum r]
      int64_t off = 0;
      for (int64_t i : members) {
        const int64_t r = ab[static_cast<size_t>(ab_index[i])].size(0);
        u_of[i] = u.narrow(1, off, r);
        off += r;
      }
      saved.insert(saved.end(), {u, a_seg});
      ctx->saved_data["mask" + std::to_string(j)] = mask;
      ctx->saved_data["segment" + std::to_string(j)] = members;
    }
    for (size_t i = 0; i < n; ++i) {
      const std::string k = std::to_string(i);
      const LinearWeight& base = *group->bases[i];
      at::Tensor y;
      if (output_read) {
        y = at::linear(x, base_weight_forward(ctx, base, *scratch, dtype, k), bias_of(base));
      } else {
        save_base_weight(ctx, base, *scratch, k);
        y = unread_output(x, base);
      }
      ctx->saved_data["lora" + k] = ab_index[i] >= 0;
      if (ab_index[i] >= 0) {
        const at::Tensor b = ab[static_cast<size_t>(ab_index[i]) + 1].to(dtype);
        const double scale = group->loras[i]->scale;
        // PEFT: result + lora_B(lora_A(x)) * scaling, as one GEMM with the add and the scale in its
        // epilogue (y += scale u B^T, one rounding instead of three and no extra passes over y).
        if (output_read) y.view({-1, b.size(0)}).addmm_(u_of[i], b.t(), /*beta=*/1, /*alpha=*/scale);
        saved.push_back(b);
        ctx->saved_data["scale" + k] = scale;
      }
      ys[i] = y;
    }
    ctx->save_for_backward(saved);
    ctx->saved_data["n"] = static_cast<int64_t>(n);
    ctx->saved_data["segments"] = static_cast<int64_t>(segments.size());
    return ys;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const int64_t n = ctx->saved_data["n"].toInt(), n_seg = ctx->saved_data["segments"].toInt(), in = x.size(-1);
    const bool want_dx = ctx->needs_input_grad(0);
    at::Tensor dx;  // [N, in]: the first term written, the others accumulated into it
    auto accumulate = [&](const at::Tensor& a, const at::Tensor& b) {
      if (dx.defined()) dx.addmm_(a, b);  // dx += a b in the GEMM's epilogue
      else dx = at::mm(a, b);
    };
    // Member i's input index (its A; its B is the next one) and its rows of U.
    std::vector<int64_t> input_of(n, -1);
    std::vector<at::Tensor> u_of(n), b_of(n), du_of(n), da_of(n), db_of(n);
    for (int64_t i = 0, next_input = 1, next_b = 1 + 2 * n_seg; i < n; ++i)
      if (ctx->saved_data["lora" + std::to_string(i)].toBool()) {
        input_of[i] = next_input;
        next_input += 2;
        b_of[i] = saved[static_cast<size_t>(next_b++)];
      }
    for (int64_t j = 0; j < n_seg; ++j) {
      const at::Tensor& u = saved[static_cast<size_t>(1 + 2 * j)];
      int64_t off = 0;
      for (int64_t i : ctx->saved_data["segment" + std::to_string(j)].toIntVector()) {
        u_of[i] = u.narrow(1, off, b_of[i].size(1));
        off += b_of[i].size(1);
      }
    }
    // dU is needed for x's gradient or any dA (a segment's dA is one GEMM over all its members' dU).
    bool want_du = want_dx;
    for (int64_t i = 0; i < n; ++i) want_du = want_du || (input_of[i] >= 0 && ctx->needs_input_grad(static_cast<size_t>(input_of[i])));
    // The base terms and each adapter's dB and dU = s g B.
    for (int64_t i = 0; i < n; ++i) {
      const std::string k = std::to_string(i);
      const at::Tensor& g = grad_outputs[static_cast<size_t>(i)];
      const at::Tensor g2 = g.reshape({-1, g.size(-1)});
      if (want_dx) accumulate(g2, base_weight_backward(ctx, g.scalar_type(), k));
      if (input_of[i] < 0) continue;
      const double scale = ctx->saved_data["scale" + k].toDouble();
      if (ctx->needs_input_grad(static_cast<size_t>(input_of[i] + 1))) db_of[i] = mm_as(g2.t(), u_of[i], at::kFloat).mul_(scale);
      if (want_du) du_of[i] = at::mm(g2, b_of[i]).mul_(scale);
    }
    // Per segment: dA = dU^T input, dx += dU A (through the dropout mask for a dropout segment).
    for (int64_t j = 0; j < n_seg; ++j) {
      const std::vector<int64_t> members = ctx->saved_data["segment" + std::to_string(j)].toIntVector();
      if (!want_du) continue;
      const at::Tensor& a_seg = saved[static_cast<size_t>(2 + 2 * j)];
      std::vector<at::Tensor> dus;
      for (int64_t i : members) dus.push_back(du_of[i]);
      const at::Tensor du = dus.size() == 1 ? dus[0] : at::cat(dus, 1);  // [N, sum r]
      const at::Tensor mask = ctx->saved_data["mask" + std::to_string(j)].toTensor();
      const double keep = mask.defined() ? ctx->saved_data["keep" + std::to_string(j)].toDouble() : 1.0;
      const at::Tensor x2 = x.reshape({-1, in});
      bool want_da = false;
      for (int64_t i : members) want_da = want_da || ctx->needs_input_grad(static_cast<size_t>(input_of[i]));
      if (want_da) {
        const at::Tensor input = mask.defined() ? (x2 * mask.reshape({-1, in})).mul_(keep) : x2;
        const at::Tensor da = mm_as(du.t(), input, at::kFloat);  // [sum r, in]
        int64_t off = 0;
        for (int64_t i : members) {
          if (ctx->needs_input_grad(static_cast<size_t>(input_of[i]))) da_of[i] = da.narrow(0, off, b_of[i].size(1));
          off += b_of[i].size(1);
        }
      }
      if (!want_dx) continue;
      if (mask.defined()) {
        at::Tensor dxl = at::mm(du, a_seg);  // [N, in]
        dxl.mul_(mask.reshape({-1, in})).mul_(keep);
        dx.add_(dxl);
      } else {
        accumulate(du, a_seg);
      }
    }
    variable_list grads = {dx.defined() ? dx.view(x.sizes()) : at::Tensor()};  // dx, then dA_i, dB_i
    for (int64_t i = 0; i < n; ++i)
      if (input_of[i] >= 0) grads.insert(grads.end(), {da_of[i], db_of[i]});
    grads.resize(grads.size() + 4);  // group, scratch, training, output_read
    return grads;
  }
};

// While torch::jit::tracer traces (the C++ exporter): the projection as one qlora::nf4_lora_linear
// node (the op registered by libqlora_ops, same numbers) instead of our autograd function's ATen
// calls. The NF4 pieces go in as nf4_quantize returns them: absmax2, code2 and offset empty when
// not nested, else offset a 0-dim fp32 tensor on the weight's device. Taken only above the tracer
// (never from inside an op's kernels, which run with tracer dispatch off).
at::Tensor nf4_lora_linear_through_op(const at::Tensor& x, const LinearWeight& base, const LoraLinear* lora) {
  using OptTensor = std::optional<at::Tensor>;
  using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, const at::Tensor&, int64_t, c10::SymIntArrayRef, const OptTensor&,
                         const OptTensor&, const OptTensor&, double);
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("qlora::nf4_lora_linear", "").typed<Sig>();
  const NF4Tensor& w = *base.nf4;
  const auto f32 = w.packed.options().dtype(at::kFloat);
  const at::Tensor none = at::empty({0}, f32);
  const at::Tensor offset = w.nested ? at::full({}, static_cast<float>(w.offset), f32) : none;
  const std::vector<c10::SymInt> shape = c10::fromIntArrayRefSlow(w.shape).vec();
  return op.call(x, w.packed, w.absmax, w.nested ? w.absmax2 : none, w.nested ? w.code2 : none, offset, w.blocksize,
                 shape, bias_of(base), lora ? OptTensor(lora->A) : std::nullopt,
                 lora ? OptTensor(lora->B) : std::nullopt, lora ? lora->scale : 1.0);
}

}  // namespace

at::Tensor mm_as(const at::Tensor& a, const at::Tensor& b, at::ScalarType out_dtype) {
  const bool half = a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf;
  if (a.is_cuda() && half && out_dtype == at::kFloat) return at::mm(a, b, at::kFloat);
  return at::mm(a, b).to(out_dtype);
}

namespace {
void check_adapter(const at::Tensor& x, const LinearWeight& base, const LoraLinear* lora) {
  TORCH_CHECK(x.size(-1) == base.in_features, "lora_linear_forward: input has ", x.size(-1),
              " features, the weight expects ", base.in_features);
  if (lora == nullptr) return;
  TORCH_CHECK(lora->A.defined() && lora->B.defined() && lora->A.dim() == 2 && lora->B.dim() == 2 &&
                  lora->A.size(1) == base.in_features && lora->B.size(0) == base.out_features &&
                  lora->A.size(0) == lora->B.size(1),
              "lora_linear_forward: LoRA A ", lora->A.sizes(), " / B ", lora->B.sizes(), " do not fit a [",
              base.out_features, ", ", base.in_features, "] weight (expected A [r, in], B [out, r])");
}

// While the C++ tracer records with dispatch on, an NF4 projection goes through the registered op
// (one node in the trace) -- unless it needs LoRA dropout in training, which the op does not do.
bool through_op(const LinearWeight& base, const LoraLinear* lora, bool training) {
  return torch::jit::tracer::isTracing() && at::tracer::impl::is_dispatch_enabled() && base.nf4 &&
         (lora == nullptr || !training || lora->dropout == 0.0);
}
}  // namespace

at::Tensor lora_linear_forward(const at::Tensor& x, const LinearWeight& base, const LoraLinear* lora,
                               DequantScratch& scratch, bool training, bool output_read) {
  check_adapter(x, base, lora);
  if (through_op(base, lora, training)) return nf4_lora_linear_through_op(x, base, lora);
  if (lora == nullptr) {
    if (!base.nf4) return linear_forward(x, base, scratch);
    return BaseLinearFunction::apply(x, &base, &scratch, output_read || !at::GradMode::is_enabled());
  }
  const LoraGroup group{{&base}, {lora}};
  const std::vector<at::Tensor> ab = {lora->A, lora->B};
  return LoraLinearFunction::apply(x, at::TensorList(ab), &group, &scratch, training,
                                   output_read || !at::GradMode::is_enabled())[0];
}

std::vector<at::Tensor> lora_linear_group_forward(const at::Tensor& x, const std::vector<const LinearWeight*>& bases,
                                                  const std::vector<const LoraLinear*>& loras, DequantScratch& scratch,
                                                  bool training) {
  TORCH_CHECK(!bases.empty() && bases.size() == loras.size(), "lora_linear_group_forward: ", bases.size(), " weights and ",
              loras.size(), " adapters");
  bool any_lora = false, any_op = false;
  for (size_t i = 0; i < bases.size(); ++i) {
    check_adapter(x, *bases[i], loras[i]);
    any_lora = any_lora || loras[i] != nullptr;
    any_op = any_op || through_op(*bases[i], loras[i], training);
  }
  std::vector<at::Tensor> ys;
  if (!any_lora || any_op) {  // one projection at a time, exactly as lora_linear_forward
    for (size_t i = 0; i < bases.size(); ++i) ys.push_back(lora_linear_forward(x, *bases[i], loras[i], scratch, training));
    return ys;
  }
  const LoraGroup group{bases, loras};
  std::vector<at::Tensor> ab;
  for (const LoraLinear* l : loras)
    if (l != nullptr) ab.insert(ab.end(), {l->A, l->B});
  return LoraLinearFunction::apply(x, at::TensorList(ab), &group, &scratch, training, /*output_read=*/true);
}

}  // namespace qlora
