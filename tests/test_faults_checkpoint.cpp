// Checkpoint faults (issue 12): resuming from a checkpoint that is truncated, of another lora_r or
// targets, or of another model is one clear error naming it (trainer API: a UserError; qlora train:
// exit status 2) and leaves the output directory byte for byte as it was; a write that fails while
// saving (a real EFBIG: RLIMIT_FSIZE lowered with SIGXFSZ ignored, which needs no root) is a
// WriteError naming the file and the cause (qlora train: exit status 5), the checkpoints saved
// before stay intact and resuming afterwards works. The trainer runs under the limit only as the
// qlora binary: in this process its log lines could hit the limit where stderr is a big file.
#include <signal.h>
#include <sys/resource.h>

#include <ATen/Parallel.h>

#include "qlora/checkpoint.h"
#include "qlora/config.h"
#include "qlora/error.h"
#include "qlora/trainer.h"

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <algorithm>
#include <cstring>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <map>
#include <string>
#include <vector>

#include "process_util.h"
#include "test_util.h"
#include "trainer_fixture.h"

using Catch::Matchers::ContainsSubstring;
namespace fs = std::filesystem;
using qlora::test::read_file;
using qlora::test::Run;
using qlora::test::TempDir;
using qlora::test::OneThreadChildren;
using qlora::test::write_file;

namespace {

qlora::TrainConfig config(const fs::path& dir, const std::vector<std::string>& overrides) {
  return qlora::parse_config(qlora::test::trainer_yaml(dir, ""), "test.yaml", overrides);
}

// A random fp32 Llama in `dir` shaped like the fixture's (4 heads, 2 KV heads, intermediate 96,
// vocab 100) but with `layers` layers of width `hidden`: "another model" for a checkpoint.
void write_model(const fs::path& dir, int layers, int64_t hidden) {
  fs::create_directories(dir);
  const nlohmann::json cfg = {{"model_type", "llama"}, {"architectures", {"LlamaForCausalLM"}}, {"hidden_size", hidden},
                              {"intermediate_size", 96}, {"num_hidden_layers", layers}, {"num_attention_heads", 4},
                              {"num_key_value_heads", 2}, {"vocab_size", 100}, {"rms_norm_eps", 1e-5},
                              {"hidden_act", "silu"}, {"tie_word_embeddings", false}, {"torch_dtype", "float32"}};
  write_file(dir / "config.json", cfg.dump(2));
  qlora::NamedTensors ts;
  auto add = [&](const std::string& n, std::vector<int64_t> shape, bool norm = false) {
    ts.emplace_back(n, norm ? at::ones(shape) : at::randn(shape) * 0.2);
  };
  add("model.embed_tokens.weight", {100, hidden});
  for (int l = 0; l < layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {hidden}, true);
    add(p + "post_attention_layernorm.weight", {hidden}, true);
    add(p + "self_attn.q_proj.weight", {hidden, hidden});
    add(p + "self_attn.k_proj.weight", {hidden / 2, hidden});
    add(p + "self_attn.v_proj.weight", {hidden / 2, hidden});
    add(p + "self_attn.o_proj.weight", {hidden, hidden});
    add(p + "mlp.gate_proj.weight", {96, hidden});
    add(p + "mlp.up_proj.weight", {96, hidden});
    add(p + "mlp.down_proj.weight", {hidden, 96});
  }
  add("model.norm.weight", {hidden}, true);
  add("lm_head.weight", {100, hidden});
  qlora::save_safetensors(dir / "model.safetensors", ts);
}

// Every file under `dir` (relative path) with its bytes and modification time, and every
// directory (name only: its time changes when a temp entry comes and goes).
using Snapshot = std::map<std::string, std::pair<std::string, fs::file_time_type>>;
Snapshot snapshot(const fs::path& dir) {
  Snapshot out;
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    const std::string name = fs::relative(e.path(), dir).string();
    if (e.is_directory()) out[name + "/"] = {};
    else out[name] = {read_file(e.path()), e.last_write_time()};
  }
  return out;
}

// The files added, removed, rewritten or touched since `before`: "+name", "-name", "~name".
std::vector<std::string> changes(const Snapshot& before, const fs::path& dir) {
  const Snapshot now = snapshot(dir);
  std::vector<std::string> out;
  for (const auto& [name, v] : now)
    if (!before.count(name)) out.push_back("+" + name);
    else if (before.at(name) != v) out.push_back("~" + name);
  for (const auto& [name, v] : before)
    if (!now.count(name)) out.push_back("-" + name);
  return out;
}

