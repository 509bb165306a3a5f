// The optimizer step's utilities: AdamW bit for bit against torch::optim::AdamW (libtorch's C++ API)
// and its checkpoint state, the HF learning-rate schedules against their formulas, gradient
// clipping against torch.nn.utils.clip_grad_norm_'s arithmetic (one rank and two), and the dynamic
// loss scaler's GradScaler behaviour (skip on inf, backoff, growth, state).
// torch headers before Catch: c10 defines a CHECK macro that Catch must override.
#include <torch/optim/adamw.h>

#include "qlora/checkpoint.h"
#include "qlora/error.h"
#include "qlora/optim.h"
#include "test_cuda_util.h"

#include <catch2/catch_approx.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_floating_point.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>

using Catch::Matchers::ContainsSubstring;
using Catch::Matchers::WithinRel;

namespace {

bool bitwise_equal(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || !a.sizes().equals(b.sizes())) return false;
  return a.reshape({-1}).contiguous().view(at::kByte).equal(b.reshape({-1}).contiguous().view(at::kByte));
}

std::vector<std::vector<int64_t>> kShapes = {{7, 13}, {5}, {3, 4, 5}, {1}, {64, 33}};

std::vector<at::Tensor> random_tensors(at::Generator& g, double scale) {
  std::vector<at::Tensor> out;
  for (const auto& s : kShapes) out.push_back(at::randn(s, g, at::kFloat) * scale);
  return out;
}

std::vector<std::string> names_for(size_t n) {
  std::vector<std::string> out;
  for (size_t i = 0; i < n; ++i) out.push_back("layers." + std::to_string(i) + ".lora_A");
  return out;
}

// Runs `steps` steps of ours and of torch::optim::AdamW from the same start and grads; the lr
// changes every step (as a schedule does) to cover per-step lr.
void compare_with_torch(double weight_decay, int steps) {
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(1234);
  const std::vector<at::Tensor> init = random_tensors(g, 1.0);
  std::vector<at::Tensor> ours, theirs;
  for (const auto& t : init) {
    ours.push_back(t.clone());
    theirs.push_back(t.clone().set_requires_grad(true));
  }
  qlora::AdamWOptions o;
  o.beta1 = 0.9;
  o.beta2 = 0.95;
  o.eps = 1e-8;
  o.weight_decay = weight_decay;
  torch::optim::AdamW opt(theirs, torch::optim::AdamWOptions(1e-3).betas({o.beta1, o.beta2}).eps(o.eps).weight_decay(weight_decay));
  qlora::AdamWState st = qlora::adamw_init(names_for(ours.size()), ours);
  for (int s = 0; s < steps; ++s) {
    const double lr = 1e-3 * (1.0 + 0.37 * s);
    static_cast<torch::optim::AdamWOptions&>(opt.param_groups()[0].options()).lr(lr);
    const std::vector<at::Tensor> grads = random_tensors(g, 0.1 + s);
    for (size_t i = 0; i < theirs.size(); ++i) theirs[i].mutable_grad() = grads[i].clone();
    opt.step();
    qlora::adamw_step(st, ours, grads, lr, o);
    for (size_t i = 0; i < ours.size(); ++i) {
      CAPTURE(weight_decay, s, i);
      REQUIRE(bitwise_equal(ours[i], theirs[i].detach()));
    }
  }
  // The state too.
  for (size_t i = 0; i < ours.size(); ++i) {
    auto& ts = static_cast<torch::optim::AdamWParamState&>(*opt.state().at(theirs[i].unsafeGetTensorImpl()));
    CHECK(bitwise_equal(st.exp_avg[i], ts.exp_avg()));
    CHECK(bitwise_equal(st.exp_avg_sq[i], ts.exp_avg_sq()));
    CHECK(ts.step() == st.step);
  }
}

}  // namespace

TEST_CASE("AdamW equals torch::optim::AdamW bit for bit on CPU fp32", "[optim]") {
  SECTION("no weight decay") { compare_with_torch(0.0, 6); }
  SECTION("weight decay") { compare_with_torch(0.01, 6); }
  SECTION("large weight decay") { compare_with_torch(0.3, 4); }
}

