// Llama-family decoder (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM): weights loaded
// from a Hugging Face folder (16-bit, bnb-4bit, single or sharded safetensors) and a forward pass
// that computes what transformers computes. Linear weights are NF4 (dequantized per call into one
// reusable per-device scratch) or 16-bit. Plain structs and free functions; the layer loop is
// explicit so that checkpointing, sharding and LoRA (later issues) can hook in where they happen.
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>  // at::NoGradGuard for inference callers

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "qlora/config.h"
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
  // 0: plain causal attention. W > 0: a token also ignores keys W or more positions back
  // (kv_idx > q_idx - W), as transformers' sliding_window_overlay: Mistral (every layer, when
  // config sliding_window is set), Qwen2 (layers >= max_window_layers when use_sliding_window).
  int64_t sliding_window = 0;
};

struct LoraLayer;  // qlora/lora.h: the LoRA adapters of one layer / of the whole model
struct LoraModel;

struct LlamaWeights {
  HFConfig config;
  at::ScalarType compute_dtype = at::kBFloat16;
  at::Device device = at::kCPU;
  at::Tensor embed_tokens;              // [vocab, hidden]
  std::vector<DecoderLayerWeights> layers;
  at::Tensor norm;                      // [hidden]
  at::Tensor lm_head;                   // [vocab, hidden]; the same tensor as embed_tokens when tied
  at::Tensor inv_freq;                  // fp32 [head_dim / 2] on `device`: rope_params(config)
  double attention_scaling = 1.0;       // rope_params(config).attention_scaling (cos/sin factor)
};

struct ModelLoadOptions {
  bool load_in_4bit = true;             // 16-bit linear weights are quantized to NF4 at load;
                                        // false: bnb-4bit weights are dequantized to 16-bit
  bool double_quant = true;             // for quantization at load
  int64_t blocksize = 64;               // for quantization at load
  at::ScalarType compute_dtype = at::kBFloat16;  // kBFloat16, kHalf or kFloat
  at::Device device = at::kCPU;
};

// Loads config.json and the weights, one tensor at a time, each moved to `device` and converted
// there (16-bit linear weights are cast to the compute dtype, then quantized, as transformers +
// bitsandbytes do with torch_dtype = compute dtype). Unsupported architectures/options (rope types
// other than default/linear/llama3, hidden_act other than silu, partial rotary, 8-bit or fp4
// quantization), missing or misshapen tensors are UserErrors naming the file, the tensor and what
// was expected. Supported beyond the minimum: Llama attention_bias and mlp_bias, Mistral/Qwen2
// sliding windows (exact, see DecoderLayerWeights), a quantized lm_head (dequantized). Unused
// checkpoint tensors are logged as a warning (rotary_emb.inv_freq buffers silently ignored).
//
// `model_dir` may also be a llama.cpp GGUF file (a regular file whose name ends in ".gguf";
// general.architecture "llama"): see load_llama_gguf.
LlamaWeights load_llama(const std::filesystem::path& model_dir, const ModelLoadOptions& options);

// ---- GGUF base models (src/io/gguf_model.cpp) ----
class GgufFile;
// The HF config a llama GGUF's metadata implies (llama.context_length, embedding_length,
// block_count, feed_forward_length, attention.head_count(_kv), attention.key_length,
// attention.layer_norm_rms_epsilon, rope.freq_base, rope.dimension_count (must equal head_dim),
// rope.scaling.type none/linear; vocab_size from llama.vocab_size or the token list; tied
// embeddings when there is no output.weight; attention_bias / mlp_bias when blk.0 has those
// biases; bos/eos/pad from tokenizer.ggml.*). Other architectures and rope scalings are UserErrors.
HFConfig hf_config_from_gguf(const GgufFile& gguf);
// The HF name of a llama GGUF tensor (token_embd.weight -> model.embed_tokens.weight,
// blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight, output.weight -> lm_head.weight,
// ...); "" for names that are not part of a llama decoder (e.g. rope_freqs.weight).
std::string gguf_tensor_name_to_hf(const std::string& gguf_name);
// One tensor by its HF name, dequantized to fp32 on the CPU in HF layout: q_proj / k_proj weights
// and biases have llama.cpp's rotary row permutation (convert_hf_to_gguf.py LlamaModel.permute)
// undone. UserError naming the file when the tensor is absent or of an unreadable type.
at::Tensor gguf_llama_tensor(const GgufFile& gguf, const HFConfig& config, const std::string& hf_name);
// load_llama for a GGUF file: each tensor dequantized to fp32, then exactly the 16-bit path of
// load_llama (cast to the compute dtype on the device, quantized to NF4 when load_in_4bit).
// A rope_freqs.weight tensor (Llama 3.1-style rope scaling, which the metadata does not describe)
// divides the default inverse frequencies, as llama.cpp applies it.
LlamaWeights load_llama_gguf(const std::filesystem::path& path, const ModelLoadOptions& options);

