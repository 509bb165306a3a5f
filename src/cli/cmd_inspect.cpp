// qlora inspect PATH: what a checkpoint holds, from its headers only. A Hugging Face model folder
// (architecture, config, tensor kinds, bnb-4bit state, parameter counts, memory as loaded in NF4
// and as 16-bit) or a single .safetensors file (names, dtypes, shapes, metadata); text or --json.
// No weight is read, so it is instant on an 8B model: safetensors headers come from the mapping,
// and of each bnb-4bit weight only its quant_state JSON (a few hundred bytes) is touched, since
// that is where the weight's logical shape and blocksize live.
#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "qlora/bnb4bit.h"
#include "qlora/error.h"
#include "qlora/log.h"
#include "qlora/hf_config.h"
#include "qlora/model.h"  // ModelLoadOptions: the defaults the memory estimate assumes (header only)
#include "qlora/safetensors.h"

namespace qlora::cli {
namespace {
namespace fs = std::filesystem;
using nlohmann::json;

constexpr int64_t k16BitBytes = 2;  // bf16/fp16: the compute dtype of everything not held in NF4

// ---- formatting ---------------------------------------------------------------------------------

std::string with_commas(int64_t v) {
  const std::string digits = std::to_string(v < 0 ? -v : v);
  std::string s = v < 0 ? "-" : "";
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) s += ',';
    s += digits[i];
  }
  return s;
}

// 8030261248 -> "8.03 B" (the way model sizes are quoted)
std::string human_count(int64_t v) {
  const double d = static_cast<double>(v);
  if (d >= 1e9) return fixed(d / 1e9, 2) + " B";
  if (d >= 1e6) return fixed(d / 1e6, 2) + " M";
  if (d >= 1e3) return fixed(d / 1e3, 2) + " K";
  return std::to_string(v);
}

std::string human_bytes(int64_t v) {
  const double d = static_cast<double>(v);
  if (d >= 1024.0 * 1024 * 1024) return fixed(d / (1024.0 * 1024 * 1024), 2) + " GiB";
  if (d >= 1024.0 * 1024) return fixed(d / (1024.0 * 1024), 2) + " MiB";
  if (d >= 1024.0) return fixed(d / 1024.0, 2) + " KiB";
  return std::to_string(v) + " B";
}

std::string shape_str(const json& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i].get<int64_t>());
  return s + "]";
}

// %g-style, without a trailing ".0" lost or scientific notation for theta-sized values.
std::string num_str(double v) {
  std::ostringstream s;
  s.precision(10);
  s << v;
  return s.str();
}

int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// ---- model folders -----------------------------------------------------------------------------

// One logical tensor of the checkpoint. A bnb-4bit weight is one tensor: its packed bytes plus its
// .absmax/.quant_map/.nested_*/.quant_state entries.
struct TensorInfo {
  std::string name;
  std::string stored_dtype;      // as in the file ("BF16"; "U8" for packed 4-bit)
  std::vector<int64_t> shape;    // logical shape (bnb-4bit: the quant_state's)
  int64_t stored_bytes = 0;      // bnb-4bit: all of its entries
  bool bnb = false;
  std::string quant_type;        // bnb-4bit: nf4 or fp4
  int64_t blocksize = 0;
  bool nested = false;
  std::string quant_dtype;       // bnb-4bit: the original weight's dtype (quant_state "dtype")
};

