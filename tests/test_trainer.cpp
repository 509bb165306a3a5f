// The trainer (issue 7) on a tiny random Llama (tiny_llama.h) with pretokenized data, so no
// tokenizer is needed: the loss falls; gradient accumulation of 4 equals a micro-batch 4 times
// larger; checkpointing equals the plain graph (with LoRA dropout); resume equals an uninterrupted
// run bitwise (fp32 CPU); an injected overflow is skipped under the loss scaler; `qlora train` end
// to end. All fp32 on the CPU.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/grad_mode.h>

#include "qlora/checkpoint.h"
#include "qlora/config.h"
#include "qlora/metrics.h"
#include "qlora/safetensors.h"
#include "qlora/trainer.h"
#include "train/weight_offload.h"
#include "test_cuda_util.h"
#ifdef QLORA_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

#include <catch2/catch_approx.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "test_util.h"
#include "tiny_llama.h"
#include "trainer_fixture.h"

using Catch::Matchers::ContainsSubstring;
namespace fs = std::filesystem;
using nlohmann::json;
using qlora::test::TempDir;

namespace {

void write_fixture(const fs::path& dir) { qlora::test::write_trainer_fixture(dir); }

std::string yaml(const fs::path& dir, const std::string& extra) { return qlora::test::trainer_yaml(dir, extra); }

qlora::TrainConfig config(const fs::path& dir, const std::vector<std::string>& overrides = {}, const std::string& extra = "") {
  return qlora::parse_config(yaml(dir, extra), "test.yaml", overrides);
}

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) { return (a - b).abs().max().item<double>(); }

}  // namespace

TEST_CASE("trainer: the loss falls over 30 steps (fp32 CPU, NF4 base)", "[train]") {
  TempDir d("qlora_train");
  write_fixture(d.path);
  qlora::TrainerOptions o;
  o.write_outputs = false;
  qlora::Trainer t = qlora::make_trainer(config(d.path, {"adapter=qlora", "load_in_4bit=true"}), o);
  REQUIRE(t.total_steps == 30);
  REQUIRE(t.compute_dtype == at::kFloat);
  std::vector<double> losses;
  while (t.step < t.total_steps) losses.push_back(qlora::train_step(t).loss);
  double first = 0, last = 0;
  for (int i = 0; i < 5; ++i) {
    first += losses[i] / 5;
    last += losses[losses.size() - 1 - i] / 5;
  }
  CAPTURE(first, last);
  for (double l : losses) REQUIRE(std::isfinite(l));
  CHECK(last < first - 0.5);
}

TEST_CASE("trainer: gradient accumulation of 4 equals one micro-batch 4 times larger", "[train]") {
  TempDir d("qlora_train");
  write_fixture(d.path);
  qlora::TrainerOptions o;
  o.write_outputs = false;
  qlora::Trainer a = qlora::make_trainer(config(d.path, {"gradient_accumulation_steps=4", "micro_batch_size=1"}), o);
  qlora::Trainer b = qlora::make_trainer(config(d.path, {"gradient_accumulation_steps=1", "micro_batch_size=4"}), o);
  // Give B (zero at init) values so that every LoRA gradient is non-zero.
  for (qlora::Trainer* t : {&a, &b}) {
    at::NoGradGuard ng;
    auto gen = at::make_generator<at::CPUGeneratorImpl>(3);
    for (at::Tensor& p : t->params) p.add_(at::randn(p.sizes(), gen) * 0.05);
  }
  // Examples of different lengths: padding in the big batch, different counts per micro-batch.
  const std::vector<int64_t> idx = {0, 1, 2, 3};
  std::vector<qlora::Batch> small;
  int64_t targets = 0;
  for (int64_t i : idx) {
    small.push_back(qlora::make_train_batch(a, {i}));
    targets += small.back().n_target_tokens;
  }
  const qlora::Batch big = qlora::make_train_batch(b, idx);
  REQUIRE(big.input_ids.size(0) == 4);
  REQUIRE(big.n_target_tokens == targets);

  double loss_a = 0;
  for (const auto& s : small) loss_a += qlora::forward_backward(a, s, static_cast<double>(targets)).item<double>();
  const double loss_b = qlora::forward_backward(b, big, static_cast<double>(targets)).item<double>();
  CHECK(loss_a == Catch::Approx(loss_b).epsilon(1e-6));
  for (size_t i = 0; i < a.params.size(); ++i) {
    CAPTURE(a.param_names[i]);
    REQUIRE(a.params[i].grad().defined());
    CHECK(max_abs_diff(a.params[i].grad(), b.params[i].grad()) <= 1e-5);
    a.params[i].mutable_grad() = at::Tensor();
    b.params[i].mutable_grad() = at::Tensor();
  }
  // One whole optimizer step each way.
  const qlora::StepResult ra = qlora::train_step_on(a, small);
  const qlora::StepResult rb = qlora::train_step_on(b, {big});
  CHECK(ra.loss == Catch::Approx(rb.loss).epsilon(1e-6));
  CHECK(ra.grad_norm == Catch::Approx(rb.grad_norm).epsilon(1e-5));
  for (size_t i = 0; i < a.params.size(); ++i) {
    CAPTURE(a.param_names[i]);
    CHECK(max_abs_diff(a.params[i], b.params[i]) <= 1e-5);
  }
}

