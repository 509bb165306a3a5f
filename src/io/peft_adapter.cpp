// PEFT LoRA adapter directories: adapter_config.json + adapter_model.safetensors, written as PEFT
// 0.21 writes them (PeftModel.save_pretrained) and read back with every check a user's adapter
// needs: the options we cannot run are refused by name instead of being silently ignored.
//
// Facts from PEFT 0.21.2 (checked by saving one): adapter_config.json is json.dumps(indent=2,
// sort_keys=True) of LoraConfig with the keys listed in peft_adapter_config below plus
// peft_version (left out here: PEFT fills it in on load when absent); target_modules a list;
// adapter_model.safetensors holds get_peft_model_state_dict: keys
// base_model.model.model.layers.N.{self_attn|mlp}.P.lora_{A|B}.weight (no adapter name), fp32 for
// an fp32 adapter, metadata {"format": "pt"}.
#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>

#include "qlora/error.h"
#include "qlora/lora.h"
#include "qlora/safetensors.h"

namespace qlora {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

std::vector<std::string> targeted(const LoraOptions& o) {
  std::vector<std::string> out;
  for (const std::string& name : lora_projection_names())
    for (const std::string& t : o.target_modules)
      if (t == name) {
        out.push_back(name);
        break;
      }
  return out;
}

// PEFT's rule (check_target_module_exists for a list): module `m` is adapted when some entry t
// equals it or m ends with "." + t. Module names are the HF ones: model.layers.N.self_attn.q_proj.
bool targets_module(const std::vector<std::string>& targets, const std::string& m) {
  for (const std::string& t : targets)
    if (m == t || (m.size() > t.size() && m.compare(m.size() - t.size() - 1, t.size() + 1, "." + t) == 0)) return true;
  return false;
}

std::string hf_module_name(size_t layer, const std::string& projection) {
  return peft_module_name(static_cast<int64_t>(layer), projection).substr(std::string("base_model.model.").size());
}

// null, {}, [] and false count as "not set".
bool is_set(const json& j, const char* key) {
  if (!j.contains(key)) return false;
  const json& v = j.at(key);
  if (v.is_null()) return false;
  if (v.is_boolean()) return v.get<bool>();
  if (v.is_object() || v.is_array() || v.is_string()) return !v.empty() && v != "";
  return true;
}

}  // namespace

json peft_adapter_config(const LoraOptions& options, const std::string& base_model_name) {
  const double a = options.alpha;
  const json alpha = (a == std::floor(a) && std::fabs(a) < 1e15) ? json(static_cast<int64_t>(a)) : json(a);
  return json{{"alora_invocation_tokens", nullptr},
              {"alpha_pattern", json::object()},
              {"arrow_config", nullptr},
              {"auto_mapping", nullptr},
              {"base_model_name_or_path", base_model_name.empty() ? json(nullptr) : json(base_model_name)},
              {"bias", "none"},
              {"corda_config", nullptr},
              {"ensure_weight_tying", false},
              {"eva_config", nullptr},
              {"exclude_modules", nullptr},
              {"fan_in_fan_out", false},
              {"inference_mode", true},
              {"init_lora_weights", true},
              {"kasa_config", nullptr},
              {"layer_replication", nullptr},
              {"layers_pattern", nullptr},
              {"layers_to_transform", nullptr},
              {"loftq_config", json::object()},
              {"lora_alpha", alpha},
              {"lora_bias", false},
              {"lora_dropout", options.dropout},
              {"lora_ga_config", nullptr},
              {"megatron_config", nullptr},
              {"megatron_core", "megatron.core"},
              {"modules_to_save", nullptr},
              {"monteclora_config", nullptr},
              {"peft_type", "LORA"},
              {"qalora_group_size", 16},
              {"r", options.r},
              {"rank_pattern", json::object()},
              {"revision", nullptr},
              {"target_modules", targeted(options)},
              {"target_parameters", nullptr},
              {"task_type", "CAUSAL_LM"},
              {"trainable_token_indices", nullptr},
              {"use_bdlora", nullptr},
              {"use_dora", false},
              {"use_qalora", false},
              {"use_rslora", options.use_rslora},
              {"velora_config", nullptr}};
}