const std::vector<std::string> kBnbAuxSuffixes = {".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                                                  ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4"};

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The quant_state JSON of bnb-4bit weight `w`: its logical shape, blocksize, nesting and dtype.
void read_quant_state(const SafetensorsCheckpoint& ck, TensorInfo& t) {
  const bool nf4 = ck.contains(t.name + kBnbQuantStateSuffix);
  const std::string qs_name = t.name + (nf4 ? kBnbQuantStateSuffix : ".quant_state.bitsandbytes__fp4");
  const SafetensorsEntry& e = ck.entry(qs_name);
  const std::string where = ck.file_of(qs_name).path().string() + ": tensor '" + qs_name + "'";
  if (e.scalar_type != at::kByte) throw UserError(where + ": expected uint8 (UTF-8 JSON), found " + e.dtype);
  const std::string text(reinterpret_cast<const char*>(ck.file_of(qs_name).data(qs_name)), static_cast<size_t>(e.end - e.begin));
  json qs;
  try {
    qs = json::parse(text);
  } catch (const json::exception& ex) {
    throw UserError(where + ": not valid JSON: " + ex.what());
  }
  auto bad = [&](const std::string& key, const std::string& expected) {
    throw UserError(where + ": '" + key + "': expected " + expected + ", found " + (qs.contains(key) ? qs[key].dump() : "nothing"));
  };
  if (!qs.is_object()) throw UserError(where + ": expected a JSON object");
  if (!qs.contains("shape") || !qs["shape"].is_array()) bad("shape", "a list of non-negative integers");
  for (const auto& d : qs["shape"]) {
    if (!d.is_number_integer() || d.get<int64_t>() < 0) bad("shape", "a list of non-negative integers");
    t.shape.push_back(d.get<int64_t>());
  }
  if (!qs.contains("blocksize") || !qs["blocksize"].is_number_integer()) bad("blocksize", "an integer");
  t.blocksize = qs["blocksize"].get<int64_t>();
  t.quant_type = qs.value("quant_type", nf4 ? "nf4" : "fp4");
  t.quant_dtype = qs.contains("dtype") && qs["dtype"].is_string() ? qs["dtype"].get<std::string>() : "";
  t.nested = qs.contains("nested_blocksize");
}

// "model.layers.12.mlp.up_proj.weight" -> ("model.layers.{i}.mlp.up_proj.weight", 12); no layer: -1.
std::pair<std::string, int64_t> layer_pattern(const std::string& name) {
  for (size_t pos = name.find("layers."); pos != std::string::npos; pos = name.find("layers.", pos + 1)) {
    if (pos != 0 && name[pos - 1] != '.') continue;
    const size_t d = pos + 7;
    size_t e = d;
    while (e < name.size() && std::isdigit(static_cast<unsigned char>(name[e]))) ++e;
    if (e > d && e - d < 10 && e < name.size() && name[e] == '.')
      return {name.substr(0, d) + "{i}" + name.substr(e), std::stoll(name.substr(d, e - d))};
  }
  return {name, -1};
}

// Table order: embeddings, the layer's modules in forward order, final norm, lm_head, the rest.
int kind_rank(const std::string& pattern) {
  static const std::vector<std::string> order = {"input_layernorm", "q_proj", "k_proj", "v_proj", "o_proj",
                                                 "post_attention_layernorm", "gate_proj", "up_proj", "down_proj"};
  if (pattern.find("embed_tokens") != std::string::npos) return 0;
  if (pattern.find("{i}") != std::string::npos) {
    for (size_t i = 0; i < order.size(); ++i)
      if (pattern.find(order[i]) != std::string::npos) return 1 + static_cast<int>(i);
    return 15;
  }
  if (ends_with(pattern, "norm.weight")) return 20;
  if (pattern.rfind("lm_head", 0) == 0) return 21;
  return 30;
}

// Bytes of one weight of n elements held as NF4Tensor: packed nibbles + absmax (8-bit codes, the
// fp32 absmax2 per 256 blocks and the 256-entry fp32 code2 when nested; else fp32 per block).
int64_t nf4_bytes(int64_t n, int64_t blocksize, bool nested) {
  const int64_t nb = nf4_num_blocks(n, blocksize);
  return (n + 1) / 2 + (nested ? nb + 4 * ((nb + 255) / 256) + 4 * 256 : 4 * nb);
}

// What config.json implies, counted by hand from the modules of a Llama-family decoder.
struct ExpectedCounts {
  int64_t total = 0, linear = 0;
};
ExpectedCounts expected_counts(const HFConfig& c) {
  const int64_t H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size, hd = c.head_dim;
  const int64_t q = c.num_attention_heads * hd, kv = c.num_key_value_heads * hd;
  const int64_t linear_per_layer = H * q + 2 * H * kv + q * H + 3 * H * I;
  int64_t per_layer = linear_per_layer + 2 * H;  // + the two RMSNorm weights
  if (c.qkv_bias) per_layer += q + 2 * kv;
  if (c.o_bias) per_layer += H;
  if (c.mlp_bias) per_layer += 2 * I + H;
  ExpectedCounts e;
  e.linear = c.num_hidden_layers * linear_per_layer;
  e.total = V * H + c.num_hidden_layers * per_layer + H + (c.tie_word_embeddings ? 0 : V * H);
  return e;
}

