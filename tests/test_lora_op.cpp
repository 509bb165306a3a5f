// qlora::nf4_lora_linear through the dispatcher (its CPU, Meta and Autograd kernels) against the
// trainer's lora_linear_forward on odd sizes, with and without bias and LoRA, nested and not, fp32
// and bf16; argument checks; the fused_linear_cross_entropy op's (traceable) Autograd kernel against
// the C++ API the trainer uses; and the tracing hooks: a torch::jit trace of lora_linear_forward and
// of fused_linear_cross_entropy records one qlora op node each.
// torch headers before Catch: c10 defines a CHECK macro that Catch must override.
#include "qlora/flce.h"
#include "qlora/lora.h"
#include "qlora/model.h"
#include "qlora/nf4.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/csrc/jit/ir/ir.h>

#include <catch2/catch_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <optional>
#include <string>
#include <vector>

using Catch::Matchers::ContainsSubstring;

namespace {

using OptTensor = std::optional<at::Tensor>;
using LoraSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, int64_t, c10::SymIntArrayRef, const OptTensor&,
                           const OptTensor&, const OptTensor&, double);

auto lora_op() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("qlora::nf4_lora_linear", "").typed<LoraSig>();
}

double rel_err(const at::Tensor& a, const at::Tensor& b) {
  return ((a.to(at::kDouble) - b.to(at::kDouble)).norm() / b.to(at::kDouble).norm().clamp_min(1e-30)).item<double>();
}

// The op's NF4 arguments as nf4_quantize returns them (empty absmax2/code2/offset when not nested).
struct Pieces {
  at::Tensor packed, absmax, absmax2, code2, offset;
};
Pieces pieces_of(const qlora::NF4Tensor& t) {
  const at::Tensor none = at::empty({0}, at::kFloat);
  if (!t.nested) return {t.packed, t.absmax, none, none, none};
  return {t.packed, t.absmax, t.absmax2, t.code2, at::full({}, static_cast<float>(t.offset), at::kFloat)};
}

at::Tensor call_op(const at::Tensor& x, const Pieces& p, const qlora::NF4Tensor& t, const OptTensor& bias,
                   const OptTensor& A, const OptTensor& B, double scale) {
  const std::vector<c10::SymInt> shape = c10::fromIntArrayRefSlow(t.shape).vec();
  return lora_op().call(x, p.packed, p.absmax, p.absmax2, p.code2, p.offset, t.blocksize, shape, bias, A, B, scale);
}

int count_nodes(const torch::jit::Graph& g, const std::string& kind) {
  int n = 0;
  for (const torch::jit::Node* node : g.nodes())
    if (std::string(node->kind().toQualString()) == kind) ++n;
  return n;
}

}  // namespace

