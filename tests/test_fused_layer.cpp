// Fused RMSNorm, SwiGLU and RoPE (include/qlora/fused_layer.h). CPU: the references equal the
// model's ATen formulas (rms_norm and apply_rotary with the switch off; silu(g) * u) bit for bit, their backward equals
// autograd through those formulas (fp64 oracle), bad arguments are clear errors. GPU ([cuda]):
// the kernels against the CPU references on odd and even sizes, every dtype, the vector and the
// scalar (misaligned) paths; and a training run with the fused kernels against one without.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/autograd.h>

#include "qlora/fused_layer.h"
#include "qlora/model.h"
#include "test_cuda_util.h"

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <string>
#include <tuple>
#include <utility>
#include <vector>

using Catch::Matchers::ContainsSubstring;

namespace {

at::Tensor randn(std::vector<int64_t> shape, uint64_t seed, double scale = 1.0) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randn(shape, gen, at::TensorOptions().dtype(at::kFloat)) * scale;
}

// RAII: the fused-kernel switch set for one test, restored after.
struct FusedSwitch {
  bool old = qlora::fused_kernels();
  explicit FusedSwitch(bool on) { qlora::set_fused_kernels(on); }
  ~FusedSwitch() { qlora::set_fused_kernels(old); }
};

double max_rel(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor x = a.to(at::kDouble).cpu(), y = b.to(at::kDouble).cpu();
  return ((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item<double>();
}

// Fraction of elements that differ, and the largest difference in units of the dtype's epsilon
// relative to the reference's magnitude (a 16-bit rounding flip is 1 unit).
std::pair<double, double> flips_and_ulps(const at::Tensor& got, const at::Tensor& ref) {
  const at::Tensor g = got.cpu().to(at::kDouble), r = ref.cpu().to(at::kDouble);
  const double eps = ref.scalar_type() == at::kBFloat16 ? 1.0 / 128 : ref.scalar_type() == at::kHalf ? 1.0 / 1024 : 1.2e-7;
  const at::Tensor diff = (g - r).abs();
  const double frac = (diff > 0).to(at::kDouble).mean().item<double>();
  const double ulps = (diff / (r.abs() * eps).clamp_min(1e-30)).max().item<double>();
  return {frac, ulps};
}

}  // namespace

TEST_CASE("fused rms_norm / swiglu: CPU references equal the model's ATen formulas", "[fused_layer]") {
  for (const at::ScalarType dt : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (const int64_t hidden : {int64_t{1}, int64_t{37}, int64_t{64}, int64_t{4100}}) {
      CAPTURE(dt, hidden);
      const at::Tensor x = randn({3, 5, hidden}, 1, 2.0).to(dt), w = (1 + randn({hidden}, 2, 0.1)).to(dt);
      auto [out, rstd] = qlora::rms_norm_fused_forward(x, w, 1e-5, true);
      const FusedSwitch off(false);
      CHECK(at::equal(out, qlora::rms_norm(x, w, 1e-5)));
      CHECK(rstd.sizes() == at::IntArrayRef{15});
      const at::Tensor h = x.to(at::kDouble);
      CHECK(max_rel(rstd, at::rsqrt(h.pow(2).mean(-1) + 1e-5).reshape({15})) < 1e-6);
      const at::Tensor g = randn({3, 5, hidden}, 3, 4.0).to(dt), u = randn({3, 5, hidden}, 4).to(dt);
      CHECK(at::equal(qlora::swiglu_fused_forward(g, u), at::silu(g) * u));
    }
  }
}

TEST_CASE("fused rms_norm / swiglu: backward equals autograd through the formulas (fp64 oracle)", "[fused_layer]") {
  for (const int64_t hidden : {int64_t{1}, int64_t{37}, int64_t{256}}) {
    CAPTURE(hidden);
    const at::Tensor x = randn({4, hidden}, 5, 1.5), w = 1 + randn({hidden}, 6, 0.1), dy = randn({4, hidden}, 7);
    // Oracle: transformers' formula in fp64 through autograd.
    const at::Tensor xd = x.to(at::kDouble).requires_grad_(true);
    const at::Tensor yd = w.to(at::kDouble) * (xd * at::rsqrt(xd.pow(2).mean(-1, true) + 1e-6));
    yd.backward(dy.to(at::kDouble));
    const at::Tensor xf = x.clone().requires_grad_(true);
    const at::Tensor yf = qlora::rms_norm_fused(xf, w, 1e-6);
    yf.backward(dy);
    // Relative to the size of the terms r w dy that the gradient is a difference of (hidden 1:
    // dx = r w dy (1 - n^2) cancels to ~eps / x^2, so its own size is no scale for fp32 error).
    const at::Tensor r = at::rsqrt(x.to(at::kDouble).pow(2).mean(-1, true) + 1e-6);
    const double scale = (r * w.to(at::kDouble) * dy.to(at::kDouble)).abs().max().item<double>();
    CHECK(((xf.grad().to(at::kDouble) - xd.grad()).abs().max().item<double>() / scale) < 1e-6);

    const at::Tensor g = randn({4, hidden}, 8, 4.0), u = randn({4, hidden}, 9);
    const at::Tensor gd = g.to(at::kDouble).requires_grad_(true), ud = u.to(at::kDouble).requires_grad_(true);
    (at::silu(gd) * ud).backward(dy.to(at::kDouble));
    const at::Tensor gf = g.clone().requires_grad_(true), uf = u.clone().requires_grad_(true);
    qlora::swiglu_fused(gf, uf).backward(dy);
    CHECK(max_rel(gf.grad(), gd.grad()) < 1e-5);
    CHECK(max_rel(uf.grad(), ud.grad()) < 1e-5);
  }
  // bf16: the backward pieces equal autograd's own bf16 arithmetic for silu(g) * u exactly.
  const at::Tensor g = randn({3, 40}, 10, 4.0).to(at::kBFloat16), u = randn({3, 40}, 11).to(at::kBFloat16);
  const at::Tensor dy = randn({3, 40}, 12).to(at::kBFloat16);
  const at::Tensor ga = g.clone().requires_grad_(true), ua = u.clone().requires_grad_(true);
  (at::silu(ga) * ua).backward(dy);
  auto [d_gate, d_up] = qlora::swiglu_fused_backward(dy, g, u);
  CHECK(at::equal(d_gate, ga.grad()));
  CHECK(at::equal(d_up, ua.grad()));
}

TEST_CASE("fused rms_norm / swiglu: bad arguments are clear errors", "[fused_layer]") {
  const at::Tensor x = randn({2, 8}, 1);
  CHECK_THROWS_WITH(qlora::rms_norm_fused_forward(x, randn({7}, 2), 1e-6, false), ContainsSubstring("w must be [8]"));
  CHECK_THROWS_WITH(qlora::rms_norm_fused_forward(x, randn({8}, 2).to(at::kBFloat16), 1e-6, false),
                    ContainsSubstring("one type and device"));
  CHECK_THROWS_WITH(qlora::rms_norm_fused_forward(x.to(at::kLong), randn({8}, 2).to(at::kLong), 1e-6, false),
                    ContainsSubstring("float32, float16 or bfloat16"));
  CHECK_THROWS_WITH(qlora::rms_norm_fused_backward(randn({2, 8}, 3), x, randn({8}, 2), randn({3}, 4)),
                    ContainsSubstring("rstd must be fp32 [2]"));
  CHECK_THROWS_WITH(qlora::swiglu_fused_forward(x, randn({2, 9}, 5)), ContainsSubstring("must have one shape"));
  const at::Tensor w = randn({8}, 6).requires_grad_(true);
  CHECK_THROWS_WITH(qlora::rms_norm_fused(x.clone().requires_grad_(true), w, 1e-6), ContainsSubstring("frozen"));
}

TEST_CASE("fused rms_norm / swiglu CUDA kernels equal the CPU references", "[fused_layer][cuda]") {
  QLORA_REQUIRE_CUDA();
  const uint64_t seed = qlora::test::fresh_seed();
  CAPTURE(seed);
  for (const at::ScalarType dt : {at::kFloat, at::kBFloat16, at::kHalf}) {
    // (rows, hidden): odd hidden and a 1-wide row take the scalar path; multiples of 8 the vector one.
    for (const auto& [rows, hidden] : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {3, 37}, {5, 64}, {7, 4096}, {2, 4100}, {300, 2048}}) {
      for (const bool misaligned : {false, true}) {
        CAPTURE(dt, rows, hidden, misaligned);
        // misaligned: x is a view one element into a buffer, so the kernels take the scalar path.
        const int64_t off = misaligned ? 1 : 0;
        const at::Tensor xbuf = randn({rows * hidden + off}, seed, 2.0).to(dt);
        const at::Tensor x = xbuf.narrow(0, off, rows * hidden).view({rows, hidden});
        const at::Tensor w = (1 + randn({hidden}, seed + 1, 0.1)).to(dt);
        auto [ref, ref_rstd] = qlora::rms_norm_fused_forward(x, w, 1e-5, true);
        auto [out, rstd] = qlora::rms_norm_fused_forward(x.cuda(), w.cuda(), 1e-5, true);
        CHECK(max_rel(rstd, ref_rstd) < 1e-6);
        // The row sums are added in another order than ATen's, so a 16-bit rounding may flip.
        const auto [frac, ulps] = flips_and_ulps(out, ref);
        CHECK(frac <= (dt == at::kFloat ? 1.0 : 0.01));
        CHECK(ulps <= (dt == at::kFloat ? 64 : 2.01));
        const at::Tensor dy = randn({rows, hidden}, seed + 2).to(dt);
        const at::Tensor dx_ref = qlora::rms_norm_fused_backward(dy, x, w, ref_rstd);
        const at::Tensor dx = qlora::rms_norm_fused_backward(dy.cuda(), x.cuda(), w.cuda(), ref_rstd.cuda());
        CHECK(max_rel(dx, dx_ref) < (dt == at::kFloat ? 1e-5 : 1e-2));

        const at::Tensor g = (randn({rows * hidden + off}, seed + 3, 4.0).to(dt)).narrow(0, off, rows * hidden);
        const at::Tensor u = randn({rows * hidden}, seed + 4).to(dt);
        const at::Tensor s_ref = qlora::swiglu_fused_forward(g, u), s = qlora::swiglu_fused_forward(g.cuda(), u.cuda());
        const auto [sfrac, sulps] = flips_and_ulps(s, s_ref);  // expf differs from ATen CPU's by an ulp at most
        CHECK(sfrac <= (dt == at::kFloat ? 1.0 : 0.01));
        CHECK(sulps <= (dt == at::kFloat ? 16 : 2.01));
        const at::Tensor d = randn({rows * hidden}, seed + 5).to(dt);
        auto [dg_ref, du_ref] = qlora::swiglu_fused_backward(d, g, u);
        auto [dg, du] = qlora::swiglu_fused_backward(d.cuda(), g.cuda(), u.cuda());
        CHECK(max_rel(dg, dg_ref) < (dt == at::kFloat ? 1e-5 : 1e-2));
        CHECK(max_rel(du, du_ref) < (dt == at::kFloat ? 1e-5 : 1e-2));
      }
    }
  }
}