// The error run_training throws for `overrides` (resuming), as a UserError that is not a WriteError.
std::string resume_error(const fs::path& dir, const std::vector<std::string>& overrides) {
  try {
    qlora::run_training(config(dir, overrides));
  } catch (const qlora::WriteError& e) {
    FAIL("a WriteError for bad input: " << e.what());
  } catch (const qlora::UserError& e) {
    return e.what();
  }
  FAIL("run_training did not refuse the checkpoint");
  return "";
}

Run run_shell(const std::string& script) { return qlora::test::run_qlora("--version >/dev/null; " + script); }

// While alive: this process's ATen kernels run on one thread (restored after), for the same reason.
struct OneIntraOpThread {
  int old = at::get_num_threads();
  OneIntraOpThread() { at::set_num_threads(1); }
  ~OneIntraOpThread() { at::set_num_threads(old); }
  OneIntraOpThread(const OneIntraOpThread&) = delete;
  OneIntraOpThread& operator=(const OneIntraOpThread&) = delete;
};

// While alive: files of this process cannot grow past `bytes`; a write beyond fails with EFBIG
// (SIGXFSZ ignored, so the process lives to report it), exactly as a full disk fails with ENOSPC.
struct FileSizeLimit {
  rlimit old{};
  struct sigaction old_xfsz {};
  explicit FileSizeLimit(rlim_t bytes) {
    REQUIRE(::getrlimit(RLIMIT_FSIZE, &old) == 0);
    struct sigaction ign {};
    ign.sa_handler = SIG_IGN;
    sigemptyset(&ign.sa_mask);
    REQUIRE(::sigaction(SIGXFSZ, &ign, &old_xfsz) == 0);
    rlimit lim = old;
    lim.rlim_cur = bytes;
    REQUIRE(::setrlimit(RLIMIT_FSIZE, &lim) == 0);
  }
  ~FileSizeLimit() {
    ::setrlimit(RLIMIT_FSIZE, &old);
    ::sigaction(SIGXFSZ, &old_xfsz, nullptr);
  }
};

}  // namespace

TEST_CASE("resume: a checkpoint of another lora_r, targets or model is refused naming it; nothing is overwritten",
          "[faults]") {
  OneIntraOpThread one_thread;  // eleven short trainer runs
  TempDir d("qlora_faults_ckpt");
  qlora::test::write_trainer_fixture(d.path);
  write_model(d.path / "model3", 3, 64);
  write_model(d.path / "model1", 1, 64);
  write_model(d.path / "model32", 2, 32);
  const fs::path out = d.path / "out";
  qlora::run_training(config(d.path, {"max_steps=4", "save_steps=2"}));
  const fs::path ckpt = out / "checkpoint-4";
  REQUIRE(fs::exists(ckpt / "manifest.json"));
  const auto before = snapshot(out);

  struct Case {
    std::vector<std::string> overrides;
    std::vector<std::string> expect;
  };
  const std::string model3 = "base_model=" + (d.path / "model3").string();
  const std::string model1 = "base_model=" + (d.path / "model1").string();
  const std::string model32 = "base_model=" + (d.path / "model32").string();
  const std::vector<Case> cases = {
      {{"lora_r=8"}, {"holds a different adapter", "lora_r 4 (this run: 8)"}},
      {{"lora_target_linear=false", "lora_target_modules=[q_proj,v_proj]"}, {"different adapter", "target_modules"}},
      {{model3}, {"different base model", "num_hidden_layers 2 (this run: 3)"}},
      {{model1}, {"different base model", "num_hidden_layers 2 (this run: 1)"}},
      {{model32}, {"different base model", "hidden_size 64 (this run: 32)"}},
  };
  for (const Case& c : cases) {
    for (const std::string resume : {ckpt.string(), std::string("auto")}) {
      std::vector<std::string> ov = {"max_steps=6", "save_steps=2", "resume_from_checkpoint=" + resume};
      ov.insert(ov.end(), c.overrides.begin(), c.overrides.end());
      CAPTURE(ov);
      const std::string err = resume_error(d.path, ov);
      CHECK_THAT(err, ContainsSubstring(ckpt.string()));
      for (const auto& e : c.expect) CHECK_THAT(err, ContainsSubstring(e));
      CHECK(err.find('\n') == std::string::npos);
    }
  }
  CHECK(changes(before, out).empty());

  // A checkpoint written before state.json named its model and adapter: the tensors alone tell.
  // Rewritten without those keys, it is refused just the same, also when this run's adapter has
  // fewer tensors (one layer) than the checkpoint -- not resumed with a layer silently dropped.
  qlora::Checkpoint full = qlora::load_checkpoint(ckpt);
  nlohmann::json legacy = full.state;
  legacy.erase("model");
  legacy.erase("adapter");
  const fs::path old_out = d.path / "old";
  const fs::path old_ckpt = qlora::save_checkpoint(old_out, 4, full.tensors, legacy);
  fs::copy(out / "prepared", old_out / "prepared");  // the data cache a run there would have left
  const std::vector<Case> legacy_cases = {
      {{"lora_r=8"}, {"has shape [4, 64]", "(expected [8, 64]", "lora_r"}},
      {{model3}, {"no tensor 'lora.base_model.model.model.layers.2."}},
      {{model1}, {"holds lora.base_model.model.model.layers.1.", "which this run's adapter does not have"}},
      {{model32}, {"has shape [4, 64] (expected [4, 32]"}},
  };
  const auto old_before = snapshot(old_out);
  for (const Case& c : legacy_cases) {
    std::vector<std::string> ov = {"max_steps=6", "output_dir=" + old_out.string(),
                                   "resume_from_checkpoint=" + old_ckpt.string()};
    ov.insert(ov.end(), c.overrides.begin(), c.overrides.end());
    CAPTURE(ov);
    const std::string err = resume_error(d.path, ov);
    CHECK_THAT(err, ContainsSubstring(old_ckpt.string()));
    for (const auto& e : c.expect) CHECK_THAT(err, ContainsSubstring(e));
  }
  CHECK(changes(old_before, old_out).empty());
  // The same checkpoint with the same config resumes (the checks above are not over-eager).
  const qlora::TrainRunResult ok =
      qlora::run_training(config(d.path, {"max_steps=5", "output_dir=" + old_out.string(), "resume_from_checkpoint=auto"}));
  CHECK(ok.steps == 5);
  CHECK(ok.losses.size() == 1);
}