TEST_CASE("nf4_lora_linear through the dispatcher equals lora_linear_forward: y, dX, dA, dB", "[lora][ops]") {
  const bool nested = GENERATE(true, false);
  const bool with_bias = GENERATE(true, false);
  const bool with_lora = GENERATE(true, false);
  const at::ScalarType dtype = GENERATE(at::kFloat, at::kBFloat16);
  CAPTURE(nested, with_bias, with_lora, dtype);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(9);
  const int64_t in = 29, out = 37, r = 3;  // odd: 37 * 29 elements, a partial last block of 64
  qlora::LinearWeight w;
  w.nf4 = qlora::nf4_quantize(at::randn({out, in}, gen) * 0.2, 64, nested);
  if (with_bias) w.bias = at::randn({out}, gen).to(dtype);
  w.out_features = out;
  w.in_features = in;
  const at::Tensor A0 = at::randn({r, in}, gen) * 0.3, B0 = at::randn({out, r}, gen) * 0.3;
  const at::Tensor x0 = at::randn({3, 7, in}, gen).to(dtype);
  const at::Tensor g = at::randn({3, 7, out}, gen).to(dtype);

  // The trainer's path.
  qlora::LoraLinear l{.A = A0.clone().requires_grad_(true), .B = B0.clone().requires_grad_(true), .scale = 0.7};
  const at::Tensor xr = x0.clone().requires_grad_(true);
  qlora::DequantScratch scratch;
  const at::Tensor yr = qlora::lora_linear_forward(xr, w, with_lora ? &l : nullptr, scratch, /*training=*/false);

  // The op.
  const at::Tensor xo = x0.clone().requires_grad_(true);
  const at::Tensor Ao = A0.clone().requires_grad_(true), Bo = B0.clone().requires_grad_(true);
  const at::Tensor yo = call_op(xo, pieces_of(*w.nf4), *w.nf4, with_bias ? OptTensor(w.bias) : std::nullopt,
                                with_lora ? OptTensor(Ao) : std::nullopt,
                                with_lora ? OptTensor(Bo) : std::nullopt, 0.7);
  REQUIRE(yo.requires_grad());
  CHECK(yo.scalar_type() == dtype);
  CHECK(yo.sizes() == yr.sizes());
  CHECK(rel_err(yo.detach(), yr.detach()) <= 1e-6);

  const std::vector<at::Tensor> want = with_lora ? torch::autograd::grad({yr}, {xr, l.A, l.B}, {g})
                                                 : torch::autograd::grad({yr}, {xr}, {g});
  const std::vector<at::Tensor> got = with_lora ? torch::autograd::grad({yo}, {xo, Ao, Bo}, {g})
                                                : torch::autograd::grad({yo}, {xo}, {g});
  REQUIRE(got.size() == want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    CAPTURE(i);
    CHECK(got[i].scalar_type() == want[i].scalar_type());  // x's dtype; fp32 for the fp32 masters
    CHECK(rel_err(got[i], want[i]) <= 1e-6);
  }
  if (with_lora) {
    // Only the masters asked for: the dx work is skipped, dA and dB are the same.
    const at::Tensor y2 = call_op(x0, pieces_of(*w.nf4), *w.nf4, std::nullopt, Ao, Bo, 0.7);
    const auto g2 = torch::autograd::grad({y2}, {Ao, Bo}, {g});
    CHECK(rel_err(g2[0], want[1]) <= 1e-6);
    CHECK(rel_err(g2[1], want[2]) <= 1e-6);
  }
}

TEST_CASE("nf4_lora_linear: no grad, Meta shapes, argument checks", "[lora][ops]") {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(3);
  const qlora::NF4Tensor t = qlora::nf4_quantize(at::randn({37, 29}, gen), 64, true);
  const Pieces p = pieces_of(t);
  const at::Tensor A = at::randn({4, 29}, gen).requires_grad_(true), B = at::randn({37, 4}, gen).requires_grad_(true);
  const at::Tensor x = at::randn({5, 29}, gen);
  {
    at::NoGradGuard no_grad;
    CHECK_FALSE(call_op(x, p, t, std::nullopt, A, B, 2.0).requires_grad());
  }
  // x without grad but the masters with: the Autograd kernel takes it.
  CHECK(call_op(x, p, t, std::nullopt, A, B, 2.0).requires_grad());
  CHECK_FALSE(call_op(x, p, t, std::nullopt, std::nullopt, std::nullopt, 2.0).requires_grad());

  // Meta: the shape [..., out] in x's dtype, from the arguments alone.
  const auto meta = [](std::vector<int64_t> s, at::ScalarType d = at::kFloat) {
    return at::empty(s, at::device(at::kMeta).dtype(d));
  };
  const Pieces pm{meta({539}, at::kByte), meta({17}, at::kByte), meta({1}), meta({256}), meta({})};
  const at::Tensor ym = call_op(meta({2, 3, 29}, at::kBFloat16), pm, t, meta({37}, at::kBFloat16), meta({4, 29}),
                                meta({37, 4}), 1.0);
  CHECK(ym.is_meta());
  CHECK(ym.scalar_type() == at::kBFloat16);
  CHECK(ym.sizes() == at::IntArrayRef{2, 3, 37});

  CHECK_THROWS_WITH(call_op(at::randn({5, 28}), p, t, std::nullopt, std::nullopt, std::nullopt, 1.0),
                    ContainsSubstring("28 features"));
  CHECK_THROWS_WITH(call_op(x, p, t, std::nullopt, A, std::nullopt, 1.0),
                    ContainsSubstring("lora_a and lora_b must be given together"));
  CHECK_THROWS_WITH(call_op(x, p, t, std::nullopt, A, at::randn({37, 3}), 1.0), ContainsSubstring("differ in r"));
  CHECK_THROWS_WITH(call_op(x, p, t, at::randn({36}), std::nullopt, std::nullopt, 1.0), ContainsSubstring("bias"));
  CHECK_THROWS_WITH(call_op(meta({5, 29}), pm, t, std::nullopt, meta({4, 28}), meta({37, 4}), 1.0),
                    ContainsSubstring("lora_a must be [r, 29]"));
}