TEST_CASE("trainer: activation checkpointing equals the plain graph, with LoRA dropout", "[train]") {
  TempDir d("qlora_train");
  write_fixture(d.path);
  qlora::TrainerOptions o;
  o.write_outputs = false;
  const std::vector<std::string> common = {"lora_dropout=0.1", "micro_batch_size=2", "gradient_accumulation_steps=2"};
  auto on_cfg = common, off_cfg = common;
  on_cfg.push_back("gradient_checkpointing=true");
  off_cfg.push_back("gradient_checkpointing=false");
  qlora::Trainer on = qlora::make_trainer(config(d.path, on_cfg), o);
  qlora::Trainer off = qlora::make_trainer(config(d.path, off_cfg), o);
  for (qlora::Trainer* t : {&on, &off}) {
    at::NoGradGuard ng;
    auto gen = at::make_generator<at::CPUGeneratorImpl>(3);
    for (at::Tensor& p : t->params) p.add_(at::randn(p.sizes(), gen) * 0.05);
  }
  // Gradients of one micro-batch.
  at::manual_seed(99);
  const qlora::Batch batch = qlora::make_train_batch(on, {4, 5});
  const double l_on = qlora::forward_backward(on, batch, 50.0).item<double>();
  at::manual_seed(99);
  const double l_off = qlora::forward_backward(off, batch, 50.0).item<double>();
  CHECK(std::abs(l_on - l_off) <= 1e-6);
  for (size_t i = 0; i < on.params.size(); ++i) {
    CAPTURE(on.param_names[i]);
    CHECK(max_abs_diff(on.params[i].grad(), off.params[i].grad()) <= 1e-6);
    on.params[i].mutable_grad() = at::Tensor();
    off.params[i].mutable_grad() = at::Tensor();
  }
  // Whole steps: the RNG stream continues identically after a checkpointed backward.
  at::manual_seed(123);
  std::vector<double> a, b;
  for (int s = 0; s < 3; ++s) a.push_back(qlora::train_step(on).loss);
  at::manual_seed(123);
  for (int s = 0; s < 3; ++s) b.push_back(qlora::train_step(off).loss);
  for (int s = 0; s < 3; ++s) CHECK(std::abs(a[s] - b[s]) <= 1e-6);
  for (size_t i = 0; i < on.params.size(); ++i) CHECK(max_abs_diff(on.params[i], off.params[i]) <= 1e-6);
}

TEST_CASE("trainer: checkpointing only the first N layers equals the plain graph, with LoRA dropout", "[train]") {
  TempDir d("qlora_train");
  write_fixture(d.path);
  qlora::TrainerOptions o;
  o.write_outputs = false;
  const std::vector<std::string> common = {"lora_dropout=0.1", "micro_batch_size=2", "gradient_accumulation_steps=2"};
  auto off_cfg = common;
  off_cfg.push_back("gradient_checkpointing=false");
  qlora::Trainer off = qlora::make_trainer(config(d.path, off_cfg), o);
  const int64_t layers = static_cast<int64_t>(off.model.layers.size());
  REQUIRE(layers >= 2);
  at::manual_seed(123);
  std::vector<double> ref;
  for (int s = 0; s < 3; ++s) ref.push_back(qlora::train_step(off).loss);
  for (const int64_t n : {int64_t{0}, int64_t{1}, layers - 1, layers + 5}) {
    CAPTURE(n);
    auto cfg = common;
    cfg.push_back("gradient_checkpointing=true");
    cfg.push_back("gradient_checkpointing_layers=" + std::to_string(n));
    qlora::Trainer t = qlora::make_trainer(config(d.path, cfg), o);
    at::manual_seed(123);
    for (int s = 0; s < 3; ++s) CHECK(std::abs(qlora::train_step(t).loss - ref[s]) <= 1e-6);
    for (size_t i = 0; i < t.params.size(); ++i) CHECK(max_abs_diff(t.params[i], off.params[i]) <= 1e-6);
  }
  // Below -1 is a config error naming the key.
  CHECK_THROWS_WITH(config(d.path, {"gradient_checkpointing_layers=-2"}), ContainsSubstring("gradient_checkpointing_layers"));
}