TEST_CASE("qlora train: resuming from a truncated, wrong-shape or other-model checkpoint exits 2 with one line",
          "[faults]") {
  OneThreadChildren one_thread;
  TempDir d("qlora_faults_ckpt");
  qlora::test::write_trainer_fixture(d.path);
  write_model(d.path / "model3", 3, 64);
  const fs::path out = d.path / "out";
  write_file(d.path / "cfg.yaml", qlora::test::trainer_yaml(d.path, "save_steps: 2\n"));
  const std::string train = "--log-level error train " + (d.path / "cfg.yaml").string() + " max_steps=6 ";
  const Run first = qlora::test::run_qlora("train " + (d.path / "cfg.yaml").string() + " max_steps=4");
  INFO(first.output);
  REQUIRE(first.status == 0);
  const fs::path ckpt = out / "checkpoint-4";
  // checkpoint-4's tensors cut short: what a copy interrupted by a full disk leaves.
  const fs::path tensors = ckpt / "tensors.safetensors";
  fs::resize_file(tensors, fs::file_size(tensors) / 2);
  const auto before = snapshot(out);

  struct Case {
    std::string args;
    std::vector<std::string> expect;
  };
  const std::vector<Case> cases = {
      {"resume_from_checkpoint=" + ckpt.string(), {tensors.string(), "bytes (expected", "truncated"}},
      {"resume_from_checkpoint=" + (out / "checkpoint-2").string() + " lora_r=8",
       {"checkpoint-2 holds a different adapter: lora_r 4 (this run: 8)"}},
      {"resume_from_checkpoint=" + (out / "checkpoint-2").string() + " base_model=" + (d.path / "model3").string(),
       {"checkpoint-2 was trained on a different base model: num_hidden_layers 2 (this run: 3)"}},
      {"resume_from_checkpoint=auto lora_r=8", {"checkpoint-2 holds a different adapter"}},  // 4 is skipped: corrupt
  };
  for (const Case& c : cases) {
    const Run r = qlora::test::expect_user_error(train + c.args, c.expect[0]);
    for (const auto& e : c.expect) CHECK_THAT(r.output, ContainsSubstring(e));
    CHECK(std::count(r.output.begin(), r.output.end(), '\n') == 1);
    CHECK(changes(before, out).empty());
  }
}

