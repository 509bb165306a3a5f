// Fixtures for the merge and GGUF export tests: a tiny Llama-family checkpoint folder of chosen
// sizes (config.json, model.safetensors, a small byte-level tokenizer.json + tokenizer_config.json,
// generation_config.json) and a PEFT adapter for it whose B matrices are random (so the merge
// changes the weights).
#pragma once
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "qlora/lora.h"
#include "qlora/model.h"
#include "qlora/safetensors.h"
#include "test_util.h"

namespace qlora::test {

struct TinyModel {
  std::string model_type = "llama";
  int64_t hidden = 64, intermediate = 96, layers = 2, heads = 4, kv_heads = 2, vocab = 100;
  bool tied = false;
  bool qkv_bias = false;                  // llama attention_bias (q, k, v, o biases); qwen2: q, k, v
  nlohmann::json rope_scaling = nullptr;  // e.g. {"rope_type": "llama3", ...}
  at::ScalarType dtype = at::kBFloat16;
};

// A byte-level tokenizer with bytes a, b, c, the merges "a b", "ab c" and a special <|end|>.
inline std::string tiny_tokenizer_json() {
  return R"({"version": "1.0", "added_tokens": [{"id": 5, "content": "<|end|>", "special": true}],
    "normalizer": null, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true},
    "post_processor": null, "decoder": {"type": "ByteLevel"},
    "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 4}, "merges": ["a b", "ab c"]}})";
}

// Writes the checkpoint into `dir` and returns its tensors (HF names, the file's dtype).
inline NamedTensors write_tiny_model(const std::filesystem::path& dir, const TinyModel& m, uint64_t seed) {
  std::filesystem::create_directories(dir);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  NamedTensors ts;
  auto add = [&](const std::string& n, std::vector<int64_t> shape, double scale, double offset = 0.0) {
    ts.emplace_back(n, (at::randn(shape, gen) * scale + offset).to(m.dtype));
  };
  const int64_t hd = m.hidden / m.heads;
  add("model.embed_tokens.weight", {m.vocab, m.hidden}, 1.0);
  for (int64_t l = 0; l < m.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    const double s = 1.0 / std::sqrt(static_cast<double>(m.hidden));
    add(p + "input_layernorm.weight", {m.hidden}, 0.2, 1.0);
    add(p + "post_attention_layernorm.weight", {m.hidden}, 0.2, 1.0);
    add(p + "self_attn.q_proj.weight", {m.heads * hd, m.hidden}, s);
    add(p + "self_attn.k_proj.weight", {m.kv_heads * hd, m.hidden}, s);
    add(p + "self_attn.v_proj.weight", {m.kv_heads * hd, m.hidden}, s);
    add(p + "self_attn.o_proj.weight", {m.hidden, m.heads * hd}, s);
    if (m.qkv_bias) {
      add(p + "self_attn.q_proj.bias", {m.heads * hd}, 0.2);
      add(p + "self_attn.k_proj.bias", {m.kv_heads * hd}, 0.2);
      add(p + "self_attn.v_proj.bias", {m.kv_heads * hd}, 0.2);
      if (m.model_type == "llama") add(p + "self_attn.o_proj.bias", {m.hidden}, 0.2);
    }
    add(p + "mlp.gate_proj.weight", {m.intermediate, m.hidden}, s);
    add(p + "mlp.up_proj.weight", {m.intermediate, m.hidden}, s);
    add(p + "mlp.down_proj.weight", {m.hidden, m.intermediate}, 1.0 / std::sqrt(static_cast<double>(m.intermediate)));
  }
  add("model.norm.weight", {m.hidden}, 0.2, 1.0);
  if (!m.tied) add("lm_head.weight", {m.vocab, m.hidden}, 1.0 / std::sqrt(static_cast<double>(m.hidden)));
  save_safetensors(dir / "model.safetensors", ts);

  nlohmann::json c = {{"architectures", {m.model_type == "qwen2" ? "Qwen2ForCausalLM" : "LlamaForCausalLM"}},
                      {"model_type", m.model_type}, {"hidden_size", m.hidden}, {"intermediate_size", m.intermediate},
                      {"num_hidden_layers", m.layers}, {"num_attention_heads", m.heads}, {"num_key_value_heads", m.kv_heads},
                      {"vocab_size", m.vocab}, {"max_position_embeddings", 256}, {"rms_norm_eps", 1e-5},
                      {"rope_theta", 10000.0}, {"tie_word_embeddings", m.tied}, {"hidden_act", "silu"},
                      {"torch_dtype", m.dtype == at::kFloat ? "float32" : m.dtype == at::kHalf ? "float16" : "bfloat16"},
                      {"bos_token_id", 5}, {"eos_token_id", 5}};
  if (m.model_type == "llama") c["attention_bias"] = m.qkv_bias;
  if (!m.rope_scaling.is_null()) c["rope_scaling"] = m.rope_scaling;
  write_file(dir / "config.json", c.dump(2));
  write_file(dir / "tokenizer.json", tiny_tokenizer_json());
  write_file(dir / "tokenizer_config.json", R"({"bos_token": "<|end|>", "eos_token": "<|end|>", "chat_template": "{{ x }}"})");
  write_file(dir / "generation_config.json", R"({"do_sample": false})");
  write_file(dir / "README.md", "not copied");
  return ts;
}

// A PEFT adapter for the model in `model_dir` (loaded 16-bit): make_lora(seed), then every B drawn
// N(0, 0.1^2) from seed + 1; saved to `adapter_dir`.
inline void write_tiny_adapter(const std::filesystem::path& adapter_dir, const std::filesystem::path& model_dir, int r,
                               double alpha, std::vector<std::string> targets, uint64_t seed, bool rslora = false) {
  ModelLoadOptions o;
  o.load_in_4bit = false;
  o.compute_dtype = at::kFloat;
  const LlamaWeights model = load_llama(model_dir, o);
  LoraOptions lo;
  lo.r = r;
  lo.alpha = alpha;
  lo.use_rslora = rslora;
  lo.target_modules = std::move(targets);
  LoraModel lora = make_lora(model, lo, seed);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed + 1);
  at::NoGradGuard no_grad;
  for (LoraLayer& layer : lora.layers)
    for (const std::string& p : lora_projection_names())
      if (auto& l = lora_projection(layer, p)) l->B.copy_(at::randn(l->B.sizes(), gen) * 0.1);
  save_peft_adapter(adapter_dir, lora, model.config, "tiny");
}

}  // namespace qlora::test