json rope_json(const HFConfig& c) {
  json r = {{"type", c.rope_scaling.rope_type}, {"theta", c.rope_theta}};
  if (c.rope_scaling.rope_type != "default") r["factor"] = c.rope_scaling.factor;
  if (c.rope_scaling.rope_type == "llama3") {
    r["low_freq_factor"] = c.rope_scaling.low_freq_factor;
    r["high_freq_factor"] = c.rope_scaling.high_freq_factor;
    r["original_max_position_embeddings"] = c.rope_scaling.original_max_position_embeddings;
  }
  return r;
}

json inspect_model(const fs::path& dir) {
  const HFConfig cfg = load_hf_config(dir);  // config first: its absence is the most likely mistake
  const SafetensorsCheckpoint ck(dir);
  const ModelLoadOptions load_defaults;

  // Logical tensors, with the bnb-4bit side entries folded into their weight.
  std::map<std::string, TensorInfo> tensors;
  std::vector<std::string> aux;
  for (const std::string& name : ck.names()) {
    bool is_aux = false;
    for (const std::string& s : kBnbAuxSuffixes)
      if (ends_with(name, s) && is_bnb4bit_weight(ck, name.substr(0, name.size() - s.size()))) is_aux = true;
    if (is_aux) {
      aux.push_back(name);
      continue;
    }
    const SafetensorsEntry& e = ck.entry(name);
    TensorInfo t;
    t.name = name;
    t.stored_dtype = e.dtype;
    t.stored_bytes = e.end - e.begin;
    if (is_bnb4bit_weight(ck, name)) {
      t.bnb = true;
      read_quant_state(ck, t);
    } else {
      t.shape = e.shape;
    }
    tensors.emplace(name, std::move(t));
  }
  for (const std::string& a : aux) {
    for (const std::string& s : kBnbAuxSuffixes)
      if (ends_with(a, s) && tensors.count(a.substr(0, a.size() - s.size()))) {
        tensors[a.substr(0, a.size() - s.size())].stored_bytes += ck.entry(a).end - ck.entry(a).begin;
        break;
      }
  }

  // Counts and memory. Not parameters: rotary inv_freq buffers some old checkpoints carry, and a
  // stored lm_head.weight of a tied model (the model uses embed_tokens).
  int64_t total = 0, linear = 0, bytes_loaded = 0, largest_linear = 0, nbnb = 0;
  std::set<int64_t> blocksizes, layers_found;
  std::set<bool> nesting;
  std::set<std::string> quant_types, quant_dtypes, dense_dtypes;
  struct Group {
    std::string pattern, stored, loaded, note;
    json shape;
    std::set<int64_t> layers;
    int64_t count = 0, numel = 0, stored_bytes = 0;
  };
  std::map<std::string, Group> groups;  // key: pattern + shape + stored + loaded
  for (const auto& [name, t] : tensors) {
    const int64_t n = numel_of(t.shape);
    const bool buffer = ends_with(name, "inv_freq");
    const bool unused = cfg.tie_word_embeddings && name == "lm_head.weight";
    const bool lin = is_quantizable_linear_weight(name);
    std::string loaded = "16-bit", note;
    if (buffer || unused) {
      loaded = "-";
      note = buffer ? "buffer, not a parameter" : "unused: embeddings are tied";
    } else {
      total += n;
      if (lin) {
        linear += n;
        largest_linear = std::max(largest_linear, n);
        loaded = "NF4";
        bytes_loaded += t.bnb ? nf4_bytes(n, t.blocksize, t.nested) : nf4_bytes(n, load_defaults.blocksize, load_defaults.double_quant);
      } else {
        bytes_loaded += n * k16BitBytes;
      }
    }
    if (t.bnb) {
      ++nbnb;
      blocksizes.insert(t.blocksize);
      nesting.insert(t.nested);
      quant_types.insert(t.quant_type);
      if (!t.quant_dtype.empty()) quant_dtypes.insert(t.quant_dtype);
      if (!lin) note = "bnb-4bit but not one of the 7 projections";
    } else if (!buffer) {
      dense_dtypes.insert(t.stored_dtype);
    }
    const std::string stored = t.bnb ? t.quant_type + " (bnb, bs " + std::to_string(t.blocksize) + (t.nested ? ", dq)" : ")")
                                     : t.stored_dtype;
    const auto [pattern, layer] = layer_pattern(name);
    if (layer >= 0) layers_found.insert(layer);
    const json shape = t.shape;
    Group& g = groups[pattern + " " + shape.dump() + " " + stored + " " + loaded];
    g.pattern = pattern;
    g.shape = shape;
    g.stored = stored;
    g.loaded = loaded;
    g.note = note;
    if (layer >= 0) g.layers.insert(layer);
    g.count += 1;
    g.numel += n;
    g.stored_bytes += t.stored_bytes;
  }
  std::vector<const Group*> ordered;
  for (const auto& [k, g] : groups) ordered.push_back(&g);
  std::stable_sort(ordered.begin(), ordered.end(), [](const Group* a, const Group* b) {
    const int ra = kind_rank(a->pattern), rb = kind_rank(b->pattern);
    return ra != rb ? ra < rb : a->pattern < b->pattern;
  });
  json jgroups = json::array();
  for (const Group* g : ordered) {
    json jg = {{"pattern", g->pattern}, {"count", g->count},     {"shape", g->shape},
               {"stored", g->stored},   {"loaded", g->loaded},   {"numel", g->numel},
               {"stored_bytes", g->stored_bytes}};
    if (!g->layers.empty()) jg["layers"] = {*g->layers.begin(), *g->layers.rbegin()};
    if (!g->note.empty()) jg["note"] = g->note;
    jgroups.push_back(jg);
  }

  int64_t disk = 0;
  json files = json::array();
  for (const auto& f : ck.files()) {
    disk += static_cast<int64_t>(fs::file_size(f->path()));
    files.push_back(f->path().filename().string());
  }

  const ExpectedCounts want = expected_counts(cfg);
  json checks = json::array();
  if (static_cast<int64_t>(layers_found.size()) != cfg.num_hidden_layers)
    checks.push_back("config.json has num_hidden_layers " + std::to_string(cfg.num_hidden_layers) + ", the checkpoint has tensors for " +
                     std::to_string(layers_found.size()) + " layers");
  if (total != want.total)
    checks.push_back("the checkpoint holds " + with_commas(total) + " parameters, config.json implies " + with_commas(want.total));
  if (linear != want.linear)
    checks.push_back("the checkpoint holds " + with_commas(linear) + " linear parameters, config.json implies " + with_commas(want.linear));
  if (cfg.quantization_config && cfg.quantization_config->load_in_4bit && nbnb == 0)
    checks.push_back("config.json has a load_in_4bit quantization_config but no tensor is bnb-4bit");
  if (nbnb > 0 && !cfg.quantization_config) checks.push_back("bnb-4bit tensors but config.json has no quantization_config");

  json quant = {{"config", cfg.quantization_config ? bnb_quantization_config_to_json(*cfg.quantization_config) : json()},
                {"bnb4bit_weights", nbnb}};
  if (nbnb > 0) {
    quant["quant_type"] = quant_types.size() == 1 ? json(*quant_types.begin()) : json(quant_types);
    quant["blocksize"] = blocksizes.size() == 1 ? json(*blocksizes.begin()) : json(blocksizes);
    quant["double_quant"] = nesting.size() == 1 ? json(*nesting.begin()) : json("mixed");
    quant["quant_state_dtype"] = quant_dtypes.size() == 1 ? json(*quant_dtypes.begin()) : json(quant_dtypes);
  }

  json arch = cfg.raw.contains("architectures") ? cfg.raw["architectures"] : json::array();
  return {
      {"kind", "model"},
      {"path", dir.string()},
      {"architectures", arch},
      {"model_type", cfg.model_type},
      {"config",
       {{"num_hidden_layers", cfg.num_hidden_layers},
        {"hidden_size", cfg.hidden_size},
        {"num_attention_heads", cfg.num_attention_heads},
        {"num_key_value_heads", cfg.num_key_value_heads},
        {"head_dim", cfg.head_dim},
        {"intermediate_size", cfg.intermediate_size},
        {"vocab_size", cfg.vocab_size},
        {"max_position_embeddings", cfg.max_position_embeddings},
        {"rms_norm_eps", cfg.rms_norm_eps},
        {"rope", rope_json(cfg)},
        {"tie_word_embeddings", cfg.tie_word_embeddings},
        {"torch_dtype", cfg.torch_dtype},
        {"qkv_bias", cfg.qkv_bias},
        {"o_bias", cfg.o_bias},
        {"mlp_bias", cfg.mlp_bias}}},
      {"files", {{"count", files.size()}, {"sharded", ck.sharded()}, {"names", files}, {"bytes", disk}}},
      {"stored_dtypes", dense_dtypes},
      {"quantization", quant},
      {"tensors", jgroups},
      {"tensor_entries", ck.names().size()},
      {"parameters",
       {{"total", total}, {"linear", linear}, {"expected_total", want.total}, {"expected_linear", want.linear}}},
      {"memory",
       {{"as_loaded_nf4_bytes", bytes_loaded},
        {"as_16bit_bytes", total * k16BitBytes},
        {"dequant_scratch_bytes", largest_linear * k16BitBytes},
        {"load_blocksize", nbnb > 0 ? *blocksizes.begin() : load_defaults.blocksize},
        {"load_double_quant", nbnb > 0 ? *nesting.begin() : load_defaults.double_quant}}},
      {"checks", checks}};
}

