// mlp_tile_tokens (src/model/tiled_mlp.cpp): the decoder layers' MLP over tiles of rows. Without
// dropout, the tiled layer's output and its gradients (input and every LoRA parameter) equal the
// untiled layer's, for tile sizes that split the rows unevenly, one row at a time, and a tile
// larger than the rows; NF4 and 16-bit bases. With dropout, the tiled backward equals finite
// differences of the tiled forward at a fixed seed (the recompute replays each tile's masks); the
// RNG is left as the forward left it. (test_trainer.cpp: a training run with tiles equals one without.)
#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include "lora_fixture.h"
#include "qlora/lora.h"
#include "qlora/model.h"
#include "test_util.h"

#include <catch2/catch_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>

#include <vector>

using namespace qlora::test::lora_fixture;
using qlora::test::TempDir;

namespace {

// The layer-0 output of h and the gradients of sum(out * w) w.r.t. h and every LoRA parameter.
struct LayerRun {
  at::Tensor out, dh;
  std::vector<at::Tensor> dparams;
};
LayerRun run_layer(const qlora::LlamaWeights& m, qlora::LoraModel& lora, const at::Tensor& h, const at::Tensor& w,
                   int64_t tile) {
  const TileSwitch tiles(tile);
  qlora::DequantScratch scratch;
  for (auto& [name, p] : qlora::named_lora_parameters(lora)) p.mutable_grad() = at::Tensor();
  const at::Tensor hin = h.detach().requires_grad_(true);
  const qlora::AttentionInputs attn = qlora::attention_inputs(m, {}, h.size(0), h.size(1));
  const at::Tensor out = qlora::decoder_layer(hin, m.layers[0], m, attn, scratch, &lora.layers[0], true);
  (out * w).sum().backward();
  LayerRun r{out.detach(), hin.grad(), {}};
  for (auto& [name, p] : qlora::named_lora_parameters(lora))
    if (name.find("layers.0.") != std::string::npos) r.dparams.push_back(p.grad().defined() ? p.grad() : at::zeros_like(p));
  return r;
}

}  // namespace

TEST_CASE("tiled MLP: output and gradients equal the untiled layer (no dropout)", "[model][lora]") {
  const bool in_4bit = GENERATE(true, false);
  const int64_t tile = GENERATE(1, 5, 7, 64);  // rows = 2 x 9 = 18: uneven tiles, single rows, one tile
  CAPTURE(in_4bit, tile);
  TempDir d;
  const qlora::LlamaWeights m = tiny_model(d.path, in_4bit);
  qlora::LoraModel lora = qlora::make_lora(m, all_targets(), 7);
  randomize_b(lora, 99);
  const at::Tensor h = at::randn({2, 9, 64}) * 0.5;
  const at::Tensor w = at::randn({2, 9, 64});
  const LayerRun ref = run_layer(m, lora, h, w, 0);
  const LayerRun got = run_layer(m, lora, h, w, tile);
  CHECK(rel_err(got.out, ref.out) < 1e-6);
  CHECK(rel_err(got.dh, ref.dh) < 1e-5);
  REQUIRE(got.dparams.size() == ref.dparams.size());
  REQUIRE(ref.dparams.size() == 14);  // A and B of seven projections
  for (size_t i = 0; i < ref.dparams.size(); ++i) {
    CAPTURE(i);
    CHECK(rel_err(got.dparams[i], ref.dparams[i]) < 1e-5);
  }
}

TEST_CASE("tiled MLP with dropout: the backward equals finite differences at a fixed seed", "[model][lora]") {
  TempDir d;
  const qlora::LlamaWeights m = tiny_model(d.path, false);  // fp32 (the lowest compute dtype with room for differences)
  qlora::LoraOptions o = all_targets();
  o.dropout = 0.3;
  qlora::LoraModel lora = qlora::make_lora(m, o, 7);
  randomize_b(lora, 99);
  const at::Tensor h = at::randn({2, 9, 64}) * 0.5;
  const at::Tensor w = at::randn({2, 9, 64});
  const int64_t tile = 4;
  const TileSwitch tiles(tile);
  qlora::DequantScratch scratch;
  const qlora::AttentionInputs attn = qlora::attention_inputs(m, {}, 2, 9);
  auto f = [&](const at::Tensor& x) {
    at::manual_seed(2024);  // the same masks in every evaluation
    return qlora::decoder_layer(x, m.layers[0], m, attn, scratch, &lora.layers[0], true);
  };
  const at::Tensor hin = h.clone().requires_grad_(true);
  const at::Tensor out = f(hin);
  const at::Tensor after_forward = at::detail::getDefaultCPUGenerator().get_state();
  (out * w).sum().backward();
  // The backward's replays leave the RNG where the forward left it.
  CHECK(at::equal(at::detail::getDefaultCPUGenerator().get_state(), after_forward));
  const at::Tensor analytic = hin.grad();
  // Dropout on: masks are in play (the output differs from the same layer without dropout).
  {
    qlora::LoraModel plain = qlora::make_lora(m, all_targets(), 7);
    randomize_b(plain, 99);
    at::NoGradGuard ng;
    CHECK(rel_err(qlora::decoder_layer(h, m.layers[0], m, attn, scratch, &plain.layers[0], true), out.detach()) > 1e-3);
  }
  at::NoGradGuard ng;
  const double eps = 1e-2;  // fp32 forward: central differences good to ~3e-3 here
  for (const int64_t flat : {0L, 77L, 300L, 641L, 1151L}) {  // rows in different tiles (64 features a row)
    CAPTURE(flat);
    at::Tensor hp = h.clone(), hm = h.clone();
    hp.view({-1})[flat] += eps;
    hm.view({-1})[flat] -= eps;
    auto objective = [&](const at::Tensor& x) { return (f(x) * w).to(at::kDouble).sum().item<double>(); };
    const double numeric = (objective(hp) - objective(hm)) / (2 * eps);
    const double a = analytic.view({-1})[flat].item<double>();
    CHECK(std::abs(numeric - a) <= 1.5e-2 * std::max(1.0, std::abs(a)));  // wrong masks: off by 1.8-5.5
  }
}