TEST_CASE("fused kernels in the decoder layer: forward and LoRA-free input gradients match the ATen ops", "[fused_layer][cuda]") {
  QLORA_REQUIRE_CUDA();
  // One decoder step's pieces on CUDA in bf16: RMSNorm, then SwiGLU, then the loss sum; the input
  // gradient with the fused kernels against the ATen ops (same math, different rounding order).
  const at::Tensor x = randn({2, 9, 64}, 21, 1.5).to(at::kBFloat16).cuda();
  const at::Tensor w = (1 + randn({64}, 22, 0.1)).to(at::kBFloat16).cuda();
  const at::Tensor dy = randn({2, 9, 64}, 23).to(at::kBFloat16).cuda();
  auto run = [&](bool fused) {
    const FusedSwitch sw(fused);
    const at::Tensor xi = x.clone().requires_grad_(true);
    const at::Tensor n = qlora::rms_norm(xi, w, 1e-5);
    const at::Tensor y = fused ? qlora::swiglu_fused(n, n * 0.5) : at::silu(n) * (n * 0.5);
    y.backward(dy);
    return std::make_pair(y.detach(), xi.grad());
  };
  const auto [y1, g1] = run(true);
  const auto [y0, g0] = run(false);
  CHECK(max_rel(y1, y0) < 1e-2);
  CHECK(max_rel(g1, g0) < 3e-2);
}

