// load_llama: a Hugging Face Llama/Mistral/Qwen2 folder (config.json + safetensors, single or
// sharded, 16-bit or bnb-4bit) -> LlamaWeights on the target device, one tensor at a time, with
// every unsupported option and every missing or misshapen tensor reported as a UserError.
//
// Facts from transformers (read, not copied) that decide what is accepted:
//  - LlamaMLP / MistralMLP / Qwen2MLP: down_proj(act_fn(gate_proj(x)) * up_proj(x)), act_fn from
//    hidden_act (we implement "silu" only); Llama's Linear layers take bias=config.mlp_bias.
//  - LlamaAttention: q/k/v/o take bias=config.attention_bias; Qwen2Attention: q/k/v bias=True,
//    o_proj bias=False; Mistral: no biases.
//  - Sliding window: Mistral uses create_sliding_window_causal_mask on every layer when
//    config.sliding_window is not None (MistralConfig default 4096 when the key is absent); Qwen2
//    sets sliding_window = None unless use_sliding_window, and layer_types[i] = "sliding_attention"
//    for i >= max_window_layers (default 28) unless config.json lists layer_types itself.
//  - lm_head is tied to embed_tokens when tie_word_embeddings (a stored lm_head.weight is then
//    ignored, as transformers' tie_weights overwrites it).
#include <ATen/ATen.h>

#include <chrono>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "model/internal.h"
#include "qlora/shape_str.h"
#include "qlora/bnb4bit.h"
#include "qlora/error.h"
#include "qlora/log.h"
#include "qlora/model.h"
#include "qlora/safetensors.h"

namespace qlora {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// The family decisions that config.json implies beyond what HFConfig models.
void check_supported(const HFConfig& c, const std::string& source) {
  static const std::vector<std::string> kArchitectures = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"};
  const json& raw = c.raw;
  if (raw.contains("architectures") && !raw["architectures"].is_null()) {
    const json& a = raw["architectures"];
    if (!a.is_array() || a.empty())
      throw UserError(source + ": architectures: expected a list such as [\"LlamaForCausalLM\"], found " + a.dump());
    for (const auto& name : a) {
      bool ok = false;
      for (const auto& k : kArchitectures) ok = ok || (name.is_string() && name.get<std::string>() == k);
      if (!ok)
        throw UserError(source + ": architecture " + name.dump() +
                        " is not supported (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)");
    }
  }
  if (raw.contains("hidden_act") && !(raw["hidden_act"].is_string() && raw["hidden_act"].get<std::string>() == "silu"))
    throw UserError(source + ": hidden_act " + raw["hidden_act"].dump() + " is not supported (supported: \"silu\")");
  if (c.hidden_size <= 0 || c.intermediate_size <= 0 || c.num_hidden_layers <= 0 || c.num_attention_heads <= 0 ||
      c.num_key_value_heads <= 0 || c.head_dim <= 0 || c.vocab_size <= 0)
    throw UserError(source + ": hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, "
                    "num_key_value_heads, head_dim and vocab_size must be positive");
  if (c.quantization_config) {
    const BnbQuantizationConfig& q = *c.quantization_config;
    if (q.load_in_8bit) throw UserError(source + ": quantization_config.load_in_8bit is not supported (only 4-bit NF4)");
    if (q.load_in_4bit && q.bnb_4bit_quant_type != "nf4")
      throw UserError(source + ": quantization_config.bnb_4bit_quant_type \"" + q.bnb_4bit_quant_type +
                      "\" is not supported (supported: \"nf4\")");
  }
  // Checked here as well as in rope_params so that the error comes before any tensor is read.
  rope_params(c);
}

// The sliding window of layer i (0 = none), following each family's config semantics.
int64_t layer_sliding_window(const HFConfig& c, int64_t i, const std::string& source) {
  const json& raw = c.raw;
  auto window_value = [&](int64_t dflt) -> int64_t {
    if (!raw.contains("sliding_window")) return dflt;
    const json& w = raw["sliding_window"];
    if (w.is_null()) return 0;
    if (!w.is_number_integer() || w.get<int64_t>() <= 0)
      throw UserError(source + ": sliding_window: expected a positive integer or null, found " + w.dump());
    return w.get<int64_t>();
  };
  if (c.model_type == "mistral") return window_value(4096);
  if (c.model_type == "qwen2") {
    const bool use = raw.contains("use_sliding_window") && raw["use_sliding_window"].is_boolean() &&
                     raw["use_sliding_window"].get<bool>();
    if (!use) return 0;
    const int64_t w = window_value(4096);
    if (w == 0) return 0;
    if (raw.contains("layer_types") && raw["layer_types"].is_array()) {
      const json& lt = raw["layer_types"];
      if (static_cast<int64_t>(lt.size()) != c.num_hidden_layers)
        throw UserError(source + ": layer_types has " + std::to_string(lt.size()) + " entries, expected num_hidden_layers = " +
                        std::to_string(c.num_hidden_layers));
      const json& t = lt[static_cast<size_t>(i)];
      if (t == "sliding_attention") return w;
      if (t == "full_attention") return 0;
      throw UserError(source + ": layer_types[" + std::to_string(i) + "] " + t.dump() +
                      " is not supported (supported: \"full_attention\", \"sliding_attention\")");
    }
    const int64_t max_window_layers =
        raw.contains("max_window_layers") && raw["max_window_layers"].is_number_integer() ? raw["max_window_layers"].get<int64_t>() : 28;
    return i >= max_window_layers ? w : 0;
  }
  return 0;  // Llama has no sliding window
}

NF4Tensor nf4_to_device(NF4Tensor t, at::Device device) {
  auto move = [&](at::Tensor& x) {
    if (x.defined()) x = x.to(device, /*non_blocking=*/false, /*copy=*/true).contiguous();
  };
  move(t.packed);
  move(t.absmax);
  move(t.absmax2);
  move(t.code2);
  return t;
}

struct Loader {
  const SafetensorsCheckpoint& ckpt;
  const ModelLoadOptions& opt;
  std::string dir;
  std::set<std::string> used;

