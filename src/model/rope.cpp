// Rotary position embedding: inverse frequencies for rope_type default, linear and llama3, the
// per-batch cos/sin tables and the rotation itself, computed with the same tensor ops in the same
// order and precision as transformers, so that fp32 results agree with it bit for bit where the
// ops are the same kernels.
//
// Facts from transformers (read, not copied):
//  - src/transformers/modeling_rope_utils.py `_compute_default_rope_parameters`:
//      inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
//    i.e. int64 arange -> fp32, fp32 division by dim, torch.pow(python float, fp32 tensor), then
//    `1.0 / t`, which torch evaluates as t.reciprocal() * 1.0 (Tensor.__rdiv__). Recent versions
//    take dim from config.head_dim (falling back to hidden_size // num_attention_heads).
//  - `_compute_linear_scaling_rope_parameters`: inv_freq /= factor; attention_factor 1.0.
//  - `_compute_llama3_parameters`: wavelen = 2*pi / inv_freq; low-frequency components (wavelen >
//    old_context_len / low_freq_factor) are divided by factor, high-frequency ones (wavelen <
//    old_context_len / high_freq_factor) kept, the ones in between blended with
//    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor),
//    (1 - smooth) * inv / factor + smooth * inv; attention_factor 1.0.
//  - models/llama/modeling_llama.py LlamaRotaryEmbedding.forward: freqs = (inv_freq[None, :, None]
//    expanded to [B, d/2, 1] @ position_ids[:, None, :].float()).transpose(1, 2) in fp32 (autocast
//    off), emb = cat(freqs, freqs), cos/sin = emb.cos()/sin() * attention_scaling, cast to the
//    activations' dtype; apply_rotary_pos_emb: q * cos + rotate_half(q) * sin with cos/sin
//    unsqueezed on the head dim; rotate_half(x) = cat(-x2, x1) for halves x1, x2 of the last dim.
#include <ATen/ATen.h>

#include <cmath>
#include <string>

#include "qlora/error.h"
#include "qlora/fused_layer.h"
#include "qlora/model.h"

namespace qlora {

namespace {

// `1.0 / t` and `c / t` as Python evaluates them on a tensor: t.reciprocal() * c.
at::Tensor scalar_over(double c, const at::Tensor& t) { return t.reciprocal() * c; }

}  // namespace

RopeParams rope_params(const HFConfig& config) {
  const RopeScaling& rs = config.rope_scaling;
  if (rs.rope_type != "default" && rs.rope_type != "linear" && rs.rope_type != "llama3")
    throw UserError("config.json: rope_scaling.rope_type \"" + rs.rope_type +
                    "\" is not supported (supported: default, linear, llama3)");
  if (config.raw.is_object() && config.raw.contains("partial_rotary_factor") &&
      !config.raw["partial_rotary_factor"].is_null()) {
    const auto& p = config.raw["partial_rotary_factor"];
    if (!p.is_number() || p.get<double>() != 1.0)
      throw UserError("config.json: partial_rotary_factor " + p.dump() +
                      " is not supported (only the full head dimension is rotated, 1.0)");
  }
  const int64_t dim = config.head_dim;
  if (dim <= 0 || dim % 2 != 0)
    throw UserError("config.json: head_dim must be a positive even number for RoPE, found " + std::to_string(dim));

  const at::Tensor exponent = at::arange(0, dim, 2, at::kLong).to(at::kFloat) / dim;
  at::Tensor inv_freq = scalar_over(1.0, at::pow(at::Scalar(config.rope_theta), exponent));

  if (rs.rope_type == "linear") {
    inv_freq = inv_freq / rs.factor;
  } else if (rs.rope_type == "llama3") {
    const double factor = rs.factor;
    const double low = rs.low_freq_factor, high = rs.high_freq_factor;
    const double old_context = static_cast<double>(rs.original_max_position_embeddings);
    const double low_freq_wavelen = old_context / low;
    const double high_freq_wavelen = old_context / high;
    const at::Tensor wavelen = scalar_over(2 * M_PI, inv_freq);
    at::Tensor llama = at::where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq);
    const at::Tensor smooth = (scalar_over(old_context, wavelen) - low) / (high - low);
    const at::Tensor smoothed = at::rsub(smooth, 1) * llama / factor + smooth * llama;
    const at::Tensor is_medium = at::logical_not(wavelen < high_freq_wavelen) * at::logical_not(wavelen > low_freq_wavelen);
    llama = at::where(is_medium, smoothed, llama);
    inv_freq = llama;
  }
  RopeParams out;
  out.inv_freq = inv_freq.contiguous();
  out.attention_scaling = 1.0;
  return out;
}

// cos/sin [B, T, head_dim] in `dtype` for int64 position ids [B, T]; inv_freq fp32 on their device.
std::pair<at::Tensor, at::Tensor> rope_cos_sin(const at::Tensor& inv_freq, double attention_scaling,
                                               const at::Tensor& position_ids, at::ScalarType dtype) {
  const int64_t batch = position_ids.size(0);
  const at::Tensor inv = inv_freq.to(at::kFloat).unsqueeze(0).unsqueeze(-1).expand({batch, -1, 1});
  const at::Tensor pos = position_ids.unsqueeze(1).to(at::kFloat);
  const at::Tensor freqs = at::matmul(inv, pos).transpose(1, 2);
  const at::Tensor emb = at::cat({freqs, freqs}, -1);
  at::Tensor cos = emb.cos() * attention_scaling;
  at::Tensor sin = emb.sin() * attention_scaling;
  return {cos.to(dtype), sin.to(dtype)};
}

at::Tensor apply_rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  // The fused kernel on CUDA (same arithmetic) for the layer loop's shapes.
  if (use_fused_kernels(x) && x.dim() == 4 && x.size(-1) % 2 == 0 &&
      cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type() && cos.dim() == 3 &&
      cos.sizes() == sin.sizes() && cos.size(0) == x.size(0) && cos.size(1) == x.size(2) && cos.size(2) == x.size(3))
    return rope_fused(x, cos, sin);
  const int64_t half = x.size(-1) / 2;
  const at::Tensor rotated = at::cat({-x.narrow(-1, half, x.size(-1) - half), x.narrow(-1, 0, half)}, -1);
  return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1);
}

}  // namespace qlora
