// HF config.json <-> HFConfig: typed, range-checked reading with errors naming the file and the
// key; writing back over the original JSON so that unknown keys survive.
// Defaults follow transformers' LlamaConfig/MistralConfig/Qwen2Config; the quantization_config
// keys and defaults follow transformers' BitsAndBytesConfig (__init__ and to_dict(), in
// src/transformers/utils/quantization_config.py): to_dict() dumps __dict__, which holds
// `_load_in_4bit`/`_load_in_8bit` next to `load_in_4bit`/`load_in_8bit`, and the dtypes as
// "bfloat16"-style names.
#include "qlora/hf_config.h"

#include <fstream>
#include <sstream>

#include "qlora/error.h"
#include "qlora/safetensors.h"

namespace qlora {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

struct Reader {
  const json& j;
  std::string where;  // "<file>: " prefix, plus the object path for nested objects

  [[noreturn]] void fail(const std::string& key, const std::string& expected, const json& found) const {
    throw UserError(where + key + ": expected " + expected + ", found " + (found.is_null() ? "null" : found.dump()));
  }
  bool has(const std::string& key) const { return j.contains(key) && !j[key].is_null(); }

  int64_t int_(const std::string& key, std::optional<int64_t> def, int64_t min = 1) const {
    if (!has(key)) {
      if (!def) throw UserError(where + key + ": missing (required)");
      return *def;
    }
    const json& v = j[key];
    if (!v.is_number_integer()) fail(key, "an integer", v);
    const int64_t x = v.get<int64_t>();
    if (x < min) fail(key, "an integer >= " + std::to_string(min), v);
    return x;
  }
  double num(const std::string& key, double def, bool positive = true) const {
    if (!has(key)) return def;
    const json& v = j[key];
    if (!v.is_number()) fail(key, "a number", v);
    const double x = v.get<double>();
    if (positive && !(x > 0)) fail(key, "a number > 0", v);
    return x;
  }
  bool boolean(const std::string& key, bool def) const {
    if (!has(key)) return def;
    const json& v = j[key];
    if (!v.is_boolean()) fail(key, "true or false", v);
    return v.get<bool>();
  }
  std::string str(const std::string& key, const std::string& def) const {
    if (!has(key)) return def;
    const json& v = j[key];
    if (!v.is_string()) fail(key, "a string", v);
    return v.get<std::string>();
  }
  // int, list of ints, or null
  std::vector<int64_t> ids(const std::string& key) const {
    std::vector<int64_t> out;
    if (!has(key)) return out;
    const json& v = j[key];
    if (v.is_number_integer()) {
      out.push_back(v.get<int64_t>());
    } else if (v.is_array()) {
      for (const auto& x : v) {
        if (!x.is_number_integer()) fail(key, "a token id, a list of token ids or null", v);
        out.push_back(x.get<int64_t>());
      }
    } else {
      fail(key, "a token id, a list of token ids or null", v);
    }
    for (int64_t x : out)
      if (x < 0) fail(key, "non-negative token ids", v);
    return out;
  }
};

RopeScaling parse_rope(const json& obj, const std::string& where) {
  RopeScaling r;
  r.raw = obj;
  if (obj.is_null()) return r;
  if (!obj.is_object()) throw UserError(where + ": expected an object or null, found " + obj.dump());
  Reader rd{obj, where + "."};
  // transformers accepts the legacy "type" key for "rope_type".
  r.rope_type = rd.has("rope_type") ? rd.str("rope_type", "default") : rd.str("type", "default");
  if (r.rope_type != "default") r.factor = rd.num("factor", 1.0);
  if (r.rope_type == "llama3") {
    for (const char* k : {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"})
      if (!rd.has(k)) throw UserError(where + "." + k + ": missing (required for rope_type llama3)");
    r.low_freq_factor = rd.num("low_freq_factor", 1.0);
    r.high_freq_factor = rd.num("high_freq_factor", 4.0);
    r.original_max_position_embeddings = rd.int_("original_max_position_embeddings", std::nullopt);
    if (!(r.high_freq_factor > r.low_freq_factor))
      throw UserError(where + ".high_freq_factor: expected > low_freq_factor (" + std::to_string(r.low_freq_factor) + "), found " +
                      std::to_string(r.high_freq_factor));
  }
  return r;
}

BnbQuantizationConfig parse_quantization_config(const json& obj, const std::string& where) {
  if (!obj.is_object()) throw UserError(where + ": expected an object, found " + obj.dump());
  Reader rd{obj, where + "."};
  BnbQuantizationConfig q;
  q.quant_method = rd.str("quant_method", "");
  if (q.quant_method != "bitsandbytes")
    throw UserError(where + ".quant_method: expected \"bitsandbytes\" (the only quantization qlora reads), found " +
                    (obj.contains("quant_method") ? obj["quant_method"].dump() : std::string("nothing")));
  // to_dict() writes both spellings; older files have only one of them.
  q.load_in_4bit = rd.boolean("load_in_4bit", rd.boolean("_load_in_4bit", false));
  q.load_in_8bit = rd.boolean("load_in_8bit", rd.boolean("_load_in_8bit", false));
  if (q.load_in_4bit && q.load_in_8bit) throw UserError(where + ": load_in_4bit and load_in_8bit are both true");
  q.llm_int8_threshold = rd.num("llm_int8_threshold", 6.0);
  if (rd.has("llm_int8_skip_modules")) {
    const json& v = obj["llm_int8_skip_modules"];
    if (!v.is_array()) rd.fail("llm_int8_skip_modules", "a list of module names or null", v);
    std::vector<std::string> mods;
    for (const auto& m : v) {
      if (!m.is_string()) rd.fail("llm_int8_skip_modules", "a list of module names or null", v);
      mods.push_back(m.get<std::string>());
    }
    q.llm_int8_skip_modules = mods;
  }
  q.llm_int8_enable_fp32_cpu_offload = rd.boolean("llm_int8_enable_fp32_cpu_offload", false);
  q.llm_int8_has_fp16_weight = rd.boolean("llm_int8_has_fp16_weight", false);
  q.bnb_4bit_quant_type = rd.str("bnb_4bit_quant_type", "fp4");
  if (q.bnb_4bit_quant_type != "nf4" && q.bnb_4bit_quant_type != "fp4")
    rd.fail("bnb_4bit_quant_type", "\"nf4\" or \"fp4\"", obj["bnb_4bit_quant_type"]);
  q.bnb_4bit_use_double_quant = rd.boolean("bnb_4bit_use_double_quant", false);
  q.bnb_4bit_compute_dtype = rd.str("bnb_4bit_compute_dtype", "float32");
  torch_dtype_from_name(q.bnb_4bit_compute_dtype, where + ".bnb_4bit_compute_dtype");
  q.bnb_4bit_quant_storage = rd.str("bnb_4bit_quant_storage", "uint8");
  torch_dtype_from_name(q.bnb_4bit_quant_storage, where + ".bnb_4bit_quant_storage");
  return q;
}

}  // namespace

at::ScalarType torch_dtype_from_name(const std::string& name, const std::string& where) {
  static const std::vector<std::pair<std::string, at::ScalarType>> table = {
      {"bfloat16", at::kBFloat16}, {"float16", at::kHalf}, {"half", at::kHalf}, {"float32", at::kFloat},
      {"float", at::kFloat},       {"float64", at::kDouble}, {"uint8", at::kByte}, {"int8", at::kChar},
      {"int16", at::kShort},       {"int32", at::kInt},      {"int64", at::kLong}, {"bool", at::kBool}};
  std::string n = name.rfind("torch.", 0) == 0 ? name.substr(6) : name;
  for (const auto& [k, t] : table)
    if (n == k) return t;
  throw UserError(where + ": expected a torch dtype name such as \"bfloat16\", \"float16\" or \"float32\", found \"" + name + "\"");
}

std::string torch_dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kByte: return "uint8";
    case at::kChar: return "int8";
    case at::kShort: return "int16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kBool: return "bool";
    default: throw UserError(std::string("no torch dtype name for ") + c10::toString(t));
  }
}