TEST_CASE("AdamW: undefined grads leave their parameter alone; bf16 grads are cast", "[optim]") {
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(7);
  std::vector<at::Tensor> p = random_tensors(g, 1.0);
  const std::vector<at::Tensor> before = {p[0].clone(), p[1].clone()};
  qlora::AdamWState st = qlora::adamw_init(names_for(p.size()), p);
  std::vector<at::Tensor> grads = random_tensors(g, 1.0);
  grads[0] = at::Tensor();
  grads[2] = grads[2].to(at::kBFloat16);
  qlora::AdamWOptions o;
  o.weight_decay = 0.1;
  qlora::adamw_step(st, p, grads, 1e-2, o);
  CHECK(bitwise_equal(p[0], before[0]));
  CHECK(st.exp_avg[0].abs().sum().item<float>() == 0.0f);
  CHECK(!bitwise_equal(p[1], before[1]));
  CHECK(st.exp_avg[2].equal(grads[2].to(at::kFloat) * 0.1f));  // (1 - beta1) * g from zero state
  CHECK(st.step == 1);
}

TEST_CASE("AdamW rejects bad inputs with the parameter's name", "[optim]") {
  std::vector<at::Tensor> p = {at::zeros({2, 3}), at::zeros({4})};
  CHECK_THROWS_WITH(qlora::adamw_init({"a"}, p), ContainsSubstring("1 names for 2 parameters"));
  CHECK_THROWS_WITH(qlora::adamw_init({"a", "a"}, p), ContainsSubstring("'a' appears twice"));
  CHECK_THROWS_WITH(qlora::adamw_init({"a", "b"}, {p[0], p[1].to(at::kHalf)}), ContainsSubstring("'b' is Half"));
  qlora::AdamWState st = qlora::adamw_init({"a", "b"}, p);
  CHECK_THROWS_WITH(qlora::adamw_step(st, p, {at::zeros({3, 2}), at::zeros({4})}, 1e-3, {}),
                    ContainsSubstring("grad of 'a' has shape [3,2] (expected the parameter's [2,3])"));
}

TEST_CASE("AdamW state round trip: resumed steps equal uninterrupted ones", "[optim]") {
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(99);
  std::vector<at::Tensor> p = random_tensors(g, 1.0);
  std::vector<std::vector<at::Tensor>> grads;
  for (int s = 0; s < 5; ++s) grads.push_back(random_tensors(g, 1.0));
  qlora::AdamWOptions o;
  o.weight_decay = 0.01;
  const auto names = names_for(p.size());

  std::vector<at::Tensor> a;
  for (const auto& t : p) a.push_back(t.clone());
  qlora::AdamWState sa = qlora::adamw_init(names, a);
  for (int s = 0; s < 5; ++s) qlora::adamw_step(sa, a, grads[s], 2e-3, o);

  std::vector<at::Tensor> b;
  for (const auto& t : p) b.push_back(t.clone());
  qlora::AdamWState sb = qlora::adamw_init(names, b);
  for (int s = 0; s < 3; ++s) qlora::adamw_step(sb, b, grads[s], 2e-3, o);
  qlora::NamedTensors saved;
  for (const auto& [n, t] : qlora::adamw_state_tensors(sb)) saved.emplace_back(n, t.clone());
  CHECK(saved.size() == 2 * p.size() + 1);
  CHECK(saved[0].first == "optimizer.layers.0.lora_A.exp_avg");
  CHECK(saved.back().first == "optimizer.step");

  qlora::AdamWState sc = qlora::adamw_init(names, b);  // fresh state, same parameters
  qlora::adamw_load_state(sc, saved);
  CHECK(sc.step == 3);
  for (int s = 3; s < 5; ++s) qlora::adamw_step(sc, b, grads[s], 2e-3, o);
  for (size_t i = 0; i < p.size(); ++i) CHECK(bitwise_equal(a[i], b[i]));

  // Shape mismatch and missing names are UserErrors naming the tensor; nothing is changed.
  qlora::NamedTensors bad = saved;
  bad[0].second = at::zeros({13, 7});
  qlora::AdamWState sd = qlora::adamw_init(names, b);
  CHECK_THROWS_WITH(qlora::adamw_load_state(sd, bad),
                    ContainsSubstring("'optimizer.layers.0.lora_A.exp_avg' has shape [13,7] (expected [7,13]"));
  CHECK(sd.step == 0);
  CHECK(sd.exp_avg_sq[0].abs().sum().item<float>() == 0.0f);
  bad = saved;
  bad.erase(bad.begin() + 3);
  CHECK_THROWS_WITH(qlora::adamw_load_state(sd, bad),
                    ContainsSubstring("'optimizer.layers.1.lora_A.exp_avg_sq' is missing"));
}

