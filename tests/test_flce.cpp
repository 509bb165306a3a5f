// Fused chunked linear + cross-entropy on CPU: loss, dX and dW against the unfused way (X W^T ->
// float -> cross-entropy, through plain autograd) for every option and reduction, odd sizes
// (V=50257, N=1, chunks that do not divide N), ignored labels, bf16, the generic form's three
// losses, gradient accumulation with the global normalizer, frozen W, and the op through the
// dispatcher (Autograd, CPU, Meta).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <catch2/catch_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <cmath>
#include <string>

#include "qlora/flce.h"

#ifdef QLORA_WITH_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

using Catch::Matchers::ContainsSubstring;
using namespace qlora;
using Reduction = FlceOptions::Reduction;

namespace {

struct Result {
  at::Tensor loss, dx, dw;  // dw undefined when W is frozen
};

// The unfused reference: whole N x V logits, the loss written plainly, plain autograd.
Result unfused(const at::Tensor& X, const at::Tensor& W, const at::Tensor& labels, const FlceOptions& o, bool train_w,
               const at::Tensor& grad_out = {}) {
  at::Tensor x = X.detach().clone().requires_grad_(true);
  at::Tensor w = W.detach().clone().requires_grad_(train_w);
  at::Tensor z = at::mm(x, w.t()).to(at::kFloat) * o.logit_scale;
  if (o.softcap > 0) z = at::tanh(z / o.softcap) * o.softcap;
  const at::Tensor lse = at::logsumexp(z, {1});
  const at::Tensor kept = labels.ne(o.ignore_index).to(at::kFloat);
  const at::Tensor rows =
      at::cross_entropy_loss(z, labels, {}, at::Reduction::None, o.ignore_index) + lse * lse * kept * o.z_loss;
  at::Tensor loss;
  switch (o.reduction) {
    case Reduction::none: loss = rows; break;
    case Reduction::sum: loss = rows.sum(); break;
    case Reduction::mean:
      loss = rows.sum() / (o.normalizer > 0 ? o.normalizer : std::max(1.0, kept.sum().item<double>()));
      break;
  }
  if (o.reduction == Reduction::none)
    loss.backward(grad_out);
  else
    loss.backward();
  return {loss.detach(), x.grad(), train_w ? w.grad() : at::Tensor()};
}

Result fused(const at::Tensor& X, const at::Tensor& W, const at::Tensor& labels, const FlceOptions& o, bool train_w,
             const at::Tensor& grad_out = {}) {
  at::Tensor x = X.detach().clone().requires_grad_(true);
  at::Tensor w = W.detach().clone().requires_grad_(train_w);
  at::Tensor loss = fused_linear_cross_entropy(x, w, labels, o);
  if (o.reduction == Reduction::none)
    loss.backward(grad_out);
  else
    loss.backward();
  return {loss.detach(), x.grad(), w.grad()};
}

// max |a - b| / max |b| (b all zero: max |a|).
double rel_err(const at::Tensor& a, const at::Tensor& b) {
  const double num = (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
  const double den = b.to(at::kDouble).abs().max().item<double>();
  return den > 0 ? num / den : num;
}

void check_close(const Result& got, const Result& want, double tol) {
  INFO("loss rel err " << rel_err(got.loss, want.loss));
  CHECK(rel_err(got.loss, want.loss) <= tol);
  INFO("dX rel err " << rel_err(got.dx, want.dx));
  CHECK(got.dx.scalar_type() == want.dx.scalar_type());
  CHECK(rel_err(got.dx, want.dx) <= tol);
  CHECK(got.dw.defined() == want.dw.defined());
  if (want.dw.defined()) {
    INFO("dW rel err " << rel_err(got.dw, want.dw));
    CHECK(got.dw.scalar_type() == want.dw.scalar_type());
    CHECK(rel_err(got.dw, want.dw) <= tol);
  }
}

struct Case {
  at::Tensor X, W, labels;
};

// Random inputs; logits of order 1-10 so that softmax is neither flat nor one-hot. About
// `ignored_frac` of the labels are ignore_index.
Case make_case(int64_t N, int64_t H, int64_t V, at::ScalarType dt, double ignored_frac = 0.25, uint64_t seed = 0) {
  at::manual_seed(seed);
  Case c;
  c.X = at::randn({N, H}).to(dt);
  c.W = (at::randn({V, H}) * (3.0 / std::sqrt(static_cast<double>(H)))).to(dt);
  c.labels = at::randint(0, V, {N}, at::kLong);
  c.labels.masked_fill_(at::rand({N}).lt(ignored_frac), -100);
  return c;
}

const char* name(Reduction r) { return r == Reduction::mean ? "mean" : r == Reduction::sum ? "sum" : "none"; }

}  // namespace

TEST_CASE("flce matches the unfused reference in fp32 for every option and reduction", "[flce]") {
  const Reduction red = GENERATE(Reduction::mean, Reduction::sum, Reduction::none);
  const double softcap = GENERATE(0.0, 3.0);
  const double z_loss = GENERATE(0.0, 1e-2);
  const double scale = GENERATE(1.0, 0.7);
  const bool train_w = GENERATE(false, true);
  const int64_t chunk = GENERATE(0, 1, 8, 37, 100);  // 8 does not divide N = 37; 100 > N
  FlceOptions o;
  o.reduction = red;
  o.softcap = softcap;
  o.z_loss = z_loss;
  o.logit_scale = scale;
  o.chunk_size = chunk;
  INFO(name(red) << " softcap " << softcap << " z_loss " << z_loss << " scale " << scale << " train_w " << train_w
                 << " chunk " << chunk);
  const Case c = make_case(37, 16, 103, at::kFloat);
  const at::Tensor go = red == Reduction::none ? at::rand({37}) : at::Tensor();
  check_close(fused(c.X, c.W, c.labels, o, train_w, go), unfused(c.X, c.W, c.labels, o, train_w, go), 1e-5);
}

TEST_CASE("flce: V = 50257, N = 1, odd chunk sizes, custom ignore_index", "[flce]") {
  SECTION("V = 50257") {
    const Case c = make_case(7, 8, 50257, at::kFloat, 0.3, 1);
    FlceOptions o;
    o.chunk_size = GENERATE(0, 3);
    check_close(fused(c.X, c.W, c.labels, o, true), unfused(c.X, c.W, c.labels, o, true), 1e-5);
  }
  SECTION("N = 1") {
    const Case c = make_case(1, 24, 257, at::kFloat, 0.0, 2);
    FlceOptions o;
    o.reduction = GENERATE(Reduction::mean, Reduction::sum, Reduction::none);
    const at::Tensor go = o.reduction == Reduction::none ? at::full({1}, 0.5) : at::Tensor();
    check_close(fused(c.X, c.W, c.labels, o, true, go), unfused(c.X, c.W, c.labels, o, true, go), 1e-5);
  }
  SECTION("ignore_index 0") {
    Case c = make_case(20, 8, 50, at::kFloat, 0.0, 3);
    FlceOptions o;
    o.ignore_index = 0;
    o.chunk_size = 6;
    c.labels.clamp_min_(1);  // class 0 is the ignored one here
    c.labels.index_put_({at::indexing::Slice(0, 5)}, 0);
    check_close(fused(c.X, c.W, c.labels, o, true), unfused(c.X, c.W, c.labels, o, true), 1e-5);
  }
}

TEST_CASE("flce with every label ignored: loss 0, gradients 0, no NaN", "[flce]") {
  Case c = make_case(9, 8, 31, at::kFloat, 0.0, 4);
  c.labels.fill_(-100);
  FlceOptions o;
  o.reduction = GENERATE(Reduction::mean, Reduction::sum, Reduction::none);
  o.z_loss = GENERATE(0.0, 1e-3);
  o.chunk_size = 4;
  const at::Tensor go = o.reduction == Reduction::none ? at::ones({9}) : at::Tensor();
  const Result r = fused(c.X, c.W, c.labels, o, true, go);
  CHECK(r.loss.abs().max().item<float>() == 0.0f);
  CHECK(r.dx.abs().max().item<float>() == 0.0f);
  CHECK(r.dw.abs().max().item<float>() == 0.0f);
  // The generic form too.
  at::Tensor x = c.X.clone().requires_grad_(true);
  at::Tensor l = chunked_linear_loss(x, c.W, c.labels, cross_entropy_chunk_loss(), 4, 1.0);
  l.backward();
  CHECK(l.item<float>() == 0.0f);
  CHECK(x.grad().abs().max().item<float>() == 0.0f);
}

// Ignored rows are dropped before the GEMMs (src/loss/flce.cpp, ce_pass), so nothing of theirs can
// reach dW: not even a non-finite hidden state (0 * NaN is NaN inside a GEMM that kept the row).
TEST_CASE("flce skips ignored rows: non-finite values there change no loss or gradient", "[flce]") {
  const Reduction red = GENERATE(Reduction::mean, Reduction::sum, Reduction::none);
  const int64_t chunk = GENERATE(0, 3, 7);
  FlceOptions o;
  o.reduction = red;
  o.chunk_size = chunk;
  o.z_loss = 1e-3;
  INFO(name(red) << " chunk " << chunk);
  const Case c = make_case(23, 8, 61, at::kFloat, 0.4, 5);
  const at::Tensor ignored = c.labels.eq(-100);
  REQUIRE(ignored.any().item<bool>());
  REQUIRE(!ignored.all().item<bool>());
  at::Tensor poisoned = c.X.clone();
  poisoned.index_put_({ignored}, NAN);
  poisoned.index_put_({ignored.nonzero().select(1, 0)[0]}, INFINITY);
  const at::Tensor go = red == Reduction::none ? at::rand({23}) : at::Tensor();
  const Result got = fused(poisoned, c.W, c.labels, o, true, go);
  check_close(got, unfused(c.X, c.W, c.labels, o, true, go), 1e-5);
  CHECK(got.dx.index({ignored}).abs().max().item<float>() == 0.0f);
  CHECK(got.dw.isfinite().all().item<bool>());
}

TEST_CASE("flce in bf16 and fp16 matches the unfused reference within 16-bit rounding", "[flce]") {
  // Both sides round the logits GEMM to 16 bits and the logits gradient to 16 bits before the dX
  // GEMM; they differ in where fp32 sums are rounded (dW: ours accumulates chunks in fp32, the
  // reference rounds one GEMM). Stated tolerance: 1e-2 of the largest magnitude (bf16 has 8 bits).
  const at::ScalarType dt = GENERATE(at::kBFloat16, at::kHalf);
  const Case c = make_case(45, 32, 1000, dt, 0.25, 5);
  FlceOptions o;
  o.chunk_size = 16;
  o.softcap = GENERATE(0.0, 5.0);
  const Result got = fused(c.X, c.W, c.labels, o, true), want = unfused(c.X, c.W, c.labels, o, true);
  CHECK(got.loss.scalar_type() == at::kFloat);
  check_close(got, want, 1e-2);
}

TEST_CASE("flce: 4 micro-batches with the global normalizer give the gradients of one 4x batch", "[flce]") {
  const Case big = make_case(64, 16, 97, at::kFloat, 0.3, 6);
  const double count = big.labels.ne(-100).sum().item<double>();
  FlceOptions o;
  o.chunk_size = 5;
  o.z_loss = 1e-3;
  at::Tensor xb = big.X.clone().requires_grad_(true), wb = big.W.clone().requires_grad_(true);
  at::Tensor lb = fused_linear_cross_entropy(xb, wb, big.labels, o);
  lb.backward();

  FlceOptions om = o;
  om.normalizer = count;
  at::Tensor xm = big.X.clone().requires_grad_(true), wm = big.W.clone().requires_grad_(true);
  double total = 0;
  for (int k = 0; k < 4; ++k) {
    const auto rows = at::indexing::Slice(16 * k, 16 * (k + 1));
    at::Tensor l = fused_linear_cross_entropy(xm.index({rows}), wm, big.labels.index({rows}), om);
    l.backward();
    total += l.item<double>();
  }
  CHECK(std::abs(total - lb.item<double>()) <= 1e-5 * std::abs(lb.item<double>()));
  CHECK(rel_err(xm.grad(), xb.grad()) <= 1e-5);
  CHECK(rel_err(wm.grad(), wb.grad()) <= 1e-5);
}

TEST_CASE("flce with W frozen: no gradient for W", "[flce]") {
  const Case c = make_case(12, 8, 40, at::kFloat, 0.2, 7);
  at::Tensor x = c.X.clone().requires_grad_(true);
  at::Tensor w = c.W.clone();  // requires_grad false: the forward allocates no dW at all
  FlceOptions o;
  o.reduction = GENERATE(Reduction::mean, Reduction::none);
  at::Tensor l = fused_linear_cross_entropy(x, w, c.labels, o);
  (o.reduction == Reduction::none ? l.sum() : l).backward();
  CHECK(x.grad().defined());
  CHECK_FALSE(w.grad().defined());
  // Nothing requires grad: a plain forward, no graph.
  const at::Tensor l2 = fused_linear_cross_entropy(c.X, c.W, c.labels, {});
  CHECK_FALSE(l2.requires_grad());
}

TEST_CASE("flce generic form: CE, softcapped CE and z-loss through autograd match the CE path", "[flce]") {
  const Case c = make_case(29, 16, 71, at::kFloat, 0.25, 8);
  const double count = c.labels.ne(-100).sum().item<double>();
  const int which = GENERATE(0, 1, 2);
  const int64_t chunk = GENERATE(0, 4, 7);
  FlceOptions o;
  o.chunk_size = chunk;
  ChunkLoss fn;
  if (which == 0) fn = cross_entropy_chunk_loss();
  if (which == 1) fn = softcap_cross_entropy_chunk_loss(o.softcap = 2.5);
  if (which == 2) fn = z_loss_cross_entropy_chunk_loss(o.z_loss = 1e-2);
  INFO("loss " << which << " chunk " << chunk);
  at::Tensor x = c.X.clone().requires_grad_(true), w = c.W.clone().requires_grad_(true);
  at::Tensor l = chunked_linear_loss(x, w, c.labels, fn, chunk, count);
  l.backward();
  const Result got{l.detach(), x.grad(), w.grad()};
  check_close(got, unfused(c.X, c.W, c.labels, o, true), 1e-5);
  check_close(got, fused(c.X, c.W, c.labels, o, true), 1e-5);
}

TEST_CASE("flce generic form: a loss of one's own, W frozen, and a chunk with no gradient", "[flce]") {
  const Case c = make_case(10, 8, 20, at::kFloat, 0.0, 9);
  // Squared logits of the label column: d/dlogits = 2 z_y at the label, written nowhere by hand.
  const ChunkLoss sq = [](const at::Tensor& z, const at::Tensor& y) { return z.gather(1, y.unsqueeze(1)).pow(2).sum(); };
  at::Tensor x = c.X.clone().requires_grad_(true);
  at::Tensor l = chunked_linear_loss(x, c.W, c.labels, sq, 3, 2.0);
  l.backward();
  at::Tensor xr = c.X.clone().requires_grad_(true);
  at::Tensor lr = at::mm(xr, c.W.t()).gather(1, c.labels.unsqueeze(1)).pow(2).sum() / 2.0;
  lr.backward();
  CHECK(rel_err(l.detach(), lr.detach()) <= 1e-5);
  CHECK(rel_err(x.grad(), xr.grad()) <= 1e-5);
  // A loss that does not depend on the logits: zero gradient, not an error.
  const ChunkLoss constant = [](const at::Tensor& z, const at::Tensor&) { return at::ones({}, z.options()); };
  at::Tensor x2 = c.X.clone().requires_grad_(true);
  at::Tensor l2 = chunked_linear_loss(x2, c.W, c.labels, constant, 4, 1.0);
  l2.backward();
  CHECK(l2.item<float>() == 3.0f);  // three chunks of 4, 4, 2 rows
  CHECK(x2.grad().abs().max().item<float>() == 0.0f);
}

TEST_CASE("cross_entropy_chunk_reference: loss, lse and the scaled gradient in place", "[flce]") {
  at::manual_seed(10);
  const at::Tensor logits = at::randn({6, 33}) * 4;
  at::Tensor labels = at::randint(0, 33, {6}, at::kLong);
  labels[2] = -100;
  FlceOptions o;
  o.logit_scale = 1.3;
  o.softcap = 4.0;
  o.z_loss = 0.05;
  at::Tensor l = logits.clone().requires_grad_(true);
  at::Tensor z = at::tanh(l * o.logit_scale / o.softcap) * o.softcap;
  at::Tensor lse_ref = at::logsumexp(z, {1});
  const at::Tensor kept = labels.ne(-100).to(at::kFloat);
  at::Tensor rows = at::cross_entropy_loss(z, labels, {}, at::Reduction::None, -100) + lse_ref * lse_ref * kept * o.z_loss;
  rows.sum().backward();
  at::Tensor g = logits.clone();
  auto [loss, lse] = cross_entropy_chunk_reference(g, labels, o, 0.5);
  CHECK(rel_err(loss, rows.detach()) <= 1e-6);
  CHECK(rel_err(lse, lse_ref.detach() * kept) <= 1e-6);
  CHECK(lse[2].item<float>() == 0.0f);
  CHECK(rel_err(g, l.grad() * 0.5) <= 1e-6);
  CHECK(g[2].abs().max().item<float>() == 0.0f);
}

TEST_CASE("flce rejects bad inputs with a message naming them", "[flce]") {
  const Case c = make_case(4, 8, 10, at::kFloat, 0.0, 11);
  at::Tensor bad = c.labels.clone();
  bad[1] = 10;
  CHECK_THROWS_WITH(fused_linear_cross_entropy(c.X, c.W, bad, {}), ContainsSubstring("labels[1] = 10"));
  CHECK_THROWS_WITH(fused_linear_cross_entropy(c.X, c.W.t().contiguous(), c.labels, {}),
                    ContainsSubstring("W must be [V,8]"));
  CHECK_THROWS_WITH(fused_linear_cross_entropy(c.X, c.W.to(at::kHalf), c.labels, {}), ContainsSubstring("dtype"));
  FlceOptions o;
  o.reduction = Reduction::sum;
  o.normalizer = 5;
  CHECK_THROWS_WITH(fused_linear_cross_entropy(c.X, c.W, c.labels, o), ContainsSubstring("normalizer"));
  CHECK_THROWS_WITH(flce_reduction_from_string("avg"), ContainsSubstring("\"avg\""));
}

TEST_CASE("qlora::fused_linear_cross_entropy through the dispatcher: Autograd, CPU, Meta", "[flce]") {
  using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, c10::string_view, double,
                         double, double, double, int64_t);
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("qlora::fused_linear_cross_entropy", "").typed<Sig>();
  const Case c = make_case(19, 8, 57, at::kFloat, 0.25, 12);
  FlceOptions o;
  o.softcap = 3;
  o.z_loss = 1e-3;
  o.logit_scale = 0.9;
  const std::string red = GENERATE("mean", "sum", "none");
  o.reduction = flce_reduction_from_string(red);
  const at::Tensor go = o.reduction == Reduction::none ? at::rand({19}) : at::Tensor();

