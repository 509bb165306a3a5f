// qlora bench flce: the fused linear + cross-entropy (flce.h) forward + backward against one N x H x V
// GEMM and against the unfused libtorch loss, side by side in one process on the current CUDA device.
// Ratios are given two ways: to the GEMM timed at the start of the case, and paired (the median of
// each sample over three back-to-back GEMMs timed right before it, per GEMM; measure() says why).
//
// Method (why): each figure is the median over --iters samples (after 2 warm-up calls), each sample
// one forward + loss.backward() bracketed by CUDA events on the current stream. Gradients of X (and W
// when trainable) are dropped before every sample so that each one allocates them afresh, as a
// training step does. "Extra peak" is the caching allocator's peak during the sample (reset first)
// minus what was allocated just before it: the inputs themselves are not counted, the logits, chunk
// buffers, dX and dW are. The GEMM alone (X W^T, bf16, no grad) is the yardstick of issue 5: a
// fused loss needs the forward GEMM, dX = G W, and, with W trainable, dW = G^T X, so ~2-3 GEMMs is
// the floor. Several chunk sizes are timed to choose the default by measurement. Every case frees
// its tensors and empties the cache before the next, so memory figures do not carry over.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "cli/bench_util.h"
#include "cli/commands.h"
#include "qlora/error.h"
#include "qlora/flce.h"

#ifdef QLORA_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>
#endif