// ---- schedules -------------------------------------------------------------------------------------

TEST_CASE("LR schedules follow transformers' lr_lambda formulas", "[optim]") {
  using K = qlora::LrScheduleKind;
  auto sched = [](K k, int64_t warmup, int64_t total) {
    qlora::LrSchedule s;
    s.kind = k;
    s.base_lr = 1.0;
    s.warmup_steps = warmup;
    s.total_steps = total;
    return s;
  };
  // Expected values written from the formulas: warmup step/warmup; linear (T-step)/(T-warmup);
  // cosine 0.5*(1+cos(pi * 0.5 * 2 * (step-warmup)/(T-warmup))); clamped at 0 past the end.
  struct Row { K kind; int64_t warmup, total, step; double expect; };
  const double pi = M_PI;
  const std::vector<Row> rows = {
      {K::constant, 0, 10, 0, 1.0},           {K::constant, 5, 10, 3, 1.0},
      {K::constant_with_warmup, 4, 10, 0, 0.0}, {K::constant_with_warmup, 4, 10, 1, 0.25},
      {K::constant_with_warmup, 4, 10, 3, 0.75}, {K::constant_with_warmup, 4, 10, 4, 1.0},
      {K::constant_with_warmup, 4, 10, 50, 1.0}, {K::constant_with_warmup, 0, 10, 0, 1.0},
      {K::linear, 2, 10, 0, 0.0},   {K::linear, 2, 10, 1, 0.5},    {K::linear, 2, 10, 2, 1.0},
      {K::linear, 2, 10, 3, 7.0 / 8}, {K::linear, 2, 10, 6, 0.5},  {K::linear, 2, 10, 9, 1.0 / 8},
      {K::linear, 2, 10, 10, 0.0},  {K::linear, 2, 10, 12, 0.0},   {K::linear, 0, 4, 0, 1.0},
      {K::linear, 0, 4, 1, 0.75},   {K::linear, 0, 1, 0, 1.0},     {K::linear, 0, 1, 1, 0.0},
      {K::cosine, 3, 11, 0, 0.0},   {K::cosine, 3, 11, 1, 1.0 / 3}, {K::cosine, 3, 11, 2, 2.0 / 3},
      {K::cosine, 3, 11, 3, 1.0},   {K::cosine, 3, 11, 5, 0.5 * (1.0 + std::cos(pi * 0.5 * 2.0 * (2.0 / 8)))},
      {K::cosine, 3, 11, 7, 0.5},   {K::cosine, 3, 11, 10, 0.5 * (1.0 + std::cos(pi * 0.5 * 2.0 * (7.0 / 8)))},
      {K::cosine, 3, 11, 11, 0.0},  {K::cosine, 3, 11, 14, 0.5 * (1.0 + std::cos(pi * 0.5 * 2.0 * (11.0 / 8)))},
      {K::cosine, 0, 100, 0, 1.0},  {K::cosine, 0, 100, 25, 0.5 * (1.0 + std::cos(pi * 0.5 * 2.0 * 0.25))},
      {K::cosine, 10, 10, 10, 1.0},  // warmup == total: progress 0/max(1,0)
  };
  for (const auto& r : rows) {
    CAPTURE(qlora::to_string(r.kind), r.warmup, r.total, r.step);
    const double got = qlora::lr_multiplier(sched(r.kind, r.warmup, r.total), r.step);
    CHECK_THAT(got, WithinRel(r.expect, 1e-15) || Catch::Matchers::WithinAbs(r.expect, 1e-16));
  }
  // Past the end the cosine rises again (HF does not clamp it: max(0, ...) only).
  CHECK(qlora::lr_multiplier(sched(K::cosine, 3, 11), 14) > 0.0);
  qlora::LrSchedule s = sched(K::linear, 2, 10);
  s.base_lr = 2e-4;
  CHECK(qlora::lr_at(s, 1) == 2e-4 * 0.5);

  CHECK(qlora::resolve_warmup_steps(7, 0.5, 100) == 7);
  CHECK(qlora::resolve_warmup_steps(0, 0.03, 100) == 3);
  CHECK(qlora::resolve_warmup_steps(0, 0.031, 100) == 4);  // ceil
  CHECK(qlora::resolve_warmup_steps(0, 0.0, 100) == 0);
  CHECK_THROWS_WITH(qlora::resolve_warmup_steps(0, 1.5, 100), ContainsSubstring("warmup_ratio"));
  CHECK(qlora::lr_schedule_kind_from_string("cosine") == K::cosine);
  CHECK_THROWS_WITH(qlora::lr_schedule_kind_from_string("cosin"), ContainsSubstring("unknown schedule 'cosin'"));
}

