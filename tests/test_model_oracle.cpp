// Hook for the HF transformers parity oracle (tests/oracle/model_hf_parity.py): a hidden test
// that the script runs with QLORA_HF_ORACLE_DIR set. Each subfolder of that directory holding a
// case.json is one case:
//   case.json           {"model": DIR (optional; default: the case folder itself),
//                        "compute_dtype": "float32"|"bfloat16"|"float16", "load_in_4bit": bool,
//                        "device": "cpu"|"cuda", "dump_layers": bool (optional)}
//   inputs.safetensors  input_ids int64 [B, T], optionally position_ids int64 [B, T]
// and the hook writes ours.safetensors there: logits fp32 [B, T, vocab] and hidden (the final-norm
// hidden states, upcast to fp32; lets the script tell the decoder from the lm_head) and, with
// dump_layers, embed and layer.<i> (each layer's output, the loop llama_hidden_states runs, spelled
// out) so that a mismatch can be pinned to a layer. A case that throws gets error.txt instead
// (the message), and the test fails after trying every case.
// torch headers before Catch2: both define CHECK, and Catch2's must be the one in force.
#include <ATen/core/grad_mode.h>

#include "qlora/hf_config.h"
#include "qlora/model.h"
#include "qlora/safetensors.h"

#include <catch2/catch_test_macros.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

namespace fs = std::filesystem;

namespace {

nlohmann::json read_json(const fs::path& p) {
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  return nlohmann::json::parse(ss.str());
}

void run_case(const fs::path& dir) {
  const nlohmann::json c = read_json(dir / "case.json");
  const fs::path model_dir = c.contains("model") ? fs::path(c.at("model").get<std::string>()) : dir;
  qlora::ModelLoadOptions opt;
  opt.load_in_4bit = c.value("load_in_4bit", false);
  opt.compute_dtype = qlora::torch_dtype_from_name(c.value("compute_dtype", std::string("float32")), "case.json: compute_dtype");
  opt.device = at::Device(c.value("device", std::string("cpu")));

  at::NoGradGuard no_grad;
  const auto t0 = std::chrono::steady_clock::now();
  const qlora::LlamaWeights model = qlora::load_llama(model_dir, opt);
  const auto t1 = std::chrono::steady_clock::now();

  const qlora::SafetensorsCheckpoint in(dir / "inputs.safetensors");
  qlora::ForwardInputs inputs;
  inputs.input_ids = in.tensor("input_ids").to(opt.device);
  if (in.contains("position_ids")) inputs.position_ids = in.tensor("position_ids").to(opt.device);

  qlora::DequantScratch scratch;
  const at::Tensor hidden = qlora::llama_hidden_states(model, inputs, scratch);
  const at::Tensor logits = qlora::llama_logits(model, inputs, scratch);
  const auto t2 = std::chrono::steady_clock::now();
  qlora::NamedTensors out = {{"logits", logits.to(at::kFloat).cpu()}, {"hidden", hidden.to(at::kFloat).cpu()}};
  if (c.value("dump_layers", false)) {
    const int64_t B = inputs.input_ids.size(0), T = inputs.input_ids.size(1);
    at::Tensor h = at::embedding(model.embed_tokens, inputs.input_ids);
    out.emplace_back("embed", h.to(at::kFloat).cpu());
    const qlora::AttentionInputs a = qlora::attention_inputs(model, inputs.position_ids, B, T);
    for (size_t i = 0; i < model.layers.size(); ++i) {
      h = qlora::decoder_layer(h, model.layers[i], model, a, scratch);
      out.emplace_back("layer." + std::to_string(i), h.to(at::kFloat).cpu());
    }
  }
  qlora::save_safetensors(dir / "ours.safetensors", out);
  const auto ms = [](auto a, auto b) { return std::chrono::duration<double, std::milli>(b - a).count(); };
  std::printf("hf oracle: %s: load %.1f ms, forward %.1f ms, logits [%lld, %lld, %lld]\n", dir.filename().c_str(),
              ms(t0, t1), ms(t1, t2), static_cast<long long>(logits.size(0)), static_cast<long long>(logits.size(1)),
              static_cast<long long>(logits.size(2)));
}

}  // namespace

TEST_CASE("HF transformers parity hook: logits of the cases the oracle script wrote", "[.hf_oracle]") {
  const char* root = std::getenv("QLORA_HF_ORACLE_DIR");
  if (!root) SKIP("QLORA_HF_ORACLE_DIR not set");
  std::vector<fs::path> cases;
  for (const auto& de : fs::directory_iterator(root))
    if (de.is_directory() && fs::exists(de.path() / "case.json")) cases.push_back(de.path());
  std::sort(cases.begin(), cases.end());
  int failed = 0;
  for (const auto& dir : cases) {
    fs::remove(dir / "error.txt");
    fs::remove(dir / "ours.safetensors");
    try {
      run_case(dir);
    } catch (const std::exception& e) {
      ++failed;
      std::ofstream(dir / "error.txt") << e.what();
      std::printf("hf oracle: %s: error: %s\n", dir.filename().c_str(), e.what());
    }
  }
  std::printf("hf oracle: %zu cases, %d failed\n", cases.size(), failed);
  CHECK(!cases.empty());
  CHECK(failed == 0);
}
