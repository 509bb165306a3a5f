// decoder_layer_for_backward (src/model/llama.cpp): a checkpointed layer's recompute without the
// work whose result its backward never reads (down_proj's dequant and GEMM, the last residual
// add). Its two terms, backpropagated with the upstream gradient each, give exactly (bitwise) the
// gradients of decoder_layer: w.r.t. the layer input and every LoRA parameter; NF4 and 16-bit bases,
// with and without LoRA dropout (the RNG reset to one state before each), down_proj with and without
// an adapter, and the tiled MLP. Where down_proj is NF4 or has an adapter, the MLP term is a
// zero-stride expansion: nothing of its size was computed. The same for the layer split at its mid
// residual (attention_block / mlp_block and their _for_backward halves; o_proj's term not computed
// either). (test_trainer.cpp: the trainer's step.)
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/autograd.h>

#include "lora_fixture.h"
#include "qlora/lora.h"
#include "qlora/model.h"
#include "test_util.h"

#include <catch2/catch_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>

#include <string>
#include <vector>

using namespace qlora::test::lora_fixture;
using qlora::test::TempDir;

namespace {

struct Grads {
  at::Tensor dh;
  std::vector<at::Tensor> dparams;  // layer 0's LoRA parameters, in named_lora_parameters order
  at::Tensor mlp_term;              // decoder_layer_for_backward's `mlp` (undefined for decoder_layer)
};

// Layer 0 on h with grad, backward of dh; for_backward: through decoder_layer_for_backward.
Grads layer_grads(const qlora::LlamaWeights& m, qlora::LoraModel& lora, const at::Tensor& h, const at::Tensor& dh,
                  bool for_backward) {
  qlora::DequantScratch scratch;
  for (auto& [name, p] : qlora::named_lora_parameters(lora)) p.mutable_grad() = at::Tensor();
  const at::Tensor hin = h.detach().requires_grad_(true);
  const qlora::AttentionInputs attn = qlora::attention_inputs(m, {}, h.size(0), h.size(1));
  at::manual_seed(5);  // the same dropout masks in both
  Grads g;
  if (for_backward) {
    const qlora::DecoderLayerTerms t = qlora::decoder_layer_for_backward(hin, m.layers[0], m, attn, scratch, &lora.layers[0], true);
    CHECK(t.mlp.sizes() == h.sizes());
    torch::autograd::backward({t.residual, t.mlp}, {dh, dh});
    g.mlp_term = t.mlp;
  } else {
    torch::autograd::backward({qlora::decoder_layer(hin, m.layers[0], m, attn, scratch, &lora.layers[0], true)}, {dh});
  }
  g.dh = hin.grad();
  for (auto& [name, p] : qlora::named_lora_parameters(lora))
    if (name.find("layers.0.") != std::string::npos) g.dparams.push_back(p.grad());
  return g;
}

bool zero_strides(const at::Tensor& t) {
  for (int64_t s : t.strides())
    if (s != 0) return false;
  return true;
}

}  // namespace

TEST_CASE("decoder_layer_for_backward: decoder_layer's gradients bitwise, without down_proj's output", "[model][lora]") {
  const bool in_4bit = GENERATE(true, false);
  const double dropout = GENERATE(0.0, 0.2);
  const bool down_targeted = GENERATE(true, false);
  const int64_t tile = GENERATE(0, 5);  // rows = 2 x 9 = 18: the MLP untiled, or in uneven tiles
  CAPTURE(in_4bit, dropout, down_targeted, tile);
  TempDir d;
  const qlora::LlamaWeights m = tiny_model(d.path, in_4bit);
  qlora::LoraOptions o = all_targets();
  o.dropout = dropout;
  if (!down_targeted) o.target_modules.pop_back();  // the seven names end with down_proj
  REQUIRE(down_targeted == (o.target_modules.back() == "down_proj"));
  qlora::LoraModel lora = qlora::make_lora(m, o, 7);
  randomize_b(lora, 99);
  const TileSwitch tiles(tile);
  const at::Tensor h = at::randn({2, 9, 64}) * 0.5;
  const at::Tensor dh = at::randn({2, 9, 64});
  const Grads ref = layer_grads(m, lora, h, dh, false);
  const Grads got = layer_grads(m, lora, h, dh, true);
  CHECK(at::equal(got.dh, ref.dh));
  REQUIRE(ref.dparams.size() == (down_targeted ? 14u : 12u));
  REQUIRE(got.dparams.size() == ref.dparams.size());
  for (size_t i = 0; i < ref.dparams.size(); ++i) {
    CAPTURE(i);
    REQUIRE(ref.dparams[i].defined());
    CHECK(at::equal(got.dparams[i], ref.dparams[i]));
  }
  // Nothing of the MLP output's size computed, wherever down_proj runs through our autograd
  // functions (a dense base without an adapter is plain at::linear: computed, and correct).
  if (in_4bit || down_targeted || tile > 0) CHECK(zero_strides(got.mlp_term));
}