TEST_CASE("trainer: activation offloading to pinned memory equals keeping the inputs on the GPU", "[train][cuda]") {
  QLORA_REQUIRE_CUDA();
  TempDir d("qlora_train");
  write_fixture(d.path);
  qlora::TrainerOptions o;
  o.write_outputs = false;
  const std::vector<std::string> common = {"device=cuda", "bf16=false", "lora_dropout=0.1", "micro_batch_size=2",
                                           "gradient_accumulation_steps=2"};
  auto on_cfg = common, off_cfg = common;
  on_cfg.push_back("activation_offloading=true");
  off_cfg.push_back("activation_offloading=false");
  qlora::Trainer on = qlora::make_trainer(config(d.path, on_cfg), o);
  qlora::Trainer off = qlora::make_trainer(config(d.path, off_cfg), o);
  at::manual_seed(123);
  std::vector<double> a, b;
  for (int s = 0; s < 3; ++s) a.push_back(qlora::train_step(on).loss);
  at::manual_seed(123);
  for (int s = 0; s < 3; ++s) b.push_back(qlora::train_step(off).loss);
  // The same kernels on the same values: bitwise equal.
  for (int s = 0; s < 3; ++s) CHECK(a[s] == b[s]);
  for (size_t i = 0; i < on.params.size(); ++i) CHECK(max_abs_diff(on.params[i], off.params[i]) == 0.0);
}

namespace {
// Three steps of each trainer, then an evaluation: bitwise equal losses, parameters and eval loss
// (`after_on`, if given, runs after each of `on`'s steps and after its evaluation).
void check_same_training(qlora::Trainer& on, qlora::Trainer& off, const std::function<void()>& after_on = {}) {
  std::vector<double> a, b;
  for (int s = 0; s < 3; ++s) {
    a.push_back(qlora::train_step(on).loss);
    if (after_on) after_on();
  }
  for (int s = 0; s < 3; ++s) b.push_back(qlora::train_step(off).loss);
  for (int s = 0; s < 3; ++s) CHECK(a[s] == b[s]);
  for (size_t i = 0; i < on.params.size(); ++i) CHECK(max_abs_diff(on.params[i], off.params[i]) == 0.0);
  const std::optional<double> ev_on = qlora::evaluate(on), ev_off = qlora::evaluate(off);
  if (after_on) after_on();
  REQUIRE(ev_on.has_value());
  REQUIRE(ev_off.has_value());
  CHECK(*ev_on == *ev_off);
}
}  // namespace

TEST_CASE("trainer: the input embedding in pinned host memory equals keeping it on the GPU", "[train][cuda]") {
  QLORA_REQUIRE_CUDA();
  TempDir d("qlora_train");
  write_fixture(d.path);
  qlora::TrainerOptions o;
  o.write_outputs = false;
  const std::vector<std::string> common = {"device=cuda", "bf16=false", "micro_batch_size=2", "val_set_size=0.2"};
  auto on_cfg = common, off_cfg = common;
  on_cfg.push_back("embedding_offloading=true");
  off_cfg.push_back("embedding_offloading=false");
  qlora::Trainer on = qlora::make_trainer(config(d.path, on_cfg), o);
  qlora::Trainer off = qlora::make_trainer(config(d.path, off_cfg), o);
  // The fixture's model is untied, so the table moved; lm_head stayed on the GPU.
  REQUIRE_FALSE(on.model.lm_head.is_same(on.model.embed_tokens));
  CHECK(on.model.embed_tokens.device().is_cpu());
  CHECK(on.model.embed_tokens.is_pinned());
  CHECK(on.model.lm_head.is_cuda());
  CHECK(off.model.embed_tokens.is_cuda());
  check_same_training(on, off);  // the same rows looked up
}