HFConfig parse_hf_config(const json& j, const std::string& source) {
  if (!j.is_object()) throw UserError(source + ": expected a JSON object, found " + std::string(j.type_name()));
  HFConfig c;
  c.raw = j;
  const Reader rd{j, source + ": "};
  c.model_type = rd.str("model_type", "");
  if (c.model_type != "llama" && c.model_type != "mistral" && c.model_type != "qwen2")
    throw UserError(source + ": model_type: expected \"llama\", \"mistral\" or \"qwen2\", found " +
                    (j.contains("model_type") ? j["model_type"].dump() : std::string("nothing")));
  c.hidden_size = rd.int_("hidden_size", std::nullopt);
  c.intermediate_size = rd.int_("intermediate_size", std::nullopt);
  c.num_hidden_layers = rd.int_("num_hidden_layers", std::nullopt);
  c.num_attention_heads = rd.int_("num_attention_heads", std::nullopt);
  c.vocab_size = rd.int_("vocab_size", std::nullopt);
  c.num_key_value_heads = rd.int_("num_key_value_heads", c.num_attention_heads);
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    throw UserError(source + ": num_key_value_heads: expected a divisor of num_attention_heads (" +
                    std::to_string(c.num_attention_heads) + "), found " + std::to_string(c.num_key_value_heads));
  if (!rd.has("head_dim") && c.hidden_size % c.num_attention_heads != 0)
    throw UserError(source + ": hidden_size " + std::to_string(c.hidden_size) + " is not a multiple of num_attention_heads " +
                    std::to_string(c.num_attention_heads) + " and no head_dim is given");
  c.head_dim = rd.int_("head_dim", c.hidden_size / c.num_attention_heads);
  c.max_position_embeddings = rd.int_("max_position_embeddings", c.model_type == "mistral" ? 131072 : c.model_type == "qwen2" ? 32768 : 2048);
  c.rms_norm_eps = rd.num("rms_norm_eps", 1e-6);
  c.tie_word_embeddings = rd.boolean("tie_word_embeddings", false);
  // transformers v5 writes rope_parameters (with rope_theta inside) instead of rope_scaling.
  if (rd.has("rope_parameters")) {
    c.rope_scaling = parse_rope(j["rope_parameters"], source + ": rope_parameters");
    c.rope_theta = Reader{j["rope_parameters"], source + ": rope_parameters."}.num("rope_theta", rd.num("rope_theta", 10000.0));
  } else {
    c.rope_theta = rd.num("rope_theta", c.model_type == "mistral" ? 1e6 : 10000.0);
    c.rope_scaling = parse_rope(j.contains("rope_scaling") ? j["rope_scaling"] : json(), source + ": rope_scaling");
  }
  // transformers >= 4.56 writes "dtype"; older ones "torch_dtype".
  c.torch_dtype = rd.has("dtype") ? rd.str("dtype", "") : rd.str("torch_dtype", "");
  if (!c.torch_dtype.empty()) torch_dtype_from_name(c.torch_dtype, source + ": " + (rd.has("dtype") ? "dtype" : "torch_dtype"));
  c.bos_token_id = rd.ids("bos_token_id");
  c.eos_token_id = rd.ids("eos_token_id");
  c.pad_token_id = rd.ids("pad_token_id");
  if (c.model_type == "qwen2") {
    c.qkv_bias = true;  // Qwen2Attention: q/k/v with bias, o_proj without
    c.o_bias = false;
  } else if (c.model_type == "llama") {
    c.qkv_bias = c.o_bias = rd.boolean("attention_bias", false);
    c.mlp_bias = rd.boolean("mlp_bias", false);
  }
  if (rd.has("quantization_config"))
    c.quantization_config = parse_quantization_config(j["quantization_config"], source + ": quantization_config");
  return c;
}

