// Llama-family models of a named shape with random weights, built in memory on the target device
// (`qlora bench train`: nothing to download, nothing written to disk). The tensors go through the
// loaders' own assembly (assemble_llama) and the same 16-bit -> NF4 step as load_llama, so the
// model is what a real checkpoint of that shape would load as; only the values are random.
#include <ATen/ATen.h>

#include <map>
#include <string>

#include "model/internal.h"
#include "qlora/error.h"
#include "qlora/model.h"

namespace qlora {

namespace {

// Facts from each model's config.json on the Hugging Face hub (meta-llama/*): hidden, intermediate,
// layers, heads, KV heads, vocabulary, tied embeddings. All use rope theta 500000 with llama3 rope
// scaling (factor 8 for 3.1/3.2 8B and 70B; 32 for 3.2 1B/3B; the factor does not change the cost).
struct ShapeSpec {
  int64_t hidden, intermediate, layers, heads, kv_heads, vocab;
  bool tied;
  double rope_factor;
};

const std::map<std::string, ShapeSpec>& shapes() {
  static const std::map<std::string, ShapeSpec> s = {
      {"llama-3.2-1b", {2048, 8192, 16, 32, 8, 128256, true, 32.0}},
      {"llama-3.2-3b", {3072, 8192, 28, 24, 8, 128256, true, 32.0}},
      {"llama-3-8b", {4096, 14336, 32, 32, 8, 128256, false, 8.0}},
      {"llama-3.1-8b", {4096, 14336, 32, 32, 8, 128256, false, 8.0}},
      {"llama-3-70b", {8192, 28672, 80, 64, 8, 128256, false, 8.0}},
      // For trying the commands on a laptop (and the CI tests): the same architecture at toy size.
      {"tiny", {64, 160, 2, 4, 2, 512, false, 8.0}},
  };
  return s;
}

}  // namespace

std::vector<std::string> model_shape_names() {
  std::vector<std::string> names;
  for (const auto& [name, spec] : shapes()) names.push_back(name);
  return names;
}

HFConfig model_shape_config(const std::string& shape) {
  const auto it = shapes().find(shape);
  if (it == shapes().end()) {
    std::string known;
    for (const std::string& n : model_shape_names()) known += (known.empty() ? "" : ", ") + n;
    throw UserError("unknown model shape '" + shape + "' (expected one of: " + known + ")");
  }
  const ShapeSpec& s = it->second;
  nlohmann::json j = {
      {"model_type", "llama"},
      {"architectures", {"LlamaForCausalLM"}},
      {"hidden_size", s.hidden},
      {"intermediate_size", s.intermediate},
      {"num_hidden_layers", s.layers},
      {"num_attention_heads", s.heads},
      {"num_key_value_heads", s.kv_heads},
      {"vocab_size", s.vocab},
      {"max_position_embeddings", 131072},
      {"rms_norm_eps", 1e-5},
      {"rope_theta", 500000.0},
      {"rope_scaling",
       {{"rope_type", "llama3"},
        {"factor", s.rope_factor},
        {"low_freq_factor", 1.0},
        {"high_freq_factor", 4.0},
        {"original_max_position_embeddings", 8192}}},
      {"tie_word_embeddings", s.tied},
      {"hidden_act", "silu"},
      {"torch_dtype", "bfloat16"},
      {"bos_token_id", s.vocab > 128000 ? 128000 : 1},
      {"eos_token_id", s.vocab > 128001 ? 128001 : 2},
  };
  return parse_hf_config(j, "shape " + shape);
}

LlamaWeights random_llama(const HFConfig& config, const ModelLoadOptions& options, uint64_t seed) {
  at::manual_seed(seed);  // the default generator of every device: same seed, same model
  const auto opts = at::TensorOptions().dtype(options.compute_dtype).device(options.device);
  // transformers' initializer_range (0.02) for matrices, ones for the norms (their init).
  auto dense = [&](const std::string& name, std::vector<int64_t> shape) {
    const bool norm = shape.size() == 1 && name.find("norm") != std::string::npos;
    return norm ? at::ones(shape, opts) : at::normal(0.0, 0.02, shape, std::nullopt, opts);
  };
  auto linear = [&](const std::string& prefix, int64_t out, int64_t in, bool has_bias) {
    LinearWeight w;
    w.out_features = out;
    w.in_features = in;
    const at::Tensor t = dense(prefix + ".weight", {out, in});
    if (options.load_in_4bit) w.nf4 = nf4_quantize(t, options.blocksize, options.double_quant);
    else w.dense = t;
    if (has_bias) w.bias = at::zeros({out}, opts);
    return w;
  };
  LlamaWeights m = assemble_llama(config, options, dense, linear, "random " + config.model_type);
  const RopeParams rope = rope_params(config);
  m.inv_freq = rope.inv_freq.to(options.device);
  m.attention_scaling = rope.attention_scaling;
  return m;
}

}  // namespace qlora