  std::string where(const std::string& name) const {
    return ckpt.contains(name) ? ckpt.file_of(name).path().string() : dir;
  }

  void check_shape(const std::string& name, at::IntArrayRef found, at::IntArrayRef expected) const {
    if (found != expected)
      throw UserError(where(name) + ": " + name + ": expected shape " + shape_str(expected) + " (from config.json), found " +
                      shape_str(found));
  }

  void require(const std::string& name) const {
    if (!ckpt.contains(name)) throw UserError(dir + ": tensor " + name + " is missing from the checkpoint");
  }

  // A tensor in the compute dtype on the device: embedding, norm, bias, lm_head, or a 16-bit
  // linear weight about to be quantized. A bnb-4bit entry (e.g. a quantized lm_head) is dequantized.
  at::Tensor dense(const std::string& name, std::vector<int64_t> expected) {
    if (is_bnb4bit_weight(ckpt, name)) {
      NF4Tensor q = nf4_to_device(read_bnb4bit_weight(ckpt, name), opt.device);
      mark_bnb(name);
      check_shape(name, q.shape, expected);
      return nf4_dequantize(q, q.dtype).to(opt.compute_dtype).contiguous();
    }
    require(name);
    used.insert(name);
    const SafetensorsEntry& e = ckpt.entry(name);
    check_shape(name, e.shape, expected);
    if (!at::isFloatingType(e.scalar_type))
      throw UserError(where(name) + ": " + name + ": expected a floating-point tensor, found dtype " + e.dtype);
    // Device first, then the cast, so that on CUDA the conversion runs on the GPU; copy=true so
    // that CPU weights own their memory rather than pinning the file mapping.
    return ckpt.view(name).to(opt.device, /*non_blocking=*/false, /*copy=*/true).to(opt.compute_dtype).contiguous();
  }

