// GPU tests of the in-place cross-entropy chunk kernel (kernels/cross_entropy.cu): per-row loss,
// logsumexp and the gradient written over the logits, against an fp64 reference computed here
// with plain ATen ops on the CPU (softmax, logsumexp, tanh), for vocab sizes 1, 7, 50257, 128256
// and 256000, fp32 / bf16 / fp16, ignored rows, all rows ignored, softcap, z-loss, logit scale,
// an odd row stride with a misaligned base, and grad_scale 0 (logits left untouched). Skipped
// without a CUDA device or in a CPU-only build. Seeds are fresh per run and printed on failure;
// QLORA_TEST_SEED=<n> replays one.
//
// Tolerances (the reference sees the same rounded logits, so only the kernel's fp32 math and the
// final rounding of the gradient differ):
//   loss, lse: |got - ref| <= 1e-5 * (1 + |lse_ref|)   (the loss is lse - z[label]: a difference
//              of numbers of the size of lse, so its error is relative to lse)
//   gradient:  |got - ref| <= (u + 1e-5) * |ref| + 1e-6 * S + d
//              u = the dtype's unit roundoff for the final round to nearest (fp32 0, bf16 2^-8,
//              fp16 2^-11), S = |grad_scale * logit_scale| * max(1, |1 + 2 z_loss lse|) (the
//              size of the one-hot term), d = 2^-25 for fp16 (half its subnormal spacing), else 0.
// Only ATen headers (not torch/cuda.h): c10's logging header, which that one pulls in, defines a
// glog-style CHECK that clashes with Catch2's.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#ifdef QLORA_WITH_CUDA
#include <c10/cuda/CUDAStream.h>

#include "../kernels/cross_entropy.cuh"

namespace qlora::kernels {
// Weak: qlora_kernels is a static library linked into libqlora_core, which carries
// cross_entropy.cu.o only while something in it calls the launcher (src/loss/flce.cpp does). Should
// that change, this test fails on a GPU (launcher missing) instead of breaking everyone's link.
__attribute__((weak)) cudaError_t cross_entropy_chunk(const CrossEntropyChunkArgs& args, cudaStream_t stream);
__attribute__((weak)) int cross_entropy_resident_ctas(int64_t rows, int64_t vocab, FloatType type, bool gradient,
                                                      int requested);
}  // namespace qlora::kernels
#endif

#include "test_cuda_util.h"

#include <catch2/catch_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>
#include <catch2/generators/catch_generators_range.hpp>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace {

using qlora::test::fresh_seed;

#ifdef QLORA_WITH_CUDA  // the helpers below only serve the GPU tests


struct Options {
  float logit_scale = 1.0f;
  float softcap = 0.0f;
  float z_loss = 0.0f;
  float grad_scale = 0.0f;
  int64_t ignore_index = -100;
};

struct Reference {
  at::Tensor loss;  // [rows] fp64
  at::Tensor lse;   // [rows] fp64 (0 for ignored rows)
  at::Tensor grad;  // [rows, vocab] fp64 (0 rows for ignored rows)
  at::Tensor scale; // [rows] fp64: S of the gradient tolerance
};

