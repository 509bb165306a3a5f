// The Llama-family forward pass: embedding, the explicit layer loop (RMSNorm, q/k/v projections,
// RoPE, grouped-query causal attention through at::scaled_dot_product_attention, o_proj, residual,
// RMSNorm, SwiGLU MLP, residual), final norm and lm_head -- the computation of transformers'
// LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM with SDPA attention.
//
// Facts from transformers (read, not copied):
//  - LlamaRMSNorm.forward: x.to(float32); variance = x.pow(2).mean(-1, keepdim=True);
//    x = x * torch.rsqrt(variance + eps); return weight * x.to(input_dtype).
//  - LlamaAttention: q/k/v = proj(x).view(B, T, -1, head_dim).transpose(1, 2); RoPE on q and k;
//    scaling = head_dim ** -0.5; o_proj(attn.transpose(1, 2).reshape(B, T, -1)).
//  - integrations/sdpa_attention.py: k/v heads repeated (repeat_kv: expand + reshape, each KV head
//    serving num_heads / num_kv_heads consecutive query heads) unless SDPA's enable_gqa is used,
//    which it is only when there is no attention mask; is_causal when there is no mask.
//  - masking_utils.py: packed rows are found from position ids (find_packed_sequence_indices: a new
//    sequence wherever position_ids[t] != position_ids[t-1] + 1) and the mask is causal AND same
//    sequence; sliding windows AND kv_idx > q_idx - window (sliding_window_overlay).
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "model/internal.h"
#include "qlora/error.h"
#include "qlora/fused_layer.h"
#include "qlora/lora.h"
#include "qlora/model.h"

namespace qlora {

namespace {
bool fused_norm(const at::Tensor& x, const at::Tensor& weight) {
  return use_fused_kernels(x) && weight.scalar_type() == x.scalar_type();
}
}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  if (fused_norm(x, weight)) return rms_norm_fused(x, weight, eps);
  const at::ScalarType dtype = x.scalar_type();
  const at::Tensor h = x.to(at::kFloat);
  const at::Tensor variance = h.pow(2).mean(-1, /*keepdim=*/true);
  return weight * (h * at::rsqrt(variance + eps)).to(dtype);
}

at::Tensor document_ids(const at::Tensor& position_ids) {
  const at::Tensor first = position_ids.narrow(1, 0, 1) - 1;
  const at::Tensor step = at::diff(position_ids, 1, -1, first);
  return (step != 1).to(at::kLong).cumsum(-1);
}

AttentionInputs attention_inputs(const LlamaWeights& model, const at::Tensor& position_ids_in, int64_t batch, int64_t seq) {
  const at::TensorOptions long_opts = at::TensorOptions().dtype(at::kLong).device(model.device);
  at::Tensor position_ids = position_ids_in.defined()
                                ? position_ids_in.to(long_opts)
                                : at::arange(seq, long_opts).unsqueeze(0).expand({batch, seq});
  AttentionInputs a;
  std::tie(a.cos, a.sin) = rope_cos_sin(model.inv_freq, model.attention_scaling, position_ids, model.compute_dtype);

  const at::TensorOptions bool_opts = at::TensorOptions().dtype(at::kBool).device(model.device);
  // [q, kv]: kv_idx <= q_idx; built only when a mask is needed (packed rows, sliding windows).
  auto causal = [&] { return at::ones({seq, seq}, bool_opts).tril(); };
  // One host sync per forward: whether any row holds more than one document. Without packing
  // the mask stays undefined and SDPA runs is_causal (its fastest kernels, with GQA built in).
  if (position_ids_in.defined() && seq > 1) {
    const at::Tensor doc = document_ids(position_ids);
    if (doc.select(1, seq - 1).ne(0).any().item<bool>())
      a.mask = causal().view({1, 1, seq, seq}) & (doc.view({batch, 1, seq, 1}) == doc.view({batch, 1, 1, seq}));
  }
  int64_t window = 0;
  for (const auto& layer : model.layers)
    if (layer.sliding_window > 0) {
      TORCH_CHECK(window == 0 || window == layer.sliding_window, "attention_inputs: layers with different sliding windows (",
                  window, ", ", layer.sliding_window, ") are not supported");
      window = layer.sliding_window;
    }
  if (window > 0 && seq > window) {
    const at::Tensor idx = at::arange(seq, long_opts);
    const at::Tensor in_window = idx.view({1, seq}) > (idx.view({seq, 1}) - window);  // kv_idx > q_idx - window
    const at::Tensor base = a.mask.defined() ? a.mask : causal().view({1, 1, seq, seq}).expand({batch, 1, seq, seq});
    a.sliding_mask = base & in_window.view({1, 1, seq, seq});
    a.sliding_window = window;
  }
  return a;
}

