// Hugging Face config.json for Llama-family models (llama, mistral, qwen2) as a plain struct,
// including a bitsandbytes `quantization_config`. The original JSON is kept so that writing the
// config back preserves every key we do not model.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace qlora {

// rope_scaling (transformers v4) or rope_parameters (v5). `rope_type` is "default" when absent.
struct RopeScaling {
  std::string rope_type = "default";  // default, linear, dynamic, llama3, yarn, longrope, ...
  double factor = 1.0;
  // llama3 only (transformers _compute_llama3_parameters)
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 0;
  nlohmann::json raw;                 // the object as found (null when absent)
};

// transformers' BitsAndBytesConfig as to_dict() writes it into config.json (every key, with its
// default). Field names are the JSON keys.
struct BnbQuantizationConfig {
  std::string quant_method = "bitsandbytes";
  bool load_in_4bit = false;
  bool load_in_8bit = false;
  double llm_int8_threshold = 6.0;
  std::optional<std::vector<std::string>> llm_int8_skip_modules;  // null by default
  bool llm_int8_enable_fp32_cpu_offload = false;
  bool llm_int8_has_fp16_weight = false;
  std::string bnb_4bit_quant_type = "fp4";
  bool bnb_4bit_use_double_quant = false;
  std::string bnb_4bit_compute_dtype = "float32";
  std::string bnb_4bit_quant_storage = "uint8";
};

struct HFConfig {
  std::string model_type;              // llama, mistral or qwen2
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;     // default: num_attention_heads
  int64_t head_dim = 0;                // default: hidden_size / num_attention_heads
  int64_t vocab_size = 0;
  int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  std::string torch_dtype;             // "bfloat16", "float16", "float32"; empty when absent
  std::vector<int64_t> bos_token_id;   // int or list in the file; empty when null/absent
  std::vector<int64_t> eos_token_id;
  std::vector<int64_t> pad_token_id;
  bool qkv_bias = false;               // llama: attention_bias; qwen2: always true
  bool o_bias = false;                 // llama: attention_bias; qwen2: false
  bool mlp_bias = false;               // llama: mlp_bias
  std::optional<BnbQuantizationConfig> quantization_config;
  nlohmann::json raw;                  // the whole file as read
};

// Parses and validates; errors are UserErrors naming `source` (e.g. ".../config.json") and the key.
HFConfig parse_hf_config(const nlohmann::json& j, const std::string& source = "config.json");
// `path` is config.json or the directory holding it.
HFConfig load_hf_config(const std::filesystem::path& path);

// The config as JSON: `raw` with the modelled fields written over it (unknown keys kept).
nlohmann::json hf_config_to_json(const HFConfig& config);
// Writes config.json atomically, formatted as transformers does (indent 2, sorted keys).
void save_hf_config(const std::filesystem::path& path, const HFConfig& config);

// The quantization_config object exactly as transformers' BitsAndBytesConfig.to_dict() gives it.
nlohmann::json bnb_quantization_config_to_json(const BnbQuantizationConfig& q);
// The config transformers writes for load_in_4bit, nf4, the given double quant and compute dtype,
// quant_storage uint8.
BnbQuantizationConfig bnb_nf4_quantization_config(bool double_quant, const std::string& compute_dtype);

// "bfloat16" <-> at::kBFloat16 (also float16, float32, float64, uint8, int8, ...). Unknown names
// are UserErrors naming `where`.
at::ScalarType torch_dtype_from_name(const std::string& name, const std::string& where);
std::string torch_dtype_name(at::ScalarType t);  // "bfloat16" (as str(torch.bfloat16) minus "torch.")

}  // namespace qlora
