// LoRA: PEFT's initialization and its determinism by seed, option checks, the LoRA linear (NF4 and
// dense base) against autograd on the dequantized reference, dropout, scratch reuse in the
// backward, the model hook (B = 0 is the base model bit for bit; B != 0 equals the merged model),
// PEFT adapter save/load and malformed adapter directories. The "[.peft_oracle]" hook at the end is
// driven by tests/oracle/peft_parity.py (HF PEFT loads our adapter; logits and first-step grads).
// torch headers before Catch: c10 defines a CHECK macro that Catch must override.
#include "model/internal.h"
#include "qlora/config.h"
#include "qlora/error.h"
#include "qlora/hf_config.h"
#include "qlora/lora.h"
#include "qlora/model.h"
#include "qlora/safetensors.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/autograd.h>

#include "test_cuda_util.h"  // after ATen, before Catch2

#include <catch2/catch_test_macros.hpp>
#include <catch2/catch_approx.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "lora_fixture.h"
#include "tiny_llama.h"
#include "test_util.h"

using Catch::Matchers::ContainsSubstring;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

using qlora::test::TempDir;
using namespace qlora::test::lora_fixture;

std::string load_error(const fs::path& dir, const qlora::LlamaWeights& m) {
  try {
    qlora::load_peft_adapter(dir, m, at::kCPU);
  } catch (const qlora::UserError& e) {
    return e.what();
  }
  return "no error";
}

json read_json(const fs::path& p) {
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  return json::parse(ss.str());
}

}  // namespace

TEST_CASE("lora: PEFT init (kaiming uniform A, zero B), scale, names, determinism by seed", "[lora]") {
  TempDir d;
  const qlora::LlamaWeights m = tiny_model(d.path, true);
  const qlora::LoraModel lora = qlora::make_lora(m, all_targets(8, 16.0), 1234);
  REQUIRE(lora.layers.size() == 2);
  int64_t count = 0;
  for (const auto& layer : lora.layers)
    for (const auto& name : qlora::lora_projection_names()) {
      const auto& l = qlora::lora_projection(layer, name);
      REQUIRE(l.has_value());
      const auto& base = qlora::base_projection(m.layers[0], name);
      CHECK(l->A.sizes() == at::IntArrayRef{8, base.in_features});
      CHECK(l->B.sizes() == at::IntArrayRef{base.out_features, 8});
      CHECK((l->A.scalar_type() == at::kFloat && l->B.scalar_type() == at::kFloat));
      CHECK((l->A.requires_grad() && l->B.requires_grad() && l->A.is_leaf()));
      CHECK(l->B.eq(0).all().item<bool>());
      CHECK(l->scale == 2.0);
      const double bound = 1.0 / std::sqrt(static_cast<double>(base.in_features));
      CHECK(l->A.abs().max().item<double>() <= bound);
      count += l->A.numel() + l->B.numel();
    }
  CHECK(qlora::lora_parameter_count(lora) == count);
  CHECK(count == 2 * 8 * (64 + 64 + 64 + 32 + 64 + 32 + 64 + 64 + 64 + 96 + 64 + 96 + 96 + 64));

  // Statistics of U(-1/sqrt(in), 1/sqrt(in)) over all A of in = 64: mean 0, variance bound^2 / 3.
  std::vector<at::Tensor> as;
  for (const auto& layer : lora.layers) as.push_back(layer.q_proj->A.detach().flatten() * 8.0);  // * sqrt(64)
  const at::Tensor all = at::cat(as);
  CHECK(std::fabs(all.mean().item<double>()) < 4.0 * std::sqrt(1.0 / 3.0 / all.numel()));
  CHECK(std::fabs(all.var().item<double>() - 1.0 / 3.0) < 0.05);
  CHECK(all.abs().max().item<double>() > 0.97);

  // The documented order: one CPU generator seeded once, layers, then q, k, v, o, gate, up, down.
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1234);
  for (const auto& layer : lora.layers)
    for (const auto& name : qlora::lora_projection_names()) {
      const at::Tensor& A = qlora::lora_projection(layer, name)->A;
      const double bound = 1.0 / std::sqrt(static_cast<double>(A.size(1)));
      CHECK(at::equal(A, at::empty(A.sizes(), at::kFloat).uniform_(-bound, bound, gen)));
    }
  const qlora::LoraModel same = qlora::make_lora(m, all_targets(8, 16.0), 1234);
  const qlora::LoraModel other = qlora::make_lora(m, all_targets(8, 16.0), 1235);
  CHECK(at::equal(same.layers[1].down_proj->A, lora.layers[1].down_proj->A));
  CHECK(!at::equal(other.layers[1].down_proj->A, lora.layers[1].down_proj->A));

  qlora::LoraOptions o = all_targets(9, 6.0);
  o.use_rslora = true;
  o.target_modules = {"v_proj", "q_proj"};
  const qlora::LoraModel sub = qlora::make_lora(m, o, 1);
  CHECK((sub.layers[0].q_proj && sub.layers[0].v_proj && !sub.layers[0].k_proj && !sub.layers[1].down_proj));
  CHECK(sub.layers[0].q_proj->scale == 2.0);  // 6 / sqrt(9)
  const auto names = qlora::named_lora_parameters(sub);
  REQUIRE(names.size() == 8);
  CHECK(names[0].first == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
  CHECK(names[3].first == "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight");
  CHECK(names[7].first == "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight");
  CHECK(names[0].second.is_same(sub.layers[0].q_proj->A));
  CHECK(qlora::peft_module_name(3, "gate_proj") == "base_model.model.model.layers.3.mlp.gate_proj");
}

