// Faults during training (issue 12): an out-of-memory error in any phase is one report naming the
// phase and what to lower (exit status 3); a non-finite loss in bf16/fp32 stops training with a
// message naming the step and the last good checkpoint (exit status 4), or is skipped up to
// nonfinite_skip_limit times. On the CPU the out-of-memory error is injected at the start of a
// phase (TrainerOptions::inject_oom_phase / QLORA_TEST_OOM_PHASE); the [cuda] case runs out of
// real GPU memory under a tiny gpu_memory_limit.
#include <ATen/ATen.h>

#include "qlora/config.h"
#include "qlora/error.h"
#include "qlora/metrics.h"
#include "qlora/trainer.h"
#include "test_cuda_util.h"

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "test_util.h"
#include "trainer_fixture.h"

using Catch::Matchers::ContainsSubstring;
namespace fs = std::filesystem;
using qlora::test::TempDir;

namespace {

qlora::TrainConfig config(const fs::path& dir, const std::vector<std::string>& overrides = {}) {
  return qlora::parse_config(qlora::test::trainer_yaml(dir, ""), "test.yaml", overrides);
}

std::string oom_message(const fs::path& dir, const std::string& phase, const std::vector<std::string>& overrides) {
  qlora::TrainerOptions o;
  o.write_outputs = false;
  o.inject_oom_phase = phase;
  try {
    qlora::Trainer t = qlora::make_trainer(config(dir, overrides), o);
    qlora::train_step(t);
  } catch (const qlora::OutOfMemory& e) {
    return e.what();
  }
  FAIL("no OutOfMemory for phase " << phase);
  return "";
}

}  // namespace

TEST_CASE("trainer: out of memory in each phase is one report naming the phase and what to lower", "[faults]") {
  TempDir d("qlora_faults");
  qlora::test::write_trainer_fixture(d.path);
  for (const bool ckpt : {true, false}) {
    CAPTURE(ckpt);
    const std::vector<std::string> cfg = {"micro_batch_size=2", std::string("gradient_checkpointing=") + (ckpt ? "true" : "false")};
    for (const std::string phase : {"forward", "loss", "backward", "optimizer"}) {
      CAPTURE(phase);
      const std::string m = oom_message(d.path, phase, cfg);
      CHECK_THAT(m, ContainsSubstring("out of GPU memory in the " + phase + " of step 1"));
      CHECK_THAT(m, ContainsSubstring("micro_batch_size (2)"));
      CHECK_THAT(m, ContainsSubstring("sequence_len (32)"));
      if (!ckpt) CHECK_THAT(m, ContainsSubstring("gradient_checkpointing: true"));
      CHECK_THAT(m, !ContainsSubstring("gradient_checkpointing_split_layers"));  // auto: off on a CPU
      CHECK(m.find('\n') == std::string::npos);
    }
  }
  const std::string load = oom_message(d.path, "load", {});
  CHECK_THAT(load, ContainsSubstring("out of GPU memory in the load of " + (d.path / "model").string()));
  // Mid residuals kept on the device are named; offloaded, they are not there.
  CHECK_THAT(oom_message(d.path, "backward", {"gradient_checkpointing_split_layers=true"}),
             ContainsSubstring("gradient_checkpointing_split_layers: false"));
  CHECK_THAT(oom_message(d.path, "backward", {"gradient_checkpointing_split_layers=true", "activation_offloading=true"}),
             !ContainsSubstring("gradient_checkpointing_split_layers"));
  // Fewer recomputed layers than all: the first thing to give back.
  CHECK_THAT(oom_message(d.path, "backward", {"gradient_checkpointing_layers=1"}),
             ContainsSubstring("more recomputed layers (gradient_checkpointing_layers: 1, -1 = all)"));
}

namespace {
// `qlora ARGS` with one environment variable set for it (the fault-injection hooks).
qlora::test::Run run_with_env(const char* name, const std::string& value, const std::string& args) {
  setenv(name, value.c_str(), 1);
  const qlora::test::Run r = qlora::test::run_qlora(args);
  unsetenv(name);
  return r;
}
}  // namespace