namespace {

at::Generator cpu_generator() { return at::detail::getDefaultCPUGenerator(); }

// Layer 0 as a checkpointed layer split at h_mid recomputes it: the forward (no grad) keeps h_mid
// and the RNG state before the MLP; the backward runs the MLP half from h_mid first, then the
// attention half from h with h_mid's gradient. `out`: the forward's output.
Grads split_layer_grads(const qlora::LlamaWeights& m, qlora::LoraModel& lora, const at::Tensor& h, const at::Tensor& dh,
                        at::Tensor* out) {
  qlora::DequantScratch scratch;
  for (auto& [name, p] : qlora::named_lora_parameters(lora)) p.mutable_grad() = at::Tensor();
  const qlora::AttentionInputs attn = qlora::attention_inputs(m, {}, h.size(0), h.size(1));
  at::manual_seed(5);
  at::Tensor h_mid, mid_state;
  {
    at::NoGradGuard no_grad;
    const qlora::AttentionBlockOutput a = qlora::attention_block(h, m.layers[0], m, attn, scratch, &lora.layers[0], true);
    h_mid = a.h_mid;
    mid_state = cpu_generator().get_state();
    *out = a.h_mid + qlora::mlp_block(a.normed, m.layers[0], scratch, &lora.layers[0], true);
  }
  cpu_generator().set_state(mid_state);
  const at::Tensor hm = h_mid.detach().requires_grad_(true);
  const qlora::DecoderLayerTerms mlp_half = qlora::mlp_block_for_backward(hm, m.layers[0], m, scratch, &lora.layers[0], true);
  torch::autograd::backward({mlp_half.residual, mlp_half.mlp}, {dh, dh});
  const at::Tensor d_mid = hm.grad();
  at::manual_seed(5);
  const at::Tensor hin = h.detach().requires_grad_(true);
  const qlora::DecoderLayerTerms attn_half =
      qlora::attention_block_for_backward(hin, m.layers[0], m, attn, scratch, &lora.layers[0], true);
  CHECK(attn_half.mlp.sizes() == h.sizes());
  torch::autograd::backward({attn_half.residual, attn_half.mlp}, {d_mid, d_mid});
  Grads g;
  g.dh = hin.grad();
  g.mlp_term = attn_half.mlp;  // o_proj's term: never computed either
  for (auto& [name, p] : qlora::named_lora_parameters(lora))
    if (name.find("layers.0.") != std::string::npos) g.dparams.push_back(p.grad());
  return g;
}

}  // namespace

TEST_CASE("attention_block + mlp_block: decoder_layer's output, and its gradients bitwise from two half recomputes",
          "[model][lora]") {
  const bool in_4bit = GENERATE(true, false);
  const double dropout = GENERATE(0.0, 0.2);
  const int64_t tile = GENERATE(0, 5);
  CAPTURE(in_4bit, dropout, tile);
  TempDir d;
  const qlora::LlamaWeights m = tiny_model(d.path, in_4bit);
  qlora::LoraOptions o = all_targets();
  o.dropout = dropout;
  qlora::LoraModel lora = qlora::make_lora(m, o, 7);
  randomize_b(lora, 99);
  const TileSwitch tiles(tile);
  const at::Tensor h = at::randn({2, 9, 64}) * 0.5;
  const at::Tensor dh = at::randn({2, 9, 64});
  at::Tensor ref_out;
  {
    at::NoGradGuard no_grad;
    qlora::DequantScratch scratch;
    at::manual_seed(5);
    ref_out = qlora::decoder_layer(h, m.layers[0], m, qlora::attention_inputs(m, {}, 2, 9), scratch, &lora.layers[0], true);
  }
  const Grads ref = layer_grads(m, lora, h, dh, false);
  at::Tensor out;
  const Grads got = split_layer_grads(m, lora, h, dh, &out);
  CHECK(at::equal(out, ref_out));
  CHECK(at::equal(got.dh, ref.dh));
  REQUIRE(ref.dparams.size() == 14u);
  REQUIRE(got.dparams.size() == ref.dparams.size());
  for (size_t i = 0; i < ref.dparams.size(); ++i) {
    CAPTURE(i);
    CHECK(at::equal(got.dparams[i], ref.dparams[i]));
  }
  CHECK(zero_strides(got.mlp_term));
}