TEST_CASE("lora: options from the config and their checks", "[lora]") {
  qlora::TrainConfig c;
  c.lora_r = 5;
  c.lora_alpha = 10;
  c.lora_dropout = 0.1;
  c.lora_target_modules = {"q_proj", "down_proj"};
  qlora::LoraOptions o = qlora::lora_options_from_config(c);
  CHECK((o.r == 5 && o.alpha == 10 && o.dropout == 0.1 && !o.use_rslora));
  CHECK(o.target_modules == std::vector<std::string>{"q_proj", "down_proj"});
  c.lora_target_linear = true;
  CHECK(qlora::lora_options_from_config(c).target_modules.size() == 7);
  CHECK(qlora::lora_scale(o) == 2.0);
  c.use_rslora = true;
  CHECK(qlora::lora_options_from_config(c).use_rslora);
  CHECK(qlora::lora_scale(qlora::lora_options_from_config(c)) == Catch::Approx(10.0 / std::sqrt(5.0)));

  auto err = [](qlora::LoraOptions x) {
    try {
      qlora::validate_lora_options(x);
    } catch (const qlora::UserError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  CHECK(err(o) == "no error");
  CHECK_THAT(err({.r = 0, .alpha = 1, .target_modules = {"q_proj"}}), ContainsSubstring("lora_r"));
  CHECK_THAT(err({.r = 2, .alpha = 0, .target_modules = {"q_proj"}}), ContainsSubstring("lora_alpha"));
  CHECK_THAT(err({.r = 2, .alpha = 1, .dropout = 1.0, .target_modules = {"q_proj"}}), ContainsSubstring("lora_dropout"));
  CHECK_THAT(err({.r = 2, .alpha = 1, .target_modules = {}}), ContainsSubstring("lora_target_modules"));
  CHECK_THAT(err({.r = 2, .alpha = 1, .target_modules = {"lm_head"}}), ContainsSubstring("'lm_head' is not a projection"));
}

namespace {

// The LoRA linear against autograd on the plain formula with the dequantized (or dense) weight.
void check_lora_linear(bool nf4) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(21);
  const int64_t in = 96, out = 200, r = 3;
  qlora::LinearWeight w;
  const at::Tensor W = at::randn({out, in}, gen) * 0.1;
  if (nf4) w.nf4 = qlora::nf4_quantize(W, 64, true);
  else w.dense = W;
  w.bias = at::randn({out}, gen);
  w.out_features = out;
  w.in_features = in;
  qlora::LoraLinear l{.A = (at::randn({r, in}, gen) * 0.2).requires_grad_(true),
                      .B = (at::randn({out, r}, gen) * 0.2).requires_grad_(true), .scale = 0.7, .dropout = 0.0};
  const at::Tensor x = at::randn({2, 5, in}, gen).requires_grad_(true);
  qlora::DequantScratch scratch;
  const at::Tensor y = qlora::lora_linear_forward(x, w, &l, scratch, /*training=*/true);
  const at::Tensor g = at::randn(y.sizes(), gen);
  const auto got = torch::autograd::grad({y}, {x, l.A, l.B}, {g});

  const at::Tensor Wref = nf4 ? qlora::nf4_dequantize(*w.nf4, at::kFloat) : W;
  const at::Tensor xr = x.detach().clone().requires_grad_(true), Ar = l.A.detach().clone().requires_grad_(true),
                   Br = l.B.detach().clone().requires_grad_(true);
  const at::Tensor yr = at::linear(xr, Wref, w.bias) + at::linear(at::linear(xr, Ar), Br) * 0.7;
  const auto want = torch::autograd::grad({yr}, {xr, Ar, Br}, {g});
  CHECK(rel_err(y.detach(), yr.detach()) <= 1e-6);
  CHECK(rel_err(got[0], want[0]) <= 1e-5);
  CHECK(rel_err(got[1], want[1]) <= 1e-5);
  CHECK(rel_err(got[2], want[2]) <= 1e-5);
  CHECK((got[1].scalar_type() == at::kFloat && got[2].scalar_type() == at::kFloat));
  CHECK(got[1].sizes() == at::IntArrayRef{r, in});

  // bf16 compute: A and B are cast for the GEMMs; their gradients still arrive in fp32.
  const at::Tensor xb = x.detach().to(at::kBFloat16).requires_grad_(true);
  qlora::LinearWeight wb = w;
  wb.bias = w.bias.to(at::kBFloat16);
  if (!nf4) wb.dense = W.to(at::kBFloat16);
  const at::Tensor yb = qlora::lora_linear_forward(xb, wb, &l, scratch, true);
  CHECK(yb.scalar_type() == at::kBFloat16);
  const auto gb = torch::autograd::grad({yb}, {xb, l.A, l.B}, {g.to(at::kBFloat16)});
  CHECK((gb[1].scalar_type() == at::kFloat && gb[2].scalar_type() == at::kFloat));
  CHECK(rel_err(gb[1], want[1]) < 3e-2);
  CHECK(rel_err(gb[2], want[2]) < 3e-2);
  CHECK(rel_err(gb[0].to(at::kFloat), want[0]) < 3e-2);
}

}  // namespace

TEST_CASE("lora: NF4 LoRA linear -- y, dX, dA, dB equal autograd on the dequantized weight", "[lora]") {
  check_lora_linear(true);
}

TEST_CASE("lora: dense-base LoRA linear -- y, dX, dA, dB equal autograd", "[lora]") { check_lora_linear(false); }

TEST_CASE("lora on CUDA in bf16: y, dX, dA, dB against the fp32 reference; fp32 gradients", "[lora][cuda]") {
  QLORA_REQUIRE_CUDA();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(34);
  for (const bool dropout : {false, true}) {
    for (const int64_t in : {96, 129}) {  // odd in_features included
      const int64_t out = 200, r = 5;
      const at::Tensor W = at::randn({out, in}, gen) * 0.1;
      qlora::LinearWeight w{.nf4 = qlora::nf4_quantize(W.to(at::kCUDA), 64, true), .out_features = out,
                            .in_features = in};
      qlora::LoraLinear l{.A = (at::randn({r, in}, gen) * 0.2).to(at::kCUDA).requires_grad_(true),
                          .B = (at::randn({out, r}, gen) * 0.2).to(at::kCUDA).requires_grad_(true), .scale = 0.7,
                          .dropout = dropout ? 0.2 : 0.0};
      const at::Tensor x = at::randn({3, 11, in}, gen).to(at::kCUDA, at::kBFloat16).requires_grad_(true);
      const at::Tensor g = at::randn({3, 11, out}, gen).to(at::kCUDA, at::kBFloat16);
      qlora::DequantScratch scratch;
      at::manual_seed(9);
      const at::Tensor y = qlora::lora_linear_forward(x, w, &l, scratch, true);
      const auto got = torch::autograd::grad({y}, {x, l.A, l.B}, {g});
      CHECK((got[1].scalar_type() == at::kFloat && got[2].scalar_type() == at::kFloat));
      CHECK((got[1].is_cuda() && got[2].is_cuda()));
      // The reference: fp32 autograd on the CPU with the same dropout mask, drawn again from the
      // same seed on the same device.
      at::Tensor keep = at::ones({3, 11, in});
      if (dropout) {
        at::manual_seed(9);
        keep = at::empty({3, 11, in}, x.options().dtype(at::kBool)).bernoulli_(0.8).to(at::kCPU, at::kFloat) / 0.8;
      }
      const at::Tensor Wref = qlora::nf4_dequantize(*w.nf4, at::kFloat).cpu();
      const at::Tensor xr = x.detach().cpu().to(at::kFloat).requires_grad_(true);
      const at::Tensor Ar = l.A.detach().cpu().requires_grad_(true), Br = l.B.detach().cpu().requires_grad_(true);
      const at::Tensor yr = at::linear(xr, Wref) + at::linear(at::linear(xr * keep, Ar), Br) * 0.7;
      const auto want = torch::autograd::grad({yr}, {xr, Ar, Br}, {g.cpu().to(at::kFloat)});
      CHECK(rel_err(y.detach().cpu().to(at::kFloat), yr.detach()) < 2e-2);
      CHECK(rel_err(got[0].cpu().to(at::kFloat), want[0]) < 2e-2);
      CHECK(rel_err(got[1].cpu(), want[1]) < 2e-2);
      CHECK(rel_err(got[2].cpu(), want[2]) < 2e-2);
    }
  }
}

namespace {
// With dropout each adapter reads its own dropped input, so the group computes what the members
// would alone, bit for bit (dx aside: the same terms summed in another order); without dropout the
// adapters share one GEMM over x ([A_q; A_v]), equal up to the GEMMs' rounding (`tol`).
void check_lora_group(const at::Device& dev, at::ScalarType dtype, double tol) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(41);
  const int64_t in = 96;
  auto base = [&](int64_t out, bool nf4, bool bias) {
    qlora::LinearWeight w{.out_features = out, .in_features = in};
    const at::Tensor W = (at::randn({out, in}, gen) * 0.1).to(dev);
    if (nf4) w.nf4 = qlora::nf4_quantize(W, 64, true);
    else w.dense = W.to(dtype);
    if (bias) w.bias = at::randn({out}, gen).to(dev, dtype);
    return w;
  };
  // q: NF4 with an adapter; k: NF4 without one (an untargeted projection); v: dense, biased, adapted.
  const qlora::LinearWeight q = base(40, true, false), k = base(24, true, false), v = base(24, false, true);
  for (const double dropout : {0.0, 0.3}) {
    CAPTURE(dev, dtype, dropout);
    auto adapter = [&](int64_t out, int64_t r, double scale) {
      return qlora::LoraLinear{.A = (at::randn({r, in}, gen) * 0.2).to(dev).requires_grad_(true),
                               .B = (at::randn({out, r}, gen) * 0.2).to(dev).requires_grad_(true), .scale = scale,
                               .dropout = dropout};
    };
    const qlora::LoraLinear lq = adapter(40, 3, 0.7), lv = adapter(24, 2, 1.5);
    const std::vector<const qlora::LinearWeight*> bases = {&q, &k, &v};
    const std::vector<const qlora::LoraLinear*> loras = {&lq, nullptr, &lv};
    const at::Tensor x0 = at::randn({2, 5, in}, gen).to(dev, dtype);
    std::vector<at::Tensor> gs;
    for (const int64_t out : {40, 24, 24}) gs.push_back(at::randn({2, 5, out}, gen).to(dev, dtype));
    qlora::DequantScratch scratch;

    const at::Tensor x = x0.clone().requires_grad_(true);
    at::manual_seed(3);
    const std::vector<at::Tensor> ys = qlora::lora_linear_group_forward(x, bases, loras, scratch, /*training=*/true);
    const auto got = torch::autograd::grad(ys, {x, lq.A, lq.B, lv.A, lv.B}, gs);

    const at::Tensor xa = x0.clone().requires_grad_(true);
    at::manual_seed(3);  // the same dropout masks: drawn adapter by adapter in both
    std::vector<at::Tensor> alone;
    for (size_t i = 0; i < bases.size(); ++i) alone.push_back(qlora::lora_linear_forward(xa, *bases[i], loras[i], scratch, true));
    const auto want = torch::autograd::grad(alone, {xa, lq.A, lq.B, lv.A, lv.B}, gs);

    auto close = [&](const at::Tensor& a, const at::Tensor& b) { return rel_err(a.cpu().to(at::kFloat), b.cpu().to(at::kFloat)) < tol; };
    auto same = [&](const at::Tensor& a, const at::Tensor& b) { return dropout > 0 ? at::equal(a, b) : close(a, b); };
    REQUIRE(ys.size() == 3);
    CHECK(at::equal(ys[1], alone[1]));  // k: no adapter
    for (const size_t i : {0, 2}) CHECK(same(ys[i], alone[i]));
    for (size_t i = 1; i < 5; ++i) CHECK(same(got[i], want[i]));  // dA, dB
    CHECK(got[1].scalar_type() == at::kFloat);
    CHECK(close(got[0], want[0]));  // dx: the same terms, summed in another order
    // Without grad (inference): the same values.
    at::NoGradGuard no_grad;
    at::manual_seed(3);
    const std::vector<at::Tensor> eval = qlora::lora_linear_group_forward(x0, bases, loras, scratch, false);
    for (size_t i = 0; i < 3; ++i) CHECK(close(eval[i], qlora::lora_linear_forward(x0, *bases[i], loras[i], scratch, false)));
  }
  qlora::DequantScratch scratch;
  CHECK_THROWS_WITH(qlora::lora_linear_group_forward(at::randn({2, in}), {&q, &k}, {nullptr}, scratch, false),
                    ContainsSubstring("2 weights and 1 adapters"));
  CHECK_THROWS_WITH(qlora::lora_linear_group_forward(at::randn({2, in + 1}), {&q}, {nullptr}, scratch, false),
                    ContainsSubstring("input has 97 features, the weight expects 96"));
}
}  // namespace

