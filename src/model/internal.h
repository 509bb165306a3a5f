// Helpers shared by the src/model/*.cpp files (not part of the public model API).
#pragma once
#include <ATen/ATen.h>

#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "qlora/model.h"

namespace torch::autograd {
struct AutogradContext;
}

namespace qlora {

struct NF4Tensor;
struct DequantScratch;
struct LoraLinear;
struct LoraLayer;

// a b (2-D, compute dtype) in `out_dtype`: a LoRA master's gradient, fp32 for fp32 masters. On
// CUDA, bf16 / fp16 inputs with an fp32 result, the GEMM writes fp32 itself (mm with out_dtype: the
// products accumulate in fp32 and are never rounded to bf16; one kernel instead of a GEMM and a
// cast); otherwise mm and a cast (lora.cpp).
at::Tensor mm_as(const at::Tensor& a, const at::Tensor& b, at::ScalarType out_dtype);

// cos/sin [B, T, head_dim] in `dtype` for int64 position ids [B, T] (rope.cpp).
std::pair<at::Tensor, at::Tensor> rope_cos_sin(const at::Tensor& inv_freq, double attention_scaling,
                                               const at::Tensor& position_ids, at::ScalarType dtype);

// llama.cpp: decoder_layer in its pieces, for the KV-cache decoder (kv_cache.cpp), which attends
// over cached keys instead of the batch's own. decoder_layer(h) is exactly
//   qkv = decoder_layer_qkv(h, ..., attn.cos, attn.sin, ...);
//   decoder_layer_output(h, grouped_attention(qkv.q, qkv.k, qkv.v, mask), ...)
struct LayerQKV {
  at::Tensor q;     // [B, heads, T, head_dim], RoPE applied
  at::Tensor k, v;  // [B, kv_heads, T, head_dim], RoPE applied to k
  at::Tensor h;     // the layer input as the residual add must read it: h itself, or the fused
                    // norm's pass-through of h (whose gradient that norm's backward adds in)
};
struct LoraLayer;
LayerQKV decoder_layer_qkv(const at::Tensor& h, const DecoderLayerWeights& layer, const LlamaWeights& model,
                           const at::Tensor& cos, const at::Tensor& sin, DequantScratch& scratch, const LoraLayer* lora,
                           bool training);
// h + o_proj(attn_out), then + mlp(norm(.)); attn_out [B, heads, T, head_dim] (SDPA's output).
// attn_out by value: moved in, it is released before the MLP runs (without grad nothing else holds it).
at::Tensor decoder_layer_output(const at::Tensor& h, at::Tensor attn_out, const DecoderLayerWeights& layer,
                                const LlamaWeights& model, DequantScratch& scratch, const LoraLayer* lora, bool training);
// One projection of a decoder layer (llama.cpp): the base alone without adapters (linear_forward),
// else lora_linear_forward with this layer's adapter for it (or none). output_read: as
// lora_linear_forward's (false: a result for the backward only, maybe not computed).
at::Tensor project(const at::Tensor& in, const LinearWeight& w, const LoraLayer* lora,
                   std::optional<LoraLinear> LoraLayer::*adapter, DequantScratch& scratch, bool training,
                   bool output_read = true);
// The SwiGLU MLP of y (llama.cpp): down(silu(gate(y)) * up(y)). output_read = false: down_proj's
// output is not computed (see decoder_layer_for_backward).
at::Tensor mlp(const at::Tensor& y, const DecoderLayerWeights& layer, DequantScratch& scratch, const LoraLayer* lora,
               bool training, bool output_read = true);
// The same over tiles of `tile_tokens` rows (tiled_mlp.cpp): only one tile's intermediates exist at
// once; the backward recomputes each tile's forward. output_read = false and no dropout: the
// forward computes nothing (the backward recomputes every tile anyway).
at::Tensor tiled_mlp(const at::Tensor& y, const DecoderLayerWeights& layer, DequantScratch& scratch,
                     const LoraLayer* lora, bool training, int64_t tile_tokens, bool output_read = true);

// SDPA over q [B, heads, Tq, D] and k/v [B, kv_heads, Tk, D] (grouped-query: query head h reads KV
// head h / (heads / kv_heads)). mask: bool [B or 1, 1, Tq, Tk] (true = attend); undefined: causal
// when Tq > 1 (Tq == Tk), and every key when Tq == 1.
at::Tensor grouped_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask);

// linear.cpp: a [out, in] view of the scratch holding `t` dequantized to `dtype` (the buffer is
// reallocated only when it is too small or of another dtype/device).
at::Tensor dequantize_into_scratch(const NF4Tensor& t, DequantScratch& scratch, at::ScalarType dtype);

// linear.cpp: an NF4Tensor through an autograd context's saved_data (plain IValues under the
// keys packed, absmax, absmax2, code2, offset, nested, blocksize, nested_blocksize, shape, dtype,
// each followed by the suffix k: one context can hold several weights), so that a backward needs
// neither the LinearWeight nor its owner to be alive.
void save_nf4(torch::autograd::AutogradContext* ctx, const NF4Tensor& t, const std::string& k = "");
NF4Tensor load_nf4(torch::autograd::AutogradContext* ctx, const std::string& k = "");

// lora.cpp: several projections of one input x (a layer's q/k/v, its gate/up), member i with the
// base bases[i] and the adapter loras[i] (or nullptr): the values of lora_linear_forward on each,
// and the same gradients except that x's is summed inside the GEMMs (one rounding per term into
// one buffer) instead of by autograd's adds of the members' separate gradients. Without any
// adapter, or while the tracer routes a member through the registered op, it is lora_linear_forward
// on each member.
std::vector<at::Tensor> lora_linear_group_forward(const at::Tensor& x, const std::vector<const LinearWeight*>& bases,
                                                  const std::vector<const LoraLinear*>& loras, DequantScratch& scratch,
                                                  bool training);

// The decoder's tensors by their HF names, from whatever source (safetensors folder, GGUF file): a
// getter for dense tensors (embeddings, norms, lm_head) and one for projections, each checking the
// shape it is given. assemble_llama asks for every tensor of the config's architecture in one fixed
// order (tied lm_head = embed_tokens) and sets the per-layer sliding windows; the caller sets the
// rope tables (inv_freq, attention_scaling), which depend on the source.
using DenseGetter = std::function<at::Tensor(const std::string& name, std::vector<int64_t> shape)>;
using LinearGetter = std::function<LinearWeight(const std::string& prefix, int64_t out, int64_t in, bool has_bias)>;
LlamaWeights assemble_llama(const HFConfig& config, const ModelLoadOptions& options, const DenseGetter& dense,
                            const LinearGetter& linear, const std::string& source);

}  // namespace qlora