// ---- random models of a named shape (src/model/random_llama.cpp; qlora bench train) ----
// The shapes: llama-3.2-1b, llama-3.2-3b, llama-3-8b, llama-3.1-8b, llama-3-70b, tiny.
std::vector<std::string> model_shape_names();
// The config.json of that shape (llama, llama3 rope); UserError naming the known shapes otherwise.
HFConfig model_shape_config(const std::string& shape);
// A model of `config` with random weights (normal(0, 0.02) matrices, unit norms), made on
// options.device in the compute dtype and quantized as load_llama quantizes (load_in_4bit).
// Deterministic per seed on a given device.
LlamaWeights random_llama(const HFConfig& config, const ModelLoadOptions& options, uint64_t seed);

// Reusable buffer for dequantized NF4 weights: grows to the largest weight seen, then every call
// reuses it (no allocation per call). One per device; not shared between threads.
struct DequantScratch {
  at::Tensor buffer;  // flat, compute dtype
  // Set by the trainer around a checkpointed layer's recompute (gradient_checkpointing_reuse_weights):
  // the LoRA model's NF4 projections dequantize into a tensor of their own, which their autograd
  // function keeps for its backward (and drops there), instead of into `buffer` and again in the
  // backward. One dequant of each of the layer's weights less, for their bytes held until then.
  bool keep_for_backward = false;
};

// y = x W^T (+ b) for x [..., in]; NF4 weights are dequantized into `scratch` first (the buffer
// grows to the largest weight, then is reused). Differentiable with respect to x: the NF4 case is
// an autograd function whose backward dequantizes the weight again (the scratch has been
// overwritten by then), so recomputed layers and LoRA get correct input gradients. The base
// weight and bias never get gradients (frozen).
at::Tensor linear_forward(const at::Tensor& x, const LinearWeight& w, DequantScratch& scratch);

// RoPE inverse frequencies as transformers computes them for rope_type default, linear and
// llama3 (others are UserErrors naming the supported ones), plus the attention scaling factor.
struct RopeParams {
  at::Tensor inv_freq;           // fp32 [head_dim / 2], CPU
  double attention_scaling = 1.0;
};
RopeParams rope_params(const HFConfig& config);

// One forward pass. input_ids: int64 [B, T]. position_ids: int64 [B, T] or undefined (0..T-1 per
// row). Packed rows: a new document starts wherever position_ids resets to 0 -- precisely, as
// transformers' find_packed_sequence_indices: wherever a position is not the previous one + 1 --
// and tokens attend only to earlier tokens of their own document (as transformers does for packed
// sequences with position ids and no attention mask).
struct ForwardInputs {
  at::Tensor input_ids;
  at::Tensor position_ids;
};

// ---- the pieces of the forward pass, for callers that run the layer loop themselves (trainer:
// checkpointing, sharding, LoRA). llama_hidden_states is exactly:
//   h = at::embedding(embed_tokens, ids); a = attention_inputs(model, position_ids, B, T);
//   for (i : layers) h = decoder_layer(h, layers[i], model, a, scratch, lora ? &lora->layers[i] : nullptr,
//                                      training);  h = rms_norm(h, norm, eps)