namespace qlora::cli {
namespace {
using nlohmann::json;

struct FlceBenchOptions {
  std::string cases = "all";
};

#ifdef QLORA_WITH_CUDA

struct Case {
  int64_t N, H, V;
  const char* note;
};
// Issue 5's shapes: Llama-3 8B's head at 4k and 16k tokens, and the CCE paper's Gemma-2-2B case.
const std::vector<Case> kCases = {{4096, 4096, 128256, "Llama-3 head, 4k tokens"},
                                  {16384, 4096, 128256, "Llama-3 head, 16k tokens"},
                                  {8192, 2304, 256000, "Gemma-2-2B head (CCE paper)"}};
// The rows of "ours" per case and W mode. chunk 0 = the automatic choice (flce_chunk_rows); the
// others are fixed row counts to compare with it. every_label_kept: the same case with the ignored
// labels replaced by valid ones, which shows the cost without the rows the loss skips (ignored
// rows are dropped before the GEMMs, src/loss/flce.cpp).
struct OursRow {
  int64_t chunk;
  bool every_label_kept;
};
const std::vector<OursRow> kOursRows = {{0, false}, {2048, false}, {4096, false}, {8192, false}, {16384, false},
                                        {0, true}};

double gb(int64_t bytes) { return static_cast<double>(bytes) / 1e9; }

int64_t allocated_now() {
  const auto s = c10::cuda::CUDACachingAllocator::getDeviceStats(c10::cuda::current_device());
  return s.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].current;
}
int64_t allocated_peak() {
  const auto s = c10::cuda::CUDACachingAllocator::getDeviceStats(c10::cuda::current_device());
  return s.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak;
}

struct Measured {
  double ms = 0;             // median
  std::vector<double> samples;
  int64_t extra_peak = 0;    // max over samples, bytes
  double loss = NAN;         // loss of the last sample (NaN when fn returns no loss)
  bool oom = false;
  // With a yardstick: its time right before each sample, and the median of the per-sample ratios.
  std::vector<double> yard_samples;
  double paired_ratio = NAN;
};

double elapsed_ms(const at::cuda::CUDAEvent& a, const at::cuda::CUDAEvent& b) {
  return static_cast<double>(a.elapsed_time(b));
}

// The paired yardstick runs this many GEMMs back to back; its time per GEMM is the run / this.
constexpr int kPairGemms = 3;

// fn() runs one sample and returns the loss (or an undefined tensor); before() runs outside the
// timed region (dropping gradients). Warm-up 2, then iters samples. yardstick (optional: a run of
// kPairGemms GEMMs) is timed on its own right before every sample, so that each sample has a
// yardstick taken in the same state of the GPU's clocks (on one H100 the same lone GEMM measured
// 23.1 to 26.3 ms within one run), and the ratio is the median of the per-sample ratios.
Measured measure(int iters, const std::function<void()>& before, const std::function<at::Tensor()>& fn,
                 const std::function<void()>& yardstick = {}) {
  Measured m;
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
  at::cuda::CUDAEvent start(cudaEventDefault), stop(cudaEventDefault), ystart(cudaEventDefault), ystop(cudaEventDefault);
  std::vector<double> ratios;
  for (int i = 0; i < 2 + iters; ++i) {
    before();
    if (yardstick) {
      c10::cuda::device_synchronize();
      ystart.record(stream);
      yardstick();
      ystop.record(stream);
    }
    c10::cuda::device_synchronize();
    c10::cuda::CUDACachingAllocator::resetPeakStats(c10::cuda::current_device());
    const int64_t base = allocated_now();
    start.record(stream);
    at::Tensor loss = fn();
    stop.record(stream);
    stop.synchronize();
    if (i < 2) continue;
    m.samples.push_back(elapsed_ms(start, stop));
    if (yardstick) {
      m.yard_samples.push_back(elapsed_ms(ystart, ystop) / kPairGemms);
      ratios.push_back(m.samples.back() / m.yard_samples.back());
    }
    m.extra_peak = std::max(m.extra_peak, allocated_peak() - base);
    if (loss.defined()) m.loss = loss.item<double>();
  }
  m.ms = median(m.samples);
  if (!ratios.empty()) m.paired_ratio = median(ratios);
  return m;
}

void clear_grad(at::Tensor& t) {
  if (t.grad().defined()) t.mutable_grad() = at::Tensor();
}

// Runs measure(), turning an out-of-memory into a row marked OOM and giving the cache back so the
// next measurement starts clean.
Measured measure_or_oom(int iters, const std::function<void()>& before, const std::function<at::Tensor()>& fn,
                        const std::function<void()>& yardstick = {}) {
  try {
    return measure(iters, before, fn, yardstick);
  } catch (const c10::OutOfMemoryError&) {
  } catch (const c10::Error& e) {
    // An OOM rethrown through the autograd engine or a cuBLAS workspace failure may arrive as a
    // plain c10::Error; anything else is a real failure.
    if (std::string(e.what()).find("out of memory") == std::string::npos) throw;
  }
  before();
  c10::cuda::device_synchronize();
  c10::cuda::CUDACachingAllocator::emptyCache();
  Measured m;
  m.oom = true;
  return m;
}

json measured_json(const Measured& m, double gemm_ms) {
  if (m.oom) return {{"oom", true}};
  return {{"median_ms", m.ms},
          {"samples_ms", m.samples},
          {"ratio_to_gemm", m.ms / gemm_ms},
          {"extra_peak_bytes", m.extra_peak},
          {"loss", m.loss}};
}

int run_bench_flce(const FlceBenchOptions& o, int iters_given, const std::string& json_path) {
  if (!at::hasCUDA() || at::getNumGPUs() == 0)
    throw UserError("qlora bench flce: needs a CUDA device (none is visible)");
  if (o.cases != "all" && o.cases != "small")
    throw UserError("qlora bench flce: --cases must be all or small, found " + o.cases);
  if (iters_given < 0) throw UserError("qlora bench flce: --iters must be >= 1, found " + std::to_string(iters_given));
  const int iters = iters_given > 0 ? iters_given : 5;

  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, c10::cuda::current_device());
  // The caching allocator sets up its per-device state on the first CUDA allocation; its stats
  // calls fail ("Invalid device argument") before that.
  (void)at::empty({1}, at::TensorOptions(at::kFloat).device(at::kCUDA));

  std::printf("qlora bench flce on %s (sm_%d%d, %d SMs), bf16, iters %d (median; 2 warm-up)\n", prop.name, prop.major,
              prop.minor, prop.multiProcessorCount, iters);
  std::printf("ours = fused_linear_cross_entropy fwd + backward (chunk 0 = automatic, its rows in brackets); "
              "gemm = one N x H x V bf16 X W^T (x gemm: one GEMM timed at the case's start; x pair: median over "
              "samples of ours / (3 back-to-back GEMMs timed right before it, / 3)); "
              "unfused = X W^T -> float -> cross_entropy -> backward; "
              "extra peak = allocator peak during fwd+bwd minus allocated before (GB = 1e9 B); "
              "loss rel = |ours - unfused| / |unfused|\n\n");
  std::printf("%-20s %-9s %-21s | %9s %7s %7s %9s | %10s %7s %9s | %9s\n", "case NxHxV", "W", "chunk", "ours ms",
              "x gemm", "x pair", "peak GB", "unfused ms", "x gemm", "peak GB", "loss rel");
  std::fflush(stdout);