TEST_CASE("checkpoint: a write failing while saving is a WriteError naming the file; the earlier checkpoint stays",
          "[faults]") {
  TempDir d("qlora_faults_ckpt");
  const fs::path out = d / "out";
  // 256 KiB of tensors; the limit lets the small files through but not the tensor file.
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(3);
  const qlora::NamedTensors ts = {{"lora.w", at::randn({256, 256}, g, at::kFloat)}};
  qlora::save_checkpoint(out, 1, ts, {{"s", 1}}, /*keep_last=*/1);
  const auto before = snapshot(out);
  for (const int64_t step : {2, 1}) {  // a new step; the same step again (the replacing save)
    CAPTURE(step);
    std::string err = "(saved)";
    {
      // Nothing in this scope writes to stdout/stderr, which may be files bigger than the limit.
      FileSizeLimit limit(64 << 10);
      try {
        qlora::save_checkpoint(out, step, ts, {{"s", step}}, /*keep_last=*/1);
      } catch (const qlora::WriteError& e) {
        err = e.what();
      }
    }
    CHECK_THAT(err, ContainsSubstring((out / ("checkpoint-" + std::to_string(step))).string() + ": not saved ("));
    CHECK_THAT(err, ContainsSubstring("tensors.safetensors: write failed: " + std::string(std::strerror(EFBIG))));
    CHECK_THAT(err, ContainsSubstring("the checkpoints saved before it are intact"));
    CHECK(err.find('\n') == std::string::npos);
    CHECK(changes(before, out).empty());  // no temp dir left, checkpoint-1 not pruned nor replaced
  }
  // With room again the next save goes through and prunes as asked.
  qlora::save_checkpoint(out, 2, ts, {{"s", 2}}, /*keep_last=*/1);
  CHECK(qlora::find_latest_checkpoint(out) == out / "checkpoint-2");
  CHECK_FALSE(fs::exists(out / "checkpoint-1"));
}

TEST_CASE("qlora train: disk full while saving exits 5 with one line naming the file; resume works after", "[faults]") {
  OneThreadChildren one_thread;
  TempDir d("qlora_faults_ckpt");
  const std::string cfg = qlora::test::write_fixture_config(d.path, "save_steps: 2\nsave_total_limit: 1\n");
  const fs::path out = d.path / "out";
  const Run first = qlora::test::run_qlora("train " + cfg + " max_steps=4");
  INFO(first.output);
  REQUIRE(first.status == 0);
  std::map<std::string, std::string> ckpt_files;
  for (const auto& e : fs::directory_iterator(out / "checkpoint-4")) ckpt_files[e.path().string()] = read_file(e.path());
  // The shell ignores SIGXFSZ (inherited through exec) and caps file sizes at 40 blocks (20 or 40
  // KiB): the tensor file of checkpoint-6 cannot be written.
  const Run r = run_shell("trap '' XFSZ; ulimit -f 40; exec " + std::string(QLORA_BINARY) + " --log-level error train " +
                          cfg + " max_steps=6 resume_from_checkpoint=auto 2>&1");
  INFO(r.output);
  CHECK(r.status == 5);
  CHECK_THAT(r.output, ContainsSubstring((out / "checkpoint-6").string() + ": not saved ("));
  CHECK_THAT(r.output, ContainsSubstring("tensors.safetensors: write failed: " + std::string(std::strerror(EFBIG))));
  CHECK(std::count(r.output.begin(), r.output.end(), '\n') == 1);
  CHECK(r.output.find("terminate") == std::string::npos);
  // checkpoint-4 intact (save_total_limit 1 did not prune it), no checkpoint-6, no temp dirs;
  // the steps trained before the failure are in metrics.jsonl.
  for (const auto& [path, bytes] : ckpt_files) CHECK(read_file(path) == bytes);
  std::vector<std::string> entries;
  for (const auto& e : fs::directory_iterator(out)) entries.push_back(e.path().filename().string());
  std::sort(entries.begin(), entries.end());
  CHECK(std::count_if(entries.begin(), entries.end(), [](const std::string& n) { return n.rfind("checkpoint-", 0) == 0 || n[0] == '.'; }) == 1);
  CHECK(std::find(entries.begin(), entries.end(), "checkpoint-4") != entries.end());
  CHECK_THAT(read_file(out / "metrics.jsonl"), ContainsSubstring("\"step\":6"));
  // With room again, resuming continues from step 4.
  const Run again = qlora::test::run_qlora("train " + cfg + " max_steps=6 resume_from_checkpoint=auto");
  INFO(again.output);
  CHECK(again.status == 0);
  CHECK_THAT(again.output, ContainsSubstring("resumed from " + (out / "checkpoint-4").string() + " at step 4"));
  CHECK(qlora::find_latest_checkpoint(out) == out / "checkpoint-6");
  CHECK(fs::exists(out / "adapter_model.safetensors"));
}