TEST_CASE("trainer: peak memory by phase on CUDA", "[train][cuda]") {
  QLORA_REQUIRE_CUDA();
#ifdef QLORA_WITH_CUDA
  TempDir d("qlora_train");
  write_fixture(d.path);
  qlora::TrainerOptions o;
  o.write_outputs = false;
  o.track_phase_peaks = true;
  const auto cfg = config(d.path, {"device=cuda", "bf16=false", "micro_batch_size=2"});
  qlora::Trainer t = qlora::make_trainer(cfg, o);
  qlora::train_step(t);  // warm-up: the allocator's pools and the optimizer state exist afterwards
  c10::cuda::device_synchronize();
  t.phase_peak_bytes = {};
  const int64_t idx = t.device.index();
  c10::cuda::CUDACachingAllocator::resetPeakStats(idx);
  const auto allocated = [&](bool peak) {
    const auto st = c10::cuda::CUDACachingAllocator::getDeviceStats(idx);
    const auto& s = st.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)];
    return peak ? s.peak : s.current;
  };
  const int64_t before = allocated(false);
  qlora::train_step(t);
  qlora::note_phase_peak(t);
  CHECK(allocated(true) == allocated(false));  // just reset
  int64_t params = 0;
  for (const at::Tensor& p : t.params) params += p.nbytes();
  for (qlora::TrainPhase ph : {qlora::TrainPhase::forward, qlora::TrainPhase::loss, qlora::TrainPhase::backward,
                               qlora::TrainPhase::optimizer}) {
    CAPTURE(qlora::to_string(ph));
    // Every phase holds the model and the LoRA state that were there before the step.
    CHECK(t.phase_peak_bytes[static_cast<size_t>(ph)] >= before);
  }
  // The backward holds the masters' gradients besides everything else (they are freed only by the next step).
  CHECK(t.phase_peak_bytes[static_cast<size_t>(qlora::TrainPhase::backward)] >= before + params);
  CHECK(t.phase_peak_bytes[static_cast<size_t>(qlora::TrainPhase::load)] == 0);

  // Without the option nothing is counted.
  qlora::TrainerOptions plain;
  plain.write_outputs = false;
  qlora::Trainer u = qlora::make_trainer(cfg, plain);
  qlora::train_step(u);
  qlora::note_phase_peak(u);
  for (const int64_t b : u.phase_peak_bytes) CHECK(b == 0);
#endif
}

TEST_CASE("OffloadedWeight: the device copy equals the host tensor, made once, dropped by release", "[train]") {
  const at::Tensor host = at::randn({37, 11});
  std::vector<at::Device> devices = {at::Device(at::kCPU)};
  if (at::hasCUDA()) devices.emplace_back(at::kCUDA, 0);
  for (const at::Device& dev : devices) {
    CAPTURE(dev);
    const at::Tensor h = dev.is_cuda() ? host.pin_memory() : host;
    qlora::OffloadedWeight w(h, dev);
    CHECK(w.host().is_same(h));
    CHECK_FALSE(w.on_device());
    w.prefetch();
    CHECK(w.on_device());
    const at::Tensor a = w.get();
    CHECK(a.device() == dev);
    CHECK(at::equal(a.cpu(), host));
    w.prefetch();                     // a copy exists: nothing new
    CHECK(w.get().is_same(a));
    w.release();
    CHECK_FALSE(w.on_device());
    const at::Tensor b = w.get();     // get() without a prefetch copies first
    CHECK(at::equal(b.cpu(), host));
    w.prefetch();
    w.release();                      // released before anything read it
    CHECK_FALSE(w.on_device());
  }
  CHECK_THROWS_WITH(qlora::OffloadedWeight(at::zeros({2}, at::TensorOptions().device(at::kMeta)), at::Device(at::kCPU)),
                    ContainsSubstring("must be in host memory"));
}

TEST_CASE("trainer: lm_head_offloading on a CPU device changes nothing", "[train]") {
  TempDir d("qlora_train");
  write_fixture(d.path);
  qlora::TrainerOptions o;
  o.write_outputs = false;
  qlora::Trainer t = qlora::make_trainer(config(d.path, {"lm_head_offloading=true", "max_steps=2"}), o);
  CHECK(t.lm_head_offload == nullptr);
  CHECK_FALSE(t.model.lm_head.is_pinned());
  CHECK(std::isfinite(qlora::train_step(t).loss));
}

TEST_CASE("trainer: lm_head in pinned host memory equals keeping it on the GPU (untied and tied)", "[train][cuda]") {
  QLORA_REQUIRE_CUDA();
  for (const bool tied : {false, true}) {
    CAPTURE(tied);
    TempDir d("qlora_train");
    write_fixture(d.path);
    if (tied) {  // the same checkpoint read as tied: lm_head = embed_tokens (the stored lm_head is ignored)
      nlohmann::json cfg = nlohmann::json::parse(qlora::test::read_file(d.path / "model" / "config.json"));
      cfg["tie_word_embeddings"] = true;
      qlora::test::write_file(d.path / "model" / "config.json", cfg.dump(2));
    }
    qlora::TrainerOptions o;
    o.write_outputs = false;
    const std::vector<std::string> common = {"device=cuda", "bf16=false", "micro_batch_size=2", "val_set_size=0.2"};
    auto on_cfg = common;
    on_cfg.push_back("lm_head_offloading=true");
    qlora::Trainer on = qlora::make_trainer(config(d.path, on_cfg), o);
    qlora::Trainer off = qlora::make_trainer(config(d.path, common), o);
    REQUIRE(on.lm_head_offload != nullptr);
    CHECK(on.model.lm_head.is_cpu());
    CHECK(on.model.lm_head.is_pinned());
    CHECK(off.model.lm_head.is_cuda());
    CHECK(on.model.embed_tokens.is_same(on.model.lm_head) == tied);  // a tied table goes with it
    CHECK(on.model.embed_tokens.is_cpu() == tied);
    // Dropped after each loss and after the evaluation.
    check_same_training(on, off, [&] { CHECK_FALSE(on.lm_head_offload->on_device()); });
  }
}

