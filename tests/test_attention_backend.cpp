// attention_backend (include/qlora/model.h set_attention_backend): the chosen SDPA kernel goes first
// in libtorch's priority order and auto restores libtorch's own. GPU ([cuda]): for the layer loop's
// calls (causal, grouped-query, bf16, head size 64 and 128, an odd length), the kernel libtorch picks
// is the one asked for where it can take the inputs, and every backend's output and input gradients
// match an fp32 math-kernel oracle.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>

#include "qlora/config.h"
#include "qlora/model.h"
#include "test_cuda_util.h"

#include <catch2/catch_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>

#include <array>
#include <cstdio>
#include <vector>

namespace {

// Restores libtorch's order after a test changed it.
struct BackendReset {
  ~BackendReset() { qlora::set_attention_backend(qlora::AttentionBackend::auto_); }
};

// As ints (Catch2 prints them on failure).
std::vector<int> priority() {
  std::vector<int> out;
  for (const at::SDPBackend b : at::globalContext().sDPPriorityOrder()) out.push_back(static_cast<int>(b));
  return out;
}
std::vector<int> ints(std::initializer_list<at::SDPBackend> order) {
  std::vector<int> out;
  for (const at::SDPBackend b : order) out.push_back(static_cast<int>(b));
  return out;
}

at::Tensor randn(std::vector<int64_t> shape, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randn(shape, gen, at::TensorOptions().dtype(at::kFloat));
}

double max_rel(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor x = a.to(at::kFloat).cpu(), y = b.to(at::kFloat).cpu();
  return (x - y).abs().max().item<double>() / std::max(1e-6, y.abs().max().item<double>());
}

}  // namespace

TEST_CASE("attention_backend: the chosen SDPA kernel goes first; auto is libtorch's order", "[model]") {
  const BackendReset reset;
  using B = at::SDPBackend;
  const std::vector<int> libtorch = ints({B::flash_attention, B::efficient_attention, B::math, B::cudnn_attention,
                                         B::overrideable});
  qlora::set_attention_backend(qlora::AttentionBackend::auto_);
  CHECK(priority() == libtorch);
  qlora::set_attention_backend(qlora::AttentionBackend::cudnn);
  CHECK(priority() == ints({B::cudnn_attention, B::flash_attention, B::efficient_attention, B::math, B::overrideable}));
  qlora::set_attention_backend(qlora::AttentionBackend::math);
  CHECK(priority() == ints({B::math, B::flash_attention, B::efficient_attention, B::cudnn_attention, B::overrideable}));
  qlora::set_attention_backend(qlora::AttentionBackend::efficient);
  CHECK(priority().front() == static_cast<int>(B::efficient_attention));
  qlora::set_attention_backend(qlora::AttentionBackend::flash);
  CHECK(priority() == libtorch);
}

TEST_CASE("attention_backend on CUDA: the kernel asked for runs, and each matches the fp32 oracle", "[model][cuda]") {
  QLORA_REQUIRE_CUDA();
  const BackendReset reset;
  const int64_t D = GENERATE(64, 128);
  const int64_t batch = 2, heads = 8, kv_heads = 2, T = 333;  // Llama-3's 4 query heads per KV head; odd T
  CAPTURE(D);
  // As the layer makes them: [B, T, heads * D] projections viewed as [B, heads, T, D].
  auto projected = [&](int64_t h, uint64_t seed) {
    return randn({batch, T, h * D}, seed).to(at::kBFloat16).cuda().view({batch, T, h, D}).transpose(1, 2);
  };
  const at::Tensor q = projected(heads, 1), k = projected(kv_heads, 2), v = projected(kv_heads, 3);
  const at::Tensor dout = randn({batch, heads, T, D}, 4).to(at::kBFloat16).cuda();
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  auto run = [&](const at::Tensor& q0, const at::Tensor& k0, const at::Tensor& v0) {
    const at::Tensor qi = q0.detach().requires_grad_(true), ki = k0.detach().requires_grad_(true),
                     vi = v0.detach().requires_grad_(true);
    const at::Tensor out = at::scaled_dot_product_attention(qi, ki, vi, std::nullopt, 0.0, true, scale, true);
    out.backward(dout.to(out.scalar_type()));
    return std::array<at::Tensor, 4>{out.detach(), qi.grad(), ki.grad(), vi.grad()};
  };
  // The oracle: the math kernel in fp32 on the same bf16 inputs.
  qlora::set_attention_backend(qlora::AttentionBackend::math);
  const auto ref = run(q.to(at::kFloat), k.to(at::kFloat), v.to(at::kFloat));
  for (const auto backend : {qlora::AttentionBackend::flash, qlora::AttentionBackend::cudnn,
                             qlora::AttentionBackend::efficient}) {
    qlora::set_attention_backend(backend);
    const int64_t chosen = at::_fused_sdp_choice(q, k, v, std::nullopt, 0.0, true, scale, true);
    const int64_t asked = backend == qlora::AttentionBackend::flash   ? static_cast<int64_t>(at::SDPBackend::flash_attention)
                          : backend == qlora::AttentionBackend::cudnn ? static_cast<int64_t>(at::SDPBackend::cudnn_attention)
                                                                      : static_cast<int64_t>(at::SDPBackend::efficient_attention);
    CAPTURE(static_cast<int>(backend), chosen);
    // Flash takes these inputs on every GPU this project targets; where cuDNN or the memory-efficient
    // kernel cannot (an old cuDNN, a GPU without it), the fallback is libtorch's next, never the error.
    if (backend == qlora::AttentionBackend::flash) CHECK(chosen == asked);
    CHECK(chosen != static_cast<int64_t>(at::SDPBackend::error));
    if (chosen != asked) std::printf("attention_backend %d: libtorch chose %lld instead\n", static_cast<int>(backend),
                                     static_cast<long long>(chosen));
    const auto got = run(q, k, v);
    for (size_t i = 0; i < got.size(); ++i) {
      CAPTURE(i);
      CHECK(max_rel(got[i], ref[i]) < 2e-2);  // bf16 outputs and gradients
    }
  }
}