TEST_CASE("lora: a group of projections of one input -- each member's values and adapter gradients as alone, x's gradient the sum", "[lora]") {
  check_lora_group(at::Device(at::kCPU), at::kFloat, 1e-6);
}

TEST_CASE("lora on CUDA in bf16: a group of projections of one input as its members alone", "[lora][cuda]") {
  QLORA_REQUIRE_CUDA();
  check_lora_group(at::Device(at::kCUDA), at::kBFloat16, 2e-2);
}

TEST_CASE("lora: dropout on the LoRA branch input only, when training", "[lora]") {
  // Base 0 and A = B = I: y = dropout(x), so the mask is visible in y.
  const int64_t n = 64;
  qlora::LinearWeight w{.dense = at::zeros({n, n}), .out_features = n, .in_features = n};
  qlora::LoraLinear l{.A = at::eye(n).requires_grad_(true), .B = at::eye(n).requires_grad_(true), .scale = 1.0, .dropout = 0.25};
  at::manual_seed(5);
  const at::Tensor x = (at::rand({4, 32, n}) + 0.5).requires_grad_(true);  // no zeros
  qlora::DequantScratch scratch;
  const at::Tensor eval = qlora::lora_linear_forward(x, w, &l, scratch, /*training=*/false);
  CHECK(at::allclose(eval, x, 0, 1e-6));
  const at::Tensor y = qlora::lora_linear_forward(x, w, &l, scratch, /*training=*/true);
  const at::Tensor keep = y.detach() != 0;
  const double dropped = 1.0 - keep.to(at::kFloat).mean().item<double>();
  CHECK(std::fabs(dropped - 0.25) < 0.03);
  CHECK(at::allclose(y.detach(), x.detach() * keep / 0.75, 1e-6, 1e-6));
  // The mask comes from the default generator: the same state gives the same mask, the next call
  // a new one.
  at::manual_seed(5);
  at::rand({4, 32, n});
  CHECK(at::equal(qlora::lora_linear_forward(x, w, &l, scratch, true), y));
  CHECK(!at::equal(qlora::lora_linear_forward(x, w, &l, scratch, true), y));

  const at::Tensor g = at::randn(y.sizes());
  const auto got = torch::autograd::grad({y}, {x, l.A, l.B}, {g});
  const at::Tensor xd = x.detach() * keep / 0.75;  // the dropped input
  CHECK(at::allclose(got[0], g * keep / 0.75, 1e-5, 1e-6));                              // dX (base is 0)
  CHECK(at::allclose(got[1], at::mm(g.reshape({-1, n}).t(), xd.reshape({-1, n})), 1e-5, 1e-5));  // dA = (gB)^T xd
  CHECK(at::allclose(got[2], at::mm(g.reshape({-1, n}).t(), xd.reshape({-1, n})), 1e-5, 1e-5));  // dB = g^T (xd A^T)
}