TEST_CASE("trainer: mlp_tile_tokens trains as the untiled MLP", "[train]") {
  TempDir d("qlora_train");
  write_fixture(d.path);
  qlora::TrainerOptions o;
  o.write_outputs = false;
  const std::vector<std::string> common = {"micro_batch_size=2", "max_steps=3"};
  auto tiled_cfg = common, plain_cfg = common;
  tiled_cfg.push_back("mlp_tile_tokens=7");
  qlora::Trainer tiled = qlora::make_trainer(config(d.path, tiled_cfg), o);
  CHECK(qlora::mlp_tile_tokens() == 7);
  std::vector<double> a, b;
  for (int s = 0; s < 3; ++s) a.push_back(qlora::train_step(tiled).loss);
  qlora::Trainer plain = qlora::make_trainer(config(d.path, plain_cfg), o);
  CHECK(qlora::mlp_tile_tokens() == 0);
  for (int s = 0; s < 3; ++s) b.push_back(qlora::train_step(plain).loss);
  for (int s = 0; s < 3; ++s) CHECK(std::abs(a[s] - b[s]) <= 1e-5 * std::abs(b[s]));
  for (size_t i = 0; i < tiled.params.size(); ++i) CHECK(max_abs_diff(tiled.params[i], plain.params[i]) < 1e-5);
}

namespace {
// Two trainers of one fixture given the same nonzero LoRA B (so every path matters) and one
// micro-batch at one RNG state: the same loss and the same gradients, bit for bit.
void check_same_forward_backward(qlora::Trainer& a, qlora::Trainer& b) {
  for (qlora::Trainer* t : {&a, &b}) {
    at::NoGradGuard ng;
    auto gen = at::make_generator<at::CPUGeneratorImpl>(3);
    for (at::Tensor& p : t->params) p.add_(at::randn(p.sizes(), gen) * 0.05);
  }
  at::manual_seed(99);
  const qlora::Batch batch = qlora::make_train_batch(a, {4, 5});
  const double la = qlora::forward_backward(a, batch, 50.0).item<double>();
  at::manual_seed(99);
  const double lb = qlora::forward_backward(b, batch, 50.0).item<double>();
  CHECK(la == lb);
  for (size_t i = 0; i < a.params.size(); ++i) {
    CAPTURE(a.param_names[i]);
    CHECK(at::equal(a.params[i].grad(), b.params[i].grad()));
  }
}
}  // namespace

TEST_CASE("trainer: the recompute without its unread outputs equals the full recompute bitwise", "[train]") {
  TempDir d("qlora_train");
  write_fixture(d.path);
  const std::string split = GENERATE("true", "false");  // the full recompute is never split
  CAPTURE(split);
  const std::vector<std::string> cfg = {"lora_dropout=0.1", "micro_batch_size=2", "gradient_checkpointing=true",
                                        "gradient_checkpointing_split_layers=" + split};
  qlora::TrainerOptions skip, full;
  skip.write_outputs = full.write_outputs = false;
  full.recompute_unread_outputs = true;
  qlora::Trainer a = qlora::make_trainer(config(d.path, cfg), skip);
  qlora::Trainer b = qlora::make_trainer(config(d.path, cfg), full);
  check_same_forward_backward(a, b);
}

TEST_CASE("trainer: a recompute reusing its dequantized weights in the backward equals dequantizing again, bitwise", "[train]") {
  TempDir d("qlora_train");
  write_fixture(d.path);
  const std::vector<std::string> common = {"adapter=qlora", "load_in_4bit=true", "lora_dropout=0.1", "micro_batch_size=2",
                                           "gradient_checkpointing=true"};
  auto reuse_cfg = common, again_cfg = common;
  again_cfg.push_back("gradient_checkpointing_reuse_weights=false");
  qlora::TrainerOptions o;
  o.write_outputs = false;
  qlora::Trainer a = qlora::make_trainer(config(d.path, reuse_cfg), o);
  qlora::Trainer b = qlora::make_trainer(config(d.path, again_cfg), o);
  REQUIRE(a.config.gradient_checkpointing_reuse_weights);  // the default
  REQUIRE(a.model.layers[0].q_proj.nf4.has_value());
  check_same_forward_backward(a, b);
  CHECK_FALSE(a.scratch.keep_for_backward);  // only while a recompute runs
}