// Driven by tests/oracle/schedule_hf.py: writes our lr for a grid of schedules to
// $QLORA_SCHEDULE_ORACLE_DIR/ours.json, which the script compares with transformers' schedulers.
TEST_CASE("schedule values for the HF oracle", "[.schedule_oracle]") {
  const char* dir = std::getenv("QLORA_SCHEDULE_ORACLE_DIR");
  if (!dir) SKIP("QLORA_SCHEDULE_ORACLE_DIR not set");
  nlohmann::json cases = nlohmann::json::array();
  for (const char* kind : {"constant", "constant_with_warmup", "linear", "cosine"})
    for (auto [warmup_steps, ratio, total] : std::vector<std::tuple<int64_t, double, int64_t>>{
             {0, 0.0, 1}, {0, 0.0, 17}, {5, 0.0, 40}, {0, 0.1, 37}, {0, 0.03, 1000}, {13, 0.0, 13}, {3, 0.0, 2}}) {
      qlora::LrSchedule s;
      s.kind = qlora::lr_schedule_kind_from_string(kind);
      s.base_lr = 2e-4;
      s.total_steps = total;
      s.warmup_steps = qlora::resolve_warmup_steps(warmup_steps, ratio, total);
      nlohmann::json lrs = nlohmann::json::array();
      for (int64_t step = 0; step < total + 3; ++step) lrs.push_back(qlora::lr_at(s, step));
      cases.push_back({{"kind", kind}, {"base_lr", s.base_lr}, {"warmup_steps", warmup_steps}, {"warmup_ratio", ratio},
                       {"resolved_warmup", s.warmup_steps}, {"total_steps", total}, {"lrs", lrs}});
    }
  std::ofstream(std::string(dir) + "/ours.json") << cases.dump() << "\n";
  std::printf("schedule oracle: %zu schedules written\n", cases.size());
}

// ---- clipping -----------------------------------------------------------------------------------

namespace {

// torch.nn.utils.clip_grad_norm_ (foreach path), written out: per-tensor norms, norm of norms,
// clip_coef = reciprocal(total + 1e-6) * max_norm, clamped to 1, grads * coef.
std::pair<double, std::vector<at::Tensor>> torch_clip(const std::vector<at::Tensor>& grads, double max_norm) {
  std::vector<at::Tensor> norms;
  for (const auto& g : grads) norms.push_back(at::linalg_vector_norm(g.to(at::kFloat), 2));
  const at::Tensor total = at::linalg_vector_norm(at::stack(norms), 2);
  const at::Tensor coef = (total + 1e-6).reciprocal().mul(max_norm).clamp_max(1.0);
  std::vector<at::Tensor> out;
  for (const auto& g : grads) out.push_back(g * coef);
  return {total.item<double>(), out};
}

}  // namespace