namespace {
// An NF4 [out, in] weight of random values (blocks of 64, nested absmax).
qlora::LinearWeight random_nf4_weight(at::Generator& gen, int64_t out, int64_t in) {
  qlora::LinearWeight w;
  w.nf4 = qlora::nf4_quantize(at::randn({out, in}, gen), 64, true);
  w.out_features = out;
  w.in_features = in;
  return w;
}
}  // namespace

TEST_CASE("lora: the backward re-dequantizes W into the same scratch and keeps no copy of it", "[lora]") {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(8);
  auto make = [&](int64_t out, int64_t in) { return random_nf4_weight(gen, out, in); };
  const qlora::LinearWeight w = make(200, 96), other = make(100, 96), bigger = make(300, 96);
  qlora::LoraLinear l{.A = (at::randn({3, 96}, gen) * 0.1).requires_grad_(true),
                      .B = (at::randn({200, 3}, gen) * 0.1).requires_grad_(true), .scale = 2.0};
  const at::Tensor x = at::randn({2, 5, 96}, gen).requires_grad_(true);
  const at::Tensor g = at::randn({2, 5, 200}, gen);
  const at::Tensor Wref = qlora::nf4_dequantize(*w.nf4, at::kFloat);
  const at::Tensor want_dx = at::matmul(g, Wref) + at::matmul(at::matmul(g, l.B.detach()) * 2.0, l.A.detach());

  qlora::DequantScratch scratch;
  const at::Tensor y = qlora::lora_linear_forward(x, w, &l, scratch, true);
  const void* ptr = scratch.buffer.data_ptr();
  qlora::lora_linear_forward(x.detach(), other, nullptr, scratch, true);  // the next projection overwrites it
  scratch.buffer.fill_(NAN);                                              // whatever is there now is not W
  const auto got = torch::autograd::grad({y}, {x}, {g});
  CHECK(scratch.buffer.data_ptr() == ptr);  // dequantized into the scratch, not a new tensor
  CHECK(rel_err(got[0], want_dx) <= 1e-5);
  CHECK(at::allclose(scratch.buffer.narrow(0, 0, 200 * 96).view({200, 96}), Wref));

  // The graph holds no reference to the scratch's memory: growing the scratch frees the old buffer
  // while y's graph is alive, and the backward still gets W right (into the new buffer).
  const at::Tensor y2 = qlora::lora_linear_forward(x, w, &l, scratch, true);
  const c10::weak_intrusive_ptr<c10::StorageImpl> old = scratch.buffer.storage().getWeakStorageImpl();
  qlora::linear_forward(x.detach(), bigger, scratch);  // reallocates (300 x 96 > 200 x 96)
  CHECK(old.expired());
  const void* grown = scratch.buffer.data_ptr();
  const auto got2 = torch::autograd::grad({y2}, {x}, {g});
  CHECK(scratch.buffer.data_ptr() == grown);
  CHECK(rel_err(got2[0], want_dx) <= 1e-5);

  // Base only (an untargeted projection of a LoRA model): the same scratch-reusing backward.
  const at::Tensor y3 = qlora::lora_linear_forward(x, w, nullptr, scratch, true);
  CHECK(at::equal(y3, qlora::linear_forward(x.detach(), w, scratch)));
  const auto got3 = torch::autograd::grad({y3}, {x}, {g});
  CHECK(scratch.buffer.data_ptr() == grown);
  CHECK(rel_err(got3[0], at::matmul(g, Wref)) <= 1e-6);
}