at::Tensor embed(const LlamaWeights& model, const at::Tensor& ids) {
  const at::Tensor& table = model.embed_tokens;
  if (table.device() == model.device) return at::embedding(table, ids.to(model.device));
  if (model.device.is_cuda() && table.is_pinned()) {
    // A device view of the pinned table (unified addressing: the GPU reads host memory over PCIe):
    // the batch's rows are gathered by the embedding kernel on the GPU, with no gather on the host
    // and no host synchronization (3.5 ms of idle GPU a step at Llama-3-8B, batch 2 x 2048). The
    // view holds the table's storage; its device is the model's (pinned memory is portable under
    // unified addressing), not looked up from the pointer.
    const at::Tensor view = at::from_blob(table.data_ptr(), table.sizes(), table.strides(), [keep = table](void*) {},
                                          table.options().device(model.device), model.device);
    return at::embedding(view, ids.to(model.device));
  }
  const at::Tensor host_ids = ids.to(at::kCPU).reshape({-1});
  at::Tensor rows = at::empty({host_ids.size(0), table.size(1)}, table.options().pinned_memory(table.is_pinned()));
  at::index_select_out(rows, table, 0, host_ids);
  std::vector<int64_t> shape = ids.sizes().vec();
  shape.push_back(table.size(1));
  // The host allocator keeps the pinned rows until the copy has read them.
  return rows.view(shape).to(model.device, /*non_blocking=*/true);
}

void set_attention_backend(AttentionBackend backend) {
  // libtorch's default order (ATen/Context.h) with the chosen backend moved to the front.
  std::vector<at::SDPBackend> order = {at::SDPBackend::flash_attention, at::SDPBackend::efficient_attention,
                                       at::SDPBackend::math, at::SDPBackend::cudnn_attention,
                                       at::SDPBackend::overrideable};
  at::SDPBackend first = at::SDPBackend::flash_attention;
  switch (backend) {
    case AttentionBackend::auto_:
    case AttentionBackend::flash: first = at::SDPBackend::flash_attention; break;
    case AttentionBackend::cudnn: first = at::SDPBackend::cudnn_attention; break;
    case AttentionBackend::efficient: first = at::SDPBackend::efficient_attention; break;
    case AttentionBackend::math: first = at::SDPBackend::math; break;
  }
  std::stable_partition(order.begin(), order.end(), [first](at::SDPBackend b) { return b == first; });
  std::vector<int64_t> ints;
  for (at::SDPBackend b : order) ints.push_back(static_cast<int64_t>(b));
  at::globalContext().setSDPPriorityOrder(ints);
}

// SDPA over q [B, H, Tq, D], k/v [B, KV, Tk, D].
at::Tensor grouped_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask) {
  const int64_t heads = q.size(1), kv_heads = k.size(1);
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(-1)));  // head_dim ** -0.5
  if (!mask.defined())
    return at::scaled_dot_product_attention(q, k, v, std::nullopt, 0.0, /*is_causal=*/q.size(2) > 1, scale,
                                            /*enable_gqa=*/heads != kv_heads);
  // With a mask, the fused kernels that take one do not take GQA: repeat the KV heads as
  // transformers' repeat_kv does (query head h reads KV head h / (heads / kv_heads)).
  auto repeat = [&](const at::Tensor& x) {
    if (heads == kv_heads) return x;
    const int64_t B = x.size(0), T = x.size(2), D = x.size(3);
    return x.unsqueeze(2).expand({B, kv_heads, heads / kv_heads, T, D}).reshape({B, heads, T, D});
  };
  return at::scaled_dot_product_attention(q, repeat(k), repeat(v), mask, 0.0, /*is_causal=*/false, scale);
}

at::Tensor project(const at::Tensor& in, const LinearWeight& w, const LoraLayer* lora,
                   std::optional<LoraLinear> LoraLayer::*adapter, DequantScratch& scratch, bool training,
                   bool output_read) {
  if (lora == nullptr) return linear_forward(in, w, scratch);  // exactly linear_forward, bit for bit
  const std::optional<LoraLinear>& a = lora->*adapter;
  return lora_linear_forward(in, w, a ? &*a : nullptr, scratch, training, output_read);
}