HFConfig load_hf_config(const fs::path& path) {
  const fs::path file = fs::is_directory(path) ? path / "config.json" : path;
  if (!fs::exists(file)) throw UserError(file.string() + ": does not exist (a Hugging Face model directory has a config.json)");
  std::ifstream in(file);
  if (!in) throw UserError(file.string() + ": cannot open");
  std::stringstream ss;
  ss << in.rdbuf();
  json j;
  try {
    j = json::parse(ss.str());
  } catch (const json::exception& e) {
    throw UserError(file.string() + ": not valid JSON: " + e.what());
  }
  return parse_hf_config(j, file.string());
}

json bnb_quantization_config_to_json(const BnbQuantizationConfig& q) {
  json o = json::object();
  o["quant_method"] = q.quant_method;
  o["_load_in_4bit"] = q.load_in_4bit;
  o["_load_in_8bit"] = q.load_in_8bit;
  o["load_in_4bit"] = q.load_in_4bit;
  o["load_in_8bit"] = q.load_in_8bit;
  o["llm_int8_threshold"] = q.llm_int8_threshold;
  o["llm_int8_skip_modules"] = q.llm_int8_skip_modules ? json(*q.llm_int8_skip_modules) : json();
  o["llm_int8_enable_fp32_cpu_offload"] = q.llm_int8_enable_fp32_cpu_offload;
  o["llm_int8_has_fp16_weight"] = q.llm_int8_has_fp16_weight;
  o["bnb_4bit_quant_type"] = q.bnb_4bit_quant_type;
  o["bnb_4bit_use_double_quant"] = q.bnb_4bit_use_double_quant;
  o["bnb_4bit_compute_dtype"] = q.bnb_4bit_compute_dtype;
  o["bnb_4bit_quant_storage"] = q.bnb_4bit_quant_storage;
  return o;
}