TEST_CASE("clip_grad_norm matches torch's clip_grad_norm_ arithmetic", "[optim]") {
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(5);
  for (double max_norm : {0.5, 1.0, 1e6}) {
    CAPTURE(max_norm);
    std::vector<at::Tensor> grads = random_tensors(g, 0.3);
    const auto [norm, expect] = torch_clip(grads, max_norm);
    const qlora::ClipResult r = qlora::clip_grad_norm(grads, max_norm);
    CHECK(r.finite);
    CHECK_THAT(r.norm, WithinRel(norm, 1e-6));
    CHECK(r.clipped == (max_norm < norm));
    for (size_t i = 0; i < grads.size(); ++i) CHECK(at::allclose(grads[i], expect[i], 1e-6, 0));
    if (r.clipped) {
      double after = 0;
      for (const auto& t : grads) after += t.square().sum().item<double>();
      CHECK_THAT(std::sqrt(after), WithinRel(max_norm, 1e-5));
    }
  }
  SECTION("max_norm 0 measures only") {
    std::vector<at::Tensor> grads = random_tensors(g, 1.0);
    const at::Tensor before = grads[0].clone();
    const qlora::ClipResult r = qlora::clip_grad_norm(grads, 0.0);
    CHECK(r.norm > 1.0);
    CHECK(!r.clipped);
    CHECK(bitwise_equal(grads[0], before));
  }
  SECTION("bf16 grads: the norm is accumulated in fp32") {
    std::vector<at::Tensor> grads = {at::full({4096}, 0.01, at::kBFloat16), at::Tensor()};
    const qlora::ClipResult r = qlora::clip_grad_norm(grads, 1e9);
    const double want = std::sqrt(4096.0) * static_cast<double>(c10::BFloat16(0.01f));
    CHECK_THAT(r.norm, WithinRel(want, 1e-6));
  }
}

TEST_CASE("clip_grad_norm: inf/NaN norm is reported, not applied", "[optim]") {
  for (float bad : {std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()}) {
    std::vector<at::Tensor> grads = {at::ones({3}), at::ones({2})};
    grads[1][1] = bad;
    const at::Tensor a = grads[0].clone();
    const qlora::ClipResult r = qlora::clip_grad_norm(grads, 1.0);
    CHECK(!r.finite);
    CHECK(!std::isfinite(r.norm));
    CHECK(!r.clipped);
    CHECK(bitwise_equal(grads[0], a));
  }
}

TEST_CASE("clip_grad_norm across two ranks equals one rank with every grad", "[optim]") {
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(11);
  const std::vector<at::Tensor> all = random_tensors(g, 1.0);
  std::vector<at::Tensor> one;
  for (const auto& t : all) one.push_back(t.clone());
  const qlora::ClipResult r1 = qlora::clip_grad_norm(one, 1.0);
  // Rank 0 holds grads 0..2, rank 1 the rest; the "all-reduce" adds the other rank's sum.
  std::vector<at::Tensor> r0g, r1g;
  for (size_t i = 0; i < all.size(); ++i) (i < 3 ? r0g : r1g).push_back(all[i].clone());
  const at::Tensor s0 = qlora::grad_sum_of_squares(r0g).clone(), s1 = qlora::grad_sum_of_squares(r1g).clone();
  int calls = 0;
  const qlora::ClipResult a = qlora::clip_grad_norm(r0g, 1.0, [&](at::Tensor& t) { ++calls; t.add_(s1); });
  const qlora::ClipResult b = qlora::clip_grad_norm(r1g, 1.0, [&](at::Tensor& t) { ++calls; t.add_(s0); });
  CHECK(calls == 2);
  CHECK_THAT(a.norm, WithinRel(r1.norm, 1e-6));
  CHECK(a.norm == b.norm);
  CHECK(a.clipped);
  for (size_t i = 0; i < all.size(); ++i) CHECK(at::allclose(i < 3 ? r0g[i] : r1g[i - 3], one[i], 1e-6, 0));
}

