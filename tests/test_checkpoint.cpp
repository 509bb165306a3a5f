// Training checkpoints: round trip, what a kill leaves behind (a temp dir: ignored and cleaned; a
// truncated or corrupt file: detected by the manifest, named, nothing modified), pruning to
// keep_last, picking the latest valid checkpoint for resume, and the RNG states.
#include "qlora/checkpoint.h"
#include "qlora/error.h"
#include "qlora/optim.h"

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "test_util.h"

using Catch::Matchers::ContainsSubstring;
using qlora::test::read_file;
using qlora::test::TempDir;
using qlora::test::write_file;
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

qlora::NamedTensors sample_tensors(int64_t seed) {
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(seed);
  return {{"lora.layers.0.q_proj.A", at::randn({8, 32}, g, at::kFloat)},
          {"lora.layers.0.q_proj.B", at::randn({32, 8}, g, at::kFloat)},
          {"extra.bf16", at::randn({3, 5}, g, at::kFloat).to(at::kBFloat16)},
          {"data.position", at::scalar_tensor(seed * 17, at::kLong)}};
}

bool same(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == b.scalar_type() && a.sizes().equals(b.sizes()) &&
         a.reshape({-1}).contiguous().view(at::kByte).equal(b.reshape({-1}).contiguous().view(at::kByte));
}

std::vector<std::string> entries(const fs::path& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

std::string load_error(const fs::path& dir) {
  try {
    qlora::load_checkpoint(dir);
  } catch (const qlora::UserError& e) {
    return e.what();
  }
  FAIL("expected a UserError");
  return "";
}

void truncate_file(const fs::path& p, uintmax_t size) { fs::resize_file(p, size); }

}  // namespace

TEST_CASE("checkpoint round trip: tensors, state, manifest", "[checkpoint]") {
  TempDir d("qlora_ckpt_test");
  const auto ts = sample_tensors(1);
  const json state = {{"global_step", 20}, {"lr_scheduler", {{"last_epoch", 20}}}, {"note", "naïve ✓"}};
  const fs::path dir = qlora::save_checkpoint(d / "out", 20, ts, state);
  CHECK(dir == d / "out" / "checkpoint-20");
  CHECK(entries(d / "out") == std::vector<std::string>{"checkpoint-20"});
  CHECK(entries(dir) == std::vector<std::string>{"manifest.json", "state.json", "tensors.safetensors"});

  const json m = json::parse(read_file(dir / "manifest.json"));
  CHECK(m["step"] == 20);
  CHECK(m["files"]["tensors.safetensors"]["size"] == static_cast<int64_t>(fs::file_size(dir / "tensors.safetensors")));
  CHECK(m["files"]["state.json"]["crc32"].get<std::string>().size() == 8);

  const qlora::Checkpoint c = qlora::load_checkpoint(dir);
  CHECK(c.step == 20);
  CHECK(c.state == state);
  REQUIRE(c.tensors.size() == ts.size());
  for (const auto& [name, t] : ts) {
    CAPTURE(name);
    REQUIRE(c.find(name) != nullptr);
    CHECK(same(c.tensor(name), t));
  }
  CHECK(c.find("nope") == nullptr);
  CHECK_THROWS_WITH(c.tensor("nope"), ContainsSubstring("no tensor 'nope'"));

  // Saving the same step again replaces it (a resumed run re-saving its resume point).
  const auto ts2 = sample_tensors(2);
  qlora::save_checkpoint(d / "out", 20, ts2, {{"global_step", 20}, {"again", true}});
  CHECK(entries(d / "out") == std::vector<std::string>{"checkpoint-20"});
  const qlora::Checkpoint c2 = qlora::load_checkpoint(dir);
  CHECK(c2.state["again"] == true);
  CHECK(same(c2.tensor("lora.layers.0.q_proj.A"), ts2[0].second));
}

TEST_CASE("checkpoint CRC-32 is zlib's", "[checkpoint]") {
  const std::string s = "123456789";
  CHECK(qlora::crc32_update(0, s.data(), s.size()) == 0xCBF43926u);
  CHECK(qlora::crc32_update(0, "", 0) == 0u);
  // Chunked updates equal one pass, for lengths around the 8-byte stride.
  std::string big;
  for (int i = 0; i < 1000; ++i) big += static_cast<char>(i * 31 + 7);
  const uint32_t whole = qlora::crc32_update(0, big.data(), big.size());
  uint32_t parts = qlora::crc32_update(0, big.data(), 13);
  parts = qlora::crc32_update(parts, big.data() + 13, 500);
  parts = qlora::crc32_update(parts, big.data() + 513, big.size() - 513);
  CHECK(whole == parts);
}