// The definition, in fp64 from the (already rounded) logits.
// row_scale (optional, [rows]): per-row gradient weights (CrossEntropyChunkArgs::grad_row_scale).
Reference reference(const at::Tensor& logits, const at::Tensor& labels, const Options& o,
                    const at::Tensor& row_scale = {}) {
  const at::Tensor x = logits.to(at::kDouble);
  const at::Tensor t = o.softcap > 0 ? at::tanh(x * (double{o.logit_scale} / o.softcap)) : at::Tensor();
  const at::Tensor z = o.softcap > 0 ? t * double{o.softcap} : x * double{o.logit_scale};
  const at::Tensor valid = labels != o.ignore_index;
  const at::Tensor safe = at::where(valid, labels, at::zeros_like(labels));
  const at::Tensor validd = valid.to(at::kDouble);
  Reference r;
  const at::Tensor lse = at::logsumexp(z, {1});
  const at::Tensor zy = z.gather(1, safe.unsqueeze(1)).squeeze(1);
  r.loss = (lse - zy + double{o.z_loss} * lse * lse) * validd;
  r.lse = lse * validd;
  const at::Tensor coef = 1.0 + 2.0 * double{o.z_loss} * lse;
  const at::Tensor p = at::softmax(z, 1);
  const at::Tensor onehot = at::zeros_like(z).scatter_(1, safe.unsqueeze(1), 1.0);
  at::Tensor dz = p * coef.unsqueeze(1) - onehot;
  at::Tensor dzdx = o.softcap > 0 ? (1.0 - t * t) * double{o.logit_scale} : at::full_like(z, double{o.logit_scale});
  const at::Tensor w = row_scale.defined() ? row_scale.to(at::kDouble) : at::ones_like(lse);
  r.grad = dz * dzdx * double{o.grad_scale} * (validd * w).unsqueeze(1);
  r.scale = std::abs(double{o.grad_scale} * o.logit_scale) * at::abs(w) * at::clamp_min(at::abs(coef), 1.0);
  return r;
}

qlora::kernels::FloatType float_type(at::ScalarType t) {
  return t == at::kFloat ? qlora::kernels::FloatType::f32
         : t == at::kHalf ? qlora::kernels::FloatType::f16
                          : qlora::kernels::FloatType::bf16;
}

double unit_roundoff(at::ScalarType t) {
  return t == at::kFloat ? 0.0 : t == at::kHalf ? std::ldexp(1.0, -11) : std::ldexp(1.0, -8);
}

at::Tensor as_bits(const at::Tensor& t) {
  return t.element_size() == 4 ? t.view(at::kInt) : t.view(at::kShort);
}

// Number of elements whose bit patterns differ (both on the CPU, same dtype and shape).
int64_t bit_diffs(const at::Tensor& a, const at::Tensor& b) {
  return (as_bits(a.contiguous()) != as_bits(b.contiguous())).sum().item<int64_t>();
}

// Logits of a rough LM-head shape: a Gaussian body with a few large outliers per row, so that the
// max is well separated from the bulk for some rows and not for others.
at::Tensor random_logits(int64_t rows, int64_t vocab, double sigma, at::Generator& gen) {
  at::Tensor x = at::randn({rows, vocab}, gen, at::TensorOptions(at::kDouble)) * sigma;
  const int64_t spikes = std::min<int64_t>(vocab, 3);
  at::Tensor idx = at::randint(vocab, {rows, spikes}, gen, at::TensorOptions(at::kLong));
  x.scatter_add_(1, idx, at::full({rows, spikes}, 2.5 * sigma, at::TensorOptions(at::kDouble)));
  return x;
}

struct Case {
  int64_t rows;
  int64_t vocab;
};
const std::vector<Case> kCases = {{9, 1}, {37, 7}, {5, 50257}, {4, 128256}, {3, 256000}};

struct OptionSet {
  const char* name;
  Options o;
};
const std::vector<OptionSet> kOptionSets = {
    {"plain", {1.0f, 0.0f, 0.0f, 1.0f, -100}},
    {"scale", {0.37f, 0.0f, 0.0f, 1.0f, -100}},
    {"softcap", {1.0f, 30.0f, 0.0f, 1.0f, -100}},
    {"z_loss", {1.0f, 0.0f, 1e-4f, 1.0f, -100}},
    {"all", {1.7f, 20.0f, 3e-3f, 1.0f, -1}},
};

struct Run {
  at::Tensor loss, lse;  // [rows] fp32 (CPU)
  at::Tensor buffer;     // the whole logits buffer after the call (CPU)
  cudaError_t status;
};

