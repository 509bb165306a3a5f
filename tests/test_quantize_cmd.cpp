// HF config.json parsing/writing and `qlora quantize`: a tiny fake 16-bit checkpoint turned into
// a bnb-4bit one (single file and sharded), every user error, and the real binary's exit codes.
// torch headers before Catch: c10 defines a CHECK macro that Catch must override.
#include "qlora/bnb4bit.h"
#include "qlora/error.h"
#include "qlora/hf_config.h"

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "test_util.h"
#include "tiny_llama.h"


using Catch::Matchers::ContainsSubstring;
namespace fs = std::filesystem;
using nlohmann::json;

using qlora::test::TempDir;

namespace {


using qlora::test::read_file;
using qlora::test::Run;
using qlora::test::run_qlora;
using qlora::test::write_file;

json tiny_config() {
  return json::parse(R"({
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
    "bos_token_id": 1, "eos_token_id": [2, 3], "tie_word_embeddings": false, "custom_key": {"kept": true},
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 128}})");
}

// A 2-layer Llama checkpoint written by our writer; `shard_bytes` > 0 writes it sharded.
qlora::NamedTensors make_checkpoint(const fs::path& dir, int64_t shard_bytes, at::ScalarType dt = at::kBFloat16) {
  const qlora::NamedTensors ts = qlora::test::tiny_llama_tensors(dt);
  if (shard_bytes > 0) qlora::save_safetensors_sharded(dir, ts, shard_bytes);
  else qlora::save_safetensors(dir / "model.safetensors", ts);
  write_file(dir / "config.json", tiny_config().dump(2));
  write_file(dir / "tokenizer.json", R"({"model": {"type": "BPE"}})");
  write_file(dir / "tokenizer_config.json", R"({"bos_token": "<s>"})");
  write_file(dir / "generation_config.json", R"({"do_sample": true})");
  write_file(dir / "README.md", "not copied");
  return ts;
}

std::string quantize_error(const fs::path& in, const fs::path& out, qlora::QuantizeOptions opt = {}) {
  try {
    qlora::quantize_checkpoint(in, out, opt);
  } catch (const qlora::UserError& e) {
    return e.what();
  }
  return "no error";
}


void check_quantized(const fs::path& in, const fs::path& out, const qlora::NamedTensors& ts, bool nested) {
  qlora::SafetensorsCheckpoint ck(out);
  int quantized = 0;
  for (const auto& [name, t] : ts) {
    CAPTURE(name);
    if (qlora::is_quantizable_linear_weight(name)) {
      REQUIRE(qlora::is_bnb4bit_weight(ck, name));
      const qlora::NF4Tensor r = qlora::read_bnb4bit_weight(ck, name);
      const qlora::NF4Tensor q = qlora::nf4_quantize(t, 64, nested);
      CHECK(at::equal(r.packed, q.packed));
      CHECK(at::equal(r.absmax, q.absmax));
      CHECK(r.nested == nested);
      CHECK(r.shape == q.shape);
      CHECK(r.dtype == at::kBFloat16);
      ++quantized;
    } else {
      CHECK(ck.entry(name).scalar_type == t.scalar_type());
      CHECK(at::equal(ck.tensor(name), t));
    }
  }
  CHECK(quantized == 14);
  const json cfg = json::parse(read_file(out / "config.json"));
  const json& q = cfg["quantization_config"];
  CHECK(q["quant_method"] == "bitsandbytes");
  CHECK(q["load_in_4bit"] == true);
  CHECK(q["_load_in_4bit"] == true);
  CHECK(q["load_in_8bit"] == false);
  CHECK(q["bnb_4bit_quant_type"] == "nf4");
  CHECK(q["bnb_4bit_use_double_quant"] == nested);
  CHECK(q["bnb_4bit_compute_dtype"] == "bfloat16");
  CHECK(q["bnb_4bit_quant_storage"] == "uint8");
  CHECK(q["llm_int8_skip_modules"].is_null());
  CHECK(q["llm_int8_threshold"] == 6.0);
  CHECK(q.size() == 13);
  CHECK(cfg["custom_key"]["kept"] == true);
  CHECK(cfg["rms_norm_eps"] == 1e-05);
  const qlora::HFConfig parsed = qlora::load_hf_config(out);
  REQUIRE(parsed.quantization_config);
  CHECK(parsed.quantization_config->bnb_4bit_use_double_quant == nested);
  for (const char* f : {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}) CHECK(read_file(in / f) == read_file(out / f));
  CHECK(!fs::exists(out / "README.md"));
  for (const auto& e : fs::directory_iterator(out)) CHECK(e.path().filename().string()[0] != '.');  // no temp files left
}

}  // namespace