namespace {
// The decoder layer's norm pattern, gradients from three upstream terms: x = norm1(h), s = h + d,
// y = norm2(s); folded: the keep-input norm and add_rms_norm (the residual gradients summed in the
// norms' backward), else rms_norm_fused and separate adds. Returns x, s, y, dh, dd.
std::vector<at::Tensor> norm_pattern(bool folded, const at::Tensor& h0, const at::Tensor& d0, const at::Tensor& w1,
                                     const at::Tensor& w2, const std::vector<at::Tensor>& grads) {
  const at::Tensor h = h0.clone().requires_grad_(true), d = d0.clone().requires_grad_(true);
  at::Tensor x, s, y;
  if (folded) {
    at::Tensor hp;
    std::tie(x, hp) = qlora::rms_norm_fused_keep_input(h, w1, 1e-5);
    std::tie(s, y) = qlora::add_rms_norm_fused(hp, d, w2, 1e-5);
  } else {
    x = qlora::rms_norm_fused(h, w1, 1e-5);
    s = h + d;
    y = qlora::rms_norm_fused(s, w2, 1e-5);
  }
  torch::autograd::backward({x, s, y}, grads);
  return {x.detach(), s.detach(), y.detach(), h.grad(), d.grad()};
}

void check_norm_pattern(const at::Device& dev, at::ScalarType dt, int64_t rows, int64_t hidden, uint64_t seed) {
  CAPTURE(dev, dt, rows, hidden);
  auto t = [&](uint64_t k, double scale) { return randn({rows, hidden}, seed + k, scale).to(dt).to(dev); };
  const at::Tensor w1 = (1 + randn({hidden}, seed + 1, 0.1)).to(dt).to(dev), w2 = (1 + randn({hidden}, seed + 2, 0.1)).to(dt).to(dev);
  const std::vector<at::Tensor> grads = {t(3, 1.0), t(4, 1.0), t(5, 1.0)};
  const std::vector<at::Tensor> a = norm_pattern(true, t(6, 2.0), t(7, 1.0), w1, w2, grads);
  const std::vector<at::Tensor> b = norm_pattern(false, t(6, 2.0), t(7, 1.0), w1, w2, grads);
  for (size_t i = 0; i < a.size(); ++i) {
    CAPTURE(i);
    CHECK(at::equal(a[i], b[i]));
  }
}
}  // namespace