TEST_CASE("lora: keep_for_backward -- the forward's dequantized W serves the backward, the scratch unused; bit for bit", "[lora]") {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(9);
  auto make = [&](int64_t out, int64_t in) { return random_nf4_weight(gen, out, in); };
  // A group (q with an adapter, k without: an untargeted projection), a lone adapted projection and
  // a lone base one -- every autograd function that dequantizes an NF4 weight.
  const qlora::LinearWeight q = make(40, 96), k = make(24, 96), o = make(72, 96), d = make(33, 96);
  auto adapter = [&](int64_t out) {
    return qlora::LoraLinear{.A = (at::randn({3, 96}, gen) * 0.2).requires_grad_(true),
                             .B = (at::randn({out, 3}, gen) * 0.2).requires_grad_(true), .scale = 0.7};
  };
  const qlora::LoraLinear lq = adapter(40), lo = adapter(72);
  const at::Tensor x0 = at::randn({2, 5, 96}, gen);
  std::vector<at::Tensor> gs;
  for (const int64_t out : {40, 24, 72, 33}) gs.push_back(at::randn({2, 5, out}, gen));
  auto run = [&](qlora::DequantScratch& scratch, bool keep) {
    const at::Tensor x = x0.clone().requires_grad_(true);
    scratch.keep_for_backward = keep;
    std::vector<at::Tensor> ys = qlora::lora_linear_group_forward(x, {&q, &k}, {&lq, nullptr}, scratch, true);
    ys.push_back(qlora::lora_linear_forward(x, o, &lo, scratch, true));
    ys.push_back(qlora::lora_linear_forward(x, d, nullptr, scratch, true));
    scratch.keep_for_backward = false;  // the backward runs without it, as in the trainer
    std::vector<at::Tensor> out = torch::autograd::grad(ys, {x, lq.A, lq.B, lo.A, lo.B}, gs);
    out.insert(out.end(), ys.begin(), ys.end());
    return out;
  };
  qlora::DequantScratch plain, kept;
  const std::vector<at::Tensor> want = run(plain, false), got = run(kept, true);
  CHECK(plain.buffer.defined());
  CHECK_FALSE(kept.buffer.defined());  // no dequant into the scratch, forward or backward
  REQUIRE(got.size() == want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    CAPTURE(i);
    CHECK(at::equal(got[i], want[i]));
  }
  // Without grad (no backward to keep it for) the weights are still dequantized once each.
  at::NoGradGuard no_grad;
  kept.keep_for_backward = true;
  CHECK(at::equal(qlora::lora_linear_forward(x0, o, &lo, kept, true), want[7]));
  kept.keep_for_backward = false;
}