TEST_CASE("HF config.json: fields, defaults, llama3 rope, token id lists", "[quantize][hf_config]") {
  const qlora::HFConfig c = qlora::parse_hf_config(tiny_config());
  CHECK(c.model_type == "llama");
  CHECK(c.hidden_size == 64);
  CHECK(c.num_key_value_heads == 2);
  CHECK(c.head_dim == 16);
  CHECK(c.rms_norm_eps == 1e-05);
  CHECK(c.rope_theta == 500000.0);
  CHECK(c.rope_scaling.rope_type == "llama3");
  CHECK(c.rope_scaling.factor == 8.0);
  CHECK(c.rope_scaling.original_max_position_embeddings == 128);
  CHECK(c.torch_dtype == "bfloat16");
  CHECK(c.bos_token_id == std::vector<int64_t>{1});
  CHECK(c.eos_token_id == std::vector<int64_t>{2, 3});
  CHECK(c.pad_token_id.empty());
  CHECK(!c.qkv_bias);
  CHECK(!c.quantization_config);

  json j = tiny_config();
  j.erase("num_key_value_heads");
  j["model_type"] = "qwen2";
  j["dtype"] = "float16";
  j.erase("rope_scaling");
  const qlora::HFConfig q = qlora::parse_hf_config(j);
  CHECK(q.num_key_value_heads == 4);
  CHECK(q.qkv_bias);
  CHECK(!q.o_bias);
  CHECK(q.torch_dtype == "float16");  // "dtype" (transformers >= 4.56) wins over torch_dtype
  CHECK(q.rope_scaling.rope_type == "default");

  // writing back keeps unknown keys and adds nothing that was not there
  const json back = qlora::hf_config_to_json(c);
  CHECK(back == tiny_config());
  json minimal = {{"model_type", "mistral"}, {"hidden_size", 64}, {"intermediate_size", 96}, {"num_hidden_layers", 2},
                  {"num_attention_heads", 4}, {"vocab_size", 100}};
  qlora::HFConfig m = qlora::parse_hf_config(minimal);
  CHECK(m.rope_theta == 1e6);
  CHECK(qlora::hf_config_to_json(m) == minimal);
  m.quantization_config = qlora::bnb_nf4_quantization_config(true, "bfloat16");
  m.rms_norm_eps = 1e-5;
  TempDir d("qlora_quant_test");
  qlora::save_hf_config(d / "config.json", m);
  const qlora::HFConfig m2 = qlora::load_hf_config(d.path);
  CHECK(m2.rms_norm_eps == 1e-5);
  REQUIRE(m2.quantization_config);
  CHECK(m2.quantization_config->bnb_4bit_quant_type == "nf4");
  CHECK(m2.quantization_config->load_in_4bit);
}