// transformers' LlamaRMSNorm: variance in fp32, x * rsqrt(var + eps) in fp32, cast back to the
// input dtype, then weight * x.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

// The embeddings of token ids [..] as [.., hidden] on model.device, wherever the table lives: on
// the device, or in pinned host memory (the trainer's embedding_offloading), where the rows are
// gathered on the host and only they travel.
at::Tensor embed(const LlamaWeights& model, const at::Tensor& ids);

// The state of the default random generator of `device` (CPU or CUDA), and setting it back: how
// recomputed forwards (checkpointed layers, MLP tiles) replay the dropout masks of the first one.
at::Tensor rng_state(const at::Device& device);
void set_rng_state(const at::Device& device, const at::Tensor& state);

// Process-wide (config mlp_tile_tokens; default 0, off): with grad on, the decoder layers run
// their MLP over tiles of this many rows (tokens), so that only one tile's intermediates exist at
// once, at the price of the MLP's forward once more in the backward (long sequences) -- except in a
// checkpointed layer without LoRA dropout, where the tiles' recompute replaces the layer's own.
void set_mlp_tile_tokens(int64_t tokens);
int64_t mlp_tile_tokens();

// Process-wide (libtorch's SDPA priority order): the attention kernel tried first on CUDA; one that
// cannot take the inputs (a mask, a head size) falls back to the next in libtorch's order. auto
// restores libtorch's own order (flash, memory-efficient, math, cuDNN).
void set_attention_backend(AttentionBackend backend);

// q * cos + rotate_half(q) * sin for q [B, heads, T, head_dim] and cos/sin [B, T, head_dim];
// rotate_half(x) = cat(-x[..., d/2:], x[..., :d/2]) (the HF/GPT-NeoX half-split convention).
at::Tensor apply_rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

// Everything the attention of every layer needs for one batch, computed once per forward.
struct AttentionInputs {
  at::Tensor cos, sin;      // [B, T, head_dim] in the compute dtype
  at::Tensor mask;          // bool [B, 1, T, T] (true = attend): causal AND same document; undefined
                            // when every row is a single document (then SDPA runs is_causal)
  at::Tensor sliding_mask;  // `mask` AND within the sliding window, for layers with one; undefined
                            // when no layer has a window or T <= the window (then it changes nothing)
  int64_t sliding_window = 0;  // the window sliding_mask was built for
};
// position_ids: int64 [B, T] or undefined (0..T-1 per row).
AttentionInputs attention_inputs(const LlamaWeights& model, const at::Tensor& position_ids, int64_t batch, int64_t seq);

// Per-row document index of each token ([[0,0,1,1,1,2]] for positions [[0,1,0,1,2,0]]), int64 [B, T].
at::Tensor document_ids(const at::Tensor& position_ids);

// One decoder layer: h + attn(norm(h)), then + mlp(norm(.)). h: [B, T, hidden], compute dtype.
// lora: this layer's adapters (qlora/lora.h); each targeted projection runs lora_linear_forward
// (base + scale * B A dropout(x)), the others the plain base. nullptr: exactly the base model.
// training: LoRA dropout on (PEFT's model.train()); nothing else in the layer depends on it.
at::Tensor decoder_layer(const at::Tensor& h, const DecoderLayerWeights& layer, const LlamaWeights& model,
                         const AttentionInputs& attn, DequantScratch& scratch, const LoraLayer* lora = nullptr,
                         bool training = false);

// decoder_layer(h) for a backward only (a checkpointed layer's recompute, with grad on): the two
// terms of its last residual add, never summed, and the MLP's last projection (down_proj) not
// computed, since a backward reads only its input: `mlp` has the MLP output's shape and
// unspecified values. torch::autograd::backward({t.residual, t.mlp}, {dh, dh}) gives exactly the
// gradients of decoder_layer(h).backward(dh), without down_proj's dequant and GEMM and the add.
struct DecoderLayerTerms {
  at::Tensor residual;  // h + o_proj(attention)
  at::Tensor mlp;       // mlp(norm(residual)), for backward only
};
DecoderLayerTerms decoder_layer_for_backward(const at::Tensor& h, const DecoderLayerWeights& layer,
                                             const LlamaWeights& model, const AttentionInputs& attn,
                                             DequantScratch& scratch, const LoraLayer* lora, bool training);