  at::Tensor x = c.X.clone().requires_grad_(true), w = c.W.clone().requires_grad_(true);
  at::Tensor l = op.call(x, w, c.labels, -100, red, 0.0, o.logit_scale, o.softcap, o.z_loss, 5);
  REQUIRE(l.requires_grad());
  if (o.reduction == Reduction::none)
    l.backward(go);
  else
    l.backward();
  check_close({l.detach(), x.grad(), w.grad()}, unfused(c.X, c.W, c.labels, o, true, go), 1e-5);

  // No grad: the CPU kernel, the same loss.
  const at::Tensor l0 = op.call(c.X, c.W, c.labels, -100, red, 0.0, o.logit_scale, o.softcap, o.z_loss, 0);
  CHECK_FALSE(l0.requires_grad());
  CHECK(rel_err(l0, l.detach()) <= 1e-6);

  // Meta: shape and dtype only.
  const at::Tensor m = op.call(at::empty({19, 8}, at::device(at::kMeta).dtype(at::kBFloat16)),
                               at::empty({57, 8}, at::device(at::kMeta).dtype(at::kBFloat16)),
                               at::empty({19}, at::device(at::kMeta).dtype(at::kLong)), -100, red, 0.0, 1.0, 0.0, 0.0, 0);
  CHECK(m.is_meta());
  CHECK(m.scalar_type() == at::kFloat);
  CHECK(m.sizes().vec() == (o.reduction == Reduction::none ? std::vector<int64_t>{19} : std::vector<int64_t>{}));
}