TEST_CASE("fused norms with the residual folded in: bit for bit rms_norm_fused and separate adds (CPU)", "[fused_layer]") {
  for (const at::ScalarType dt : {at::kFloat, at::kBFloat16})
    for (const auto& [rows, hidden] : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {3, 37}, {4, 64}})
      check_norm_pattern(at::Device(at::kCPU), dt, rows, hidden, 40);
  // Bad arguments: one-line errors naming the tensors.
  const at::Tensor h = randn({2, 8}, 1), w = randn({8}, 2);
  CHECK_THROWS_WITH(qlora::add_rms_norm_fused_forward(h, randn({2, 7}, 3), w, 1e-6, false),
                    ContainsSubstring("add_rms_norm: h [2, 8] and delta [2, 7] must have one shape"));
  CHECK_THROWS_WITH(qlora::add_rms_norm_fused_forward(h, randn({2, 8}, 3).to(at::kBFloat16), w, 1e-6, false),
                    ContainsSubstring("one type and device"));
  auto [out, rstd] = qlora::rms_norm_fused_forward(h, w, 1e-6, true);
  CHECK_THROWS_WITH(qlora::rms_norm_fused_backward(randn({2, 8}, 4), h, w, rstd, randn({2, 9}, 5)),
                    ContainsSubstring("residual_grad [2, 9] must have x's shape [2, 8]"));
  CHECK_THROWS_WITH(qlora::add_rms_norm_fused(h.clone().requires_grad_(true), h, w.clone().requires_grad_(true), 1e-6),
                    ContainsSubstring("frozen"));
}

TEST_CASE("fused norms with the residual folded in: CUDA kernels bit for bit rms_norm_fused and separate adds", "[fused_layer][cuda]") {
  QLORA_REQUIRE_CUDA();
  const uint64_t seed = qlora::test::fresh_seed();
  CAPTURE(seed);
  for (const at::ScalarType dt : {at::kFloat, at::kBFloat16, at::kHalf})
    // Odd hidden sizes take the scalar path, multiples of 8 the vector one.
    for (const auto& [rows, hidden] : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {3, 37}, {5, 64}, {7, 4096}, {33, 4100}})
      check_norm_pattern(at::Device(at::kCUDA), dt, rows, hidden, seed);
}

