// A llama.cpp GGUF file (general.architecture "llama") as a base model: the HF config its metadata
// implies, the llama.cpp -> HF tensor names, the rotary row permutation undone, and load_llama_gguf
// (every tensor dequantized to fp32, then load_llama's 16-bit path: compute dtype, NF4 if asked).
//
// Facts from llama.cpp (read, not copied):
//  - convert_hf_to_gguf.py LlamaModel.modify_tensors permutes q_proj (n_head) and k_proj
//    (n_head_kv) weights and biases: w.reshape(n_head, 2, rows/n_head/2, ...).swapaxes(1, 2),
//    i.e. HF row h*D + s*D/2 + i (s in {0,1}) goes to GGUF row h*D + 2i + s (rotate-pairs instead
//    of HF's rotate-half). The inverse: reshape(n_head, D/2, 2, ...).swapaxes(1, 2) (as
//    transformers' modeling_gguf_pytorch_utils does).
//  - GGUF dims are ggml order, dims[0] = in_features: an HF [out, in] weight has dims {in, out}.
//  - Llama 3.1-style rope scaling is stored as rope_freqs.weight (one factor per frequency, the
//    rotation angle is divided by it), not in the metadata.
#include <ATen/ATen.h>

#include <chrono>
#include <map>
#include <set>
#include <sstream>

#include "model/internal.h"
#include "qlora/gguf_export.h"
#include "qlora/shape_str.h"
#include "qlora/error.h"
#include "qlora/ggml_quants.h"
#include "qlora/gguf.h"
#include "qlora/log.h"
#include "qlora/model.h"
#include "qlora/nf4.h"