// Launches on a copy of `buffer` (moved to the GPU); logits start `offset` elements into it, rows
// `ld` apart.
Run run_kernel(const at::Tensor& buffer, int64_t offset, int64_t rows, int64_t vocab, int64_t ld,
               const at::Tensor& labels, const Options& o, const at::Tensor& row_scale = {}, int cluster_ctas = 0) {
  at::Tensor buf = buffer.to(at::kCUDA);
  const at::Tensor rs = row_scale.defined() ? row_scale.to(at::kFloat).to(at::kCUDA) : at::Tensor();
  const at::Tensor lab = labels.to(at::kCUDA);
  const at::TensorOptions f32 = at::TensorOptions(at::kFloat).device(at::kCUDA);
  at::Tensor loss = at::full({rows}, NAN, f32);
  at::Tensor lse = at::full({rows}, NAN, f32);
  qlora::kernels::CrossEntropyChunkArgs a;
  a.logits = static_cast<char*>(buf.data_ptr()) + offset * buf.element_size();
  a.logits_type = float_type(buffer.scalar_type());
  a.rows = rows;
  a.vocab = vocab;
  a.ld = ld;
  a.labels = lab.data_ptr<int64_t>();
  a.ignore_index = o.ignore_index;
  a.logit_scale = o.logit_scale;
  a.softcap = o.softcap;
  a.z_loss = o.z_loss;
  a.loss = loss.data_ptr<float>();
  a.lse = lse.data_ptr<float>();
  a.grad_scale = o.grad_scale;
  a.grad_row_scale = rs.defined() ? rs.data_ptr<float>() : nullptr;
  a.cluster_ctas = cluster_ctas;
  Run r;
  r.status = qlora::kernels::cross_entropy_chunk(a, c10::cuda::getCurrentCUDAStream().stream());
  r.loss = loss.cpu();
  r.lse = lse.cpu();
  r.buffer = buf.cpu();
  return r;
}
// Every assertion of the reference test on one run: loss and lse, untouched padding, the gradient
// (or untouched logits when none was asked for), exact zeros on ignored rows.
void check_run(const Run& run, const Reference& ref, const at::Tensor& buffer, const at::Tensor& logits,
               const at::Tensor& labels, const Options& o, at::ScalarType dt, int64_t offset, int64_t rows,
               int64_t vocab, int64_t ld) {
  const float grad_scale = o.grad_scale;
  // loss and lse
  const at::Tensor lse_tol = 1e-5 * (1.0 + at::abs(ref.lse));
  const at::Tensor loss_err = at::abs(run.loss.to(at::kDouble) - ref.loss);
  const at::Tensor lse_err = at::abs(run.lse.to(at::kDouble) - ref.lse);
  INFO("max loss error " << loss_err.max().item<double>() << ", max lse error " << lse_err.max().item<double>());
  CHECK(at::isfinite(run.loss).all().item<bool>());
  CHECK((loss_err <= lse_tol).all().item<bool>());
  CHECK((lse_err <= lse_tol).all().item<bool>());

  const at::Tensor got = run.buffer.narrow(0, offset, rows * ld).view({rows, ld}).narrow(1, 0, vocab);
  // Everything outside the logits is untouched.
  CHECK(bit_diffs(run.buffer.narrow(0, 0, offset), buffer.narrow(0, 0, offset)) == 0);
  if (ld > vocab) {
    const auto pad = [&](const at::Tensor& b) {
      return b.narrow(0, offset, rows * ld).view({rows, ld}).narrow(1, vocab, ld - vocab);
    };
    CHECK(bit_diffs(pad(run.buffer), pad(buffer)) == 0);
  }
  if (grad_scale == 0.0f) {
    CHECK(bit_diffs(got, logits) == 0);  // no gradient asked for: logits untouched
  } else {
    const double u = unit_roundoff(dt);
    const double d = dt == at::kHalf ? std::ldexp(1.0, -25) : 0.0;
    const at::Tensor g = got.to(at::kDouble);
    const at::Tensor err = at::abs(g - ref.grad);
    const at::Tensor tol = (u + 1e-5) * at::abs(ref.grad) + 1e-6 * ref.scale.unsqueeze(1) + d;
    const at::Tensor bad = err > tol;
    INFO("max gradient error " << err.max().item<double>() << ", elements over tolerance "
                               << bad.sum().item<int64_t>() << " of " << err.numel());
    CHECK(at::isfinite(g).all().item<bool>());
    CHECK(bad.sum().item<int64_t>() == 0);
    // Ignored rows: exactly zero.
    const at::Tensor ignored = labels == o.ignore_index;
    if (ignored.any().item<bool>()) CHECK((g.masked_select(ignored.unsqueeze(1)) == 0).all().item<bool>());
  }
}

