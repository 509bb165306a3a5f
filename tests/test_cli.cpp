// The qlora binary as a user runs it: exit statuses, one-line errors, --version, validate.
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

#include "test_util.h"

using Catch::Matchers::ContainsSubstring;

namespace {

using qlora::test::Run;
using qlora::test::run_qlora;

std::string temp_file(const std::string& name, const std::string& text) {
  auto path = std::filesystem::temp_directory_path() / ("qlora_cli_test_" + std::to_string(::getpid()) + "_" + name);
  std::ofstream(path) << text;
  return path.string();
}

size_t count_lines(const std::string& s) {
  size_t n = 0;
  for (char c : s) n += c == '\n';
  return n;
}

}  // namespace

TEST_CASE("qlora --version names the build, libtorch and CUDA", "[cli]") {
  Run r = run_qlora("--version");
  CHECK(r.status == 0);
  CHECK_THAT(r.output, ContainsSubstring("qlora 0.1.0 (git "));
  CHECK_THAT(r.output, ContainsSubstring("libtorch 2.11."));
  CHECK_THAT(r.output, ContainsSubstring("CUDA: "));
}

TEST_CASE("help for the binary and every subcommand", "[cli]") {
  Run r = run_qlora("--help");
  CHECK(r.status == 0);
  for (const char* sub : {"train", "eval", "generate", "merge", "export", "quantize", "inspect", "validate", "bench"}) {
    CHECK_THAT(r.output, ContainsSubstring(sub));
    Run h = run_qlora(std::string(sub) + " --help");
    CAPTURE(sub);
    CHECK(h.status == 0);
    CHECK_THAT(h.output, ContainsSubstring("Usage: qlora " + std::string(sub)));
  }
}

TEST_CASE("validate prints the resolved config with overrides applied", "[cli]") {
  Run r = run_qlora(std::string("validate ") + QLORA_SOURCE_DIR + "/configs/quickstart.yaml lora_r=32");
  CHECK(r.status == 0);
  CHECK_THAT(r.output, ContainsSubstring("\nlora_r: 32\n"));
  CHECK_THAT(r.output, ContainsSubstring("\nlearning_rate: 0.001\n"));
  CHECK_THAT(r.output, ContainsSubstring("lora_target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]"));
}

TEST_CASE("validate --list-keys documents every key", "[cli]") {
  Run r = run_qlora("validate --list-keys");
  CHECK(r.status == 0);
  CHECK_THAT(r.output, ContainsSubstring("lora_r  (integer in [1, 4096], default 16)"));
}

TEST_CASE("user errors are one line and exit status 2", "[cli]") {
  SECTION("config typo: names the key, the suggestion and the line") {
    const std::string cfg = temp_file("typo.yaml", "base_model: m\ndatasets: [{path: d.jsonl}]\nlora_rr: 8\n");
    Run r = run_qlora("validate " + cfg);
    std::filesystem::remove(cfg);
    CHECK(r.status == 2);
    CHECK_THAT(r.output, ContainsSubstring("typo.yaml:3:1: lora_rr: unknown key (did you mean 'lora_r'?)"));
    CHECK(count_lines(r.output) == 1);
  }
  SECTION("missing config file") {
    Run r = run_qlora("validate /nonexistent/x.yaml");
    CHECK(r.status == 2);
    CHECK_THAT(r.output, ContainsSubstring("config file '/nonexistent/x.yaml': cannot open"));
    CHECK(count_lines(r.output) == 1);
  }
  SECTION("bad override") {
    Run r = run_qlora(std::string("validate ") + QLORA_SOURCE_DIR + "/configs/quickstart.yaml lora_r=abc");
    CHECK(r.status == 2);
    CHECK_THAT(r.output, ContainsSubstring("override 'lora_r=abc': lora_r: expected an integer, found 'abc'"));
  }
  SECTION("unknown option or subcommand") {
    Run r = run_qlora("--no-such-flag");
    CHECK(r.status == 2);
    CHECK(count_lines(r.output) == 1);
    CHECK(run_qlora("frobnicate").status == 2);
  }
  SECTION("bad log level") {
    Run r = run_qlora("--log-level loud validate --list-keys");
    CHECK(r.status == 2);
    CHECK_THAT(r.output, ContainsSubstring("--log-level 'loud': expected one of trace"));
  }
  SECTION("validate without a config") {
    CHECK(run_qlora("validate").status == 2);
  }
}