// A report value for the text output: strings bare, booleans yes/no, lists joined.
std::string plain(const json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_boolean()) return v.get<bool>() ? "yes" : "no";
  if (v.is_array()) {
    std::string s;
    for (const auto& x : v) s += (s.empty() ? "" : ", ") + plain(x);
    return s;
  }
  return v.dump();
}

void print_model(const json& r) {
  const json& c = r["config"];
  const json& rope = c["rope"];
  std::string arch;
  for (const auto& a : r["architectures"]) arch += (arch.empty() ? "" : ", ") + a.get<std::string>();
  std::cout << r["path"].get<std::string>() << ": " << (arch.empty() ? "(no architectures)" : arch) << ", model_type "
            << r["model_type"].get<std::string>() << "\n";
  const json& files = r["files"];
  std::cout << "  files        " << files["count"].get<int64_t>() << " safetensors"
            << (files["sharded"].get<bool>() ? " (sharded, model.safetensors.index.json)" : "") << ", "
            << human_bytes(files["bytes"].get<int64_t>()) << " on disk, " << r["tensor_entries"].get<int64_t>()
            << " entries\n";
  const int64_t heads = c["num_attention_heads"].get<int64_t>(), kv = c["num_key_value_heads"].get<int64_t>();
  std::cout << "  layers       " << c["num_hidden_layers"] << ", hidden " << c["hidden_size"] << ", intermediate "
            << c["intermediate_size"] << ", vocab " << c["vocab_size"] << "\n"
            << "  attention    " << heads << " heads, " << kv << " KV heads" << (heads != kv ? " (GQA " + std::to_string(heads / kv) + ":1)" : "")
            << ", head_dim " << c["head_dim"] << ", biases: q/k/v " << (c["qkv_bias"].get<bool>() ? "yes" : "no") << ", o "
            << (c["o_bias"].get<bool>() ? "yes" : "no") << ", mlp " << (c["mlp_bias"].get<bool>() ? "yes" : "no") << "\n";
  std::cout << "  rope         " << rope["type"].get<std::string>() << ", theta " << num_str(rope["theta"].get<double>());
  if (rope.contains("factor")) std::cout << ", factor " << num_str(rope["factor"].get<double>());
  if (rope.contains("low_freq_factor"))
    std::cout << ", low_freq_factor " << num_str(rope["low_freq_factor"].get<double>()) << ", high_freq_factor "
              << num_str(rope["high_freq_factor"].get<double>()) << ", original_max_position "
              << rope["original_max_position_embeddings"];
  std::cout << "; max_position_embeddings " << c["max_position_embeddings"] << "\n";
  std::string dtypes;
  for (const auto& d : r["stored_dtypes"]) dtypes += (dtypes.empty() ? "" : ", ") + d.get<std::string>();
  std::cout << "  dtype        torch_dtype " << (c["torch_dtype"].get<std::string>().empty() ? "(absent)" : c["torch_dtype"].get<std::string>())
            << ", stored " << (dtypes.empty() ? "-" : dtypes) << "; rms_norm_eps " << num_str(c["rms_norm_eps"].get<double>())
            << "; tied embeddings " << (c["tie_word_embeddings"].get<bool>() ? "yes" : "no") << "\n";
  const json& q = r["quantization"];
  const json& m = r["memory"];
  std::cout << "  quantization ";
  if (q["bnb4bit_weights"].get<int64_t>() > 0) {
    std::cout << "bitsandbytes 4-bit: " << q["bnb4bit_weights"] << " weights, quant_type " << plain(q["quant_type"])
              << ", blocksize " << plain(q["blocksize"]) << ", double quant " << plain(q["double_quant"])
              << ", original dtype " << plain(q["quant_state_dtype"]);
    if (!q["config"].is_null()) std::cout << "; compute dtype " << q["config"]["bnb_4bit_compute_dtype"].get<std::string>();
    std::cout << "\n";
  } else {
    std::cout << "none (16-bit checkpoint; qlora quantizes the 7 projections to NF4 at load: blocksize "
              << m["load_blocksize"] << ", double quant " << (m["load_double_quant"].get<bool>() ? "yes" : "no") << ")\n";
  }

  std::cout << "\ntensors ({i} = layer index";
  const int64_t nl = c["num_hidden_layers"].get<int64_t>();
  if (nl > 0) std::cout << ", 0.." << nl - 1;
  std::cout << "; stored = in the file, loaded = as qlora holds it by default)\n";
  size_t wn = 7, ws = 5, wst = 6;
  for (const auto& g : r["tensors"]) {
    wn = std::max(wn, g["pattern"].get<std::string>().size());
    ws = std::max(ws, shape_str(g["shape"]).size());
    wst = std::max(wst, g["stored"].get<std::string>().size());
  }
  std::printf("  %-*s %5s  %-*s  %-*s  %-6s  %14s  %s\n", static_cast<int>(wn), "pattern", "count", static_cast<int>(ws), "shape",
              static_cast<int>(wst), "stored", "loaded", "parameters", "");
  std::fflush(stdout);
  for (const auto& g : r["tensors"]) {
    std::printf("  %-*s %5lld  %-*s  %-*s  %-6s  %14s  %s\n", static_cast<int>(wn), g["pattern"].get<std::string>().c_str(),
                static_cast<long long>(g["count"].get<int64_t>()), static_cast<int>(ws), shape_str(g["shape"]).c_str(),
                static_cast<int>(wst), g["stored"].get<std::string>().c_str(), g["loaded"].get<std::string>().c_str(),
                with_commas(g["numel"].get<int64_t>()).c_str(), g.value("note", "").c_str());
  }
  std::fflush(stdout);

  const json& p = r["parameters"];
  const int64_t total = p["total"].get<int64_t>(), linear = p["linear"].get<int64_t>();
  std::cout << "\nparameters   total " << with_commas(total) << " (" << human_count(total) << "), linear (the 7 projection weights) "
            << with_commas(linear) << " (" << human_count(linear) << ")"
            << (total == p["expected_total"].get<int64_t>() && linear == p["expected_linear"].get<int64_t>() ? ", as config.json implies" : "")
            << "\n";
  std::cout << "memory       as loaded (NF4 projections, blocksize " << m["load_blocksize"] << (m["load_double_quant"].get<bool>() ? ", double quant" : "")
            << "; 16-bit rest): " << human_bytes(m["as_loaded_nf4_bytes"].get<int64_t>()) << "; as 16-bit: "
            << human_bytes(m["as_16bit_bytes"].get<int64_t>()) << "; + NF4 dequant scratch "
            << human_bytes(m["dequant_scratch_bytes"].get<int64_t>()) << " (the largest projection in 16-bit)\n";
  if (r["checks"].empty()) {
    std::cout << "checks       ok (layers, parameter counts and quantization agree with config.json)\n";
  } else {
    for (const auto& w : r["checks"]) std::cout << "check        " << w.get<std::string>() << "\n";
  }
}