// cluster_ctas values every test runs: the launcher's choice, two-pass, one-read at 1, 3 and 8 CTAs.
const std::vector<int> kKernelChoices = {0, -1, 1, 3, 8};

#endif  // QLORA_WITH_CUDA (helpers)


}  // namespace

TEST_CASE("cross_entropy_chunk matches an fp64 reference: loss, lse, gradient in place", "[cuda][flce]") {
  QLORA_REQUIRE_CUDA();
#ifdef QLORA_WITH_CUDA
  REQUIRE(&qlora::kernels::cross_entropy_chunk != nullptr);  // see the weak declaration above
  const Case c = GENERATE(from_range(kCases));
  const at::ScalarType dt = GENERATE(at::kFloat, at::kBFloat16, at::kHalf);
  const OptionSet os = GENERATE(from_range(kOptionSets));
  const bool strided = GENERATE(false, true);  // odd ld > vocab and a base one element off 16 bytes
  const float grad_scale = GENERATE(0.37f, 0.0f);
  const uint64_t seed = fresh_seed();
  Options o = os.o;
  o.grad_scale = grad_scale;
  const int64_t rows = c.rows, vocab = c.vocab;
  const int64_t ld = strided ? vocab + 3 + (vocab % 2 == 0 ? 0 : 2) : vocab;  // odd when strided
  const int64_t offset = strided ? 1 : 0;
  CAPTURE(rows, vocab, ld, offset, c10::toString(dt), os.name, grad_scale, seed);

  at::Generator gen = at::detail::createCPUGenerator(seed);
  const double sigma = o.softcap > 0 ? 25.0 : 3.0;  // softcap: reach into tanh's curved part
  // The buffer: random padding around the logits (it must come back unchanged), the logits rounded
  // to dt once; the reference sees exactly those values.
  at::Tensor buffer = (at::randn({offset + rows * ld}, gen, at::TensorOptions(at::kDouble)) * 7.0).to(dt);
  at::Tensor logits = buffer.narrow(0, offset, rows * ld).view({rows, ld}).narrow(1, 0, vocab);
  logits.copy_(random_logits(rows, vocab, sigma, gen).to(dt));
  // Labels: random, about one row in four ignored (never row 0), one row labelled with its argmax.
  at::Tensor labels = at::randint(vocab, {rows}, gen, at::TensorOptions(at::kLong));
  at::Tensor drop = at::rand({rows}, gen, at::TensorOptions(at::kDouble)) < 0.25;
  drop[0].fill_(false);
  labels = at::where(drop, at::full_like(labels, o.ignore_index), labels);
  if (rows > 1) labels[1].fill_(logits[1].to(at::kDouble).argmax().item<int64_t>());

  const Reference ref = reference(logits, labels, o);
  // Every kernel the launcher has: its own choice, the two-pass kernel, and the one-read kernel with
  // 1, 3 and 8 CTAs per row wherever this device and row can take them (sm_90+, slice in shared memory).
  for (const int ctas : kKernelChoices) {
    const int used = qlora::kernels::cross_entropy_resident_ctas(rows, vocab, float_type(dt), grad_scale != 0.0f, ctas);
    CAPTURE(ctas, used);
    if (used < 0) continue;  // a forced cluster size this device or row cannot take
    const Run run = run_kernel(buffer, offset, rows, vocab, ld, labels, o, {}, ctas);
    REQUIRE(run.status == cudaSuccess);
    check_run(run, ref, buffer, logits, labels, o, dt, offset, rows, vocab, ld);
  }
#endif
}