namespace {
using AdapterSlot = std::optional<LoraLinear> LoraLayer::*;

// Projections of one input (q/k/v; gate/up), as `project` on each; with adapters, one autograd
// function for the group (lora_linear_group_forward: the input's gradient summed in the GEMMs).
std::vector<at::Tensor> project_group(const at::Tensor& in, const std::vector<std::pair<const LinearWeight*, AdapterSlot>>& members,
                                      const LoraLayer* lora, DequantScratch& scratch, bool training) {
  std::vector<at::Tensor> out;
  if (lora == nullptr) {
    for (const auto& [w, slot] : members) out.push_back(linear_forward(in, *w, scratch));
    return out;
  }
  std::vector<const LinearWeight*> bases;
  std::vector<const LoraLinear*> adapters;
  for (const auto& [w, slot] : members) {
    const std::optional<LoraLinear>& a = lora->*slot;
    bases.push_back(w);
    adapters.push_back(a ? &*a : nullptr);
  }
  return lora_linear_group_forward(in, bases, adapters, scratch, training);
}
}  // namespace

at::Tensor mlp(const at::Tensor& y, const DecoderLayerWeights& layer, DequantScratch& scratch, const LoraLayer* lora,
               bool training, bool output_read) {
  at::Tensor act;
  {  // Without grad, gate and up are freed here, before down_proj runs (with grad, autograd keeps them).
    const std::vector<at::Tensor> gate_up = project_group(
        y, {{&layer.gate_proj, &LoraLayer::gate_proj}, {&layer.up_proj, &LoraLayer::up_proj}}, lora, scratch, training);
    const at::Tensor &gate = gate_up[0], &up = gate_up[1];
    act = use_fused_kernels(gate) ? swiglu_fused(gate, up) : at::silu(gate) * up;
  }
  return project(act, layer.down_proj, lora, &LoraLayer::down_proj, scratch, training, output_read);
}

LayerQKV decoder_layer_qkv(const at::Tensor& h, const DecoderLayerWeights& layer, const LlamaWeights& model,
                           const at::Tensor& cos, const at::Tensor& sin, DequantScratch& scratch, const LoraLayer* lora,
                           bool training) {
  const HFConfig& c = model.config;
  const int64_t B = h.size(0), T = h.size(1), D = c.head_dim;
  LayerQKV r;
  at::Tensor x;
  if (fused_norm(h, layer.input_layernorm)) {
    std::tie(x, r.h) = rms_norm_fused_keep_input(h, layer.input_layernorm, c.rms_norm_eps);
  } else {
    x = rms_norm(h, layer.input_layernorm, c.rms_norm_eps);
    r.h = h;
  }
  const std::vector<at::Tensor> qkv = project_group(
      x, {{&layer.q_proj, &LoraLayer::q_proj}, {&layer.k_proj, &LoraLayer::k_proj}, {&layer.v_proj, &LoraLayer::v_proj}},
      lora, scratch, training);
  r.q = qkv[0].view({B, T, c.num_attention_heads, D}).transpose(1, 2);
  r.k = qkv[1].view({B, T, c.num_key_value_heads, D}).transpose(1, 2);
  r.v = qkv[2].view({B, T, c.num_key_value_heads, D}).transpose(1, 2);
  r.q = apply_rotary(r.q, cos, sin);
  r.k = apply_rotary(r.k, cos, sin);
  return r;
}

