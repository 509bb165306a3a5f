// `qlora inspect` as a user runs it: tiny Llama/Qwen2 checkpoints (16-bit, sharded, bnb-4bit with
// and without double quant) and single .safetensors files written to a temp dir, the report
// (text and --json) checked against parameter counts and NF4 byte counts worked out by hand, and
// every bad input giving one line and exit status 2.
// torch headers before Catch: c10 defines a CHECK macro that Catch must override.
#include "qlora/bnb4bit.h"
#include "qlora/safetensors.h"

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <filesystem>
#include <string>

#include "test_util.h"
#include "tiny_llama.h"

using Catch::Matchers::ContainsSubstring;
namespace fs = std::filesystem;
using nlohmann::json;
using qlora::test::run_qlora;
using qlora::test::TempDir;
using qlora::test::write_file;

namespace {

// hidden 64, intermediate 96, 2 layers, 4 heads of 16, 2 KV heads, vocab 100.
json tiny_config(const std::string& model_type = "llama", bool tied = false, int layers = 2) {
  json c = {{"architectures", {model_type == "qwen2" ? "Qwen2ForCausalLM" : "LlamaForCausalLM"}},
            {"model_type", model_type}, {"hidden_size", 64}, {"intermediate_size", 96}, {"num_hidden_layers", layers},
            {"num_attention_heads", 4}, {"num_key_value_heads", 2}, {"vocab_size", 100}, {"max_position_embeddings", 256},
            {"rms_norm_eps", 1e-5}, {"rope_theta", 500000.0}, {"torch_dtype", "bfloat16"}, {"tie_word_embeddings", tied}};
  if (model_type == "llama")
    c["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 1.0}, {"high_freq_factor", 4.0},
                         {"original_max_position_embeddings", 128}};
  return c;
}

void write_model(const fs::path& dir, const json& config, const qlora::NamedTensors& ts, int64_t shard_bytes = 0) {
  fs::create_directories(dir);
  if (shard_bytes > 0) qlora::save_safetensors_sharded(dir, ts, shard_bytes);
  else qlora::save_safetensors(dir / "model.safetensors", ts);
  write_file(dir / "config.json", config.dump(2));
}

// Hand count for the Llama above. Linear per layer: q 64*64 + k 32*64 + v 32*64 + o 64*64 +
// gate/up/down 3 * 96*64 = 4096 + 2048 + 2048 + 4096 + 18432 = 30720; two layers: 61440.
// Total: embed 6400 + 2 * (30720 + norms 128) + final norm 64 + lm_head 6400 = 74560.
constexpr int64_t kLinear = 61440;
constexpr int64_t kTotal = 74560;
// NF4 bytes of one n-element weight, blocksize 64, double quant: n/2 packed + n/64 absmax codes
// + 4 (one absmax2 block) + 1024 (code2): q/o 3140, k/v 2084, gate/up/down 4196; per layer
// 2*3140 + 2*2084 + 3*4196 = 23036. 16-bit rest: (74560 - 61440) * 2 = 26240.
constexpr int64_t kNF4Loaded = 2 * 23036 + 26240;

json inspect_json(const fs::path& p) {
  const auto r = run_qlora("inspect --json '" + p.string() + "'");
  INFO(r.output);
  REQUIRE(r.status == 0);
  return json::parse(r.output);
}

// One line of output (the error), exit status 2.
void check_user_error(const std::string& args, const std::string& expected) {
  const auto r = run_qlora(args);
  INFO(r.output);
  CHECK(r.status == 2);
  CHECK_THAT(r.output, ContainsSubstring(expected));
  CHECK(std::count(r.output.begin(), r.output.end(), '\n') == 1);
}

}  // namespace