TEST_CASE("cross_entropy_chunk with every row ignored: zero loss, zero gradient, no NaN", "[cuda][flce]") {
  QLORA_REQUIRE_CUDA();
#ifdef QLORA_WITH_CUDA
  REQUIRE(&qlora::kernels::cross_entropy_chunk != nullptr);
  const at::ScalarType dt = GENERATE(at::kFloat, at::kBFloat16, at::kHalf);
  const int64_t vocab = GENERATE(int64_t{7}, int64_t{128256});
  const int64_t ignore_index = GENERATE(int64_t{-100}, int64_t{3});
  const uint64_t seed = fresh_seed();
  CAPTURE(c10::toString(dt), vocab, ignore_index, seed);
  at::Generator gen = at::detail::createCPUGenerator(seed);
  const int64_t rows = 6, ld = vocab + 1, offset = 1;
  at::Tensor buffer = (at::randn({offset + rows * ld}, gen, at::TensorOptions(at::kDouble)) * 4.0).to(dt);
  buffer[offset + 2].fill_(std::numeric_limits<double>::infinity());  // never read: the row is ignored
  const at::Tensor labels = at::full({rows}, ignore_index, at::TensorOptions(at::kLong));
  Options o;
  o.ignore_index = ignore_index;
  o.softcap = 10.0f;
  o.z_loss = 1e-3f;
  o.grad_scale = 2.0f;
  for (const int ctas : kKernelChoices) {
    CAPTURE(ctas);
    if (qlora::kernels::cross_entropy_resident_ctas(rows, vocab, float_type(dt), true, ctas) < 0) continue;
    const Run run = run_kernel(buffer, offset, rows, vocab, ld, labels, o, {}, ctas);
    REQUIRE(run.status == cudaSuccess);
    CHECK((run.loss == 0).all().item<bool>());
    CHECK((run.lse == 0).all().item<bool>());
    const at::Tensor got = run.buffer.narrow(0, offset, rows * ld).view({rows, ld});
    CHECK((got.narrow(1, 0, vocab) == 0).all().item<bool>());
    CHECK(bit_diffs(got.narrow(1, vocab, 1), buffer.narrow(0, offset, rows * ld).view({rows, ld}).narrow(1, vocab, 1)) == 0);
  }
  o.grad_scale = 0.0f;  // loss only: nothing written
  const Run run0 = run_kernel(buffer, offset, rows, vocab, ld, labels, o);
  REQUIRE(run0.status == cudaSuccess);
  CHECK((run0.loss == 0).all().item<bool>());
  CHECK(bit_diffs(run0.buffer, buffer) == 0);
#endif
}