  const auto bf16 = at::TensorOptions(at::kBFloat16).device(at::kCUDA);
  json jcases = json::array();
  const size_t ncases = o.cases == "small" ? 1 : kCases.size();
  for (size_t ci = 0; ci < ncases; ++ci) {
    const Case& c = kCases[ci];
    json jcase;
    {
      at::manual_seed(1234 + static_cast<uint64_t>(ci));
      // Scales keep the logits O(1) (|z| ~ sqrt(H) * 1 * 0.02), as a trained head's are; random,
      // not zeros, so the GEMMs see real data.
      at::Tensor X = at::randn({c.N, c.H}, bf16);
      at::Tensor W = (at::randn({c.V, c.H}, bf16) * 0.02).contiguous();
      at::Tensor labels = at::randint(0, c.V, {c.N}, at::TensorOptions(at::kLong).device(at::kCUDA));
      at::Tensor labels_all_kept = labels.clone();
      labels.masked_fill_(at::rand({c.N}, at::TensorOptions(at::kFloat).device(at::kCUDA)) < 0.1, -100);
      const int64_t ignored = labels.eq(-100).sum().item<int64_t>();

      // The yardstick: the forward GEMM alone, in the dtype and layout the loss uses, timed at the
      // start of the case; and, paired with every sample of every row (measure()), kPairGemms of
      // them back to back: a load as long as a fused step, so that it runs at the step's clock.
      const std::function<void()> gemm_run = [&] {
        at::NoGradGuard no_grad;
        for (int k = 0; k < kPairGemms; ++k) (void)at::matmul(X, W.t());
      };
      const Measured gemm = measure(iters, [] {}, [&] {
        at::NoGradGuard no_grad;
        (void)at::matmul(X, W.t());
        return at::Tensor();
      });
      const double gemm_tflops = 2.0 * static_cast<double>(c.N) * c.H * c.V / (gemm.ms * 1e-3) / 1e12;
      const std::string cname = std::to_string(c.N) + "x" + std::to_string(c.H) + "x" + std::to_string(c.V);
      std::printf("%-20s gemm %.3f ms (%.0f TFLOP/s), extra peak %.2f GB; %lld of %lld labels ignored (%s)\n",
                  cname.c_str(), gemm.ms, gemm_tflops, gb(gemm.extra_peak), static_cast<long long>(ignored),
                  static_cast<long long>(c.N), c.note);
      std::fflush(stdout);
      jcase = {{"N", c.N},
               {"H", c.H},
               {"V", c.V},
               {"note", c.note},
               {"ignored_labels", ignored},
               {"gemm", {{"median_ms", gemm.ms}, {"samples_ms", gemm.samples}, {"tflops", gemm_tflops}}}};

      json jmodes = json::array();
      for (const bool trainable : {false, true}) {
        const char* wname = trainable ? "trainable" : "frozen";
        at::Tensor Xg = X.detach().requires_grad_(true);
        at::Tensor Wg = trainable ? W.detach().requires_grad_(true) : W;
        auto drop_grads = [&] {
          clear_grad(Xg);
          if (trainable) clear_grad(Wg);
        };

        // Unfused first: its loss is the reference for ours' rows.
        const Measured unfused = measure_or_oom(iters, drop_grads, [&] {
          at::Tensor logits = at::matmul(Xg, Wg.t()).to(at::kFloat);
          at::Tensor loss = at::cross_entropy_loss(logits, labels, {}, at::Reduction::Mean, -100);
          logits = at::Tensor();
          loss.backward();
          return loss.detach();
        });
        drop_grads();
        c10::cuda::CUDACachingAllocator::emptyCache();

        json jchunks = json::array();
        for (const OursRow& row : kOursRows) {
          const int64_t chunk = row.chunk;
          const at::Tensor& row_labels = row.every_label_kept ? labels_all_kept : labels;
          FlceOptions fo;
          fo.chunk_size = chunk;
          const Measured ours = measure_or_oom(
              iters, drop_grads,
              [&] {
                at::Tensor loss = fused_linear_cross_entropy(Xg, Wg, row_labels, fo);
                loss.backward();
                return loss.detach();
              },
              gemm_run);
          drop_grads();
          c10::cuda::CUDACachingAllocator::emptyCache();
          // What the automatic choice gives now (free memory after the cache was emptied, as in the run),
          // for the rows the loss keeps (the ignored ones are dropped before chunking).
          const int64_t kept_rows = row.every_label_kept ? c.N : c.N - ignored;
          const int64_t rows = flce_chunk_rows(kept_rows, c.V, at::kBFloat16, X.device(), chunk, trainable);
          std::string chunk_label = chunk == 0 ? "auto (" + std::to_string(rows) + ")" : std::to_string(chunk);
          if (row.every_label_kept) chunk_label += " all kept";
          // The unfused loss is of the case's labels: no reference for the all-kept row.
          const double rel = (!ours.oom && !unfused.oom && !row.every_label_kept)
                                 ? std::abs(ours.loss - unfused.loss) / std::abs(unfused.loss)
                                 : NAN;

          char ours_s[64], unf_s[64], rel_s[24];
          if (ours.oom)
            std::snprintf(ours_s, sizeof ours_s, "%9s %7s %7s %9s", "OOM", "-", "-", "-");
          else
            std::snprintf(ours_s, sizeof ours_s, "%9.3f %6.2fx %6.2fx %9.3f", ours.ms, ours.ms / gemm.ms,
                          ours.paired_ratio, gb(ours.extra_peak));
          if (unfused.oom)
            std::snprintf(unf_s, sizeof unf_s, "%10s %7s %9s", "OOM", "-", "-");
          else
            std::snprintf(unf_s, sizeof unf_s, "%10.3f %6.2fx %9.3f", unfused.ms, unfused.ms / gemm.ms,
                          gb(unfused.extra_peak));
          if (std::isnan(rel))
            std::snprintf(rel_s, sizeof rel_s, "%9s", "-");
          else
            std::snprintf(rel_s, sizeof rel_s, "%9.2e", rel);
          std::printf("%-20s %-9s %-21s | %s | %s | %s\n", cname.c_str(), wname, chunk_label.c_str(), ours_s, unf_s, rel_s);
          std::fflush(stdout);

          json jc = measured_json(ours, gemm.ms);
          if (!ours.oom) {
            jc["gemm_paired_samples_ms"] = ours.yard_samples;
            jc["ratio_to_gemm_paired"] = ours.paired_ratio;
          }
          jc["chunk_size"] = chunk;
          jc["chunk_rows"] = rows;
          jc["labels"] = row.every_label_kept ? "every label kept (no row skipped)" : "the case's (10 % ignored)";
          if (!std::isnan(rel)) jc["loss_rel_diff_vs_unfused"] = rel;
          jchunks.push_back(jc);
        }
        jmodes.push_back({{"W", wname}, {"unfused", measured_json(unfused, gemm.ms)}, {"ours", jchunks}});
      }
      jcase["modes"] = jmodes;
    }
    // Inputs of this case are out of scope here: give their blocks back before the next case.
    c10::cuda::device_synchronize();
    c10::cuda::CUDACachingAllocator::emptyCache();
    jcases.push_back(jcase);
  }