TEST_CASE("flce_chunk_rows: the override, the CPU budget, always in [1, N]", "[flce]") {
  const at::Device cpu(at::kCPU);
  CHECK(flce_chunk_rows(100, 50257, at::kBFloat16, cpu, 7) == 7);
  CHECK(flce_chunk_rows(5, 50257, at::kBFloat16, cpu, 7) == 5);
  CHECK(flce_chunk_rows(0, 50257, at::kFloat, cpu, 0) == 1);
  const int64_t r = flce_chunk_rows(1 << 20, 128256, at::kBFloat16, cpu, 0);
  CHECK(r >= 1);
  CHECK(r * 128256 * (2 + 8) <= (int64_t{256} << 20));
  CHECK(flce_chunk_rows(3, 10, at::kFloat, cpu, 0) == 3);
  // Automatic chunks are equal: the budget's row count, spread evenly over the chunks it needs.
  const int64_t cap = flce_chunk_rows(1 << 20, 50257, at::kFloat, cpu, 0);
  const int64_t n = cap + cap / 3;  // two chunks at the budget: cap + cap/3 -> two of about 2/3 cap
  const int64_t even = flce_chunk_rows(n, 50257, at::kFloat, cpu, 0);
  CHECK(even == (n + 1) / 2);
  CHECK(flce_chunk_rows(2 * cap, 50257, at::kFloat, cpu, 0) == cap);
}