TEST_CASE("fused_linear_cross_entropy op: its Autograd kernel gives the C++ API's loss and gradients", "[flce][ops]") {
  using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, c10::string_view, double,
                         double, double, double, int64_t);
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("qlora::fused_linear_cross_entropy", "").typed<Sig>();
  const std::string red = GENERATE("mean", "sum", "none");
  const at::ScalarType dtype = GENERATE(at::kFloat, at::kBFloat16);
  const bool w_grad = GENERATE(true, false);
  CAPTURE(red, dtype, w_grad);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(8);
  const at::Tensor X = at::randn({23, 29}, gen).to(dtype), W = (at::randn({53, 29}, gen) * 0.3).to(dtype);
  at::Tensor labels = at::randint(0, 53, {23}, gen, at::kLong);
  labels.index_put_({at::indexing::Slice(0, at::indexing::None, 4)}, -100);
  qlora::FlceOptions o;
  o.reduction = qlora::flce_reduction_from_string(red);
  o.softcap = 3;
  o.z_loss = 1e-3;
  o.logit_scale = 0.9;
  o.chunk_size = 5;
  const at::Tensor go = red == "none" ? at::rand({23}, gen) : at::ones({}, at::kFloat);

  const at::Tensor x1 = X.clone().requires_grad_(true), w1 = W.clone().requires_grad_(w_grad);
  const at::Tensor l1 = qlora::fused_linear_cross_entropy(x1, w1, labels, o);
  l1.backward(go);
  const at::Tensor x2 = X.clone().requires_grad_(true), w2 = W.clone().requires_grad_(w_grad);
  const at::Tensor l2 = op.call(x2, w2, labels, -100, red, 0.0, o.logit_scale, o.softcap, o.z_loss, o.chunk_size);
  l2.backward(go);
  CHECK(rel_err(l2.detach(), l1.detach()) <= 1e-7);
  CHECK(x2.grad().scalar_type() == dtype);
  CHECK(rel_err(x2.grad(), x1.grad()) <= 1e-7);
  if (w_grad) {
    CHECK(w2.grad().scalar_type() == dtype);
    CHECK(rel_err(w2.grad(), w1.grad()) <= 1e-7);
  } else {
    CHECK_FALSE(w2.grad().defined());
  }
}