// ---- loss scaling ----------------------------------------------------------------------------------

TEST_CASE("loss scaler: GradScaler defaults, unscale in place", "[optim]") {
  qlora::LossScaler s = qlora::make_loss_scaler({}, at::kCPU);
  CHECK(qlora::loss_scale_value(s) == 65536.0);
  const at::Tensor loss = at::scalar_tensor(0.5, at::kFloat);
  CHECK(qlora::scale_loss(s, loss).item<float>() == 32768.0f);
  std::vector<at::Tensor> grads = {at::full({5}, 65536.0 * 3), at::full({2, 3}, 65536.0 * 0.25)};
  CHECK(!qlora::unscale_grads(s, grads));
  CHECK(grads[0].eq(3.0f).all().item<bool>());
  CHECK(grads[1].eq(0.25f).all().item<bool>());
  qlora::update_loss_scale(s);
  CHECK(qlora::loss_scale_value(s) == 65536.0);
  CHECK(s.growth_tracker.item<int>() == 1);
}

TEST_CASE("loss scaler: injected inf skips the step and halves the scale", "[optim]") {
  for (float bad : {std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                    std::numeric_limits<float>::quiet_NaN()}) {
    qlora::LossScaler s = qlora::make_loss_scaler({}, at::kCPU);
    qlora::update_loss_scale(s);  // one good step: tracker 1
    std::vector<at::Tensor> grads = {at::ones({4}), at::ones({3}, at::kHalf), at::ones({2})};
    grads[1][2] = bad;
    CHECK(qlora::unscale_grads(s, grads));
    qlora::update_loss_scale(s);
    CHECK(qlora::loss_scale_value(s) == 32768.0);
    CHECK(s.growth_tracker.item<int>() == 0);
    // The next clean step is not skipped.
    std::vector<at::Tensor> ok = {at::ones({4})};
    CHECK(!qlora::unscale_grads(s, ok));
  }
}

TEST_CASE("loss scaler: growth after growth_interval good steps; state round trip", "[optim]") {
  qlora::LossScalerOptions o;
  o.init_scale = 1024;
  o.growth_interval = 3;
  qlora::LossScaler s = qlora::make_loss_scaler(o, at::kCPU);
  auto good_step = [&] {
    std::vector<at::Tensor> g = {at::ones({8})};
    REQUIRE(!qlora::unscale_grads(s, g));
    qlora::update_loss_scale(s);
  };
  good_step();
  good_step();
  CHECK(qlora::loss_scale_value(s) == 1024.0);
  good_step();
  CHECK(qlora::loss_scale_value(s) == 2048.0);
  CHECK(s.growth_tracker.item<int>() == 0);
  good_step();
  const nlohmann::json st = qlora::loss_scaler_state(s);
  CHECK(st["scale"] == 2048.0);
  CHECK(st["_growth_tracker"] == 1);
  qlora::LossScaler t = qlora::make_loss_scaler(o, at::kCPU);
  qlora::load_loss_scaler_state(t, st);
  CHECK(qlora::loss_scale_value(t) == 2048.0);
  CHECK(t.growth_tracker.item<int>() == 1);
  CHECK_THROWS_WITH(qlora::load_loss_scaler_state(t, nlohmann::json{{"scale", "big"}}), ContainsSubstring("loss scaler state"));
  qlora::LossScalerOptions zero;
  zero.init_scale = 0;
  CHECK_THROWS_WITH(qlora::make_loss_scaler(zero, at::kCPU), ContainsSubstring("init_scale"));
}

TEST_CASE("loss scaler: one rank's inf skips the step on every rank", "[optim]") {
  qlora::LossScaler s = qlora::make_loss_scaler({}, at::kCPU);
  std::vector<at::Tensor> grads = {at::ones({4})};
  // This rank is clean; the all-reduce brings the other rank's found_inf = 1.
  CHECK(qlora::unscale_grads(s, grads, [](at::Tensor& t) { t.add_(1.0); }));
  qlora::update_loss_scale(s);
  CHECK(qlora::loss_scale_value(s) == 32768.0);
}

