// Llama-family decoder (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM): weights loaded
// from a Hugging Face folder (16-bit, bnb-4bit, single or sharded safetensors) and a forward pass
// that computes what transformers computes. Linear weights are NF4 (dequantized per call into one
// reusable per-device scratch) or 16-bit. Plain structs and free functions; the layer loop is
// explicit so that checkpointing, sharding and LoRA (later issues) can hook in where they happen.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "qlora/hf_config.h"
#include "qlora/nf4.h"

namespace qlora {

// One linear layer, y = x W^T (+ b). Exactly one of `nf4` / `dense` holds the weight.
struct LinearWeight {
  std::optional<NF4Tensor> nf4;   // NF4 (bitsandbytes layout), shape [out, in]
  at::Tensor dense;               // [out, in] in the compute dtype, when not NF4
  at::Tensor bias;                // [out] in the compute dtype, or undefined
  int64_t out_features = 0;
  int64_t in_features = 0;
};

struct DecoderLayerWeights {
  at::Tensor input_layernorm;           // [hidden]
  at::Tensor post_attention_layernorm;  // [hidden]
  LinearWeight q_proj, k_proj, v_proj, o_proj;
  LinearWeight gate_proj, up_proj, down_proj;
};

struct LlamaWeights {
  HFConfig config;
  at::ScalarType compute_dtype = at::kBFloat16;
  at::Device device = at::kCPU;
  at::Tensor embed_tokens;              // [vocab, hidden]
  std::vector<DecoderLayerWeights> layers;
  at::Tensor norm;                      // [hidden]
  at::Tensor lm_head;                   // [vocab, hidden]; the same tensor as embed_tokens when tied
};

struct ModelLoadOptions {
  bool load_in_4bit = true;             // 16-bit linear weights are quantized to NF4 at load;
                                        // false: bnb-4bit weights are dequantized to 16-bit
  bool double_quant = true;             // for quantization at load
  int64_t blocksize = 64;               // for quantization at load
  at::ScalarType compute_dtype = at::kBFloat16;  // kBFloat16, kHalf or kFloat
  at::Device device = at::kCPU;
};

// Loads config.json and the weights. Unsupported architectures/options, missing or misshapen
// tensors are UserErrors naming the file, the tensor and what was expected.
LlamaWeights load_llama(const std::filesystem::path& model_dir, const ModelLoadOptions& options);

// Reusable buffer for dequantized NF4 weights: grows to the largest weight seen, then every call
// reuses it (no allocation per call). One per device; not shared between threads.
struct DequantScratch {
  at::Tensor buffer;  // flat, compute dtype
};

// y = x W^T (+ b) for x [..., in]; NF4 weights are dequantized into `scratch` first.
at::Tensor linear_forward(const at::Tensor& x, const LinearWeight& w, DequantScratch& scratch);

// RoPE inverse frequencies as transformers computes them for rope_type default, linear and
// llama3 (others are UserErrors naming the supported ones), plus the attention scaling factor.
struct RopeParams {
  at::Tensor inv_freq;           // fp32 [head_dim / 2], CPU
  double attention_scaling = 1.0;
};
RopeParams rope_params(const HFConfig& config);

// One forward pass. input_ids: int64 [B, T]. position_ids: int64 [B, T] or undefined (0..T-1 per
// row). Packed rows: a new document starts wherever position_ids resets to 0, and tokens attend
// only to earlier tokens of their own document (as transformers does for packed sequences with
// position ids).
struct ForwardInputs {
  at::Tensor input_ids;
  at::Tensor position_ids;
};

// Final-norm hidden states [B, T, hidden] in the compute dtype.
at::Tensor llama_hidden_states(const LlamaWeights& model, const ForwardInputs& inputs, DequantScratch& scratch);
// Logits [B, T, vocab] in fp32 (the lm_head GEMM in the compute dtype, then upcast).
at::Tensor llama_logits(const LlamaWeights& model, const ForwardInputs& inputs, DequantScratch& scratch);

// Parameter and memory accounting for `qlora inspect` and `qlora validate`.
struct ModelFootprint {
  int64_t parameters = 0;             // as in the 16-bit model (embeddings, norms, linears, lm_head if untied)
  int64_t linear_parameters = 0;      // the seven projections of every layer
  int64_t bytes_as_loaded = 0;        // NF4 linears (packed + absmax state) + 16-bit rest
  int64_t bytes_16bit = 0;            // everything in 16-bit
};
ModelFootprint model_footprint(const LlamaWeights& model);

}  // namespace qlora