namespace {
// q as the layer makes it: a [B, T, heads * D] projection viewed as [B, heads, T, D] (transposed).
at::Tensor projected(int64_t B, int64_t H, int64_t T, int64_t D, uint64_t seed, at::ScalarType dt) {
  return randn({B, T, H * D}, seed, 2.0).to(dt).view({B, T, H, D}).transpose(1, 2);
}
std::pair<at::Tensor, at::Tensor> cos_sin(int64_t B, int64_t T, int64_t D, uint64_t seed, at::ScalarType dt) {
  const at::Tensor ang = randn({B, T, D}, seed, 3.0);
  return {ang.cos().to(dt), ang.sin().to(dt)};
}
}  // namespace

TEST_CASE("fused rope: the CPU reference equals apply_rotary; its backward equals autograd's", "[fused_layer]") {
  for (const at::ScalarType dt : {at::kFloat, at::kBFloat16}) {
    for (const int64_t D : {int64_t{2}, int64_t{10}, int64_t{64}}) {
      CAPTURE(dt, D);
      const at::Tensor x = projected(2, 3, 5, D, 31, dt);
      const auto [c, s] = cos_sin(2, 5, D, 32, dt);
      const FusedSwitch off(false);
      CHECK(at::equal(qlora::rope_fused_forward(x, c, s), qlora::apply_rotary(x, c, s)));
      const at::Tensor xa = x.detach().clone().requires_grad_(true);
      const at::Tensor dy = randn({2, 3, 5, D}, 33).to(dt);
      qlora::apply_rotary(xa, c, s).backward(dy);
      CHECK(at::equal(qlora::rope_fused_backward(dy, c, s), xa.grad()));
      const at::Tensor xf = x.detach().clone().requires_grad_(true);
      qlora::rope_fused(xf, c, s).backward(dy);
      CHECK(at::equal(xf.grad(), xa.grad()));
    }
  }
  const at::Tensor x = projected(1, 2, 3, 8, 1, at::kFloat);
  const auto [c, s] = cos_sin(1, 3, 8, 2, at::kFloat);
  CHECK_THROWS_WITH(qlora::rope_fused_forward(projected(1, 2, 3, 7, 1, at::kFloat), c, s), ContainsSubstring("even head_dim"));
  CHECK_THROWS_WITH(qlora::rope_fused_forward(x, c.narrow(1, 0, 2), s), ContainsSubstring("cos and sin must be [1, 3, 8]"));
  CHECK_THROWS_WITH(qlora::rope_fused_forward(x, c.to(at::kBFloat16), s), ContainsSubstring("one type and device"));
}

TEST_CASE("fused rope CUDA kernel equals the CPU reference bit for bit, strided and contiguous", "[fused_layer][cuda]") {
  QLORA_REQUIRE_CUDA();
  const uint64_t seed = qlora::test::fresh_seed();
  CAPTURE(seed);
  for (const at::ScalarType dt : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (const int64_t D : {int64_t{2}, int64_t{10}, int64_t{64}, int64_t{96}, int64_t{128}, int64_t{256}}) {
      // 0: the transposed projection; 1: contiguous; 2: rows padded by 2 values and offset by 1
      // (strides and pointer not multiples of the kernel's 4-value vector: the scalar path).
      for (const int layout : {0, 1, 2}) {
        const bool contiguous = layout == 1;
        CAPTURE(dt, D, layout);
        at::Tensor x = projected(2, 5, 33, D, seed, dt);
        if (contiguous) x = x.contiguous();
        at::Tensor xc = x.cuda();  // a dense layout is kept by the copy
        if (layout == 2) {
          const at::Tensor padded = at::zeros({2, 5, 33, D + 2}, xc.options());
          padded.narrow(-1, 1, D).copy_(x);
          xc = padded.narrow(-1, 1, D);
        }
        const auto [c, s] = cos_sin(2, 33, D, seed + 1, dt);
        const at::Tensor dy = randn({2, 5, 33, D}, seed + 2).to(dt);
        const at::Tensor out = qlora::rope_fused_forward(xc, c.cuda(), s.cuda());
        if (layout != 2) CHECK(out.strides() == xc.strides());  // the output keeps x's dense layout
        CHECK(at::equal(out.cpu(), qlora::rope_fused_forward(x, c, s)));
        CHECK(at::equal(qlora::rope_fused_backward(dy.cuda(), c.cuda(), s.cuda()).cpu(), qlora::rope_fused_backward(dy, c, s)));
      }
    }
  }
}