TEST_CASE("checkpoint: a killed save's temp dir is ignored, then cleaned", "[checkpoint]") {
  TempDir d("qlora_ckpt_test");
  const fs::path out = d / "out";
  qlora::save_checkpoint(out, 5, sample_tensors(5), {{"s", 5}});
  // What a SIGKILL during the save of step 7 leaves: a temp dir with a half-written tensors file.
  const fs::path tmp = out / ".checkpoint-7.tmp-424242";
  fs::create_directories(tmp);
  write_file(tmp / "tensors.safetensors", "\x10\x00\x00");
  write_file(tmp / "state.json", "{");
  auto latest = qlora::find_latest_checkpoint(out);
  REQUIRE(latest);
  CHECK(*latest == out / "checkpoint-5");
  CHECK(qlora::resolve_resume_checkpoint("auto", out) == out / "checkpoint-5");
  CHECK(fs::exists(tmp));  // looking does not modify
  qlora::save_checkpoint(out, 6, sample_tensors(6), {{"s", 6}});
  CHECK(!fs::exists(tmp));
  CHECK(entries(out) == std::vector<std::string>{"checkpoint-5", "checkpoint-6"});
  CHECK(*qlora::find_latest_checkpoint(out) == out / "checkpoint-6");
  // A replacing save killed between its two renames (where the filesystem cannot exchange): the
  // old checkpoint moved aside is put back when its step has none, else removed.
  fs::create_directories(out / ".checkpoint-6.old-1");
  fs::create_directories(out / ".checkpoint-9.old-1");
  write_file(out / ".checkpoint-9.old-1" / "state.json", "{}");
  CHECK(qlora::remove_incomplete_checkpoints(out) == 1);
  CHECK(entries(out) == std::vector<std::string>{"checkpoint-5", "checkpoint-6", "checkpoint-9"});
  CHECK(fs::exists(out / "checkpoint-9" / "state.json"));
  CHECK(*qlora::find_latest_checkpoint(out) == out / "checkpoint-6");  // 9 has no manifest: skipped
}

TEST_CASE("checkpoint: truncated or corrupt files are named; nothing is modified", "[checkpoint]") {
  TempDir d("qlora_ckpt_test");
  const fs::path out = d / "out";
  qlora::save_checkpoint(out, 10, sample_tensors(10), {{"s", 10}});
  const fs::path dir = qlora::save_checkpoint(out, 20, sample_tensors(20), {{"s", 20}});
  const fs::path tensors = dir / "tensors.safetensors";
  const uintmax_t full = fs::file_size(tensors);

  SECTION("truncated tensors file") {
    truncate_file(tensors, full - 100);
    const std::string err = load_error(dir);
    CHECK_THAT(err, ContainsSubstring(tensors.string()));
    CHECK_THAT(err, ContainsSubstring("truncated"));
    CHECK(fs::file_size(tensors) == full - 100);
    CHECK(*qlora::find_latest_checkpoint(out) == out / "checkpoint-10");  // skipped with a warning
    CHECK_THROWS_WITH(qlora::resolve_resume_checkpoint(dir.string(), out), ContainsSubstring("tensors.safetensors"));
  }
  SECTION("a flipped byte, same size") {
    std::string bytes = read_file(tensors);
    bytes[bytes.size() - 5] ^= 0x40;
    write_file(tensors, bytes);
    CHECK_THAT(load_error(dir), ContainsSubstring("tensors.safetensors: CRC-32"));
    CHECK(read_file(tensors) == bytes);
    CHECK(*qlora::find_latest_checkpoint(out) == out / "checkpoint-10");
  }
  SECTION("state.json edited") {
    write_file(dir / "state.json", "{\"s\": 21}\n");
    CHECK_THAT(load_error(dir), ContainsSubstring("state.json"));
  }
  SECTION("manifest missing or garbage") {
    fs::remove(dir / "manifest.json");
    CHECK_THAT(load_error(dir), ContainsSubstring("manifest.json: missing"));
    write_file(dir / "manifest.json", "{\"format\": \"something\"}");
    CHECK_THAT(load_error(dir), ContainsSubstring("not a valid checkpoint manifest"));
    CHECK(*qlora::find_latest_checkpoint(out) == out / "checkpoint-10");
  }
  SECTION("tensors file removed") {
    fs::remove(tensors);
    CHECK_THAT(load_error(dir), ContainsSubstring("tensors.safetensors: missing"));
  }
  SECTION("all corrupt: none found") {
    truncate_file(tensors, 0);
    truncate_file(out / "checkpoint-10" / "state.json", 1);
    CHECK(!qlora::find_latest_checkpoint(out));
    CHECK(!qlora::resolve_resume_checkpoint("auto", out));
  }
}