TEST_CASE("cross_entropy_chunk rejects bad arguments", "[cuda][flce]") {
  QLORA_REQUIRE_CUDA();
#ifdef QLORA_WITH_CUDA
  REQUIRE(&qlora::kernels::cross_entropy_chunk != nullptr);
  at::Tensor x = at::zeros({4, 8}, at::TensorOptions(at::kFloat).device(at::kCUDA));
  at::Tensor labels = at::zeros({4}, at::TensorOptions(at::kLong).device(at::kCUDA));
  at::Tensor loss = at::zeros({4}, at::TensorOptions(at::kFloat).device(at::kCUDA));
  const auto good = [&] {
    qlora::kernels::CrossEntropyChunkArgs a;
    a.logits = x.data_ptr();
    a.logits_type = qlora::kernels::FloatType::f32;
    a.rows = 4;
    a.vocab = 8;
    a.ld = 8;
    a.labels = labels.data_ptr<int64_t>();
    a.loss = loss.data_ptr<float>();
    return a;
  };
  const cudaStream_t s = c10::cuda::getCurrentCUDAStream().stream();
  CHECK(qlora::kernels::cross_entropy_chunk(good(), s) == cudaSuccess);
  auto a = good();
  a.ld = 7;  // < vocab
  CHECK(qlora::kernels::cross_entropy_chunk(a, s) == cudaErrorInvalidValue);
  a = good();
  a.vocab = 0;
  CHECK(qlora::kernels::cross_entropy_chunk(a, s) == cudaErrorInvalidValue);
  a = good();
  a.loss = nullptr;
  CHECK(qlora::kernels::cross_entropy_chunk(a, s) == cudaErrorInvalidValue);
  a = good();
  a.softcap = -1.0f;
  CHECK(qlora::kernels::cross_entropy_chunk(a, s) == cudaErrorInvalidValue);
  a = good();
  a.logits = static_cast<char*>(x.data_ptr()) + 2;  // not aligned to fp32
  CHECK(qlora::kernels::cross_entropy_chunk(a, s) == cudaErrorInvalidValue);
  a = good();
  a.rows = 0;  // nothing to do
  CHECK(qlora::kernels::cross_entropy_chunk(a, s) == cudaSuccess);
  CHECK(cudaStreamSynchronize(s) == cudaSuccess);
  CHECK(cudaGetLastError() == cudaSuccess);  // nothing failed to launch, no sticky error
#endif
}

TEST_CASE("cross_entropy_chunk with per-row gradient weights (grad_row_scale)", "[cuda][flce]") {
  QLORA_REQUIRE_CUDA();
#ifdef QLORA_WITH_CUDA
  REQUIRE(&qlora::kernels::cross_entropy_chunk != nullptr);
  const at::ScalarType dt = GENERATE(at::kFloat, at::kBFloat16);
  const int64_t vocab = GENERATE(int64_t{7}, int64_t{50257});
  const uint64_t seed = fresh_seed();
  CAPTURE(c10::toString(dt), vocab, seed);
  at::Generator gen = at::detail::createCPUGenerator(seed);
  const int64_t rows = 11, ld = vocab;
  Options o;
  o.grad_scale = 0.5f;
  o.z_loss = 1e-4f;
  at::Tensor buffer = random_logits(rows, vocab, 3.0, gen).to(dt).view({-1});
  at::Tensor labels = at::randint(vocab, {rows}, gen, at::TensorOptions(at::kLong));
  labels[3].fill_(o.ignore_index);
  // Weights: random of both signs, one exactly 0 (that row's gradient is 0, its loss is not).
  at::Tensor w = at::randn({rows}, gen, at::TensorOptions(at::kFloat));
  w[5].fill_(0.0f);
  const at::Tensor logits = buffer.view({rows, vocab});
  const Reference ref = reference(logits, labels, o, w);
  for (const int ctas : kKernelChoices) {
    CAPTURE(ctas);
    if (qlora::kernels::cross_entropy_resident_ctas(rows, vocab, float_type(dt), true, ctas) < 0) continue;
    const Run run = run_kernel(buffer, 0, rows, vocab, ld, labels, o, w, ctas);
    REQUIRE(run.status == cudaSuccess);
    CHECK((at::abs(run.loss.to(at::kDouble) - ref.loss) <= 1e-5 * (1.0 + at::abs(ref.lse))).all().item<bool>());
    const at::Tensor g = run.buffer.view({rows, vocab}).to(at::kDouble);
    const at::Tensor err = at::abs(g - ref.grad);
    const at::Tensor tol = (unit_roundoff(dt) + 1e-5) * at::abs(ref.grad) + 1e-6 * ref.scale.unsqueeze(1);
    INFO("max gradient error " << err.max().item<double>());
    CHECK((err <= tol).all().item<bool>());
    CHECK((g[5] == 0).all().item<bool>());
    CHECK((g[3] == 0).all().item<bool>());
  }
#endif
}

