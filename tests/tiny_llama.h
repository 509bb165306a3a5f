// The tensors of a tiny 2-layer Llama-shaped checkpoint (hidden 64, 4 heads of 16 with 2 KV heads,
// intermediate 96, vocab 100), random, for tests that write checkpoints with our safetensors
// writer. qkv_bias adds Qwen2's q/k/v biases; tied leaves out lm_head.weight.
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "qlora/safetensors.h"

namespace qlora::test {

inline NamedTensors tiny_llama_tensors(at::ScalarType dtype = at::kBFloat16, bool qkv_bias = false, bool tied = false) {
  NamedTensors ts;
  auto add = [&](const std::string& n, std::vector<int64_t> shape) { ts.emplace_back(n, (at::randn(shape) * 0.05).to(dtype)); };
  add("model.embed_tokens.weight", {100, 64});
  for (int l = 0; l < 2; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {64});
    add(p + "post_attention_layernorm.weight", {64});
    add(p + "self_attn.q_proj.weight", {64, 64});
    add(p + "self_attn.k_proj.weight", {32, 64});
    add(p + "self_attn.v_proj.weight", {32, 64});
    add(p + "self_attn.o_proj.weight", {64, 64});
    if (qkv_bias) {
      add(p + "self_attn.q_proj.bias", {64});
      add(p + "self_attn.k_proj.bias", {32});
      add(p + "self_attn.v_proj.bias", {32});
    }
    add(p + "mlp.gate_proj.weight", {96, 64});
    add(p + "mlp.up_proj.weight", {96, 64});
    add(p + "mlp.down_proj.weight", {64, 96});
  }
  add("model.norm.weight", {64});
  if (!tied) add("lm_head.weight", {100, 64});
  return ts;
}

}  // namespace qlora::test
