// The SwiGLU MLP over tiles of rows (mlp_tile_tokens): the MLP treats every token on its own, so
// running it on a tile of rows at a time gives the same rows. At long sequences its three
// intermediates (gate, up, silu(gate) * up: rows x intermediate each, 7.5 GB apiece at 262,144
// tokens of Llama-3-8B) are the largest tensors of a layer; tiled, only one tile's exist at once.
// The forward keeps nothing but its input; the backward recomputes each tile with grad on and runs
// that tile's backward (the LoRA gradients accumulate into the parameters' .grad as in any
// backward), so the MLP's forward runs once more -- the price of the memory, paid only when on.
// Dropout: each tile's masks come from the RNG state recorded before that tile in the forward.
// Also here: rng_state / set_rng_state (model.h), which the trainer's checkpointed layers share.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <atomic>
#include <mutex>
#include <vector>

#include "model/internal.h"
#include "qlora/lora.h"
#include "qlora/model.h"

namespace qlora {

namespace {

std::atomic<int64_t> g_mlp_tile_tokens{0};

bool draws_dropout(const LoraLayer* lora, bool training) {
  if (lora == nullptr || !training) return false;
  for (const auto* a : {&lora->gate_proj, &lora->up_proj, &lora->down_proj})
    if (*a && (*a)->dropout > 0.0) return true;
  return false;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Every pointer argument must outlive the backward (the trainer's model, scratch and adapters do;
// the LoRA linear keeps its scratch the same way).
struct TiledMlpFunction : public torch::autograd::Function<TiledMlpFunction> {
  // y [..., hidden]; returns mlp(y), y's shape. output_read = false: the tiles run only to record
  // each one's RNG state when the MLP draws dropout masks (their outputs are not kept), else not at all.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& y, const DecoderLayerWeights* layer,
                            DequantScratch* scratch, const LoraLayer* lora, bool training, int64_t tile,
                            bool output_read) {
    const int64_t H = y.size(-1);
    const at::Tensor rows = y.reshape({-1, H});
    const int64_t n = rows.size(0);
    const bool rng = draws_dropout(lora, training);
    at::Tensor out = output_read ? at::empty_like(rows) : at::zeros({}, y.options()).expand(y.sizes());
    std::vector<at::Tensor> states;
    for (int64_t s = 0; (output_read || rng) && s < n; s += tile) {
      const int64_t len = std::min(tile, n - s);
      if (rng) states.push_back(rng_state(y.device()));
      const at::Tensor o = mlp(rows.narrow(0, s, len), *layer, *scratch, lora, training);
      if (output_read) out.narrow(0, s, len).copy_(o);
    }
    ctx->save_for_backward({y});
    auto& d = ctx->saved_data;
    d["layer"] = static_cast<int64_t>(reinterpret_cast<intptr_t>(layer));
    d["scratch"] = static_cast<int64_t>(reinterpret_cast<intptr_t>(scratch));
    d["lora"] = static_cast<int64_t>(reinterpret_cast<intptr_t>(lora));
    d["training"] = training;
    d["tile"] = tile;
    d["states"] = states;
    return output_read ? out.view(y.sizes()) : out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor y = ctx->get_saved_variables()[0];
    auto& d = ctx->saved_data;
    auto ptr = [&d](const char* key) { return reinterpret_cast<void*>(static_cast<intptr_t>(d[key].toInt())); };
    const auto& layer = *static_cast<const DecoderLayerWeights*>(ptr("layer"));
    auto& scratch = *static_cast<DequantScratch*>(ptr("scratch"));
    const auto* lora = static_cast<const LoraLayer*>(ptr("lora"));
    const bool training = d["training"].toBool();
    const int64_t tile = d["tile"].toInt();
    const std::vector<at::Tensor> states = d["states"].toTensorVector();
    const int64_t H = y.size(-1);
    const at::Tensor rows = y.reshape({-1, H}).detach();
    const at::Tensor g = grad_outputs[0].reshape({-1, H});
    const int64_t n = rows.size(0);
    at::Tensor dy = at::empty_like(rows);
    // The tiles' masks are replayed; the RNG is left as it was found.
    const at::Tensor state_before = states.empty() ? at::Tensor() : rng_state(y.device());
    at::AutoGradMode grad_on(true);
    for (int64_t s = 0, t = 0; s < n; s += tile, ++t) {
      const int64_t len = std::min(tile, n - s);
      if (!states.empty()) set_rng_state(y.device(), states[static_cast<size_t>(t)]);
      const at::Tensor in = rows.narrow(0, s, len).detach().requires_grad_(true);
      const at::Tensor o = mlp(in, layer, scratch, lora, training, /*output_read=*/false);
      torch::autograd::backward({o}, {g.narrow(0, s, len)});
      dy.narrow(0, s, len).copy_(in.grad());
    }
    if (state_before.defined()) set_rng_state(y.device(), state_before);
    return {dy.view(y.sizes()), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

namespace {
at::Generator generator_of(const at::Device& device) {
  return device.is_cuda() ? at::globalContext().defaultGenerator(device) : at::detail::getDefaultCPUGenerator();
}
}  // namespace

at::Tensor rng_state(const at::Device& device) {
  at::Generator gen = generator_of(device);
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set_rng_state(const at::Device& device, const at::Tensor& state) {
  at::Generator gen = generator_of(device);
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

void set_mlp_tile_tokens(int64_t tokens) { g_mlp_tile_tokens = tokens < 0 ? 0 : tokens; }
int64_t mlp_tile_tokens() { return g_mlp_tile_tokens; }

at::Tensor tiled_mlp(const at::Tensor& y, const DecoderLayerWeights& layer, DequantScratch& scratch,
                     const LoraLayer* lora, bool training, int64_t tile_tokens, bool output_read) {
  return TiledMlpFunction::apply(y, &layer, &scratch, lora, training, tile_tokens,
                                 output_read || !at::GradMode::is_enabled());
}

}  // namespace qlora