namespace qlora {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// llama.cpp per-layer names -> HF names (suffix .weight / .bias appended by the caller); read
// both ways: loading GGUF files here, writing them in gguf_export.cpp (hf_tensor_name_to_gguf).
const std::map<std::string, std::string>& layer_names() {
  static const std::map<std::string, std::string> m = {
      {"attn_norm", "input_layernorm"},     {"ffn_norm", "post_attention_layernorm"},
      {"attn_q", "self_attn.q_proj"},       {"attn_k", "self_attn.k_proj"},
      {"attn_v", "self_attn.v_proj"},       {"attn_output", "self_attn.o_proj"},
      {"ffn_gate", "mlp.gate_proj"},        {"ffn_up", "mlp.up_proj"},
      {"ffn_down", "mlp.down_proj"},
  };
  return m;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// HF name -> GGUF tensor, for every tensor of the file that maps.
std::map<std::string, const GgufTensorInfo*> hf_index(const GgufFile& g) {
  std::map<std::string, const GgufTensorInfo*> out;
  for (const auto& t : g.tensors()) {
    const std::string hf = gguf_tensor_name_to_hf(t.name);
    if (!hf.empty()) out[hf] = &t;
  }
  return out;
}

int64_t int_key(const GgufFile& g, const std::string& key, int64_t dflt, bool required) {
  if (!g.contains(key)) {
    if (required) throw UserError(g.path().string() + ": metadata key " + key + " is missing (a llama GGUF has it)");
    return dflt;
  }
  return g.get_int(key);
}

}  // namespace

std::string gguf_tensor_name_to_hf(const std::string& name) {
  if (name == "token_embd.weight") return "model.embed_tokens.weight";
  if (name == "output_norm.weight") return "model.norm.weight";
  if (name == "output.weight") return "lm_head.weight";
  if (name.rfind("blk.", 0) != 0) return "";
  const size_t dot = name.find('.', 4);
  if (dot == std::string::npos || dot == 4) return "";
  const std::string layer = name.substr(4, dot - 4);
  for (char c : layer)
    if (c < '0' || c > '9') return "";
  if (layer.size() > 1 && layer[0] == '0') return "";
  const std::string rest = name.substr(dot + 1);
  std::string base, suffix;
  if (ends_with(rest, ".weight")) suffix = ".weight";
  else if (ends_with(rest, ".bias")) suffix = ".bias";
  else return "";
  base = rest.substr(0, rest.size() - suffix.size());
  const auto it = layer_names().find(base);
  if (it == layer_names().end()) return "";
  if (suffix == ".bias" && (base == "attn_norm" || base == "ffn_norm")) return "";
  return "model.layers." + layer + "." + it->second + suffix;
}

std::string hf_tensor_name_to_gguf(const std::string& hf) {
  if (hf == "model.embed_tokens.weight") return "token_embd.weight";
  if (hf == "model.norm.weight") return "output_norm.weight";
  if (hf == "lm_head.weight") return "output.weight";
  const std::string prefix = "model.layers.";
  if (hf.rfind(prefix, 0) != 0) return "";
  const size_t dot = hf.find('.', prefix.size());
  if (dot == std::string::npos || dot == prefix.size()) return "";
  const std::string layer = hf.substr(prefix.size(), dot - prefix.size());
  for (char ch : layer)
    if (ch < '0' || ch > '9') return "";
  std::string rest = hf.substr(dot + 1), suffix;
  if (ends_with(rest, ".weight")) suffix = ".weight";
  else if (ends_with(rest, ".bias")) suffix = ".bias";
  else return "";
  rest = rest.substr(0, rest.size() - suffix.size());
  for (const auto& [gguf, hf_module] : layer_names())
    if (hf_module == rest) return "blk." + layer + "." + gguf + suffix;
  return "";
}

HFConfig hf_config_from_gguf(const GgufFile& g) {
  const std::string src = g.path().string();
  if (!g.contains("general.architecture"))
    throw UserError(src + ": metadata key general.architecture is missing (expected \"llama\")");
  const std::string arch = g.get_string("general.architecture");
  if (arch != "llama")
    throw UserError(src + ": general.architecture \"" + arch + "\" is not supported as a base model (supported: \"llama\")");
  auto req = [&](const std::string& k) { return int_key(g, "llama." + k, 0, true); };

  const int64_t hidden = req("embedding_length");
  const int64_t heads = req("attention.head_count");
  const int64_t kv_heads = int_key(g, "llama.attention.head_count_kv", heads, false);
  if (heads <= 0 || hidden <= 0 || kv_heads <= 0)
    throw UserError(src + ": llama.embedding_length, attention.head_count and head_count_kv must be positive");
  const int64_t head_dim = int_key(g, "llama.attention.key_length", hidden / heads, false);
  const int64_t value_dim = int_key(g, "llama.attention.value_length", head_dim, false);
  if (value_dim != head_dim)
    throw UserError(src + ": llama.attention.value_length " + std::to_string(value_dim) + " differs from key_length " +
                    std::to_string(head_dim) + " (not supported)");
  if (g.contains("llama.rope.dimension_count") && g.get_int("llama.rope.dimension_count") != head_dim)
    throw UserError(src + ": llama.rope.dimension_count " + std::to_string(g.get_int("llama.rope.dimension_count")) +
                    " differs from the head dimension " + std::to_string(head_dim) + " (partial rotary is not supported)");
  if (!g.contains("llama.attention.layer_norm_rms_epsilon"))
    throw UserError(src + ": metadata key llama.attention.layer_norm_rms_epsilon is missing (a llama GGUF has it)");

  int64_t vocab = 0;
  if (g.contains("llama.vocab_size")) vocab = g.get_int("llama.vocab_size");
  else if (g.contains("tokenizer.ggml.tokens")) vocab = static_cast<int64_t>(g.get_string_array("tokenizer.ggml.tokens").size());
  else if (const GgufTensorInfo* e = g.find_tensor("token_embd.weight"); e && e->dims.size() == 2) vocab = e->dims[1];
  else throw UserError(src + ": cannot tell the vocabulary size (no llama.vocab_size, tokenizer.ggml.tokens or token_embd.weight)");

  json j = {{"model_type", "llama"},
            {"architectures", {"LlamaForCausalLM"}},
            {"hidden_act", "silu"},
            {"hidden_size", hidden},
            {"intermediate_size", req("feed_forward_length")},
            {"num_hidden_layers", req("block_count")},
            {"num_attention_heads", heads},
            {"num_key_value_heads", kv_heads},
            {"head_dim", head_dim},
            {"vocab_size", vocab},
            {"max_position_embeddings", req("context_length")},
            {"rms_norm_eps", g.get_float("llama.attention.layer_norm_rms_epsilon")},
            {"rope_theta", g.contains("llama.rope.freq_base") ? g.get_float("llama.rope.freq_base") : 10000.0},
            {"tie_word_embeddings", g.find_tensor("output.weight") == nullptr},
            {"attention_bias", g.find_tensor("blk.0.attn_q.bias") != nullptr},
            {"mlp_bias", g.find_tensor("blk.0.ffn_gate.bias") != nullptr}};

  // Rope scaling: rope.scaling.type (none, linear, yarn, ...) + rope.scaling.factor; older files
  // write rope.scale_linear alone.
  std::string rope_type = g.contains("llama.rope.scaling.type") ? g.get_string("llama.rope.scaling.type") : "none";
  double factor = g.contains("llama.rope.scaling.factor") ? g.get_float("llama.rope.scaling.factor") : 0.0;
  if (rope_type == "none" && g.contains("llama.rope.scale_linear")) {
    rope_type = "linear";
    factor = g.get_float("llama.rope.scale_linear");
  }
  if (rope_type == "linear" && factor != 0.0 && factor != 1.0) {
    j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", factor}};
  } else if (rope_type != "none" && rope_type != "linear") {
    throw UserError(src + ": llama.rope.scaling.type \"" + rope_type + "\" is not supported (supported: none, linear)");
  }
  for (const auto& [key, hf] : {std::pair<std::string, std::string>{"tokenizer.ggml.bos_token_id", "bos_token_id"},
                                {"tokenizer.ggml.eos_token_id", "eos_token_id"},
                                {"tokenizer.ggml.padding_token_id", "pad_token_id"}})
    if (g.contains(key)) j[hf] = g.get_int(key);
  return parse_hf_config(j, src);
}

at::Tensor gguf_llama_tensor(const GgufFile& g, const HFConfig& c, const std::string& hf_name) {
  const GgufTensorInfo* info = nullptr;
  for (const auto& t : g.tensors())
    if (gguf_tensor_name_to_hf(t.name) == hf_name) info = &t;
  if (!info) throw UserError(g.path().string() + ": no tensor maps to " + hf_name);
  at::Tensor t = gguf_tensor_to_float(g, *info);
  const bool q = ends_with(hf_name, "self_attn.q_proj.weight") || ends_with(hf_name, "self_attn.q_proj.bias");
  const bool k = ends_with(hf_name, "self_attn.k_proj.weight") || ends_with(hf_name, "self_attn.k_proj.bias");
  if (!q && !k) return t;
  const int64_t n_head = q ? c.num_attention_heads : c.num_key_value_heads;
  const int64_t rows = t.size(0);
  if (n_head <= 0 || rows % (2 * n_head) != 0)
    throw UserError(g.path().string() + ": " + info->name + ": " + std::to_string(rows) + " rows cannot be split into " +
                    std::to_string(n_head) + " heads of rotary pairs");
  std::vector<int64_t> split = {n_head, rows / n_head / 2, 2};
  for (int64_t d = 1; d < t.dim(); ++d) split.push_back(t.size(d));
  return t.reshape(split).transpose(1, 2).contiguous().reshape(t.sizes());
}

LlamaWeights load_llama_gguf(const fs::path& path, const ModelLoadOptions& options) {
  const auto t0 = std::chrono::steady_clock::now();
  if (options.compute_dtype != at::kBFloat16 && options.compute_dtype != at::kHalf && options.compute_dtype != at::kFloat)
    throw UserError(std::string("compute dtype must be bfloat16, float16 or float32, found ") + c10::toString(options.compute_dtype));
  const GgufFile g(path);
  const std::string src = path.string();
  const HFConfig config = hf_config_from_gguf(g);
  const RopeParams rope = rope_params(config);  // validates the rope before any tensor is read
  const std::map<std::string, const GgufTensorInfo*> index = hf_index(g);
  std::set<std::string> used;

  // fp32 on the CPU, HF layout, shape checked against the metadata.
  auto fp32 = [&](const std::string& hf, std::vector<int64_t> expected) {
    const auto it = index.find(hf);
    if (it == index.end()) throw UserError(src + ": tensor for " + hf + " is missing from the GGUF file");
    const GgufTensorInfo& info = *it->second;
    const std::vector<int64_t> found(info.dims.rbegin(), info.dims.rend());
    if (found != expected)
      throw UserError(src + ": " + info.name + " (" + hf + "): expected shape " + shape_str(expected) +
                      " (from the GGUF metadata; GGUF dims reversed), found " + shape_str(found));
    if (!ggml_can_dequantize(info.type))
      throw UserError(src + ": " + info.name + ": ggml type " + ggml_type_name(info.type) +
                      " is not supported (supported: f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, q4_K, q5_K, q6_K)");
    used.insert(info.name);
    return gguf_llama_tensor(g, config, hf);
  };
  // As load_llama's dense(): device first, then the cast.
  auto dense = [&](const std::string& hf, std::vector<int64_t> expected) {
    return fp32(hf, std::move(expected)).to(options.device).to(options.compute_dtype).contiguous();
  };
  auto linear = [&](const std::string& prefix, int64_t out, int64_t in, bool has_bias) {
    LinearWeight w;
    w.out_features = out;
    w.in_features = in;
    at::Tensor t = dense(prefix + ".weight", {out, in});
    if (options.load_in_4bit) w.nf4 = nf4_quantize(t, options.blocksize, options.double_quant);
    else w.dense = t;
    if (has_bias) w.bias = dense(prefix + ".bias", {out});
    else if (index.count(prefix + ".bias"))
      throw UserError(src + ": " + prefix + ".bias: unexpected (blk.0 of this file has no bias for this projection)");
    return w;
  };

  LlamaWeights m = assemble_llama(config, options, dense, linear, src);
  const int64_t H = config.hidden_size;

  at::Tensor inv_freq = rope.inv_freq;
  if (const GgufTensorInfo* rf = g.find_tensor("rope_freqs.weight")) {
    at::Tensor factors = gguf_tensor_to_float(g, *rf).flatten();
    if (factors.numel() != inv_freq.numel())
      throw UserError(src + ": rope_freqs.weight has " + std::to_string(factors.numel()) + " factors, expected head_dim / 2 = " +
                      std::to_string(inv_freq.numel()));
    inv_freq = inv_freq / factors;
    used.insert(rf->name);
    log_info(cat(src, ": rope_freqs.weight applied (per-frequency rope scaling, as llama.cpp does)"));
  }
  m.inv_freq = inv_freq.to(options.device);
  m.attention_scaling = rope.attention_scaling;

  std::vector<std::string> unused;
  for (const auto& t : g.tensors())
    if (!used.count(t.name)) unused.push_back(t.name);
  if (!unused.empty())
    log_warn(cat(src, ": ", unused.size(), " tensor(s) in the GGUF file are not used by llama (first: ", unused.front(), ")"));

  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  log_info(cat("loaded llama from GGUF ", src, ": ", config.num_hidden_layers, " layers, hidden ", H, ", linear weights ",
               options.load_in_4bit ? std::string("NF4") : torch_dtype_name(options.compute_dtype), ", compute ",
               torch_dtype_name(options.compute_dtype), " on ", options.device.str(), " in ", secs, " s"));
  return m;
}

}  // namespace qlora
