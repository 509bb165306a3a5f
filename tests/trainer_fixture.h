// The trainer tests' fixture (test_trainer.cpp, test_fsdp.cpp): a tiny random Llama and
// pretokenized data a LoRA learns quickly, and the YAML of a small fp32 CPU run on it.
#pragma once
#include <filesystem>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "qlora/safetensors.h"
#include "test_util.h"
#include "tiny_llama.h"

namespace qlora::test {

// tiny_llama.h's shapes (hidden 64, 4 heads, 2 KV heads, intermediate 96, vocab 100, 2 layers),
// fp32, no tokenizer.json; and 24 pretokenized examples of 12..20 tokens following x -> x + 3
// (mod 100) from different starts: something a LoRA can learn quickly.
inline void write_trainer_fixture(const std::filesystem::path& dir) {
  at::manual_seed(5);
  std::filesystem::create_directories(dir / "model");
  const nlohmann::json cfg = {{"model_type", "llama"}, {"architectures", {"LlamaForCausalLM"}}, {"hidden_size", 64},
                    {"intermediate_size", 96}, {"num_hidden_layers", 2}, {"num_attention_heads", 4},
                    {"num_key_value_heads", 2}, {"vocab_size", 100}, {"rms_norm_eps", 1e-5},
                    {"hidden_act", "silu"}, {"tie_word_embeddings", false}, {"torch_dtype", "float32"}};
  write_file(dir / "model" / "config.json", cfg.dump(2));
  qlora::NamedTensors ts = tiny_llama_tensors(at::kFloat);
  for (auto& [name, t] : ts)
    if (name.find("norm.weight") != std::string::npos) t = t + 1.0;
    else t = t * 4.0;
  qlora::save_safetensors(dir / "model" / "model.safetensors", ts);
  std::ostringstream data;
  for (int k = 0; k < 24; ++k) {
    nlohmann::json ids = nlohmann::json::array();
    int x = (7 * k) % 100;
    for (int i = 0; i < 12 + k % 9; ++i, x = (x + 3) % 100) ids.push_back(x);
    data << nlohmann::json{{"input_ids", ids}}.dump() << "\n";
  }
  write_file(dir / "data.jsonl", data.str());
}

inline std::string trainer_yaml(const std::filesystem::path& dir, const std::string& extra) {
  return "base_model: " + (dir / "model").string() + "\n" +
         "adapter: lora\nload_in_4bit: false\n"
         "lora_r: 4\nlora_alpha: 8\nlora_dropout: 0.0\nlora_target_linear: true\n"
         "datasets:\n  - path: " + (dir / "data.jsonl").string() + "\n    type: input_ids\n" +
         "sequence_len: 32\nsample_packing: false\nmicro_batch_size: 1\ngradient_accumulation_steps: 1\n"
         "max_steps: 30\nlearning_rate: 0.005\nlr_scheduler: constant\nmax_grad_norm: 1.0\n"
         "device: cpu\nseed: 7\nlogging_steps: 1\n"
         "output_dir: " + (dir / "out").string() + "\n" + extra;
}

}  // namespace qlora::test