namespace {

// o_proj over the attention output (SDPA's [B, heads, T, head_dim]), taken by value and let go of
// once reshaped: without grad nothing else holds it. output_read as project's.
at::Tensor attention_projection(at::Tensor attn_out, const DecoderLayerWeights& layer, const LlamaWeights& model,
                                DequantScratch& scratch, const LoraLayer* lora, bool training, bool output_read) {
  const HFConfig& c = model.config;
  const int64_t B = attn_out.size(0), T = attn_out.size(2);
  const at::Tensor o = attn_out.transpose(1, 2).reshape({B, T, c.num_attention_heads * c.head_dim});
  attn_out = at::Tensor();
  return project(o, layer.o_proj, lora, &LoraLayer::o_proj, scratch, training, output_read);
}

// h + attn_proj and its post-attention norm, in one kernel where the fused kernels run.
AttentionBlockOutput add_and_norm(const at::Tensor& h, const at::Tensor& attn_proj, const DecoderLayerWeights& layer,
                                  const LlamaWeights& model) {
  AttentionBlockOutput r;
  if (fused_norm(h, layer.post_attention_layernorm)) {
    std::tie(r.h_mid, r.normed) = add_rms_norm_fused(h, attn_proj, layer.post_attention_layernorm, model.config.rms_norm_eps);
  } else {
    r.h_mid = h + attn_proj;
    r.normed = rms_norm(r.h_mid, layer.post_attention_layernorm, model.config.rms_norm_eps);
  }
  return r;
}

// The layer's attention output (SDPA's, [B, heads, T, head_dim]) for h, and the h its residual add
// reads (LayerQKV::h).
std::pair<at::Tensor, at::Tensor> layer_attention(const at::Tensor& h, const DecoderLayerWeights& layer,
                                                  const LlamaWeights& model, const AttentionInputs& attn,
                                                  DequantScratch& scratch, const LoraLayer* lora, bool training) {
  const LayerQKV qkv = decoder_layer_qkv(h, layer, model, attn.cos, attn.sin, scratch, lora, training);
  at::Tensor mask = attn.mask;
  if (layer.sliding_window > 0 && attn.sliding_mask.defined()) {
    TORCH_CHECK(layer.sliding_window == attn.sliding_window, "decoder_layer: the layer's sliding window ", layer.sliding_window,
                " differs from the one the attention inputs were built for (", attn.sliding_window, ")");
    mask = attn.sliding_mask;
  }
  return {grouped_attention(qkv.q, qkv.k, qkv.v, mask), qkv.h};
}

// The two terms of decoder_layer_output's last add; output_read as mlp's. attn_out is taken by
// value and let go of, as are the attention block's other intermediates, before the MLP runs:
// without grad nothing else holds them, and the MLP's are the layer's largest.
DecoderLayerTerms decoder_layer_terms(const at::Tensor& h, at::Tensor attn_out, const DecoderLayerWeights& layer,
                                      const LlamaWeights& model, DequantScratch& scratch, const LoraLayer* lora,
                                      bool training, bool output_read) {
  AttentionBlockOutput a;
  {
    const at::Tensor attn_proj = attention_projection(std::move(attn_out), layer, model, scratch, lora, training, true);
    a = add_and_norm(h, attn_proj, layer, model);
  }
  return {a.h_mid, mlp_block(a.normed, layer, scratch, lora, training, output_read)};
}

}  // namespace

at::Tensor mlp_block(const at::Tensor& normed, const DecoderLayerWeights& layer, DequantScratch& scratch,
                     const LoraLayer* lora, bool training, bool output_read) {
  const int64_t tile = mlp_tile_tokens();
  const bool tiled = tile > 0 && normed.numel() / normed.size(-1) > tile;  // with or without grad: one tile at a time
  return tiled ? tiled_mlp(normed, layer, scratch, lora, training, tile, output_read)
               : mlp(normed, layer, scratch, lora, training, output_read);
}

AttentionBlockOutput attention_block(const at::Tensor& h, const DecoderLayerWeights& layer, const LlamaWeights& model,
                                     const AttentionInputs& attn, DequantScratch& scratch, const LoraLayer* lora,
                                     bool training) {
  auto [attn_out, h_res] = layer_attention(h, layer, model, attn, scratch, lora, training);
  const at::Tensor attn_proj = attention_projection(std::move(attn_out), layer, model, scratch, lora, training, true);
  return add_and_norm(h_res, attn_proj, layer, model);
}

DecoderLayerTerms attention_block_for_backward(const at::Tensor& h, const DecoderLayerWeights& layer,
                                               const LlamaWeights& model, const AttentionInputs& attn,
                                               DequantScratch& scratch, const LoraLayer* lora, bool training) {
  auto [attn_out, h_res] = layer_attention(h, layer, model, attn, scratch, lora, training);
  return {h_res, attention_projection(std::move(attn_out), layer, model, scratch, lora, training, /*output_read=*/false)};
}