TEST_CASE("lora: model hook -- B = 0 is the base model bit for bit; B != 0 equals the merged weights", "[lora][model]") {
  for (bool in_4bit : {true, false}) {
    INFO("NF4 " << in_4bit);
    TempDir d;
    const qlora::LlamaWeights m = tiny_model(d.path, in_4bit);
    const at::Tensor ids = ids_of({2, 9}, 3);
    qlora::LoraModel lora = qlora::make_lora(m, all_targets(), 7);
    qlora::DequantScratch scratch;
    at::Tensor base, with;
    {
      at::NoGradGuard ng;
      base = qlora::llama_logits(m, {ids, {}}, scratch);
      with = qlora::llama_logits(m, {ids, {}}, scratch, &lora, /*training=*/true);
    }
    CHECK(at::equal(base, with));

    randomize_b(lora, 99);
    // The merged model: W' = deq(W) + scale B A (fp32, dense).
    qlora::LlamaWeights merged = m;
    for (size_t i = 0; i < m.layers.size(); ++i)
      for (const auto& name : qlora::lora_projection_names()) {
        auto& bw = const_cast<qlora::LinearWeight&>(qlora::base_projection(merged.layers[i], name));
        const auto& l = *qlora::lora_projection(lora.layers[i], name);
        const at::Tensor W = bw.nf4 ? qlora::nf4_dequantize(*bw.nf4, at::kFloat) : bw.dense;
        bw.nf4.reset();
        bw.dense = W + l.scale * at::mm(l.B.detach(), l.A.detach());
      }
    {
      at::NoGradGuard ng;
      const at::Tensor ours = qlora::llama_logits(m, {ids, {}}, scratch, &lora);
      const at::Tensor ref = qlora::llama_logits(merged, {ids, {}}, scratch);
      CHECK(rel_err(ours, ref) < 1e-5);
      CHECK(rel_err(ours, base) > 1e-3);  // the adapter matters
    }

    // Gradients through the whole model (every layer's backward re-dequantizing into the one
    // scratch) equal plain autograd through the merged weights W' = deq(W) + scale B A.
    std::vector<at::Tensor> ref_params;
    for (size_t i = 0; i < m.layers.size(); ++i)
      for (const auto& name : qlora::lora_projection_names()) {
        auto& bw = const_cast<qlora::LinearWeight&>(qlora::base_projection(merged.layers[i], name));
        const auto& l = *qlora::lora_projection(lora.layers[i], name);
        const qlora::LinearWeight& orig = qlora::base_projection(m.layers[i], name);
        const at::Tensor W = orig.nf4 ? qlora::nf4_dequantize(*orig.nf4, at::kFloat) : orig.dense;
        const at::Tensor A = l.A.detach().clone().requires_grad_(true), B = l.B.detach().clone().requires_grad_(true);
        bw.dense = W + l.scale * at::mm(B, A);
        ref_params.push_back(A);
        ref_params.push_back(B);
      }
    const at::Tensor R = at::randn({2, 9, 100});
    (qlora::llama_logits(m, {ids, {}}, scratch, &lora, true) * R).sum().backward();
    (qlora::llama_logits(merged, {ids, {}}, scratch) * R).sum().backward();
    const auto params = qlora::named_lora_parameters(lora);
    REQUIRE(params.size() == ref_params.size());
    double worst = 0;
    for (size_t i = 0; i < params.size(); ++i) worst = std::max(worst, rel_err(params[i].second.grad(), ref_params[i].grad()));
    CHECK(worst < 1e-4);
    INFO("worst LoRA gradient relative error " << worst);
    CHECK(worst < 1e-5);

    at::NoGradGuard ng;
    qlora::LoraModel short_lora = lora;
    short_lora.layers.pop_back();
    CHECK_THROWS_WITH(qlora::llama_logits(m, {ids, {}}, scratch, &short_lora),
                      ContainsSubstring("LoRA adapter has 1 layers, the model has 2"));
  }
}

TEST_CASE("lora: bf16 compute on an NF4 base -- training step with dropout gives fp32 gradients", "[lora]") {
  TempDir d;
  const qlora::LlamaWeights m = tiny_model(d.path, true, at::kBFloat16);
  qlora::LoraOptions o = all_targets(4, 8.0);
  o.dropout = 0.1;
  qlora::LoraModel lora = qlora::make_lora(m, o, 5);
  randomize_b(lora, 6);
  qlora::DequantScratch scratch;
  const at::Tensor logits = qlora::llama_logits(m, {ids_of({2, 9}, 4), {}}, scratch, &lora, /*training=*/true);
  CHECK(scratch.buffer.scalar_type() == at::kBFloat16);
  logits.logsumexp(-1).mean().backward();
  for (const auto& [name, t] : qlora::named_lora_parameters(lora)) {
    INFO(name);
    REQUIRE(t.grad().defined());
    CHECK(t.grad().scalar_type() == at::kFloat);
    CHECK(t.grad().isfinite().all().item<bool>());
    CHECK(t.grad().abs().sum().item<double>() > 0);
  }
}

TEST_CASE("lora: PEFT adapter save/load roundtrip", "[lora]") {
  TempDir d;
  const qlora::LlamaWeights m = tiny_model(d.path / "model", true);
  qlora::LoraOptions o = all_targets(6, 12.5);
  o.dropout = 0.05;
  o.use_rslora = true;
  o.target_modules = {"down_proj", "q_proj", "v_proj"};
  qlora::LoraModel lora = qlora::make_lora(m, o, 3);
  randomize_b(lora, 4);
  const fs::path out = d.path / "adapter";
  qlora::save_peft_adapter(out, lora, m.config, "my/base-model");
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(out)) files.push_back(e.path().filename().string());
  std::sort(files.begin(), files.end());
  CHECK(files == std::vector<std::string>{"adapter_config.json", "adapter_model.safetensors"});

  const json c = read_json(out / "adapter_config.json");
  CHECK(c.at("peft_type") == "LORA");
  CHECK(c.at("task_type") == "CAUSAL_LM");
  CHECK(c.at("r") == 6);
  CHECK(c.at("lora_alpha") == 12.5);
  CHECK(c.at("lora_dropout") == 0.05);
  CHECK(c.at("use_rslora") == true);
  CHECK(c.at("target_modules") == json({"q_proj", "v_proj", "down_proj"}));
  CHECK(c.at("bias") == "none");
  CHECK(c.at("base_model_name_or_path") == "my/base-model");
  CHECK((c.at("use_dora") == false && c.at("fan_in_fan_out") == false && c.at("modules_to_save").is_null()));

  const qlora::SafetensorsFile st(out / "adapter_model.safetensors");
  CHECK(st.names().size() == 12);
  CHECK(st.entry("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight").dtype == "F32");
  CHECK(st.metadata().at("format") == "pt");

  const qlora::LoraModel back = qlora::load_peft_adapter(out, m, at::kCPU);
  CHECK((back.options.r == 6 && back.options.alpha == 12.5 && back.options.dropout == 0.05 && back.options.use_rslora));
  const auto a = qlora::named_lora_parameters(lora), b = qlora::named_lora_parameters(back);
  REQUIRE(a.size() == b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    CHECK(a[i].first == b[i].first);
    CHECK(at::equal(a[i].second, b[i].second));
    CHECK(b[i].second.requires_grad());
  }
  CHECK(back.layers[0].q_proj->scale == lora.layers[0].q_proj->scale);
  CHECK(back.layers[0].q_proj->dropout == 0.05);
  CHECK(!back.layers[0].k_proj);

  // Integer alpha is written as an integer, like PEFT; "all-linear" loads as the seven.
  qlora::LoraModel all = qlora::make_lora(m, all_targets(4, 8.0), 1);
  qlora::save_peft_adapter(d.path / "all", all, m.config, "");
  json ca = read_json(d.path / "all" / "adapter_config.json");
  CHECK(ca.at("lora_alpha").is_number_integer());
  CHECK(ca.at("base_model_name_or_path").is_null());
  ca["target_modules"] = "all-linear";
  qlora::write_file_atomic(d.path / "all" / "adapter_config.json", ca.dump());
  CHECK(qlora::lora_parameter_count(qlora::load_peft_adapter(d.path / "all", m, at::kCPU)) == qlora::lora_parameter_count(all));
  // PEFT saves "all-linear" as fully qualified module names; a layer-dependent adapter round-trips
  // through such names.
  json names = json::array();
  for (int l = 0; l < 2; ++l)
    for (const char* p : {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                          "mlp.up_proj", "mlp.down_proj"})
      names.push_back("model.layers." + std::to_string(l) + "." + p);
  ca["target_modules"] = names;
  qlora::write_file_atomic(d.path / "all" / "adapter_config.json", ca.dump());
  qlora::LoraModel q = qlora::load_peft_adapter(d.path / "all", m, at::kCPU);
  CHECK(q.options.target_modules.size() == 7);
  q.layers[1].gate_proj.reset();
  qlora::save_peft_adapter(d.path / "uneven", q, m.config, "");
  const json cu = read_json(d.path / "uneven" / "adapter_config.json");
  CHECK(cu.at("target_modules").size() == 13);
  CHECK(cu.at("target_modules")[0] == "model.layers.0.self_attn.q_proj");
  const qlora::LoraModel u = qlora::load_peft_adapter(d.path / "uneven", m, at::kCPU);
  CHECK((u.layers[0].gate_proj && !u.layers[1].gate_proj && u.layers[1].up_proj));
}