// A decoder layer in two halves, split at h_mid = h + o_proj(attention(norm(h))), the residual
// between the attention block and the MLP: decoder_layer(h) == a.h_mid + mlp_block(a.normed) for
// a = attention_block(h). A recompute that kept h_mid from the forward
// (gradient_checkpointing_split_layers) runs each half on its own, the MLP's first:
//   backward(mlp_block_for_backward(h_mid)'s {residual, mlp}, {dh, dh}) -> d_mid = h_mid's gradient;
//   backward(attention_block_for_backward(h)'s {residual, mlp}, {d_mid, d_mid}) -> h's gradient,
// exactly decoder_layer's gradients, and neither o_proj's nor down_proj's forward GEMM runs (their
// outputs are only backpropagated through; `mlp` holds the projection's term, values unspecified).
struct AttentionBlockOutput {
  at::Tensor h_mid;   // h + o_proj(attention(norm(h)))
  at::Tensor normed;  // post_attention_layernorm(h_mid), the MLP's input
};
AttentionBlockOutput attention_block(const at::Tensor& h, const DecoderLayerWeights& layer, const LlamaWeights& model,
                                     const AttentionInputs& attn, DequantScratch& scratch, const LoraLayer* lora,
                                     bool training);
// The SwiGLU MLP of the normalized h_mid, over tiles of mlp_tile_tokens rows when set; output_read
// = false: down_proj's output not computed (as decoder_layer_for_backward's).
at::Tensor mlp_block(const at::Tensor& normed, const DecoderLayerWeights& layer, DequantScratch& scratch,
                     const LoraLayer* lora, bool training, bool output_read = true);
// For the backward: {h as the residual add reads it, o_proj's term}.
DecoderLayerTerms attention_block_for_backward(const at::Tensor& h, const DecoderLayerWeights& layer,
                                               const LlamaWeights& model, const AttentionInputs& attn,
                                               DequantScratch& scratch, const LoraLayer* lora, bool training);
// For the backward: {h_mid as the residual add reads it, the MLP's term}.
DecoderLayerTerms mlp_block_for_backward(const at::Tensor& h_mid, const DecoderLayerWeights& layer,
                                         const LlamaWeights& model, DequantScratch& scratch, const LoraLayer* lora,
                                         bool training);

// Final-norm hidden states [B, T, hidden] in the compute dtype. lora: adapters for every layer
// (lora->layers.size() == layers.size()), or nullptr for the base model; training: LoRA dropout.
at::Tensor llama_hidden_states(const LlamaWeights& model, const ForwardInputs& inputs, DequantScratch& scratch,
                               const LoraModel* lora = nullptr, bool training = false);
// Logits [B, T, vocab] in fp32 (the lm_head GEMM in the compute dtype, then upcast).
at::Tensor llama_logits(const LlamaWeights& model, const ForwardInputs& inputs, DequantScratch& scratch,
                        const LoraModel* lora = nullptr, bool training = false);

// Parameter and memory accounting for `qlora inspect` and `qlora validate`.
struct ModelFootprint {
  int64_t parameters = 0;             // as in the 16-bit model (embeddings, norms, linears and their
                                      // biases, lm_head if untied); a tied lm_head counts once
  int64_t linear_parameters = 0;      // weights of the seven projections of every layer (no biases)
  int64_t bytes_as_loaded = 0;        // bytes the loaded tensors hold: NF4 linears as packed + absmax
                                      // + absmax2 + code2, everything else at the compute dtype's size
                                      // (2 bytes for bf16/fp16, 4 for fp32); a tied lm_head counts once
  int64_t bytes_16bit = 0;            // parameters * 2
};
ModelFootprint model_footprint(const LlamaWeights& model);

}  // namespace qlora