// ---- single files ------------------------------------------------------------------------------

json inspect_file(const fs::path& path) {
  const SafetensorsFile f(path);
  json tensors = json::array();
  int64_t data = 0;
  for (const SafetensorsEntry& e : f.entries()) {
    tensors.push_back({{"name", e.name}, {"dtype", e.dtype}, {"shape", e.shape}, {"data_offsets", {e.begin, e.end}}});
    data += e.end - e.begin;
  }
  return {{"kind", "safetensors"},
          {"path", path.string()},
          {"file_bytes", static_cast<int64_t>(fs::file_size(path))},
          {"data_bytes", data},
          {"metadata", f.metadata()},
          {"tensors", tensors}};
}

void print_file(const json& r) {
  std::cout << r["path"].get<std::string>() << ": safetensors file, " << r["tensors"].size() << " tensors, "
            << human_bytes(r["data_bytes"].get<int64_t>()) << " of tensor data\n";
  std::cout << "metadata:";
  if (r["metadata"].empty()) std::cout << " (none)";
  for (auto it = r["metadata"].begin(); it != r["metadata"].end(); ++it) std::cout << " " << it.key() << "=" << it.value().get<std::string>();
  std::cout << "\n";
  size_t wn = 4, ws = 5;
  for (const auto& t : r["tensors"]) {
    wn = std::max(wn, t["name"].get<std::string>().size());
    ws = std::max(ws, shape_str(t["shape"]).size());
  }
  std::printf("  %-*s  %-7s  %-*s  %14s\n", static_cast<int>(wn), "name", "dtype", static_cast<int>(ws), "shape", "bytes");
  for (const auto& t : r["tensors"])
    std::printf("  %-*s  %-7s  %-*s  %14s\n", static_cast<int>(wn), t["name"].get<std::string>().c_str(),
                t["dtype"].get<std::string>().c_str(), static_cast<int>(ws), shape_str(t["shape"]).c_str(),
                with_commas(t["data_offsets"][1].get<int64_t>() - t["data_offsets"][0].get<int64_t>()).c_str());
  std::fflush(stdout);
}