void save_peft_adapter(const fs::path& dir, const LoraModel& lora, const HFConfig& config, const std::string& base_model_name) {
  validate_lora_options(lora.options);
  if (static_cast<int64_t>(lora.layers.size()) != config.num_hidden_layers)
    throw UserError("save_peft_adapter: the adapter has " + std::to_string(lora.layers.size()) +
                    " layers, the base model's config has num_hidden_layers " + std::to_string(config.num_hidden_layers));
  NamedTensors tensors;
  for (const auto& [name, t] : named_lora_parameters(lora)) tensors.emplace_back(name, t.detach().to(at::kFloat));
  if (tensors.empty()) throw UserError("save_peft_adapter: the adapter has no LoRA weights");
  json cfg = peft_adapter_config(lora.options, base_model_name);
  // Layers adapted differently (an adapter read from such a file): name every module, as PEFT does.
  bool uniform = true;
  for (const LoraLayer& l : lora.layers)
    for (const std::string& name : lora_projection_names())
      uniform = uniform && lora_projection(l, name).has_value() == lora_projection(lora.layers[0], name).has_value();
  if (!uniform) {
    json names = json::array();
    for (size_t i = 0; i < lora.layers.size(); ++i)
      for (const std::string& name : lora_projection_names())
        if (lora_projection(lora.layers[i], name)) names.push_back(hf_module_name(i, name));
    cfg["target_modules"] = names;
  }
  fs::create_directories(dir);
  // Weights first: adapter_config.json appearing last marks a complete adapter.
  save_safetensors(dir / "adapter_model.safetensors", tensors, {{"format", "pt"}});
  write_file_atomic(dir / "adapter_config.json", cfg.dump(2) + "\n");
}

namespace {

// The options and the raw target_modules entries (projection names, or PEFT's fully qualified
// module names as it saves them for "all-linear").
LoraOptions parse_adapter_config(const fs::path& path, std::vector<std::string>& targets) {
  const std::string where = path.string();
  if (!fs::exists(path))
    throw UserError(where + ": not found (expected a PEFT adapter directory holding adapter_config.json and "
                            "adapter_model.safetensors)");
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  json j;
  try {
    j = json::parse(ss.str());
  } catch (const json::exception& e) {
    throw UserError(where + ": not valid JSON (" + e.what() + ")");
  }
  if (!j.is_object()) throw UserError(where + ": expected a JSON object");
  const json peft_type = j.value("peft_type", json(""));
  if (!peft_type.is_string() || peft_type.get<std::string>() != "LORA")
    throw UserError(where + ": peft_type is " +
                    (peft_type.is_string() ? "'" + peft_type.get<std::string>() + "'" : peft_type.dump()) +
                    ", expected LORA (the only adapter type qlora runs)");

  // Options that change the computation and that we do not implement: refuse rather than ignore.
  const std::vector<std::pair<const char*, const char*>> unsupported = {
      {"use_dora", "DoRA"},
      {"lora_bias", "LoRA biases"},
      {"fan_in_fan_out", "fan_in_fan_out (Conv1D-style weights)"},
      {"rank_pattern", "per-module ranks (rank_pattern)"},
      {"alpha_pattern", "per-module alphas (alpha_pattern)"},
      {"layers_to_transform", "layers_to_transform"},
      {"layer_replication", "layer_replication"},
      {"modules_to_save", "modules_to_save"},
      {"target_parameters", "target_parameters"},
      {"trainable_token_indices", "trainable_token_indices"},
      {"exclude_modules", "exclude_modules"},
      {"use_qalora", "QA-LoRA"},
      {"alora_invocation_tokens", "activated LoRA (alora_invocation_tokens)"},
      {"use_bdlora", "BD-LoRA"}};
  for (const auto& [key, what] : unsupported)
    if (is_set(j, key)) throw UserError(where + ": " + key + " is set: " + what + " is not supported");
  if (j.contains("bias") && j.at("bias") != "none")
    throw UserError(where + ": bias is " + j.at("bias").dump() + ", expected \"none\" (bias training is not supported)");

  LoraOptions o;
  try {
    const json& r = j.at("r");
    // At most the config's lora_r limit, checked before get<int>, which would wrap a larger value
    // (2^33 became 0); r < 1 is validate_lora_options' error below.
    const bool r_ok = r.is_number_unsigned()  ? r.get<uint64_t>() <= 4096
                      : r.is_number_integer() ? r.get<int64_t>() >= std::numeric_limits<int>::min() && r.get<int64_t>() <= 4096
                                              : false;
    if (!r_ok) throw UserError(where + ": r is " + r.dump() + ", expected an integer rank in 1..4096");
    o.r = r.get<int>();
    const json alpha = j.value("lora_alpha", json(8));
    if (!alpha.is_number()) throw UserError(where + ": lora_alpha is " + alpha.dump() + ", expected a number");
    o.alpha = alpha.get<double>();
    const json dropout = j.value("lora_dropout", json(0.0));
    if (!dropout.is_number()) throw UserError(where + ": lora_dropout is " + dropout.dump() + ", expected a number");
    o.dropout = dropout.get<double>();
    const json rs = j.value("use_rslora", json(false));
    if (!rs.is_boolean()) throw UserError(where + ": use_rslora is " + rs.dump() + ", expected true or false");
    o.use_rslora = rs.get<bool>();
    const json& t = j.at("target_modules");
    if (t.is_string()) {
      if (t.get<std::string>() != "all-linear")
        throw UserError(where + ": target_modules is the pattern " + t.dump() +
                        "; only a list of module names or \"all-linear\" is supported");
      targets = lora_projection_names();
    } else if (t.is_array()) {
      for (const json& e : t) {
        if (!e.is_string()) throw UserError(where + ": target_modules holds " + e.dump() + ", expected strings");
        targets.push_back(e.get<std::string>());
      }
    } else {
      throw UserError(where + ": target_modules is " + t.dump() + ", expected a list of module names");
    }
  } catch (const json::out_of_range& e) {
    throw UserError(where + ": missing key (" + std::string(e.what()) + ")");
  }
  o.target_modules = lora_projection_names();  // r, alpha, dropout checked here; targets matched by the caller
  try {
    validate_lora_options(o);
  } catch (const UserError& e) {
    throw UserError(where + ": " + e.what());
  }
  o.target_modules.clear();
  return o;
}

}  // namespace