TEST_CASE("trainer: layers recomputed in two halves (gradient_checkpointing_split_layers) equal one recompute, bitwise",
          "[train]") {
  TempDir d("qlora_train");
  write_fixture(d.path);
  const std::vector<std::string> common = {"adapter=qlora", "load_in_4bit=true", "lora_dropout=0.1", "micro_batch_size=2",
                                           "gradient_checkpointing=true"};
  qlora::TrainerOptions o;
  o.write_outputs = false;
  for (const std::string layers : {"-1", "1"}) {  // every layer split, or the first (the other keeps its graph)
    CAPTURE(layers);
    auto split_cfg = common, whole_cfg = common;
    split_cfg.push_back("gradient_checkpointing_split_layers=true");
    split_cfg.push_back("gradient_checkpointing_layers=" + layers);
    whole_cfg.push_back("gradient_checkpointing_layers=" + layers);
    qlora::Trainer a = qlora::make_trainer(config(d.path, split_cfg), o);
    qlora::Trainer b = qlora::make_trainer(config(d.path, whole_cfg), o);
    REQUIRE(a.split_layers);
    REQUIRE_FALSE(b.split_layers);  // auto, without activation offloading on CUDA
    check_same_forward_backward(a, b);
    // Whole steps: the RNG stream continues identically after the split backward.
    for (qlora::Trainer* t : {&a, &b})
      for (at::Tensor& p : t->params) p.mutable_grad() = at::Tensor();
    at::manual_seed(123);
    std::vector<double> la, lb;
    for (int s = 0; s < 2; ++s) la.push_back(qlora::train_step(a).loss);
    at::manual_seed(123);
    for (int s = 0; s < 2; ++s) lb.push_back(qlora::train_step(b).loss);
    CHECK(la == lb);
    for (size_t i = 0; i < a.params.size(); ++i) CHECK(at::equal(a.params[i], b.params[i]));
  }
}

TEST_CASE("plan_recompute_storage: the split where the host holds the mid residuals, else one line", "[train]") {
  using qlora::AutoBool;
  qlora::TrainConfig c;  // Llama-3-8B at 262,144 tokens: the offloaded inputs 64 GiB, with the mid residuals 128 GiB
  c.gradient_checkpointing = true;
  c.activation_offloading = true;
  c.micro_batch_size = 1;
  c.sequence_len = 262144;
  qlora::HostMemory small, large;
  small.available = int64_t{100} << 30;
  large.available = int64_t{200} << 30;
  small.source = large.source = "MemAvailable";
  auto plan = [&](AutoBool split, bool cuda, const qlora::HostMemory& host) {
    c.gradient_checkpointing_split_layers = split;
    return qlora::plan_recompute_storage(c, 32, 4096, at::kBFloat16, cuda, host, 1);
  };
  CHECK(plan(AutoBool::auto_, true, large));
  CHECK_FALSE(plan(AutoBool::auto_, true, small));  // the inputs alone fit: off, the run goes on
  CHECK_FALSE(plan(AutoBool::off, true, large));
  CHECK(plan(AutoBool::on, true, large));
  CHECK_THROWS_WITH(plan(AutoBool::on, true, small),
                    ContainsSubstring("activation_offloading: needs 128.0 GiB of pinned host memory (32 layer inputs + 32 "
                                      "mid residuals x 262144 tokens x 4096 x 2 bytes)"));
  c.sequence_len = 524288;  // not even the inputs fit
  CHECK_THROWS_WITH(plan(AutoBool::auto_, true, small), ContainsSubstring("needs 128.0 GiB of pinned host memory (32 layer inputs x 524288"));
  c.sequence_len = 2048;
  // Without offloading on CUDA the mid residuals would stay on the device: only when asked.
  CHECK_FALSE(plan(AutoBool::auto_, false, large));
  CHECK(plan(AutoBool::on, false, small));
  c.activation_offloading = false;
  CHECK_FALSE(plan(AutoBool::auto_, true, large));
  CHECK(plan(AutoBool::on, true, large));
  c.gradient_checkpointing = false;  // nothing recomputed
  CHECK_FALSE(plan(AutoBool::on, true, large));
}