int run_inspect(const std::string& path_arg, bool as_json) {
  const fs::path path(path_arg);
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (ec || !fs::exists(st)) throw UserError("qlora inspect: " + path_arg + ": does not exist");
  json report;
  if (fs::is_directory(st)) {
    report = inspect_model(path);
  } else if (path.extension() == ".safetensors") {
    report = inspect_file(path);
  } else {
    throw UserError("qlora inspect: " + path_arg + ": expected a model folder (config.json + safetensors) or a .safetensors file");
  }
  if (as_json) {
    std::cout << report.dump(2) << "\n";
  } else if (report["kind"] == "model") {
    print_model(report);
  } else {
    print_file(report);
  }
  return kExitOk;
}

}  // namespace

CommandFn add_inspect_command(CLI::App& app) {
  struct State {
    std::string path;
    bool json = false;
  };
  auto st = std::make_shared<State>();
  auto* sub = app.add_subcommand("inspect", "describe a checkpoint from its headers: a model folder (architecture, tensors, "
                                            "parameter counts, memory as NF4 and 16-bit) or a .safetensors file");
  sub->add_option("path", st->path, "Hugging Face model folder (config.json + safetensors, 16-bit or bnb-4bit) or a .safetensors file")
      ->required();
  sub->add_flag("--json", st->json, "print the report as JSON");
  return [st] { return run_inspect(st->path, st->json); };
}

}  // namespace qlora::cli