TEST_CASE("lora: malformed adapter directories are UserErrors naming the problem", "[lora]") {
  TempDir d;
  const qlora::LlamaWeights m = tiny_model(d.path / "model", true);
  qlora::LoraModel lora = qlora::make_lora(m, all_targets(4, 8.0), 1);
  lora.layers[0].k_proj.reset();
  lora.layers[1].k_proj.reset();
  lora.options.target_modules = {"q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  const fs::path good = d.path / "good";
  qlora::save_peft_adapter(good, lora, m.config, "base");
  const json cfg = read_json(good / "adapter_config.json");
  const qlora::SafetensorsFile st(good / "adapter_model.safetensors");
  qlora::NamedTensors tensors;
  for (const auto& n : st.names()) tensors.emplace_back(n, st.tensor(n));
  int k = 0;
  // A copy of the good adapter with the config edited and/or the tensors changed.
  auto variant = [&](const json& c, const qlora::NamedTensors& t) {
    const fs::path p = d.path / ("bad" + std::to_string(k++));
    fs::create_directories(p);
    qlora::write_file_atomic(p / "adapter_config.json", c.dump());
    qlora::save_safetensors(p / "adapter_model.safetensors", t);
    return p;
  };
  auto with = [&](const char* key, const json& v) {
    json c = cfg;
    c[key] = v;
    return variant(c, tensors);
  };
  CHECK(load_error(good, m) == "no error");
  CHECK_THAT(load_error(d.path / "absent", m), ContainsSubstring("not a directory"));
  fs::create_directories(d.path / "empty");
  CHECK_THAT(load_error(d.path / "empty", m), ContainsSubstring("adapter_config.json: not found"));
  {
    const fs::path p = variant(cfg, tensors);
    fs::remove(p / "adapter_model.safetensors");
    CHECK_THAT(load_error(p, m), ContainsSubstring("adapter_model.safetensors: not found"));
    std::ofstream(p / "adapter_model.bin") << "pickle";
    CHECK_THAT(load_error(p, m), ContainsSubstring("adapter_model.bin (a pickle), which is not supported"));
    qlora::write_file_atomic(p / "adapter_config.json", "{\"peft_type\": ");
    CHECK_THAT(load_error(p, m), ContainsSubstring("not valid JSON"));
  }
  CHECK_THAT(load_error(with("peft_type", "IA3"), m), ContainsSubstring("peft_type is 'IA3', expected LORA"));
  // Found by fuzz/peft_adapter: a non-string peft_type escaped as nlohmann's type_error, and an r
  // beyond int was wrapped by get<int> (2^33 became 0).
  CHECK_THAT(load_error(with("peft_type", 6), m), ContainsSubstring("peft_type is 6, expected LORA"));
  CHECK_THAT(load_error(with("peft_type", json::object()), m), ContainsSubstring("peft_type is {}, expected LORA"));
  for (const json& r : {json(int64_t{1} << 33), json(-(int64_t{1} << 33)), json(std::numeric_limits<uint64_t>::max()),
                        json(2.5), json(4097)})
    CHECK_THAT(load_error(with("r", r), m), ContainsSubstring("r is " + r.dump() + ", expected an integer rank in 1..4096"));
  CHECK_THAT(load_error(with("use_dora", true), m), ContainsSubstring("use_dora is set: DoRA is not supported"));
  CHECK_THAT(load_error(with("rank_pattern", {{"q_proj", 8}}), m), ContainsSubstring("rank_pattern"));
  CHECK_THAT(load_error(with("modules_to_save", {"lm_head"}), m), ContainsSubstring("modules_to_save is set"));
  CHECK_THAT(load_error(with("bias", "all"), m), ContainsSubstring("bias is \"all\", expected \"none\""));
  CHECK_THAT(load_error(with("target_modules", ".*proj"), m), ContainsSubstring("only a list of module names or \"all-linear\""));
  CHECK_THAT(load_error(with("target_modules", {"q_proj", "lm_head"}), m),
             ContainsSubstring("target_modules entry 'lm_head' matches none of the model's projections"));
  // PEFT's fully qualified names (how it saves "all-linear"): only layer 0's q_proj targeted, so
  // layer 1's q_proj tensors are unexpected.
  CHECK_THAT(load_error(with("target_modules", {"model.layers.0.self_attn.q_proj"}), m),
             ContainsSubstring("unexpected tensor base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"));
  CHECK_THAT(load_error(with("r", 0), m), ContainsSubstring("lora_r: expected a rank >= 1"));
  CHECK_THAT(load_error(with("r", "4"), m), ContainsSubstring("r is \"4\", expected an integer"));
  CHECK_THAT(load_error(with("r", 8), m), ContainsSubstring("has shape [4, 64], expected [8, 64]"));
  CHECK_THAT(load_error(with("target_modules", {"q_proj", "k_proj"}), m),
             ContainsSubstring("missing tensor base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"));
  {
    json c = cfg;
    c.erase("r");
    CHECK_THAT(load_error(variant(c, tensors), m), ContainsSubstring("missing key"));
  }
  {
    qlora::NamedTensors t = tensors;
    t.emplace_back("base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight", at::zeros({4, 64}));
    CHECK_THAT(load_error(variant(cfg, t), m),
               ContainsSubstring("unexpected tensor base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight"));
  }
  {
    qlora::NamedTensors t = tensors;
    for (auto& [n, v] : t)
      if (n == "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight") v = at::zeros({96, 5});
    CHECK_THAT(load_error(variant(cfg, t), m), ContainsSubstring("up_proj.lora_B.weight has shape [96, 5], expected [96, 4]"));
    for (auto& [n, v] : t)
      if (n == "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight") v = at::zeros({96, 4}, at::kInt);
    CHECK_THAT(load_error(variant(cfg, t), m), ContainsSubstring("has dtype I32, expected F32, BF16 or F16"));
  }
}

// ---- Hook for tests/oracle/peft_parity.py: each subfolder of $QLORA_PEFT_ORACLE_DIR with a
// case.json is one case:
//   case.json  {"model": DIR, "mode": "save" | "load", "r", "alpha", "use_rslora", "target_modules",
//               "seed", "b_seed", "b_std" (save), "adapter": DIR (load)}
//   inputs.safetensors  input_ids int64 [B, T], labels int64 [B, T] (-100: ignored)
// save: make_lora(seed), B ~ N(0, b_std^2) from b_seed (randomize_b), saved to case/adapter;
// load: load_peft_adapter(adapter). Both: fp32 16-bit base, training mode (dropout 0), logits and
// loss = mean cross-entropy of logits[:, :-1] against labels[:, 1:] (transformers' shift), backward;
// ours.safetensors gets logits, loss and every LoRA gradient under PEFT's names.
namespace {

void run_peft_case(const fs::path& dir) {
  const json c = read_json(dir / "case.json");
  const qlora::LlamaWeights m = qlora::load_llama(c.at("model").get<std::string>(), {.load_in_4bit = false, .compute_dtype = at::kFloat});
  qlora::LoraModel lora;
  if (c.at("mode") == "save") {
    const qlora::LoraOptions o{.r = c.at("r").get<int>(), .alpha = c.at("alpha").get<double>(), .dropout = 0.0,
                               .use_rslora = c.value("use_rslora", false),
                               .target_modules = c.at("target_modules").get<std::vector<std::string>>()};
    lora = qlora::make_lora(m, o, c.at("seed").get<uint64_t>());
    randomize_b(lora, c.at("b_seed").get<uint64_t>(), c.at("b_std").get<double>());
    qlora::save_peft_adapter(dir / "adapter", lora, m.config, c.at("model").get<std::string>());
  } else {
    lora = qlora::load_peft_adapter(c.at("adapter").get<std::string>(), m, at::kCPU);
  }
  const qlora::SafetensorsFile in(dir / "inputs.safetensors");
  const at::Tensor ids = in.tensor("input_ids"), labels = in.tensor("labels");
  qlora::DequantScratch scratch;
  const at::Tensor logits = qlora::llama_logits(m, {ids, {}}, scratch, &lora, /*training=*/true);
  const int64_t T = ids.size(1), V = logits.size(-1);
  const at::Tensor loss = at::cross_entropy_loss(logits.narrow(1, 0, T - 1).reshape({-1, V}),
                                                 labels.narrow(1, 1, T - 1).reshape({-1}), {}, at::Reduction::Mean, -100);
  loss.backward();
  qlora::NamedTensors out = {{"logits", logits.detach()}, {"loss", loss.detach().reshape({1})}};
  for (const auto& [name, t] : qlora::named_lora_parameters(lora)) out.emplace_back(name, t.grad());
  qlora::save_safetensors(dir / "ours.safetensors", out);
  std::printf("peft oracle: %s: %s, %zu LoRA tensors, loss %.6f\n", dir.filename().c_str(), c.at("mode").get<std::string>().c_str(),
              out.size() - 2, loss.item<double>());
}

}  // namespace

TEST_CASE("PEFT parity hook: adapters, logits and LoRA gradients for the oracle script", "[.peft_oracle]") {
  const char* root = std::getenv("QLORA_PEFT_ORACLE_DIR");
  if (!root) SKIP("QLORA_PEFT_ORACLE_DIR not set");
  std::vector<fs::path> cases;
  for (const auto& de : fs::directory_iterator(root))
    if (de.is_directory() && fs::exists(de.path() / "case.json")) cases.push_back(de.path());
  std::sort(cases.begin(), cases.end());
  int failed = 0;
  for (const auto& dir : cases) {
    fs::remove(dir / "error.txt");
    try {
      run_peft_case(dir);
    } catch (const std::exception& e) {
      ++failed;
      std::ofstream(dir / "error.txt") << e.what();
      std::printf("peft oracle: %s: error: %s\n", dir.filename().c_str(), e.what());
    }
  }
  std::printf("peft oracle: %zu cases, %d failed\n", cases.size(), failed);
  CHECK(!cases.empty());
  CHECK(failed == 0);
}