TEST_CASE("inspect a 16-bit Llama folder: config, tensor kinds, counts, memory", "[inspect]") {
  TempDir tmp("qlora_inspect");
  write_model(tmp / "m", tiny_config(), qlora::test::tiny_llama_tensors());

  const json r = inspect_json(tmp / "m");
  CHECK(r["kind"] == "model");
  CHECK(r["architectures"] == json::array({"LlamaForCausalLM"}));
  CHECK(r["config"]["num_hidden_layers"] == 2);
  CHECK(r["config"]["head_dim"] == 16);
  CHECK(r["config"]["num_key_value_heads"] == 2);
  CHECK(r["config"]["rope"]["type"] == "llama3");
  CHECK(r["config"]["rope"]["factor"] == 8.0);
  CHECK(r["config"]["rope"]["original_max_position_embeddings"] == 128);
  CHECK(r["parameters"]["total"] == kTotal);
  CHECK(r["parameters"]["linear"] == kLinear);
  CHECK(r["parameters"]["expected_total"] == kTotal);
  CHECK(r["memory"]["as_16bit_bytes"] == 2 * kTotal);
  CHECK(r["memory"]["as_loaded_nf4_bytes"] == kNF4Loaded);
  CHECK(r["memory"]["dequant_scratch_bytes"] == 96 * 64 * 2);
  CHECK(r["quantization"]["bnb4bit_weights"] == 0);
  CHECK(r["files"]["count"] == 1);
  CHECK(r["files"]["sharded"] == false);
  CHECK(r["checks"].empty());
  // 1 embed + 9 per-layer kinds + final norm + lm_head, layers folded into {i}
  REQUIRE(r["tensors"].size() == 12);
  CHECK(r["tensors"][0]["pattern"] == "model.embed_tokens.weight");
  const json& q = r["tensors"][2];
  CHECK(q["pattern"] == "model.layers.{i}.self_attn.q_proj.weight");
  CHECK(q["count"] == 2);
  CHECK(q["shape"] == json::array({64, 64}));
  CHECK(q["stored"] == "BF16");
  CHECK(q["loaded"] == "NF4");
  CHECK(q["layers"] == json::array({0, 1}));
  CHECK(r["tensors"][11]["pattern"] == "lm_head.weight");
  CHECK(r["tensors"][11]["loaded"] == "16-bit");

  const auto t = run_qlora("inspect '" + (tmp / "m").string() + "'");
  INFO(t.output);
  CHECK(t.status == 0);
  CHECK_THAT(t.output, ContainsSubstring("LlamaForCausalLM, model_type llama"));
  CHECK_THAT(t.output, ContainsSubstring("4 heads, 2 KV heads (GQA 2:1), head_dim 16"));
  CHECK_THAT(t.output, ContainsSubstring("llama3, theta 500000, factor 8"));
  CHECK_THAT(t.output, ContainsSubstring("model.layers.{i}.mlp.down_proj.weight"));
  CHECK_THAT(t.output, ContainsSubstring("total 74,560 (74.56 K), linear (the 7 projection weights) 61,440"));
  CHECK_THAT(t.output, ContainsSubstring("as config.json implies"));
  CHECK_THAT(t.output, ContainsSubstring("quantizes the 7 projections to NF4 at load"));
  CHECK_THAT(t.output, ContainsSubstring("checks       ok"));
}

TEST_CASE("inspect a sharded folder and its bnb-4bit versions", "[inspect]") {
  TempDir tmp("qlora_inspect");
  const qlora::NamedTensors ts = qlora::test::tiny_llama_tensors();
  write_model(tmp / "sharded", tiny_config(), ts, 40000);
  const json s = inspect_json(tmp / "sharded");
  CHECK(s["files"]["sharded"] == true);
  CHECK(s["files"]["count"].get<int>() > 1);
  CHECK(s["parameters"]["total"] == kTotal);
  CHECK(s["memory"]["as_loaded_nf4_bytes"] == kNF4Loaded);

  SECTION("double quant, blocksize 64: the same counts and loaded bytes as quantizing at load") {
    qlora::quantize_checkpoint(tmp / "sharded", tmp / "q", {});
    const json r = inspect_json(tmp / "q");
    CHECK(r["quantization"]["bnb4bit_weights"] == 14);
    CHECK(r["quantization"]["quant_type"] == "nf4");
    CHECK(r["quantization"]["blocksize"] == 64);
    CHECK(r["quantization"]["double_quant"] == true);
    CHECK(r["quantization"]["quant_state_dtype"] == "bfloat16");
    CHECK(r["quantization"]["config"]["bnb_4bit_quant_type"] == "nf4");
    CHECK(r["parameters"]["total"] == kTotal);
    CHECK(r["parameters"]["linear"] == kLinear);
    CHECK(r["memory"]["as_loaded_nf4_bytes"] == kNF4Loaded);
    CHECK(r["checks"].empty());
    const json& k = r["tensors"][3];
    CHECK(k["pattern"] == "model.layers.{i}.self_attn.k_proj.weight");
    CHECK(k["shape"] == json::array({32, 64}));  // the logical shape, from the quant_state
    CHECK(k["stored"] == "nf4 (bnb, bs 64, dq)");
    // packed 1024 + absmax codes 32 + quant_map 64 + nested_absmax 4 + nested_quant_map 1024 +
    // its quant_state JSON, per layer
    CHECK(k["stored_bytes"].get<int64_t>() > 2 * (1024 + 32 + 64 + 4 + 1024));
    const auto t = run_qlora("inspect '" + (tmp / "q").string() + "'");
    CHECK(t.status == 0);
    CHECK_THAT(t.output, ContainsSubstring("bitsandbytes 4-bit: 14 weights, quant_type nf4, blocksize 64, double quant yes"));
  }
  SECTION("no double quant, blocksize 128: fp32 absmax per block") {
    qlora::QuantizeOptions opt;
    opt.blocksize = 128;
    opt.double_quant = false;
    qlora::quantize_checkpoint(tmp / "sharded", tmp / "q128", opt);
    const json r = inspect_json(tmp / "q128");
    CHECK(r["quantization"]["blocksize"] == 128);
    CHECK(r["quantization"]["double_quant"] == false);
    CHECK(r["memory"]["load_blocksize"] == 128);
    // n/2 + 4 * n/128 per weight: q/o 2176, k/v 1088, gate/up/down 3264; per layer
    // 2*2176 + 2*1088 + 3*3264 = 16320
    CHECK(r["memory"]["as_loaded_nf4_bytes"] == 2 * 16320 + 26240);
  }
}