// ---- CUDA: the same code on device tensors (fused _foreach and _amp kernels) ----------------------

TEST_CASE("AdamW, clipping, loss scaling and RNG state on CUDA agree with the CPU", "[cuda][optim]") {
  QLORA_REQUIRE_CUDA();
  const at::Device cuda(at::kCUDA, 0);
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(21);
  std::vector<at::Tensor> cpu = random_tensors(g, 1.0), dev;
  for (const auto& t : cpu) dev.push_back(t.to(cuda));
  const auto names = names_for(cpu.size());
  qlora::AdamWState sc = qlora::adamw_init(names, cpu), sd = qlora::adamw_init(names, dev);
  qlora::AdamWOptions o;
  o.weight_decay = 0.01;
  for (int s = 0; s < 4; ++s) {
    std::vector<at::Tensor> gc = random_tensors(g, 0.5), gd;
    for (const auto& t : gc) gd.push_back(t.to(cuda).to(s % 2 ? at::kBFloat16 : at::kFloat));
    for (auto& t : gc) t = t.to(s % 2 ? at::kBFloat16 : at::kFloat).to(at::kFloat);
    qlora::adamw_step(sc, cpu, gc, 1e-3, o);
    qlora::adamw_step(sd, dev, gd, 1e-3, o);
  }
  for (size_t i = 0; i < cpu.size(); ++i) {
    CHECK(dev[i].is_cuda());
    CHECK(at::allclose(dev[i].cpu(), cpu[i], 1e-5, 1e-7));
    // CUDA runs torch's fused AdamW kernel, whose (1 - beta2) is 1 - float(0.999) = 0.00099998713
    // where the CPU's foreach form rounds the double 1 - 0.999 to 0.001f: every new g^2 term is
    // 1.29e-5 smaller relative; anything beyond that would be a real difference.
    CHECK(at::allclose(sd.exp_avg_sq[i].cpu(), sc.exp_avg_sq[i], 2e-5, 1e-12));
    CHECK(at::allclose(sd.exp_avg[i].cpu(), sc.exp_avg[i], 1e-5, 1e-8));  // m may cancel to ~0: an absolute floor
  }

  std::vector<at::Tensor> gc = random_tensors(g, 0.3), gd;
  for (const auto& t : gc) gd.push_back(t.to(cuda));
  gd[1] = gd[1].to(at::kBFloat16);
  gc[1] = gd[1].cpu().to(at::kFloat);
  const qlora::ClipResult rc = qlora::clip_grad_norm(gc, 0.5), rd = qlora::clip_grad_norm(gd, 0.5);
  CHECK_THAT(rd.norm, WithinRel(rc.norm, 1e-5));
  CHECK(rd.clipped);
  CHECK(at::allclose(gd[0].cpu(), gc[0], 1e-5, 1e-7));

  qlora::LossScaler s = qlora::make_loss_scaler({}, cuda);
  std::vector<at::Tensor> grads = {at::full({300}, 65536.0 * 2, at::TensorOptions().device(cuda)),
                                   at::ones({7}, at::TensorOptions().device(cuda).dtype(at::kHalf))};
  CHECK(!qlora::unscale_grads(s, grads));
  CHECK(grads[0].eq(2.0f).all().item<bool>());
  qlora::update_loss_scale(s);
  grads[1][3] = std::numeric_limits<float>::infinity();
  CHECK(qlora::unscale_grads(s, grads));
  qlora::update_loss_scale(s);
  CHECK(qlora::loss_scale_value(s) == 32768.0);

  const qlora::NamedTensors rng = qlora::rng_state_tensors();
  bool has_cuda_state = false;
  for (const auto& [n, t] : rng) has_cuda_state |= n == "rng.cuda.0";
  CHECK(has_cuda_state);
  const at::Tensor expect = at::randn({1000}, at::TensorOptions().device(cuda));
  (void)at::randn({77}, at::TensorOptions().device(cuda));
  qlora::restore_rng_state(rng);
  CHECK(at::randn({1000}, at::TensorOptions().device(cuda)).equal(expect));
}