TEST_CASE("trainer: split recompute with every offload on CUDA equals the plain recompute on the GPU", "[train][cuda]") {
  QLORA_REQUIRE_CUDA();
  TempDir d("qlora_train");
  write_fixture(d.path);
  qlora::TrainerOptions o;
  o.write_outputs = false;
  // fp32 (deterministic attention backward) and no dropout: check_same_training runs one trainer's
  // steps after the other's on one RNG stream (the split's dropout masks: the CPU tests above).
  const std::vector<std::string> common = {"device=cuda", "bf16=false", "adapter=qlora", "load_in_4bit=true",
                                           "micro_batch_size=2", "val_set_size=0.2"};
  auto on_cfg = common, off_cfg = common;
  for (const char* kv : {"activation_offloading=true", "embedding_offloading=true", "lm_head_offloading=true"})
    on_cfg.push_back(kv);
  qlora::Trainer on = qlora::make_trainer(config(d.path, on_cfg), o);
  qlora::Trainer off = qlora::make_trainer(config(d.path, off_cfg), o);
  CHECK(on.model.embed_tokens.is_pinned());  // gathered on the GPU through unified addressing
  REQUIRE(on.split_layers);                  // auto: on with activation offloading
  REQUIRE_FALSE(off.split_layers);
  check_same_training(on, off);  // with the fused norms: the split's gradients join as in one layer
}

TEST_CASE("trainer: resume from step 10 equals the uninterrupted run bitwise (fp32 CPU)", "[train]") {
  TempDir d("qlora_train");
  write_fixture(d.path);
  const std::vector<std::string> common = {"lora_dropout=0.1", "max_steps=20", "save_steps=5", "save_total_limit=2",
                                           "lr_scheduler=cosine", "warmup_steps=3", "gradient_accumulation_steps=2"};
  auto with_out = [&](const std::string& out, std::vector<std::string> extra) {
    std::vector<std::string> v = common;
    v.push_back("output_dir=" + (d.path / out).string());
    for (auto& e : extra) v.push_back(e);
    return config(d.path, v);
  };
  const qlora::TrainRunResult full = qlora::run_training(with_out("full", {}));
  REQUIRE(full.steps == 20);
  REQUIRE(full.losses.size() == 20);

  qlora::TrainerOptions stop;
  stop.stop_after_step = 10;
  const qlora::TrainRunResult first = qlora::run_training(with_out("split", {}), stop);
  CHECK(first.interrupted);
  CHECK(first.steps == 10);
  CHECK(fs::exists(d.path / "split" / "checkpoint-10"));
  CHECK(fs::exists(d.path / "split" / "checkpoint-5"));  // save_total_limit 2: 5 and 10
  const qlora::TrainRunResult rest = qlora::run_training(with_out("split", {"resume_from_checkpoint=auto"}));
  REQUIRE(rest.steps == 20);
  REQUIRE(rest.losses.size() == 10);
  for (size_t i = 0; i < 10; ++i) {
    CAPTURE(i);
    CHECK(first.losses[i] == full.losses[i]);
    CHECK(rest.losses[i] == full.losses[10 + i]);  // bitwise
  }
  const qlora::SafetensorsFile pa(d.path / "full" / "adapter_model.safetensors");
  const qlora::SafetensorsFile pb(d.path / "split" / "adapter_model.safetensors");
  REQUIRE(pa.names() == pb.names());
  REQUIRE(pa.names().size() == 2 * 2 * 7);
  for (const std::string& n : pa.names()) {
    CAPTURE(n);
    CHECK(at::equal(pa.tensor(n), pb.tensor(n)));
  }
  // The loss lines of metrics.jsonl are identical (the resumed run trimmed nothing it needed).
  const qlora::LossCurve ca = qlora::read_loss_curve(d.path / "full" / "metrics.jsonl");
  const qlora::LossCurve cb = qlora::read_loss_curve(d.path / "split" / "metrics.jsonl");
  CHECK(ca.train == cb.train);
  CHECK(ca.train.size() == 20);
}

TEST_CASE("trainer: an injected overflow is skipped under the loss scaler and training continues", "[train]") {
  // fp16 compute on the CPU is not what this checks (the scaler's logic is dtype-independent):
  // compute fp32 with the scaler forced on, and an inf multiplied into step 3's loss.
  TempDir d("qlora_train");
  write_fixture(d.path);
  qlora::TrainerOptions o;
  o.write_outputs = false;
  o.force_loss_scaler = true;
  o.inject_overflow_step = 2;
  qlora::Trainer t = qlora::make_trainer(config(d.path, {"max_steps=6"}), o);
  REQUIRE(t.scaler.has_value());
  const double scale0 = qlora::loss_scale_value(*t.scaler);
  std::vector<qlora::StepResult> rs;
  std::vector<at::Tensor> before;
  for (int s = 0; s < 6; ++s) {
    if (s == 2)
      for (const at::Tensor& p : t.params) before.push_back(p.detach().clone());
    rs.push_back(qlora::train_step(t));
    if (s == 2) {
      CHECK(rs.back().skipped);
      CHECK(qlora::loss_scale_value(*t.scaler) == scale0 / 2);
      for (size_t i = 0; i < t.params.size(); ++i) CHECK(at::equal(before[i], t.params[i]));  // untouched
    } else {
      CHECK_FALSE(rs.back().skipped);
    }
    CHECK(std::isfinite(rs.back().loss));
  }
  CHECK(t.step == 6);
  CHECK(qlora::loss_scale_value(*t.scaler) == scale0 / 2);
  for (size_t i = 0; i < t.params.size(); ++i) {
    CHECK(at::isfinite(t.params[i]).all().item<bool>());
    CHECK_FALSE(at::equal(before[i], t.params[i]));  // steps after the skipped one did train
  }
}