TEST_CASE("inspect a tied Qwen2 with q/k/v biases", "[inspect]") {
  TempDir tmp("qlora_inspect");
  write_model(tmp / "m", tiny_config("qwen2", true), qlora::test::tiny_llama_tensors(at::kBFloat16, /*qkv_bias=*/true, /*tied=*/true));
  const json r = inspect_json(tmp / "m");
  // kTotal without lm_head (6400) plus the q/k/v biases (64 + 32 + 32 per layer)
  CHECK(r["parameters"]["total"] == kTotal - 6400 + 2 * 128);
  CHECK(r["parameters"]["linear"] == kLinear);
  CHECK(r["parameters"]["expected_total"] == kTotal - 6400 + 2 * 128);
  CHECK(r["config"]["qkv_bias"] == true);
  CHECK(r["config"]["tie_word_embeddings"] == true);
  CHECK(r["checks"].empty());
}

TEST_CASE("inspect reports a checkpoint that disagrees with its config.json", "[inspect]") {
  TempDir tmp("qlora_inspect");
  write_model(tmp / "m", tiny_config("llama", false, 3), qlora::test::tiny_llama_tensors());
  const auto t = run_qlora("inspect '" + (tmp / "m").string() + "'");
  INFO(t.output);
  CHECK(t.status == 0);  // inspect describes; the loader is the one to refuse
  CHECK_THAT(t.output, ContainsSubstring("config.json has num_hidden_layers 3, the checkpoint has tensors for 2 layers"));
  CHECK_THAT(t.output, ContainsSubstring("the checkpoint holds 74,560 parameters, config.json implies 105,408"));
}

TEST_CASE("inspect a single .safetensors file", "[inspect]") {
  TempDir tmp("qlora_inspect");
  qlora::save_safetensors(tmp / "one.safetensors",
                          {{"a.weight", at::zeros({3, 5}, at::kBFloat16)}, {"b", at::zeros({7}, at::kFloat)},
                           {"ids", at::zeros({2, 2}, at::kLong)}},
                          {{"format", "pt"}, {"note", "hello"}});
  const json r = inspect_json(tmp / "one.safetensors");
  CHECK(r["kind"] == "safetensors");
  CHECK(r["metadata"] == json({{"format", "pt"}, {"note", "hello"}}));
  REQUIRE(r["tensors"].size() == 3);
  CHECK(r["data_bytes"] == 3 * 5 * 2 + 7 * 4 + 4 * 8);
  const auto t = run_qlora("inspect '" + (tmp / "one.safetensors").string() + "'");
  INFO(t.output);
  CHECK(t.status == 0);
  CHECK_THAT(t.output, ContainsSubstring("safetensors file, 3 tensors"));
  CHECK_THAT(t.output, ContainsSubstring("format=pt note=hello"));
  CHECK_THAT(t.output, ContainsSubstring("a.weight"));
  CHECK_THAT(t.output, ContainsSubstring("[3, 5]"));
  CHECK_THAT(t.output, ContainsSubstring("I64"));
}