TEST_CASE("HF config.json errors name the file and the key", "[quantize][hf_config]") {
  auto err = [](const json& j) {
    try {
      qlora::parse_hf_config(j, "m/config.json");
    } catch (const qlora::UserError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  auto with = [](const std::string& key, const json& v) {
    json j = tiny_config();
    if (v.is_discarded()) j.erase(key);
    else j[key] = v;
    return j;
  };
  const json drop = json(json::value_t::discarded);
  CHECK_THAT(err(with("hidden_size", drop)), ContainsSubstring("m/config.json: hidden_size: missing (required)"));
  CHECK_THAT(err(with("hidden_size", "64")), ContainsSubstring("m/config.json: hidden_size: expected an integer, found \"64\""));
  CHECK_THAT(err(with("num_hidden_layers", 0)), ContainsSubstring("num_hidden_layers: expected an integer >= 1, found 0"));
  CHECK_THAT(err(with("num_key_value_heads", 3)), ContainsSubstring("num_key_value_heads: expected a divisor of num_attention_heads (4), found 3"));
  CHECK_THAT(err(with("model_type", "gpt2")), ContainsSubstring("model_type: expected \"llama\", \"mistral\" or \"qwen2\", found \"gpt2\""));
  CHECK_THAT(err(with("rms_norm_eps", -1.0)), ContainsSubstring("rms_norm_eps: expected a number > 0"));
  CHECK_THAT(err(with("tie_word_embeddings", 1)), ContainsSubstring("tie_word_embeddings: expected true or false"));
  CHECK_THAT(err(with("eos_token_id", "x")), ContainsSubstring("eos_token_id: expected a token id, a list of token ids or null"));
  CHECK_THAT(err(with("torch_dtype", "float17")), ContainsSubstring("torch_dtype: expected a torch dtype name"));
  json rope = tiny_config()["rope_scaling"];
  rope.erase("low_freq_factor");
  CHECK_THAT(err(with("rope_scaling", rope)), ContainsSubstring("rope_scaling.low_freq_factor: missing (required for rope_type llama3)"));
  CHECK_THAT(err(with("rope_scaling", 3)), ContainsSubstring("rope_scaling: expected an object or null"));
  CHECK_THAT(err(with("quantization_config", json{{"quant_method", "gptq"}})), ContainsSubstring("quantization_config.quant_method: expected \"bitsandbytes\""));
  CHECK_THAT(err(with("quantization_config", json{{"quant_method", "bitsandbytes"}, {"load_in_4bit", "yes"}})),
             ContainsSubstring("quantization_config.load_in_4bit: expected true or false, found \"yes\""));
  CHECK_THAT(err(with("quantization_config", json{{"quant_method", "bitsandbytes"}, {"bnb_4bit_quant_type", "int4"}})),
             ContainsSubstring("quantization_config.bnb_4bit_quant_type: expected \"nf4\" or \"fp4\""));
  CHECK_THAT(err(json::array()), ContainsSubstring("m/config.json: expected a JSON object"));

  TempDir d("qlora_quant_test");
  CHECK_THROWS_WITH(qlora::load_hf_config(d.path), ContainsSubstring("config.json: does not exist"));
  write_file(d / "config.json", "{\"model_type\": ");
  CHECK_THROWS_WITH(qlora::load_hf_config(d.path), ContainsSubstring("config.json: not valid JSON"));
}

TEST_CASE("quantize a single-file 16-bit checkpoint", "[quantize]") {
  TempDir d("qlora_quant_test");
  fs::create_directories(d / "in");
  const auto ts = make_checkpoint(d / "in", 0);
  const qlora::QuantizeSummary s = qlora::quantize_checkpoint(d / "in", d / "out", {});
  CHECK(s.quantized == 14);
  CHECK(s.kept == 7);
  CHECK(fs::exists(d / "out" / "model.safetensors"));
  CHECK(!fs::exists(d / "out" / "model.safetensors.index.json"));
  check_quantized(d / "in", d / "out", ts, true);

  SECTION("the output is refused as input: already quantized") {
    CHECK_THAT(quantize_error(d / "out", d / "again"), ContainsSubstring("quantization_config: expected none (a 16-bit checkpoint)"));
  }
  SECTION("a non-empty OUT_DIR is refused without --force and left as it was") {
    const std::string before = read_file(d / "out" / "model.safetensors");
    CHECK_THAT(quantize_error(d / "in", d / "out"), ContainsSubstring("output directory is not empty (pass --force"));
    CHECK(read_file(d / "out" / "model.safetensors") == before);
    // --force: a stale shard of an earlier run goes, the user's other files stay
    qlora::save_safetensors(d / "out" / "model-00001-of-00002.safetensors", {{"x", at::zeros({1})}});
    write_file(d / "out" / "adapter_model.safetensors", "mine");
    qlora::QuantizeOptions o;
    o.force = true;
    o.double_quant = false;
    qlora::quantize_checkpoint(d / "in", d / "out", o);
    CHECK(!fs::exists(d / "out" / "model-00001-of-00002.safetensors"));
    CHECK(read_file(d / "out" / "adapter_model.safetensors") == "mine");
    fs::remove(d / "out" / "adapter_model.safetensors");
    check_quantized(d / "in", d / "out", ts, false);
  }
}

TEST_CASE("quantize a sharded checkpoint, without double quant", "[quantize]") {
  TempDir d("qlora_quant_test");
  fs::create_directories(d / "in");
  const auto ts = make_checkpoint(d / "in", 40000);
  REQUIRE(fs::exists(d / "in" / "model.safetensors.index.json"));
  qlora::QuantizeOptions o;
  o.double_quant = false;
  const qlora::QuantizeSummary s = qlora::quantize_checkpoint(d / "in", d / "out", o);
  CHECK(s.quantized == 14);
  check_quantized(d / "in", d / "out", ts, false);
  const json index = json::parse(read_file(d / "out" / "model.safetensors.index.json"));
  qlora::SafetensorsCheckpoint ck(d / "out");
  CHECK(ck.sharded());
  CHECK(index["weight_map"].size() == ck.names().size());
  CHECK(index["weight_map"].contains("model.layers.1.mlp.down_proj.weight.quant_state.bitsandbytes__nf4"));
  int64_t total = 0;
  for (const auto& n : ck.names()) total += ck.entry(n).end - ck.entry(n).begin;
  CHECK(index["metadata"]["total_size"] == total);
}

TEST_CASE("quantize user errors", "[quantize]") {
  TempDir d("qlora_quant_test");
  CHECK_THAT(quantize_error(d / "missing", d / "out"), ContainsSubstring("missing: input directory does not exist"));
  fs::create_directories(d / "in");
  CHECK_THAT(quantize_error(d / "in", d / "out"), ContainsSubstring("config.json: does not exist"));
  write_file(d / "in" / "config.json", "{oops");
  CHECK_THAT(quantize_error(d / "in", d / "out"), ContainsSubstring("config.json: not valid JSON"));
  write_file(d / "in" / "config.json", tiny_config().dump());
  CHECK_THAT(quantize_error(d / "in", d / "out"), ContainsSubstring("no model.safetensors"));
  make_checkpoint(d / "in", 0);
  CHECK_THAT(quantize_error(d / "in", d / "in"), ContainsSubstring("the output directory is the input directory"));
  qlora::QuantizeOptions o;
  o.blocksize = 48;
  CHECK_THAT(quantize_error(d / "in", d / "out", o), ContainsSubstring("--blocksize: expected a power of two in 32..4096, found 48"));
  qlora::save_safetensors(d / "in" / "model.safetensors", {{"model.embed_tokens.weight", at::zeros({4, 4}, at::kBFloat16)}});
  CHECK_THAT(quantize_error(d / "in", d / "out"), ContainsSubstring("found no linear layer weights to quantize"));
  CHECK(!fs::exists(d / "out"));  // nothing written on a refused run
}

TEST_CASE("qlora quantize binary: exit status 2 on user errors, 0 on success", "[quantize]") {
  TempDir d("qlora_quant_test");
  Run r = run_qlora("quantize " + (d / "nope").string() + " " + (d / "out").string());
  CHECK(r.status == 2);
  CHECK_THAT(r.output, ContainsSubstring("input directory does not exist"));
  CHECK(std::count(r.output.begin(), r.output.end(), '\n') == 1);
  Run missing = run_qlora("quantize");
  CHECK(missing.status == 2);

  fs::create_directories(d / "in");
  make_checkpoint(d / "in", 0);
  Run ok = run_qlora("quantize " + (d / "in").string() + " " + (d / "out").string() + " --blocksize 128 --no-double-quant");
  CHECK(ok.status == 0);
  CHECK_THAT(ok.output, ContainsSubstring("layer 1 (2/2): 7 linear weights -> NF4"));
  qlora::SafetensorsCheckpoint ck(d / "out");
  const qlora::NF4Tensor q = qlora::read_bnb4bit_weight(ck, "model.layers.0.mlp.up_proj.weight");
  CHECK(q.blocksize == 128);
  CHECK(!q.nested);
  Run again = run_qlora("quantize " + (d / "in").string() + " " + (d / "out").string());
  CHECK(again.status == 2);
  CHECK_THAT(again.output, ContainsSubstring("not empty (pass --force"));
}