LoraModel load_peft_adapter(const fs::path& dir, const LlamaWeights& model, at::Device device) {
  if (!fs::is_directory(dir)) throw UserError(dir.string() + ": not a directory (expected a PEFT adapter directory)");
  LoraModel lora;
  std::vector<std::string> targets;
  const fs::path config_path = dir / "adapter_config.json";
  lora.options = parse_adapter_config(config_path, targets);
  for (const std::string& t : targets) {
    bool any = false;
    for (size_t i = 0; i < model.layers.size() && !any; ++i)
      for (const std::string& name : lora_projection_names()) any = any || targets_module({t}, hf_module_name(i, name));
    if (!any)
      throw UserError(config_path.string() + ": target_modules entry '" + t + "' matches none of the model's projections (" +
                      "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj of layers 0.." +
                      std::to_string(model.layers.size() - 1) + ")");
  }
  for (const std::string& name : lora_projection_names())
    for (size_t i = 0; i < model.layers.size(); ++i)
      if (targets_module(targets, hf_module_name(i, name))) {
        lora.options.target_modules.push_back(name);
        break;
      }
  const fs::path file = dir / "adapter_model.safetensors";
  if (!fs::exists(file)) {
    if (fs::exists(dir / "adapter_model.bin"))
      throw UserError(dir.string() + ": holds adapter_model.bin (a pickle), which is not supported; expected "
                                     "adapter_model.safetensors (save with safe_serialization=True)");
    throw UserError(file.string() + ": not found (expected the adapter's weights next to adapter_config.json)");
  }
  const SafetensorsFile st(file);
  const std::string where = file.string();
  std::set<std::string> used;
  const double scale = lora_scale(lora.options);
  auto read = [&](const std::string& name, int64_t rows, int64_t cols) {
    if (!st.contains(name))
      throw UserError(where + ": missing tensor " + name + " (adapter_config.json targets this projection)");
    const SafetensorsEntry& e = st.entry(name);
    if (e.scalar_type != at::kFloat && e.scalar_type != at::kBFloat16 && e.scalar_type != at::kHalf)
      throw UserError(where + ": tensor " + name + " has dtype " + e.dtype + ", expected F32, BF16 or F16");
    if (e.shape != std::vector<int64_t>{rows, cols})
      throw UserError(where + ": tensor " + name + " has shape " + c10::str(at::IntArrayRef(e.shape)) + ", expected [" +
                      std::to_string(rows) + ", " + std::to_string(cols) + "] for this model and r " +
                      std::to_string(lora.options.r));
    used.insert(name);
    return st.tensor(name).to(at::kFloat).to(device).requires_grad_(true);
  };
  for (size_t i = 0; i < model.layers.size(); ++i) {
    LoraLayer& out = lora.layers.emplace_back();
    for (const std::string& name : lora_projection_names()) {
      if (!targets_module(targets, hf_module_name(i, name))) continue;
      const LinearWeight& base = base_projection(model.layers[i], name);
      const std::string m = peft_module_name(static_cast<int64_t>(i), name);
      LoraLinear l;
      l.A = read(m + ".lora_A.weight", lora.options.r, base.in_features);
      l.B = read(m + ".lora_B.weight", base.out_features, lora.options.r);
      l.scale = scale;
      l.dropout = lora.options.dropout;
      lora_projection(out, name) = std::move(l);
    }
  }
  for (const std::string& name : st.names())
    if (!used.count(name))
      throw UserError(where + ": unexpected tensor " + name + " (not a LoRA weight of a targeted projection of a " +
                      std::to_string(model.layers.size()) + "-layer model)");
  return lora;
}

}  // namespace qlora