  void mark_bnb(const std::string& name) {
    used.insert(name);
    for (const char* s : {".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4"})
      used.insert(name + s);
  }

  LinearWeight linear(const std::string& prefix, int64_t out, int64_t in, bool has_bias) {
    const std::string name = prefix + ".weight";
    const std::vector<int64_t> expected = {out, in};
    LinearWeight w;
    w.out_features = out;
    w.in_features = in;
    if (is_bnb4bit_weight(ckpt, name)) {
      NF4Tensor q = read_bnb4bit_weight(ckpt, name);
      mark_bnb(name);
      check_shape(name, q.shape, expected);
      q = nf4_to_device(std::move(q), opt.device);
      if (opt.load_in_4bit) w.nf4 = std::move(q);
      // Dequantized in the stored dtype, then cast: what bitsandbytes' dequantize_4bit(...).to(dtype) gives.
      else w.dense = nf4_dequantize(q, q.dtype).to(opt.compute_dtype).contiguous();
    } else {
      // In the compute dtype first (what from_pretrained(torch_dtype=compute) does before
      // bitsandbytes quantizes), on the device, so that CUDA quantizes on the GPU.
      at::Tensor t = dense(name, expected);
      if (opt.load_in_4bit) w.nf4 = nf4_quantize(t, opt.blocksize, opt.double_quant);
      else w.dense = t;
    }
    if (has_bias) w.bias = dense(prefix + ".bias", {out});
    else if (ckpt.contains(prefix + ".bias"))
      throw UserError(where(prefix + ".bias") + ": " + prefix + ".bias: unexpected (config.json says this projection has no bias)");
    return w;
  }
};

}  // namespace

LlamaWeights load_llama(const fs::path& model_dir, const ModelLoadOptions& options) {
  const auto t0 = std::chrono::steady_clock::now();
  if (options.compute_dtype != at::kBFloat16 && options.compute_dtype != at::kHalf && options.compute_dtype != at::kFloat)
    throw UserError(std::string("compute dtype must be bfloat16, float16 or float32, found ") + c10::toString(options.compute_dtype));
  if (fs::is_regular_file(model_dir) && model_dir.extension() == ".gguf") return load_llama_gguf(model_dir, options);
  const fs::path config_path = fs::is_directory(model_dir) ? model_dir / "config.json" : model_dir;
  const HFConfig config = load_hf_config(config_path);
  check_supported(config, config_path.string());

  const SafetensorsCheckpoint ckpt(fs::is_directory(model_dir) ? model_dir : model_dir.parent_path());
  Loader ld{ckpt, options, model_dir.string(), {}};

  LlamaWeights m = assemble_llama(
      config, options, [&](const std::string& n, std::vector<int64_t> e) { return ld.dense(n, std::move(e)); },
      [&](const std::string& p, int64_t out, int64_t in, bool b) { return ld.linear(p, out, in, b); }, config_path.string());
  if (config.tie_word_embeddings && ckpt.contains("lm_head.weight")) ld.used.insert("lm_head.weight");
  const int64_t H = config.hidden_size;

  const RopeParams rope = rope_params(config);
  m.inv_freq = rope.inv_freq.to(options.device);
  m.attention_scaling = rope.attention_scaling;

  // Tensors we did not use: old checkpoints store rotary_emb.inv_freq buffers (recomputed here);
  // anything else is reported, since it may mean the config and the weights disagree.
  std::vector<std::string> unused;
  for (const auto& n : ckpt.names())
    if (!ld.used.count(n) && n.find("rotary_emb.inv_freq") == std::string::npos) unused.push_back(n);
  if (!unused.empty())
    log_warn(cat(model_dir.string(), ": ", unused.size(), " tensor(s) in the checkpoint are not used by ", config.model_type,
                 " (first: ", unused.front(), ")"));

  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  log_info(cat("loaded ", config.model_type, " from ", model_dir.string(), ": ", config.num_hidden_layers, " layers, hidden ",
               H, ", linear weights ", options.load_in_4bit ? std::string("NF4") : torch_dtype_name(options.compute_dtype),
               ", compute ", torch_dtype_name(options.compute_dtype), " on ", options.device.str(), " in ", secs, " s"));
  return m;
}

