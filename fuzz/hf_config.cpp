// libFuzzer target: a Hugging Face config.json (src/io/hf_config.cpp, load_hf_config): architecture,
// sizes, rope_scaling / rope_parameters, tied embeddings, sliding windows, quantization_config.
// Input: the file's text. A config that loads must write back (hf_config_to_json) into JSON that
// parses again to the same JSON: what we accept we can also save, as `qlora quantize` and
// `qlora merge` do.
#include <cstdint>

#include "fuzz_util.h"
#include "qlora/hf_config.h"
#include "qlora/model.h"

namespace {

namespace fs = std::filesystem;
using namespace qlora;

void write_seeds(const fs::path& dir) {
  // Our own writer's output for the shapes `qlora bench train` builds, plus hand-written variants.
  for (const std::string& shape : model_shape_names())
    fuzz::write_bytes(dir / ("shape-" + shape), hf_config_to_json(model_shape_config(shape)).dump(1));
  fuzz::write_bytes(dir / "llama3",
                    R"({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
 "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
 "vocab_size": 512, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
 "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
 "original_max_position_embeddings": 8192}, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
 "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": [2, 3]})");
  fuzz::write_bytes(dir / "mistral-bnb",
                    R"({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 96,
 "intermediate_size": 200, "num_hidden_layers": 1, "num_attention_heads": 3, "num_key_value_heads": 1,
 "head_dim": 32, "vocab_size": 100, "sliding_window": 16, "torch_dtype": "float16",
 "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": true, "bnb_4bit_quant_type": "nf4",
 "bnb_4bit_use_double_quant": true, "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8",
 "llm_int8_skip_modules": ["lm_head"]}})");
  fuzz::write_bytes(dir / "qwen2-v5",
                    R"({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64,
 "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
 "vocab_size": 300, "use_sliding_window": true, "sliding_window": 32, "max_window_layers": 2,
 "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}, "dtype": "float32"})");
  fuzz::write_bytes(dir / "not-json", "{\"hidden_size\": 64,");
  fuzz::write_bytes(dir / "array", "[1, 2, 3]");
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::initialize(write_seeds);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const fs::path file = fuzz::write_scratch("config.json", {reinterpret_cast<const char*>(data), size});
  HFConfig config;
  if (!fuzz::expect_user_error([&] { config = load_hf_config(file); })) return 0;
  const nlohmann::json written = hf_config_to_json(config);
  HFConfig again;
  try {
    again = parse_hf_config(written, "config.json (written back)");
  } catch (const std::exception& e) {
    fuzz::invariant_failed(std::string("a loaded config.json does not load after writing it back: ") + e.what() +
                           "\n" + written.dump());
  }
  if (hf_config_to_json(again) != written)
    fuzz::invariant_failed("config.json changes on a second write:\n" + written.dump() + "\n" +
                           hf_config_to_json(again).dump());
  return 0;
}
