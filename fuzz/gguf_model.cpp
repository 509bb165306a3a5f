// libFuzzer target: a llama.cpp GGUF as a Llama base model (src/io/gguf_model.cpp,
// load_llama_gguf): the llama.* metadata -> HF config, tensor names -> HF names, shapes checked
// against the config, Q/K rows un-permuted, quantized tensors dequantized.
// Input: a whole .gguf file, loaded on the CPU in fp32 without NF4. A model that loads must have
// every layer's projections in the [out, in] shapes its config gives.
#include <cstdint>

#include "fuzz_util.h"
#include "qlora/ggml_quants.h"
#include "qlora/gguf.h"
#include "qlora/gguf_export.h"
#include "qlora/hf_config.h"
#include "qlora/model.h"

namespace {

namespace fs = std::filesystem;
using namespace qlora;

// How the target loads (and builds) models: on the CPU, fp32, linear weights not quantized.
ModelLoadOptions cpu_fp32() {
  ModelLoadOptions mo;
  mo.load_in_4bit = false;
  mo.compute_dtype = at::kFloat;
  return mo;
}

// A tiny Llama (1 or 2 layers, hidden 32, GQA 2:1; down_proj rows of 48 fall back to f16 under q8_0) written the way `qlora export --format gguf`
// writes one: the exporter's metadata, tensor names and Q/K permutation; f32 or q8_0 matrices.
std::string tiny_gguf(int64_t layers, bool tie, GgmlType matrix_type) {
  const HFConfig config = parse_hf_config(nlohmann::json{
      {"architectures", {"LlamaForCausalLM"}}, {"model_type", "llama"}, {"hidden_size", 32},
      {"intermediate_size", 48}, {"num_hidden_layers", layers}, {"num_attention_heads", 2},
      {"num_key_value_heads", 1}, {"vocab_size", 32}, {"max_position_embeddings", 64},
      {"rms_norm_eps", 1e-5}, {"rope_theta", 10000.0}, {"tie_word_embeddings", tie}});
  const LlamaWeights m = random_llama(config, cpu_fp32(), 5);
  GgufWriter w;
  add_gguf_model_metadata(w, config, "fuzz tiny", matrix_type);
  auto add = [&](const std::string& hf_name, at::Tensor t) {
    t = t.to(at::kFloat).contiguous();
    const std::vector<int64_t> dims(t.sizes().rbegin(), t.sizes().rend());  // ggml: innermost first
    const GgmlType type = gguf_tensor_type(t.sizes().vec(), matrix_type);  // HF shape; f16 when rows do not fit q8_0 blocks
    if (type == GgmlType::f32) {
      w.add_tensor(hf_tensor_name_to_gguf(hf_name), type, dims, t.data_ptr<float>(), static_cast<uint64_t>(t.numel()) * 4);
    } else {
      const std::string bytes = ggml_quantize_tensor(t, type);
      w.add_tensor(hf_tensor_name_to_gguf(hf_name), type, dims, bytes.data(), bytes.size());
    }
  };
  add("model.embed_tokens.weight", m.embed_tokens);
  for (int64_t i = 0; i < layers; ++i) {
    const DecoderLayerWeights& l = m.layers[static_cast<size_t>(i)];
    const std::string p = "model.layers." + std::to_string(i) + ".";
    add(p + "input_layernorm.weight", l.input_layernorm);
    add(p + "post_attention_layernorm.weight", l.post_attention_layernorm);
    add(p + "self_attn.q_proj.weight", gguf_permute_qk(l.q_proj.dense, config.num_attention_heads));
    add(p + "self_attn.k_proj.weight", gguf_permute_qk(l.k_proj.dense, config.num_key_value_heads));
    add(p + "self_attn.v_proj.weight", l.v_proj.dense);
    add(p + "self_attn.o_proj.weight", l.o_proj.dense);
    add(p + "mlp.gate_proj.weight", l.gate_proj.dense);
    add(p + "mlp.up_proj.weight", l.up_proj.dense);
    add(p + "mlp.down_proj.weight", l.down_proj.dense);
  }
  add("model.norm.weight", m.norm);
  if (!tie) add("lm_head.weight", m.lm_head);
  return w.serialize();
}

void write_seeds(const fs::path& dir) {
  fuzz::write_bytes(dir / "tiny-f32-tied", tiny_gguf(1, true, GgmlType::f32));
  fuzz::write_bytes(dir / "tiny-f32-2layers", tiny_gguf(2, false, GgmlType::f32));
  fuzz::write_bytes(dir / "tiny-q8_0", tiny_gguf(1, false, GgmlType::q8_0));
  // The seeds are only worth their coverage if they load: a UserError here is a broken seed.
  for (const char* name : {"tiny-f32-tied", "tiny-f32-2layers", "tiny-q8_0"}) {
    const fs::path copy = fuzz::scratch_dir() / (std::string(name) + ".gguf");
    fs::copy_file(dir / name, copy, fs::copy_options::overwrite_existing);
    try {
      (void)load_llama_gguf(copy, cpu_fp32());
    } catch (const std::exception& e) {
      fuzz::invariant_failed(std::string("seed ") + name + " does not load: " + e.what());
    }
    fs::remove(copy);
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::initialize(write_seeds);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const fs::path file = fuzz::write_scratch("model.gguf", {reinterpret_cast<const char*>(data), size});
  LlamaWeights m;
  if (!fuzz::expect_user_error([&] { m = load_llama_gguf(file, cpu_fp32()); })) return 0;
  const HFConfig& c = m.config;
  const int64_t hd = c.head_dim > 0 ? c.head_dim : c.hidden_size / c.num_attention_heads;
  auto check = [&](const LinearWeight& lw, int64_t out, int64_t in, const char* what) {
    if (lw.dense.dim() != 2 || lw.dense.size(0) != out || lw.dense.size(1) != in)
      fuzz::invariant_failed(std::string("loaded GGUF model: ") + what + " is not [" + std::to_string(out) + ", " +
                             std::to_string(in) + "]");
  };
  if (static_cast<int64_t>(m.layers.size()) != c.num_hidden_layers) fuzz::invariant_failed("layer count differs from the config");
  for (const DecoderLayerWeights& l : m.layers) {
    check(l.q_proj, c.num_attention_heads * hd, c.hidden_size, "q_proj");
    check(l.k_proj, c.num_key_value_heads * hd, c.hidden_size, "k_proj");
    check(l.v_proj, c.num_key_value_heads * hd, c.hidden_size, "v_proj");
    check(l.o_proj, c.hidden_size, c.num_attention_heads * hd, "o_proj");
    check(l.gate_proj, c.intermediate_size, c.hidden_size, "gate_proj");
    check(l.up_proj, c.intermediate_size, c.hidden_size, "up_proj");
    check(l.down_proj, c.hidden_size, c.intermediate_size, "down_proj");
  }
  if (m.embed_tokens.dim() != 2 || m.embed_tokens.size(0) != c.vocab_size || m.embed_tokens.size(1) != c.hidden_size)
    fuzz::invariant_failed("loaded GGUF model: embed_tokens is not [vocab, hidden]");
  return 0;
}