// ---- CUDA (skipped without a GPU): the CUDA path (kernels/cross_entropy.cuh in place on the
// GEMM output, cuBLAS fp32-accumulated dW) against the CPU path on the same inputs ---------------

#ifdef QLORA_WITH_CUDA
#define FLCE_REQUIRE_CUDA() \
  if (!at::hasCUDA()) SKIP("no CUDA device")
#else
#define FLCE_REQUIRE_CUDA() SKIP("CPU-only build (QLORA_WITH_CUDA is off)")
#endif

TEST_CASE("flce on CUDA matches the CPU path: every reduction and option, fp32 and bf16", "[cuda][flce]") {
  FLCE_REQUIRE_CUDA();
  const at::ScalarType dt = GENERATE(at::kFloat, at::kBFloat16);
  const Reduction red = GENERATE(Reduction::mean, Reduction::sum, Reduction::none);
  const double softcap = GENERATE(0.0, 3.0);
  const int64_t V = GENERATE(103, 50257);
  FlceOptions o;
  o.reduction = red;
  o.softcap = softcap;
  o.z_loss = 1e-3;
  o.logit_scale = 0.8;
  o.chunk_size = GENERATE(0, 5);
  INFO(c10::toString(dt) << " " << name(red) << " softcap " << softcap << " V " << V << " chunk " << o.chunk_size);
  const Case c = make_case(23, 64, V, dt, 0.25, 13);
  const at::Tensor go = red == Reduction::none ? at::rand({23}) : at::Tensor();
  const Result cpu = fused(c.X, c.W, c.labels, o, true, go);
  const at::Device dev(at::kCUDA);
  const Result gpu = fused(c.X.to(dev), c.W.to(dev), c.labels.to(dev), o, true, go.defined() ? go.to(dev) : go);
  // fp32: the GEMMs' summation order differs; bf16: the gradient is rounded to bf16 by the kernel
  // (from the same bf16 logits) and dW is summed in a different order: 1e-2 of the largest value.
  check_close({gpu.loss.cpu(), gpu.dx.cpu(), gpu.dw.cpu()}, cpu, dt == at::kFloat ? 1e-4 : 1e-2);
}