BnbQuantizationConfig bnb_nf4_quantization_config(bool double_quant, const std::string& compute_dtype) {
  BnbQuantizationConfig q;
  q.load_in_4bit = true;
  q.bnb_4bit_quant_type = "nf4";
  q.bnb_4bit_use_double_quant = double_quant;
  q.bnb_4bit_compute_dtype = compute_dtype;
  q.bnb_4bit_quant_storage = "uint8";
  return q;
}

json hf_config_to_json(const HFConfig& c) {
  json j = c.raw.is_object() ? c.raw : json::object();
  // A key is written when the file had it or when its value is not the one a reader would
  // default to, so a round trip adds nothing.
  auto put = [&](const char* key, const json& value, bool differs_from_default) {
    if (j.contains(key) || differs_from_default) j[key] = value;
  };
  auto ids = [](const std::vector<int64_t>& v) { return v.empty() ? json() : v.size() == 1 ? json(v[0]) : json(v); };
  j["model_type"] = c.model_type;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["num_hidden_layers"] = c.num_hidden_layers;
  j["num_attention_heads"] = c.num_attention_heads;
  j["vocab_size"] = c.vocab_size;
  put("num_key_value_heads", c.num_key_value_heads, c.num_key_value_heads != c.num_attention_heads);
  put("head_dim", c.head_dim, c.head_dim != c.hidden_size / c.num_attention_heads);
  const int64_t default_mpe = c.model_type == "mistral" ? 131072 : c.model_type == "qwen2" ? 32768 : 2048;
  const double default_theta = c.model_type == "mistral" ? 1e6 : 10000.0;
  put("max_position_embeddings", c.max_position_embeddings, c.max_position_embeddings != default_mpe);
  put("rms_norm_eps", c.rms_norm_eps, c.rms_norm_eps != 1e-6);
  put("tie_word_embeddings", c.tie_word_embeddings, c.tie_word_embeddings);
  if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) j["rope_parameters"]["rope_theta"] = c.rope_theta;
  else put("rope_theta", c.rope_theta, c.rope_theta != default_theta);
  if (!c.torch_dtype.empty()) j[j.contains("dtype") ? "dtype" : "torch_dtype"] = c.torch_dtype;
  put("bos_token_id", ids(c.bos_token_id), !c.bos_token_id.empty());
  put("eos_token_id", ids(c.eos_token_id), !c.eos_token_id.empty());
  put("pad_token_id", ids(c.pad_token_id), !c.pad_token_id.empty());
  if (c.model_type == "llama") {
    put("attention_bias", c.qkv_bias, c.qkv_bias);
    put("mlp_bias", c.mlp_bias, c.mlp_bias);
  }
  if (c.quantization_config) j["quantization_config"] = bnb_quantization_config_to_json(*c.quantization_config);
  else j.erase("quantization_config");
  return j;
}

void save_hf_config(const fs::path& path, const HFConfig& config) {
  // transformers: json.dumps(config_dict, indent=2, sort_keys=True) + "\n"; nlohmann's object
  // keeps its keys sorted.
  write_file_atomic(path, hf_config_to_json(config).dump(2) + "\n");
}

}  // namespace qlora
