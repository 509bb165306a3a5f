// The key/value cache and the incremental forward (generate.h): the decoder layer's own pieces
// (decoder_layer_qkv, grouped_attention, decoder_layer_output from llama.cpp) with the attention
// reading the cached keys/values of earlier positions. RoPE positions continue from the cache
// length, so a prefill of T tokens followed by one-token steps computes what llama_logits computes
// on the whole sequence.
//
// Masks: a one-token step attends to every cached key, so it needs none; with a sliding window the
// keys are narrowed to the window's last W slots instead (kv > q - W). A first prefill (empty
// cache) is plain causal, as the full forward. A prefill after cached positions is the rectangular
// [T, past + T] causal mask (SDPA's is_causal aligns the diagonal top-left, which is wrong there).
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <string>

#include "model/internal.h"
#include "qlora/error.h"
#include "qlora/generate.h"

namespace qlora {

namespace {

at::Tensor new_buffer(const LlamaWeights& model, int64_t batch, int64_t capacity) {
  const HFConfig& c = model.config;
  return at::empty({batch, c.num_key_value_heads, capacity, c.head_dim},
                   at::TensorOptions().dtype(model.compute_dtype).device(model.device));
}

// bool [1, 1, T, past + T]: new token t (position past + t) sees key j when j <= past + t and, with
// a window W > 0, j > past + t - W.
at::Tensor step_mask(int64_t past, int64_t T, int64_t window, const at::Device& device) {
  const at::TensorOptions long_opts = at::TensorOptions().dtype(at::kLong).device(device);
  const at::Tensor q = at::arange(past, past + T, long_opts).view({T, 1});
  const at::Tensor kv = at::arange(past + T, long_opts).view({1, past + T});
  at::Tensor mask = kv <= q;
  if (window > 0) mask = mask & (kv > q - window);
  return mask.view({1, 1, T, past + T});
}

}  // namespace

KVCache make_kv_cache(const LlamaWeights& model, int64_t batch, int64_t capacity, int64_t max_length) {
  if (batch < 1) throw UserError("KV cache: batch must be at least 1, found " + std::to_string(batch));
  KVCache cache;
  cache.batch = batch;
  cache.max_length = max_length > 0 ? max_length : model.config.max_position_embeddings;
  if (capacity > cache.max_length)
    throw UserError("KV cache: " + std::to_string(capacity) + " positions requested, the model allows " +
                    std::to_string(cache.max_length));
  cache.capacity = std::max<int64_t>(capacity, 1);
  for (size_t i = 0; i < model.layers.size(); ++i) {
    cache.k.push_back(new_buffer(model, batch, cache.capacity));
    cache.v.push_back(new_buffer(model, batch, cache.capacity));
  }
  return cache;
}

void reserve_kv_cache(KVCache& cache, int64_t length) {
  if (length <= cache.capacity) return;
  if (length > cache.max_length)
    throw UserError("context of " + std::to_string(length) + " tokens exceeds the model's maximum of " +
                    std::to_string(cache.max_length) + " positions");
  const int64_t capacity = std::min(cache.max_length, std::max(length, 2 * cache.capacity));
  for (auto* buffers : {&cache.k, &cache.v})
    for (at::Tensor& b : *buffers) {
      at::Tensor grown = at::empty({b.size(0), b.size(1), capacity, b.size(3)}, b.options());
      grown.narrow(2, 0, cache.length).copy_(b.narrow(2, 0, cache.length));
      b = grown;
    }
  cache.capacity = capacity;
}

at::Tensor llama_forward_cached(const LlamaWeights& model, const at::Tensor& input_ids, KVCache& cache,
                                DequantScratch& scratch, const LoraModel* lora, bool all_logits) {
  at::NoGradGuard no_grad;
  TORCH_CHECK(input_ids.defined() && input_ids.dim() == 2 && input_ids.scalar_type() == at::kLong && input_ids.size(1) > 0,
              "llama_forward_cached: input_ids must be int64 [batch, seq] with seq > 0");
  TORCH_CHECK(input_ids.size(0) == cache.batch, "llama_forward_cached: input_ids has ", input_ids.size(0),
              " rows, the cache was made for ", cache.batch);
  TORCH_CHECK(cache.k.size() == model.layers.size(), "llama_forward_cached: the cache has ", cache.k.size(),
              " layers, the model ", model.layers.size());
  if (lora != nullptr && lora->layers.size() != model.layers.size())
    throw UserError("LoRA adapter has " + std::to_string(lora->layers.size()) + " layers, the model has " +
                    std::to_string(model.layers.size()));
  {
    // Ids usually come from the host (prompt, sampler): checked there, no device sync.
    const auto [lo, hi] = at::aminmax(input_ids);
    const int64_t mn = lo.item<int64_t>(), mx = hi.item<int64_t>();
    if (mn < 0 || mx >= model.config.vocab_size)
      throw UserError("token id " + std::to_string(mn < 0 ? mn : mx) + " is outside the vocabulary [0, " +
                      std::to_string(model.config.vocab_size) + ")");
  }
  const int64_t B = input_ids.size(0), T = input_ids.size(1), past = cache.length, total = past + T;
  reserve_kv_cache(cache, total);

  const at::Tensor ids = input_ids.to(model.device);
  const at::Tensor positions =
      at::arange(past, total, at::TensorOptions().dtype(at::kLong).device(model.device)).unsqueeze(0).expand({B, T});
  const auto [cos, sin] = rope_cos_sin(model.inv_freq, model.attention_scaling, positions, model.compute_dtype);

  // One mask per window size in use (0: none), built on first need.
  at::Tensor plain_mask, window_mask;
  auto mask_for = [&](int64_t window) -> at::Tensor {
    if (T == 1) return {};                                      // every (windowed) key: no mask
    if (past == 0 && (window == 0 || T <= window)) return {};   // plain causal, as the full forward
    at::Tensor& m = window > 0 ? window_mask : plain_mask;
    if (!m.defined()) m = step_mask(past, T, window, model.device);
    return m;
  };

  at::Tensor h = embed(model, ids);
  for (size_t i = 0; i < model.layers.size(); ++i) {
    const DecoderLayerWeights& layer = model.layers[i];
    const LoraLayer* adapters = lora ? &lora->layers[i] : nullptr;
    const LayerQKV qkv = decoder_layer_qkv(h, layer, model, cos, sin, scratch, adapters, /*training=*/false);
    cache.k[i].narrow(2, past, T).copy_(qkv.k);
    cache.v[i].narrow(2, past, T).copy_(qkv.v);
    const int64_t window = layer.sliding_window;
    const int64_t first = (T == 1 && window > 0) ? std::max<int64_t>(0, total - window) : 0;
    const at::Tensor keys = cache.k[i].narrow(2, first, total - first);
    const at::Tensor values = cache.v[i].narrow(2, first, total - first);
    h = decoder_layer_output(h, grouped_attention(qkv.q, keys, values, mask_for(window)), layer, model, scratch, adapters,
                             /*training=*/false);
  }
  cache.length = total;

  if (!all_logits) h = h.narrow(1, T - 1, 1);
  const at::Tensor logits = at::linear(rms_norm(h, model.norm, model.config.rms_norm_eps), model.lm_head).to(at::kFloat);
  return all_logits ? logits : logits.select(1, 0);
}

}  // namespace qlora