  std::printf("\ntargets (issue 5, N=16384 H=4096 V=128256): ours <= 2.2x gemm W frozen, <= 3.2x W trainable; "
              "extra peak <= 1.2 GB W frozen\n");
  if (!json_path.empty()) {
    json j = {{"bench", "flce"},
              {"device", prop.name},
              {"sm", prop.major * 10 + prop.minor},
              {"sms", prop.multiProcessorCount},
              {"dtype", "bf16"},
              {"iters", iters},
              {"warmup", 2},
              {"ignore_index", -100},
              {"ignored_fraction_target", 0.1},
              {"method", "per sample: grads dropped, sync, peak stats reset, CUDA events around forward + "
                         "loss.backward(); median of iters samples after 2 warm-up; extra_peak = max over samples of "
                         "(allocator peak - allocated before); ratio_to_gemm = median / median of one bf16 X W^T "
                         "(no grad) timed at the case's start; ratio_to_gemm_paired = median over samples of (sample / (three back-to-back GEMMs timed right before that sample, / 3)); gemm_paired_samples_ms are per GEMM; chunk_size 0 = automatic (chunk_rows as flce_chunk_rows gave after the run)"},
              {"cases", jcases}};
    write_bench_json("flce", json_path, j);
    std::printf("wrote %s\n", json_path.c_str());
  }
  return kExitOk;
}

#else

int run_bench_flce(const FlceBenchOptions&, int, const std::string&) {
  throw UserError("qlora bench flce: needs a CUDA device (this build has no CUDA part)");
}

#endif

}  // namespace

int bench_flce(const std::string& cases, int iters, const std::string& json_path) {
  FlceBenchOptions o;
  if (!cases.empty()) o.cases = cases;
  return run_bench_flce(o, iters, json_path);
}

}  // namespace qlora::cli