TEST_CASE("cross_entropy_chunk picks the one-read kernel where it applies", "[cuda][flce]") {
  QLORA_REQUIRE_CUDA();
#ifdef QLORA_WITH_CUDA
  REQUIRE(&qlora::kernels::cross_entropy_resident_ctas != nullptr);
  using qlora::kernels::FloatType;
  const auto ctas = [](int64_t rows, int64_t vocab, FloatType t, bool grad, int requested) {
    return qlora::kernels::cross_entropy_resident_ctas(rows, vocab, t, grad, requested);
  };
  int dev = 0, major = 0;
  REQUIRE(cudaGetDevice(&dev) == cudaSuccess);
  REQUIRE(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess);
  // Never without a gradient, never when asked for two-pass.
  CHECK(ctas(8192, 128256, FloatType::bf16, false, 0) == 0);
  CHECK(ctas(8192, 128256, FloatType::bf16, false, 4) == 0);
  CHECK(ctas(8192, 128256, FloatType::bf16, true, -1) == 0);
  if (major < 9) {  // no clusters: always two-pass; a forced size cannot run
    CHECK(ctas(8192, 128256, FloatType::bf16, true, 0) == 0);
    CHECK(ctas(8192, 128256, FloatType::bf16, true, 4) == -1);
    return;
  }
  // Slices of at most 64 KiB: Llama-3's bf16 rows over 4 CTAs, Gemma-2's over 8, fp32 Llama-3 over 8.
  CHECK(ctas(8192, 128256, FloatType::bf16, true, 0) == 4);
  CHECK(ctas(8192, 256000, FloatType::bf16, true, 0) == 8);
  CHECK(ctas(8192, 128256, FloatType::f32, true, 0) == 8);
  CHECK(ctas(16, 32000, FloatType::bf16, true, 0) == 1);
  CHECK(ctas(16, 7, FloatType::f16, true, 0) == 1);
  // Rows too long for 8 CTAs of 64 KiB: two-pass (fp32 x 256000 = 1 MB).
  CHECK(ctas(16, 256000, FloatType::f32, true, 0) == 0);
  // Forced: whatever fits the device's shared memory; 1 CTA cannot hold a 256 KB row.
  CHECK(ctas(16, 128256, FloatType::bf16, true, 2) == 2);
  CHECK(ctas(16, 128256, FloatType::bf16, true, 1) == -1);
  // rows x CTAs must stay a valid grid.
  CHECK(ctas(int64_t{1} << 30, 128256, FloatType::bf16, true, 0) == 0);
  // A forced size that cannot run is refused, not silently replaced.
  at::Tensor x = at::zeros({2, 128256}, at::TensorOptions(at::kBFloat16).device(at::kCUDA));
  at::Tensor labels = at::zeros({2}, at::TensorOptions(at::kLong).device(at::kCUDA));
  at::Tensor loss = at::zeros({2}, at::TensorOptions(at::kFloat).device(at::kCUDA));
  qlora::kernels::CrossEntropyChunkArgs a;
  a.logits = x.data_ptr();
  a.rows = 2;
  a.vocab = a.ld = 128256;
  a.labels = labels.data_ptr<int64_t>();
  a.loss = loss.data_ptr<float>();
  a.grad_scale = 1.0f;
  a.cluster_ctas = 1;
  const cudaStream_t s = c10::cuda::getCurrentCUDAStream().stream();
  CHECK(qlora::kernels::cross_entropy_chunk(a, s) == cudaErrorNotSupported);
  a.cluster_ctas = 9;
  CHECK(qlora::kernels::cross_entropy_chunk(a, s) == cudaErrorInvalidValue);
  a.cluster_ctas = 0;
  CHECK(qlora::kernels::cross_entropy_chunk(a, s) == cudaSuccess);
  CHECK(cudaStreamSynchronize(s) == cudaSuccess);
#endif
}