TEST_CASE("qlora train: end to end on a tiny config; a config typo is one line and exit 2", "[train]") {
  TempDir d("qlora_train");
  write_fixture(d.path);
  const fs::path out = d.path / "out";
  qlora::test::write_file(d.path / "cfg.yaml", yaml(d.path, "val_set_size: 4\neval_steps: 5\nsave_steps: 4\n"));
  const qlora::test::Run r = qlora::test::run_qlora("train " + (d.path / "cfg.yaml").string() + " max_steps=8");
  INFO(r.output);
  REQUIRE(r.status == 0);
  CHECK(fs::exists(out / "adapter_config.json"));
  CHECK(fs::exists(out / "adapter_model.safetensors"));
  CHECK(fs::exists(out / "loss.svg"));
  CHECK(fs::exists(out / "config.resolved.yaml"));
  CHECK(fs::exists(out / "checkpoint-4"));
  CHECK(fs::exists(out / "checkpoint-8"));
  const qlora::LossCurve c = qlora::read_loss_curve(out / "metrics.jsonl");
  CHECK(c.train.size() == 8);
  CHECK(c.eval.size() == 2);  // steps 5 and 8 (the end)
  CHECK_THAT(r.output, ContainsSubstring("step 8/8"));
  CHECK_THAT(r.output, ContainsSubstring("tok/s"));
  CHECK_THAT(r.output, ContainsSubstring("ETA"));
  CHECK_THAT(r.output, ContainsSubstring("loss.svg"));

  const qlora::test::Run bad = qlora::test::run_qlora("train " + (d.path / "cfg.yaml").string() + " lora_rr=4");
  INFO(bad.output);
  CHECK(bad.status == 2);
  CHECK_THAT(bad.output, ContainsSubstring("lora_rr"));
  CHECK(std::count(bad.output.begin(), bad.output.end(), '\n') == 1);
}

TEST_CASE("qlora train: SIGINT finishes the step, writes a checkpoint and exits 0; auto resume continues", "[train]") {
  TempDir d("qlora_train");
  write_fixture(d.path);
  const fs::path out = d.path / "out";
  qlora::test::write_file(d.path / "cfg.yaml", yaml(d.path, ""));
  // Wait until the first step is logged (the handlers are installed by then), then SIGINT.
  const std::string script = std::string(QLORA_BINARY) + " train " + (d.path / "cfg.yaml").string() +
                             " max_steps=1000000 >" + (d.path / "log.txt").string() + " 2>&1 & pid=$!; while [ ! -s " + (out / "metrics.jsonl").string() +
                             " ]; do sleep 0.1; done; kill -INT $pid; wait $pid; echo \"exit=$?\"; cat " + (d.path / "log.txt").string();
  const qlora::test::Run r = qlora::test::run_qlora("--version >/dev/null; " + script);
  INFO(r.output);
  CHECK_THAT(r.output, ContainsSubstring("exit=0"));
  CHECK_THAT(r.output, ContainsSubstring("signal 2"));
  const auto latest = qlora::find_latest_checkpoint(out);
  REQUIRE(latest.has_value());
  const qlora::test::Run again =
      qlora::test::run_qlora("train " + (d.path / "cfg.yaml").string() + " resume_from_checkpoint=auto max_steps=" +
                             std::to_string(qlora::load_checkpoint(*latest).step + 2));
  INFO(again.output);
  CHECK(again.status == 0);
  CHECK_THAT(again.output, ContainsSubstring("resumed from"));
}

TEST_CASE("trainer: fp16 compute on the CPU with the dynamic loss scaler", "[train]") {
  TempDir d("qlora_train");
  write_fixture(d.path);
  qlora::TrainerOptions o;
  o.write_outputs = false;
  qlora::Trainer t = qlora::make_trainer(config(d.path, {"fp16=true", "bf16=false", "max_steps=8"}), o);
  REQUIRE(t.compute_dtype == at::kHalf);
  REQUIRE(t.scaler.has_value());
  int skipped = 0;
  for (int s = 0; s < 8; ++s) {
    const qlora::StepResult r = qlora::train_step(t);
    skipped += r.skipped;
    CHECK(std::isfinite(r.loss));
  }
  CHECK(skipped < 8);
  for (const at::Tensor& p : t.params) CHECK(at::isfinite(p).all().item<bool>());
}