DecoderLayerTerms mlp_block_for_backward(const at::Tensor& h_mid, const DecoderLayerWeights& layer,
                                         const LlamaWeights& model, DequantScratch& scratch, const LoraLayer* lora,
                                         bool training) {
  // The norm that keeps its input as its second output: with the fused kernels, the residual's
  // gradient then joins the norm's backward in one kernel and one rounding, as add_rms_norm's does
  // in the unsplit layer -- the same bits.
  at::Tensor normed, residual;
  if (fused_norm(h_mid, layer.post_attention_layernorm)) {
    std::tie(normed, residual) = rms_norm_fused_keep_input(h_mid, layer.post_attention_layernorm, model.config.rms_norm_eps);
  } else {
    normed = rms_norm(h_mid, layer.post_attention_layernorm, model.config.rms_norm_eps);
    residual = h_mid;
  }
  return {residual, mlp_block(normed, layer, scratch, lora, training, /*output_read=*/false)};
}

at::Tensor decoder_layer_output(const at::Tensor& h, at::Tensor attn_out, const DecoderLayerWeights& layer,
                                const LlamaWeights& model, DequantScratch& scratch, const LoraLayer* lora, bool training) {
  const DecoderLayerTerms t = decoder_layer_terms(h, std::move(attn_out), layer, model, scratch, lora, training, true);
  return t.residual + t.mlp;
}

at::Tensor decoder_layer(const at::Tensor& h, const DecoderLayerWeights& layer, const LlamaWeights& model,
                         const AttentionInputs& attn, DequantScratch& scratch, const LoraLayer* lora, bool training) {
  auto [attn_out, h_res] = layer_attention(h, layer, model, attn, scratch, lora, training);
  return decoder_layer_output(h_res, std::move(attn_out), layer, model, scratch, lora, training);
}

DecoderLayerTerms decoder_layer_for_backward(const at::Tensor& h, const DecoderLayerWeights& layer,
                                             const LlamaWeights& model, const AttentionInputs& attn,
                                             DequantScratch& scratch, const LoraLayer* lora, bool training) {
  auto [attn_out, h_res] = layer_attention(h, layer, model, attn, scratch, lora, training);
  return decoder_layer_terms(h_res, std::move(attn_out), layer, model, scratch, lora, training, /*output_read=*/false);
}

namespace {

void check_inputs(const LlamaWeights& model, const ForwardInputs& in) {
  const at::Tensor& ids = in.input_ids;
  TORCH_CHECK(ids.defined() && ids.dim() == 2 && ids.scalar_type() == at::kLong,
              "llama forward: input_ids must be int64 [batch, seq], found ",
              ids.defined() ? c10::toString(ids.scalar_type()) : "undefined", ids.defined() ? ids.sizes() : at::IntArrayRef{});
  TORCH_CHECK(ids.size(1) > 0, "llama forward: input_ids has no tokens");
  if (in.position_ids.defined())
    TORCH_CHECK(in.position_ids.sizes() == ids.sizes(), "llama forward: position_ids has shape ", in.position_ids.sizes(),
                ", expected the shape of input_ids ", ids.sizes());
  // Token ids come from data; an id past the vocabulary is a data error, not a crash.
  const auto [lo, hi] = at::aminmax(ids);
  const int64_t mn = lo.item<int64_t>(), mx = hi.item<int64_t>();
  if (mn < 0 || mx >= model.config.vocab_size)
    throw UserError("token id " + std::to_string(mn < 0 ? mn : mx) + " is outside the vocabulary [0, " +
                    std::to_string(model.config.vocab_size) + ")");
}

}  // namespace

at::Tensor llama_hidden_states(const LlamaWeights& model, const ForwardInputs& inputs, DequantScratch& scratch,
                               const LoraModel* lora, bool training) {
  check_inputs(model, inputs);
  if (lora != nullptr && lora->layers.size() != model.layers.size())
    throw UserError("LoRA adapter has " + std::to_string(lora->layers.size()) + " layers, the model has " +
                    std::to_string(model.layers.size()));
  const at::Tensor ids = inputs.input_ids.to(model.device);
  const int64_t batch = ids.size(0), seq = ids.size(1);
  at::Tensor h = embed(model, ids);
  const AttentionInputs attn = attention_inputs(model, inputs.position_ids, batch, seq);
  for (size_t i = 0; i < model.layers.size(); ++i)
    h = decoder_layer(h, model.layers[i], model, attn, scratch, lora ? &lora->layers[i] : nullptr, training);
  return rms_norm(h, model.norm, model.config.rms_norm_eps);
}

at::Tensor llama_logits(const LlamaWeights& model, const ForwardInputs& inputs, DequantScratch& scratch,
                        const LoraModel* lora, bool training) {
  return at::linear(llama_hidden_states(model, inputs, scratch, lora, training), model.lm_head).to(at::kFloat);
}

}  // namespace qlora