TEST_CASE("flce on CUDA: every label ignored, W frozen, the op through the dispatcher", "[cuda][flce]") {
  FLCE_REQUIRE_CUDA();
  const at::Device dev(at::kCUDA);
  Case c = make_case(17, 32, 1000, at::kBFloat16, 0.0, 14);
  at::Tensor x = c.X.to(dev).requires_grad_(true), w = c.W.to(dev);
  at::Tensor none = at::full({17}, -100, at::device(dev).dtype(at::kLong));
  at::Tensor l = fused_linear_cross_entropy(x, w, none, {});
  l.backward();
  CHECK(l.item<float>() == 0.0f);
  CHECK(x.grad().abs().max().item<float>() == 0.0f);
  CHECK_FALSE(w.grad().defined());

  using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, c10::string_view, double,
                         double, double, double, int64_t);
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("qlora::fused_linear_cross_entropy", "").typed<Sig>();
  at::Tensor x2 = c.X.to(dev).requires_grad_(true);
  at::Tensor l2 = op.call(x2, c.W.to(dev), c.labels.to(dev), -100, "mean", 0.0, 1.0, 0.0, 0.0, 0);
  l2.backward();
  const Result cpu = fused(c.X, c.W, c.labels, {}, false);
  CHECK(rel_err(l2.detach().cpu(), cpu.loss) <= 1e-2);
  CHECK(rel_err(x2.grad().cpu(), cpu.dx) <= 1e-2);
  const at::Tensor l3 = op.call(c.X.to(dev), c.W.to(dev), c.labels.to(dev), -100, "none", 0.0, 1.0, 0.0, 0.0, 0);
  CHECK(l3.is_cuda());
  CHECK(l3.sizes().vec() == std::vector<int64_t>{17});
}