LlamaWeights assemble_llama(const HFConfig& config, const ModelLoadOptions& options, const DenseGetter& dense,
                            const LinearGetter& linear, const std::string& source) {
  LlamaWeights m;
  m.config = config;
  m.compute_dtype = options.compute_dtype;
  m.device = options.device;
  const int64_t H = config.hidden_size, I = config.intermediate_size, V = config.vocab_size;
  const int64_t q_out = config.num_attention_heads * config.head_dim;
  const int64_t kv_out = config.num_key_value_heads * config.head_dim;
  m.embed_tokens = dense("model.embed_tokens.weight", {V, H});
  // No reserve(num_hidden_layers): the count comes from the file, and a corrupt one (2^28, found by
  // fuzz/gguf_model) would allocate before the first missing layer tensor names the problem.
  for (int64_t i = 0; i < config.num_hidden_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    DecoderLayerWeights l;
    l.input_layernorm = dense(p + "input_layernorm.weight", {H});
    l.q_proj = linear(p + "self_attn.q_proj", q_out, H, config.qkv_bias);
    l.k_proj = linear(p + "self_attn.k_proj", kv_out, H, config.qkv_bias);
    l.v_proj = linear(p + "self_attn.v_proj", kv_out, H, config.qkv_bias);
    l.o_proj = linear(p + "self_attn.o_proj", H, q_out, config.o_bias);
    l.post_attention_layernorm = dense(p + "post_attention_layernorm.weight", {H});
    l.gate_proj = linear(p + "mlp.gate_proj", I, H, config.mlp_bias);
    l.up_proj = linear(p + "mlp.up_proj", I, H, config.mlp_bias);
    l.down_proj = linear(p + "mlp.down_proj", H, I, config.mlp_bias);
    l.sliding_window = layer_sliding_window(config, i, source);
    m.layers.push_back(std::move(l));
  }
  m.norm = dense("model.norm.weight", {H});
  m.lm_head = config.tie_word_embeddings ? m.embed_tokens : dense("lm_head.weight", {V, H});
  return m;
}

ModelFootprint model_footprint(const LlamaWeights& m) {
  ModelFootprint f;
  auto dense = [&](const at::Tensor& t) {
    if (!t.defined()) return;
    f.parameters += t.numel();
    f.bytes_as_loaded += t.numel() * static_cast<int64_t>(t.element_size());
  };
  auto linear = [&](const LinearWeight& w) {
    const int64_t n = w.out_features * w.in_features;
    f.parameters += n;
    f.linear_parameters += n;
    if (w.nf4) {
      for (const at::Tensor* t : {&w.nf4->packed, &w.nf4->absmax, &w.nf4->absmax2, &w.nf4->code2})
        if (t->defined()) f.bytes_as_loaded += t->numel() * static_cast<int64_t>(t->element_size());
    } else {
      f.bytes_as_loaded += w.dense.numel() * static_cast<int64_t>(w.dense.element_size());
    }
    dense(w.bias);
  };
  dense(m.embed_tokens);
  for (const auto& l : m.layers) {
    dense(l.input_layernorm);
    dense(l.post_attention_layernorm);
    for (const LinearWeight* w : {&l.q_proj, &l.k_proj, &l.v_proj, &l.o_proj, &l.gate_proj, &l.up_proj, &l.down_proj}) linear(*w);
  }
  dense(m.norm);
  if (m.lm_head.defined() && !m.lm_head.is_same(m.embed_tokens)) dense(m.lm_head);
  f.bytes_16bit = f.parameters * 2;
  return f;
}

}  // namespace qlora