TEST_CASE("qlora train: out of memory exits 3 with one line; the checkpoints written before stay", "[faults]") {
  TempDir d("qlora_faults");
  qlora::test::write_trainer_fixture(d.path);
  qlora::test::write_file(d.path / "cfg.yaml", qlora::test::trainer_yaml(d.path, "save_steps: 2\n"));
  const std::string cfg = (d.path / "cfg.yaml").string();
  const qlora::test::Run ok = qlora::test::run_qlora("train " + cfg + " max_steps=4");
  INFO(ok.output);
  REQUIRE(ok.status == 0);
  const fs::path ckpt = d.path / "out" / "checkpoint-4";
  REQUIRE(fs::exists(ckpt / "manifest.json"));
  const std::string manifest = qlora::test::read_file(ckpt / "manifest.json");
  // Resumed towards step 6, out of memory at the first backward: exit 3, one line.
  const qlora::test::Run r =
      run_with_env("QLORA_TEST_OOM_PHASE", "backward", "--log-level error train " + cfg + " max_steps=6 resume_from_checkpoint=auto");
  INFO(r.output);
  CHECK(r.status == 3);
  CHECK_THAT(r.output, ContainsSubstring("out of GPU memory in the backward of step 5"));
  CHECK(std::count(r.output.begin(), r.output.end(), '\n') == 1);
  CHECK(qlora::test::read_file(ckpt / "manifest.json") == manifest);  // untouched
  // And resuming without the fault finishes from there.
  const qlora::test::Run again = qlora::test::run_qlora("train " + cfg + " max_steps=6 resume_from_checkpoint=auto");
  INFO(again.output);
  CHECK(again.status == 0);
  CHECK_THAT(again.output, ContainsSubstring("at step 4"));
  CHECK(fs::exists(d.path / "out" / "checkpoint-6"));
}

TEST_CASE("trainer: a non-finite loss in fp32 stops training naming the step and the last good checkpoint", "[faults]") {
  TempDir d("qlora_faults");
  qlora::test::write_trainer_fixture(d.path);
  qlora::TrainerOptions o;
  o.inject_overflow_step = 4;  // the 5th step's loss is multiplied by inf
  try {
    qlora::run_training(config(d.path, {"max_steps=8", "save_steps=2"}), o);
    FAIL("run_training did not stop");
  } catch (const qlora::TrainingStopped& e) {
    const std::string m = e.what();
    CHECK_THAT(m, ContainsSubstring("step 5: the loss or the gradients are not finite"));
    CHECK_THAT(m, ContainsSubstring((d.path / "out" / "checkpoint-4").string() + " (resume_from_checkpoint=auto)"));
    CHECK_THAT(m, ContainsSubstring("nonfinite_skip_limit"));
  }
  CHECK(fs::exists(d.path / "out" / "checkpoint-4"));
  CHECK_FALSE(fs::exists(d.path / "out" / "checkpoint-6"));

  // nonfinite_skip_limit: 1 skips that step (no update) and trains on to the end.
  TempDir d2("qlora_faults");
  qlora::test::write_trainer_fixture(d2.path);
  const qlora::TrainRunResult r = qlora::run_training(config(d2.path, {"max_steps=8", "nonfinite_skip_limit=1"}), o);
  CHECK(r.steps == 8);
  CHECK(fs::exists(d2.path / "out" / "adapter_model.safetensors"));
  const std::string metrics = qlora::test::read_file(d2.path / "out" / "metrics.jsonl");
  CHECK(std::count(metrics.begin(), metrics.end(), '\n') == 8);
  CHECK_THAT(metrics, ContainsSubstring("\"skipped\":true"));
}

TEST_CASE("qlora train: a non-finite loss exits 4 with one line naming the last good checkpoint", "[faults]") {
  TempDir d("qlora_faults");
  qlora::test::write_trainer_fixture(d.path);
  qlora::test::write_file(d.path / "cfg.yaml", qlora::test::trainer_yaml(d.path, "save_steps: 3\n"));
  const qlora::test::Run r =
      run_with_env("QLORA_TEST_OVERFLOW_STEP", "3", "--log-level error train " + (d.path / "cfg.yaml").string() + " max_steps=6");
  INFO(r.output);
  CHECK(r.status == 4);
  CHECK_THAT(r.output, ContainsSubstring("step 4: the loss or the gradients are not finite"));
  CHECK_THAT(r.output, ContainsSubstring("checkpoint-3"));
  CHECK(std::count(r.output.begin(), r.output.end(), '\n') == 1);
}

TEST_CASE("trainer: running out of real GPU memory is reported as out of memory", "[faults][cuda]") {
  QLORA_REQUIRE_CUDA();
  TempDir d("qlora_faults");
  qlora::test::write_trainer_fixture(d.path);
  qlora::TrainerOptions o;
  o.write_outputs = false;
  // 2 MiB for the allocator: the tiny model loads, a batch of 8 x 32 tokens does not fit its step.
  try {
    qlora::Trainer t = qlora::make_trainer(
        config(d.path, {"device=cuda", "gpu_memory_limit=0.002", "micro_batch_size=8", "gradient_checkpointing=false"}), o);
    qlora::train_step(t);
    FAIL("no out-of-memory error under a 2 MiB cap");
  } catch (const qlora::OutOfMemory& e) {
    const std::string m = e.what();
    CHECK_THAT(m, ContainsSubstring("out of GPU memory in the "));
    CHECK_THAT(m, ContainsSubstring("gpu_memory_limit 0.002 GiB"));
  }
  // The trainer is gone, and so is its cap: 256 MiB fits again.
  CHECK_NOTHROW(at::empty({64 << 20}, at::TensorOptions().device(at::kCUDA).dtype(at::kFloat)));
}