TEST_CASE("flce on CUDA skips ignored rows: non-finite values there change nothing", "[cuda][flce]") {
  FLCE_REQUIRE_CUDA();
  const at::ScalarType dt = GENERATE(at::kFloat, at::kBFloat16);
  const Reduction red = GENERATE(Reduction::mean, Reduction::none);
  FlceOptions o;
  o.reduction = red;
  o.chunk_size = GENERATE(0, 4);
  INFO(c10::toString(dt) << " " << name(red) << " chunk " << o.chunk_size);
  const Case c = make_case(29, 64, 50257, dt, 0.4, 15);
  const at::Tensor ignored = c.labels.eq(-100);
  REQUIRE(ignored.any().item<bool>());
  at::Tensor poisoned = c.X.clone();
  poisoned.index_put_({ignored}, NAN);
  const at::Tensor go = red == Reduction::none ? at::rand({29}) : at::Tensor();
  const Result cpu = fused(c.X, c.W, c.labels, o, true, go);
  const at::Device dev(at::kCUDA);
  const Result gpu = fused(poisoned.to(dev), c.W.to(dev), c.labels.to(dev), o, true, go.defined() ? go.to(dev) : go);
  check_close({gpu.loss.cpu(), gpu.dx.cpu(), gpu.dw.cpu()}, cpu, dt == at::kFloat ? 1e-4 : 1e-2);
  CHECK(gpu.dx.cpu().index({ignored}).abs().max().item<float>() == 0.0f);
}