TEST_CASE("log lines carry the rank", "[cli]") {
  Run r = run_qlora("train x");
  CHECK_THAT(r.output, ContainsSubstring("[r0] error: "));
  const std::string cmd = "RANK=3 " + std::string(QLORA_BINARY) + " train x 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  REQUIRE(p != nullptr);
  char buf[512] = {0};
  size_t n = fread(buf, 1, sizeof buf - 1, p);
  pclose(p);
  CHECK_THAT(std::string(buf, n), ContainsSubstring("[r3] error: "));
}

TEST_CASE("qlora bench ce / flce: bad input or no GPU exits 2 with one line", "[cli]") {
  // Without a CUDA device (CI) the GPU benches say so; on a GPU the bad --iters is refused before
  // anything is timed. Either way: exit 2, one line, nothing measured.
  for (const char* op : {"ce", "flce"}) {
    CAPTURE(op);
    Run r = run_qlora(std::string("bench ") + op + " --iters=-1");
    CHECK(r.status == 2);
    CHECK(count_lines(r.output) == 1);
    const bool no_gpu = r.output.find("needs a CUDA device") != std::string::npos;
    const bool bad_iters = r.output.find("--iters must be >= 1, found -1") != std::string::npos;
    CHECK((no_gpu || bad_iters));
    CHECK_THAT(r.output, ContainsSubstring(std::string("qlora bench ") + op + ":"));
  }
}

TEST_CASE("qlora bench fused --cases small: eight rows, the minimal bytes by hand, JSON; bad input exits 2", "[cli]") {
  const std::string json_path = temp_file("fused.json", "");
  Run r = run_qlora("bench fused --cases small --iters 2 --json " + json_path);
  REQUIRE(r.status == 0);
  CHECK_THAT(r.output, ContainsSubstring("rope q"));
  std::ifstream in(json_path);
  const nlohmann::json j = nlohmann::json::parse(in);
  CHECK(j["bench"] == "fused");
  CHECK(j["cases"] == "small");
  CHECK(j["tokens"] == 66);  // batch 2 x seq 33
  REQUIRE(j["rows"].size() == 8);
  // Small shapes: tokens 66, hidden 96, intermediate 200, q heads 6, k heads 2, head_dim 16; bf16.
  const double x = 66.0 * 96 * 2, t = 66.0 * 200 * 2, cs = 2.0 * 66 * 16 * 2;
  const double want[8] = {2 * x + 66 * 4,   2 * x + 66 * 4 + 3 * x + 66 * 4,
                          3 * t,            8 * t,
                          2 * (66.0 * 6 * 16 * 2) + cs, 2 * (2 * (66.0 * 6 * 16 * 2) + cs),
                          2 * (66.0 * 2 * 16 * 2) + cs, 2 * (2 * (66.0 * 2 * 16 * 2) + cs)};
  const char* ops[8] = {"rms_norm", "rms_norm", "swiglu", "swiglu", "rope q", "rope q", "rope k", "rope k"};
  for (size_t i = 0; i < 8; ++i) {
    CAPTURE(i);
    const nlohmann::json& row = j["rows"][i];
    CHECK(row["op"] == ops[i]);
    CHECK(row["pass"] == (i % 2 ? "fwd+bwd" : "fwd"));
    CHECK(row["bytes"].get<double>() == want[i]);
    CHECK(row["fused_ms"].get<double>() > 0);
    CHECK(row["aten_ms"].get<double>() > 0);
  }
  std::filesystem::remove(json_path);

  Run bad = run_qlora("bench fused --iters=-1");
  CHECK(bad.status == 2);
  CHECK(count_lines(bad.output) == 1);
  CHECK_THAT(bad.output, ContainsSubstring("qlora bench fused: --iters must be >= 1, found -1"));
  Run bad_cases = run_qlora("bench fused --cases big");
  CHECK(bad_cases.status == 2);
  CHECK_THAT(bad_cases.output, ContainsSubstring("--cases"));
  Run bad_json = run_qlora("bench fused --cases small --iters 1 --json /nonexistent-dir/x.json");
  CHECK(bad_json.status == 2);
  CHECK_THAT(bad_json.output, ContainsSubstring("cannot write --json file /nonexistent-dir/x.json"));
}