TEST_CASE("tracing hooks: lora_linear_forward and fused_linear_cross_entropy record one qlora node", "[lora][ops]") {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(4);
  qlora::LinearWeight w;
  w.nf4 = qlora::nf4_quantize(at::randn({37, 29}, gen), 64, true);
  w.bias = at::randn({37}, gen);
  w.out_features = 37;
  w.in_features = 29;
  const at::Tensor x = at::randn({2, 5, 29}, gen);
  const at::Tensor A = (at::randn({3, 29}, gen) * 0.3).requires_grad_(true);
  const at::Tensor B = (at::randn({37, 3}, gen) * 0.3).requires_grad_(true);
  qlora::DequantScratch scratch;
  const auto no_names = [](const at::Tensor&) { return std::string(); };

  // The masters are trace inputs (a tensor that requires grad cannot be a trace constant).
  const auto [state, outputs] = torch::jit::tracer::trace(
      {x, A, B},
      [&](torch::jit::Stack in) -> torch::jit::Stack {
        qlora::LoraLinear l{.A = in[1].toTensor(), .B = in[2].toTensor(), .scale = 0.5, .dropout = 0.1};
        return {qlora::lora_linear_forward(in[0].toTensor(), w, &l, scratch, /*training=*/false)};
      },
      no_names);
  const torch::jit::Graph& g = *state->graph;
  CAPTURE(g.toString());
  CHECK(count_nodes(g, "qlora::nf4_lora_linear") == 1);
  CHECK(count_nodes(g, "aten::linear") + count_nodes(g, "aten::matmul") + count_nodes(g, "aten::mm") == 0);
  // The traced call gives the eager numbers.
  qlora::LoraLinear l{.A = A, .B = B, .scale = 0.5};
  CHECK(rel_err(outputs[0].toTensor().detach(), qlora::lora_linear_forward(x, w, &l, scratch, false).detach()) <= 1e-6);

  // An untargeted NF4 projection (no adapter) too.
  const auto [state1, outputs1] = torch::jit::tracer::trace(
      {x},
      [&](torch::jit::Stack in) -> torch::jit::Stack {
        return {qlora::lora_linear_forward(in[0].toTensor(), w, nullptr, scratch, /*training=*/true)};
      },
      no_names);
  CHECK(count_nodes(*state1->graph, "qlora::nf4_lora_linear") == 1);
  CHECK(rel_err(outputs1[0].toTensor(), qlora::lora_linear_forward(x, w, nullptr, scratch, false)) <= 1e-6);

  // Dropout while training is not the op's: the trace keeps our autograd function's ATen calls.
  const auto [state2, outputs2] = torch::jit::tracer::trace(
      {x, A, B},
      [&](torch::jit::Stack in) -> torch::jit::Stack {
        qlora::LoraLinear l2{.A = in[1].toTensor(), .B = in[2].toTensor(), .scale = 0.5, .dropout = 0.1};
        return {qlora::lora_linear_forward(in[0].toTensor(), w, &l2, scratch, /*training=*/true)};
      },
      no_names);
  CHECK(count_nodes(*state2->graph, "qlora::nf4_lora_linear") == 0);

  // Outside tracing nothing changes: the hook is not taken.
  CHECK_FALSE(torch::jit::tracer::isTracing());

  const at::Tensor X = at::randn({11, 29}, gen), W = at::randn({53, 29}, gen);
  const at::Tensor labels = at::randint(0, 53, {11}, gen, at::kLong);
  qlora::FlceOptions o;
  o.chunk_size = 4;
  const auto [state3, outputs3] = torch::jit::tracer::trace(
      {X, W, labels},
      [&](torch::jit::Stack in) -> torch::jit::Stack {
        return {qlora::fused_linear_cross_entropy(in[0].toTensor(), in[1].toTensor(), in[2].toTensor(), o)};
      },
      no_names);
  CAPTURE(state3->graph->toString());
  CHECK(count_nodes(*state3->graph, "qlora::fused_linear_cross_entropy") == 1);
  CHECK(count_nodes(*state3->graph, "aten::mm") == 0);
  CHECK(rel_err(outputs3[0].toTensor(), qlora::fused_linear_cross_entropy(X, W, labels, o)) <= 1e-6);
  // The no-autograd variant (evaluation) too.
  const auto [state4, outputs4] = torch::jit::tracer::trace(
      {X, W, labels},
      [&](torch::jit::Stack in) -> torch::jit::Stack {
        return {qlora::fused_linear_cross_entropy_forward(in[0].toTensor(), in[1].toTensor(), in[2].toTensor(), o)};
      },
      no_names);
  CHECK(count_nodes(*state4->graph, "qlora::fused_linear_cross_entropy") == 1);
  CHECK(rel_err(outputs4[0].toTensor(), outputs3[0].toTensor()) <= 1e-6);
}
