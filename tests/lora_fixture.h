// A tiny LoRA test model and helpers shared by the LoRA, tiled-MLP and recompute tests:
// tiny_llama.h's shapes (hidden 64, 4 heads of 16, 2 KV heads, intermediate 96, vocab 100, 2 layers)
// with weights far from trivial, every projection targeted, B randomized so the adapter matters.
#pragma once
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "qlora/lora.h"
#include "qlora/model.h"
#include "qlora/safetensors.h"
#include "tiny_llama.h"

namespace qlora::test::lora_fixture {

// tiny_llama.h's shapes: hidden 64, 4 heads of 16, 2 KV heads, intermediate 96, vocab 100, 2 layers.
inline qlora::LlamaWeights tiny_model(const std::filesystem::path& dir, bool in_4bit, at::ScalarType dtype = at::kFloat) {
  at::manual_seed(11);
  std::filesystem::create_directories(dir);
  const nlohmann::json cfg = {{"model_type", "llama"}, {"architectures", {"LlamaForCausalLM"}}, {"hidden_size", 64},
                    {"intermediate_size", 96}, {"num_hidden_layers", 2}, {"num_attention_heads", 4},
                    {"num_key_value_heads", 2}, {"vocab_size", 100}, {"rms_norm_eps", 1e-5},
                    {"hidden_act", "silu"}, {"tie_word_embeddings", false}, {"torch_dtype", "float32"}};
  qlora::write_file_atomic(dir / "config.json", cfg.dump(2));
  qlora::NamedTensors ts = qlora::test::tiny_llama_tensors(at::kFloat);
  for (auto& [name, t] : ts)
    if (name.find("layernorm") != std::string::npos || name.find("norm.weight") != std::string::npos) t = t + 1.0;
    else t = t * 4.0;  // ~ N(0, 0.2^2): attention and MLP far from trivial
  qlora::save_safetensors(dir / "model.safetensors", ts);
  return qlora::load_llama(dir, {.load_in_4bit = in_4bit, .compute_dtype = dtype});
}

inline qlora::LoraOptions all_targets(int r = 4, double alpha = 8.0) {
  return {.r = r, .alpha = alpha, .dropout = 0.0, .use_rslora = false, .target_modules = qlora::lora_projection_names()};
}

// B ~ N(0, std^2) from its own generator, layers and projections in order: the adapter matters.
inline void randomize_b(qlora::LoraModel& lora, uint64_t seed, double std = 0.1) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  at::NoGradGuard ng;
  for (auto& [name, t] : qlora::named_lora_parameters(lora))
    if (name.find("lora_B") != std::string::npos) t.copy_(at::randn(t.sizes(), gen) * std);
}

inline double rel_err(const at::Tensor& a, const at::Tensor& b) {
  return ((a.to(at::kDouble) - b.to(at::kDouble)).norm() / b.to(at::kDouble).norm().clamp_min(1e-30)).item<double>();
}

inline at::Tensor ids_of(std::vector<int64_t> shape, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randint(0, 100, shape, gen, at::TensorOptions().dtype(at::kLong));
}

// mlp_tile_tokens set for a scope (process-wide), back to 0 (off) when it ends.
struct TileSwitch {
  explicit TileSwitch(int64_t n) { qlora::set_mlp_tile_tokens(n); }
  ~TileSwitch() { qlora::set_mlp_tile_tokens(0); }
  TileSwitch(const TileSwitch&) = delete;
  TileSwitch& operator=(const TileSwitch&) = delete;
};

}  // namespace qlora::test::lora_fixture