TEST_CASE("checkpoint: keep_last prunes the oldest, never the one just written", "[checkpoint]") {
  TempDir d("qlora_ckpt_test");
  const fs::path out = d / "out";
  const auto ts = sample_tensors(3);
  for (int s = 1; s <= 5; ++s) qlora::save_checkpoint(out, s * 10, ts, {{"s", s}}, /*keep_last=*/2);
  CHECK(entries(out) == std::vector<std::string>{"checkpoint-40", "checkpoint-50"});
  // keep_last 0 keeps everything.
  qlora::save_checkpoint(out, 60, ts, {}, 0);
  qlora::save_checkpoint(out, 70, ts, {}, 0);
  CHECK(entries(out).size() == 4);
  // A run resumed from an earlier step writes a lower step than existing ones: it survives.
  qlora::save_checkpoint(out, 45, ts, {}, 1);
  CHECK(entries(out) == std::vector<std::string>{"checkpoint-45"});
  qlora::save_checkpoint(out, 46, ts, {}, 3);
  CHECK(entries(out) == std::vector<std::string>{"checkpoint-45", "checkpoint-46"});
  // Other directories are not touched.
  fs::create_directories(out / "checkpoint-abc");
  fs::create_directories(out / "logs");
  qlora::save_checkpoint(out, 47, ts, {}, 1);
  CHECK(entries(out) == std::vector<std::string>{"checkpoint-47", "checkpoint-abc", "logs"});
}

TEST_CASE("checkpoint: resume_from_checkpoint values", "[checkpoint]") {
  TempDir d("qlora_ckpt_test");
  const fs::path out = d / "out";
  CHECK(!qlora::resolve_resume_checkpoint("", out));
  CHECK(!qlora::resolve_resume_checkpoint("auto", out));  // no output dir yet
  qlora::save_checkpoint(out, 3, sample_tensors(3), {});
  qlora::save_checkpoint(out, 12, sample_tensors(12), {});
  qlora::save_checkpoint(out, 100, sample_tensors(100), {});  // numeric, not lexicographic order
  CHECK(qlora::resolve_resume_checkpoint("auto", out) == out / "checkpoint-100");
  CHECK(qlora::resolve_resume_checkpoint("true", out) == out / "checkpoint-100");
  CHECK(!qlora::resolve_resume_checkpoint("false", out));
  CHECK(qlora::resolve_resume_checkpoint((out / "checkpoint-12").string(), out) == out / "checkpoint-12");
  CHECK_THROWS_WITH(qlora::resolve_resume_checkpoint((out / "checkpoint-13").string(), out),
                    ContainsSubstring("checkpoint-13' is not a directory"));
}

TEST_CASE("checkpoint: RNG state restores the CPU generator's sequence", "[checkpoint]") {
  TempDir d("qlora_ckpt_test");
  at::manual_seed(1234);
  (void)at::randn({10});
  qlora::NamedTensors ts = qlora::rng_state_tensors();
  REQUIRE(!ts.empty());
  CHECK(ts[0].first == "rng.cpu");
  const at::Tensor expect = at::randn({50});
  // Through a checkpoint on disk, together with an optimizer state.
  std::vector<at::Tensor> params = {at::randn({4, 4})};
  qlora::AdamWState st = qlora::adamw_init({"w"}, params);
  qlora::adamw_step(st, params, {at::ones({4, 4})}, 1e-3, {});
  for (auto& e : qlora::adamw_state_tensors(st)) ts.push_back(e);
  const fs::path dir = qlora::save_checkpoint(d / "out", 1, ts, {});
  at::manual_seed(999);
  (void)at::randn({77});
  const qlora::Checkpoint c = qlora::load_checkpoint(dir);
  qlora::restore_rng_state(c.tensors);
  CHECK(at::randn({50}).equal(expect));
  qlora::AdamWState back = qlora::adamw_init({"w"}, params);
  qlora::adamw_load_state(back, c.tensors);
  CHECK(back.step == 1);
  CHECK(back.exp_avg_sq[0].equal(st.exp_avg_sq[0]));
}