TEST_CASE("flce on CUDA inside a CUDA graph capture: no read-back, the same loss on replay", "[cuda][flce]") {
  FLCE_REQUIRE_CUDA();
#ifdef QLORA_WITH_CUDA
  const at::Device dev(at::kCUDA);
  const Case c = make_case(31, 64, 1000, at::kBFloat16, 0.3, 16);
  const at::Tensor X = c.X.to(dev), W = c.W.to(dev), labels = c.labels.to(dev);
  FlceOptions o;
  o.chunk_size = 8;
  const float eager = fused_linear_cross_entropy_forward(X, W, labels, o).item<float>();
  // Capture on a side stream after a warm-up there (cuBLAS handles and workspaces exist before).
  const c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool();
  at::Tensor captured;
  at::cuda::CUDAGraph graph;
  {
    const c10::cuda::CUDAStreamGuard guard(side);
    (void)fused_linear_cross_entropy_forward(X, W, labels, o);
    side.synchronize();
    graph.capture_begin();
    captured = fused_linear_cross_entropy_forward(X, W, labels, o);
    graph.capture_end();
  }
  graph.replay();
  c10::cuda::device_synchronize();
  // The captured graph runs every row (the skipping needs a read-back); the loss is the same.
  CHECK(std::abs(captured.item<float>() - eager) <= 1e-5f * std::abs(eager));
#endif
}