TEST_CASE("inspect: bad input is one line and exit status 2", "[inspect]") {
  TempDir tmp("qlora_inspect");
  check_user_error("inspect '" + (tmp / "absent").string() + "'", "does not exist");
  fs::create_directories(tmp / "noconfig");
  qlora::save_safetensors(tmp / "noconfig" / "model.safetensors", {{"x", at::zeros({2})}});
  check_user_error("inspect '" + (tmp / "noconfig").string() + "'", "config.json: does not exist");
  // header length past the end of the file
  std::string bad(8, '\0');
  bad[0] = static_cast<char>(200);
  write_file(tmp / "bad.safetensors", bad + "{}");
  check_user_error("inspect '" + (tmp / "bad.safetensors").string() + "'", "exceeds the file size");
  // the same file as a model folder's weights
  fs::create_directories(tmp / "corrupt");
  write_file(tmp / "corrupt" / "config.json", tiny_config().dump());
  write_file(tmp / "corrupt" / "model.safetensors", bad + "{}");
  check_user_error("inspect '" + (tmp / "corrupt").string() + "'", "exceeds the file size");
  // a config.json that is not a Llama-family model
  fs::create_directories(tmp / "gpt2");
  write_file(tmp / "gpt2" / "config.json", R"({"model_type": "gpt2"})");
  check_user_error("inspect '" + (tmp / "gpt2").string() + "'", "model_type");
  write_file(tmp / "notes.txt", "hello");
  check_user_error("inspect '" + (tmp / "notes.txt").string() + "'", "expected a model folder");
  const auto r = run_qlora("inspect");
  CHECK(r.status == 2);
}

TEST_CASE("bench model on the CPU: a table, the JSON, and its user errors", "[bench]") {
  TempDir tmp("qlora_bench_model");
  write_model(tmp / "m", tiny_config(), qlora::test::tiny_llama_tensors());
  const std::string dir = "'" + (tmp / "m").string() + "'";
  const auto r = run_qlora("bench model " + dir + " --device cpu --seq 8 --batch 2 --iters 2 --json '" +
                           (tmp / "b.json").string() + "'");
  INFO(r.output);
  REQUIRE(r.status == 0);
  CHECK_THAT(r.output, ContainsSubstring("NF4 linears, compute bf16, batch 2 x seq 8, iters 2"));
  CHECK_THAT(r.output, ContainsSubstring("logits (fp32 [B,T,V])"));
  const json j = json::parse(qlora::test::read_file(tmp / "b.json"));
  CHECK(j["bench"] == "model");
  CHECK(j["load_in_4bit"] == true);
  CHECK(j["parameters"] == kTotal);
  CHECK(j["linear_parameters"] == kLinear);
  CHECK(j["forward"]["logits"]["samples_ms"].size() == 2);
  CHECK(j["forward"]["hidden"]["median_ms"].get<double>() > 0);

  const auto r16 = run_qlora("bench model " + dir + " --device cpu --seq 4 --iters 1 --no-4bit --dtype fp32");
  INFO(r16.output);
  CHECK(r16.status == 0);
  CHECK_THAT(r16.output, ContainsSubstring("16-bit linears, compute fp32"));

  check_user_error("bench model --device cpu", "MODEL_DIR is required");
  check_user_error("bench model " + dir + " --device cpu --seq 0", "--seq and --batch must be >= 1");
  check_user_error("bench nf4 --dtype fp32", "fp32 is for bench model");
  if (!at::hasCUDA()) check_user_error("bench model " + dir, "CUDA");
}

// Runs with device-build's "[cuda]" subset on the GPU box, before the 8B run of scripts/device-model.
TEST_CASE("bench model on CUDA: a tiny model, NF4 and 16-bit", "[bench][cuda]") {
  if (!at::hasCUDA()) SKIP("no CUDA device");
  TempDir tmp("qlora_bench_model");
  write_model(tmp / "m", tiny_config(), qlora::test::tiny_llama_tensors());
  for (const char* extra : {"", " --no-4bit", " --dtype fp16"}) {
    const auto r = run_qlora("bench model '" + (tmp / "m").string() + "' --seq 64 --batch 2 --iters 2" + extra +
                             " --json '" + (tmp / "b.json").string() + "'");
    INFO(r.output);
    REQUIRE(r.status == 0);
    const json j = json::parse(qlora::test::read_file(tmp / "b.json"));
    CHECK(j["parameters"] == kTotal);
    CHECK(j["memory_after_load"]["allocated_bytes"].get<int64_t>() > 0);
    CHECK(j["forward"]["logits"]["peak_extra_bytes"].get<int64_t>() > 0);
    CHECK(j["forward"]["logits"]["median_ms"].get<double>() > 0);
  }
}
