// qlora bench ce: the in-place cross-entropy chunk kernels (kernels/cross_entropy.cu) on the chunk
// shapes the fused linear + cross-entropy loss gives them, next to a device copy of the same bytes
// and the plain libtorch way (logits -> float -> cross_entropy -> backward -> logits dtype), in one
// process on the current CUDA device.
//
// Method (why): time_ms (bench_util.h): median over --iters samples of >= 8 back-to-back launches.
// One chunk is 0.2-2 GB, far above the 50 MB L2, so one set suffices. The kernels work in place:
// after the first launch they run on the gradient the previous launch wrote (finite values of the
// same size; the work per element does not depend on them). GB/s counts the bytes an in-place
// gradient must move (the chunk read once and written once); "moved" is what each kernel design
// moves (two-pass: read twice, written once), so "moved GB/s" against the copy shows how close
// each design runs to the memory system, and "GB/s" how fast the job gets done.
#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "cli/bench_util.h"
#include "cli/commands.h"
#include "qlora/error.h"

#ifdef QLORA_WITH_CUDA
#include <c10/cuda/CUDAStream.h>

#include "../../kernels/cross_entropy.cuh"
#endif

namespace qlora::cli {
namespace {

#ifdef QLORA_WITH_CUDA

struct CeCase {
  int64_t rows, vocab;
  at::ScalarType dtype;
  const char* note;
};
// The chunks `qlora bench flce` hands the kernel at issue 5's shapes (flce_chunk_rows: 8192 rows
// trainable, 837 frozen at V=128256; 4194 rows trainable at V=256000), and an fp32 chunk.
const std::vector<CeCase> kCeCases = {{8192, 128256, at::kBFloat16, "Llama-3 head, trainable-W chunk"},
                                      {837, 128256, at::kBFloat16, "Llama-3 head, frozen-W chunk"},
                                      {4194, 256000, at::kBFloat16, "Gemma-2 head, trainable-W chunk"},
                                      {2048, 128256, at::kFloat, "Llama-3 head, fp32 logits"}};
// Forced cluster sizes of the one-read kernel timed beside the launcher's choice and two-pass.
const std::vector<int> kCeClusterSizes = {1, 2, 3, 4, 5, 6, 7, 8};

kernels::FloatType float_type(at::ScalarType t) {
  return t == at::kFloat ? kernels::FloatType::f32 : t == at::kHalf ? kernels::FloatType::f16 : kernels::FloatType::bf16;
}

kernels::CrossEntropyChunkArgs ce_args(at::Tensor& logits, const at::Tensor& labels, at::Tensor& loss, float grad_scale,
                                       int cluster_ctas) {
  kernels::CrossEntropyChunkArgs a;
  a.logits = logits.data_ptr();
  a.logits_type = float_type(logits.scalar_type());
  a.rows = logits.size(0);
  a.vocab = a.ld = logits.size(1);
  a.labels = labels.data_ptr<int64_t>();
  a.loss = loss.data_ptr<float>();
  a.grad_scale = grad_scale;
  a.cluster_ctas = cluster_ctas;
  return a;
}

void launch(const kernels::CrossEntropyChunkArgs& a) {
  const cudaError_t err = kernels::cross_entropy_chunk(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "cross_entropy_chunk (cluster_ctas ", a.cluster_ctas, "): ", cudaGetErrorString(err));
}

int run_bench_ce(int iters_given, const std::string& json_path) {
  if (!at::hasCUDA() || at::getNumGPUs() == 0) throw UserError("qlora bench ce: needs a CUDA device (none is visible)");
  if (iters_given < 0) throw UserError("qlora bench ce: --iters must be >= 1, found " + std::to_string(iters_given));
  const int iters = iters_given > 0 ? iters_given : 20;
  int dev = 0;
  cudaGetDevice(&dev);
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, dev);
  const double copy_gbps = measure_copy_gbps(iters);
  std::printf("qlora bench ce on %s (sm_%d%d, %d SMs), iters %d (median)\n", prop.name, prop.major, prop.minor,
              prop.multiProcessorCount, iters);
  std::printf("device-to-device copy (2 GiB -> 2 GiB, read + written): %.0f GB/s\n", copy_gbps);
  std::printf("loss + gradient in place, no ignored labels; GB/s = 2 x chunk bytes (read once + written once) / "
              "time; moved = the bytes the kernel moves (two-pass 3x the chunk, one-read 2x); %%copy of moved; "
              "torch = logits.float() -> cross_entropy(sum) -> backward -> logits dtype\n\n");
  std::printf("%-8s %-7s %-5s | %-14s %9s %8s %7s %6s | %s\n", "rows", "vocab", "dtype", "kernel", "ms", "GB/s", "moved",
              "%copy", "vs two-pass");

  nlohmann::json jcases = nlohmann::json::array();
  const auto cuda = at::TensorOptions().device(at::kCUDA);
  for (const CeCase& c : kCeCases) {
    at::manual_seed(4321);
    at::Tensor logits = (at::randn({c.rows, c.vocab}, cuda.dtype(at::kFloat)) * 2.0).to(c.dtype);
    const at::Tensor labels = at::randint(0, c.vocab, {c.rows}, cuda.dtype(at::kLong));
    at::Tensor loss = at::empty({c.rows}, cuda.dtype(at::kFloat));
    const double chunk_bytes = static_cast<double>(logits.numel()) * static_cast<double>(logits.element_size());
    const char* dname = c.dtype == at::kFloat ? "fp32" : c.dtype == at::kHalf ? "fp16" : "bf16";
    const int chosen = kernels::cross_entropy_resident_ctas(c.rows, c.vocab, float_type(c.dtype), true, 0);

    // The two designs agree: loss and gradient of the launcher's choice against two-pass, one input.
    const at::Tensor input = logits.clone();
    at::Tensor g_two = input.clone(), g_auto = input.clone();
    at::Tensor loss_two = at::empty_like(loss), loss_auto = at::empty_like(loss);
    launch(ce_args(g_two, labels, loss_two, 1.0f, -1));
    launch(ce_args(g_auto, labels, loss_auto, 1.0f, 0));
    const double loss_rel = ((loss_auto - loss_two).abs() / loss_two.abs()).max().item<double>();
    const double grad_rel =
        ((g_auto.to(at::kFloat) - g_two.to(at::kFloat)).abs().max() / g_two.to(at::kFloat).abs().max()).item<double>();
    g_two = g_auto = at::Tensor();

    double two_pass_ms = NAN;
    nlohmann::json jk = nlohmann::json::array();
    auto row = [&](const std::string& name, double ms, double moved_factor) {
      const double gbps = 2.0 * chunk_bytes / (ms * 1e-3) / 1e9;
      const double moved = moved_factor * chunk_bytes / (ms * 1e-3) / 1e9;
      char vs[32] = "-";
      if (!std::isnan(two_pass_ms)) std::snprintf(vs, sizeof vs, "%.2fx", two_pass_ms / ms);
      std::printf("%-8lld %-7lld %-5s | %-14s %9.4f %8.0f %7.0f %5.1f%% | %s\n", static_cast<long long>(c.rows),
                  static_cast<long long>(c.vocab), dname, name.c_str(), ms, gbps, moved, 100.0 * moved / copy_gbps, vs);
      std::fflush(stdout);
      jk.push_back({{"kernel", name}, {"ms", ms}, {"gbps", gbps}, {"moved_gbps", moved}, {"pct_copy", 100.0 * moved / copy_gbps}});
    };
    for (const int k : {-1, 0}) {  // two-pass first: the others are compared with it
      const kernels::CrossEntropyChunkArgs a = ce_args(logits, labels, loss, 1.0f, k);
      const double ms = time_ms([&](int) { launch(a); }, 1, iters);
      if (k == -1) {
        two_pass_ms = ms;
        row("two-pass", ms, 3.0);
      } else {
        row("auto (" + std::to_string(chosen) + " CTAs)", ms, chosen > 0 ? 2.0 : 3.0);
      }
    }
    for (const int k : kCeClusterSizes) {
      if (kernels::cross_entropy_resident_ctas(c.rows, c.vocab, float_type(c.dtype), true, k) < 0) continue;
      const kernels::CrossEntropyChunkArgs a = ce_args(logits, labels, loss, 1.0f, k);
      row("one-read " + std::to_string(k), time_ms([&](int) { launch(a); }, 1, iters), 2.0);
    }
    {  // loss only: one read whatever the kernel
      const kernels::CrossEntropyChunkArgs a = ce_args(logits, labels, loss, 0.0f, 0);
      const double ms = time_ms([&](int) { launch(a); }, 1, iters);
      const double gbps = chunk_bytes / (ms * 1e-3) / 1e9;
      std::printf("%-8lld %-7lld %-5s | %-14s %9.4f %8.0f %7.0f %5.1f%% | (loss only: the chunk read once)\n",
                  static_cast<long long>(c.rows), static_cast<long long>(c.vocab), dname, "loss only", ms, gbps, gbps,
                  100.0 * gbps / copy_gbps);
      jk.push_back({{"kernel", "loss only"}, {"ms", ms}, {"gbps", gbps}, {"pct_copy", 100.0 * gbps / copy_gbps}});
    }
    double torch_ms = NAN;
    try {
      torch_ms = time_ms(
          [&](int) {
            at::Tensor lf = logits.to(at::kFloat).requires_grad_(true);
            at::Tensor l = at::cross_entropy_loss(lf, labels, {}, at::Reduction::Sum, -100);
            l.backward();
            (void)lf.grad().to(c.dtype);
          },
          1, std::max(3, iters / 4));
      row("torch", torch_ms, 2.0);
    } catch (const c10::Error& e) {
      std::printf("%-8lld %-7lld %-5s | torch: %s\n", static_cast<long long>(c.rows), static_cast<long long>(c.vocab),
                  dname, std::string(e.what()).substr(0, 80).c_str());
    }
    std::printf("%-8lld %-7lld %-5s | auto vs two-pass: loss max rel diff %.2e, gradient max abs diff / max |g| %.2e "
                "(%s)\n\n",
                static_cast<long long>(c.rows), static_cast<long long>(c.vocab), dname, loss_rel, grad_rel, c.note);
    jcases.push_back({{"rows", c.rows},
                      {"vocab", c.vocab},
                      {"dtype", dname},
                      {"note", c.note},
                      {"chunk_bytes", chunk_bytes},
                      {"auto_ctas", chosen},
                      {"auto_vs_two_pass_loss_rel", loss_rel},
                      {"auto_vs_two_pass_grad_rel", grad_rel},
                      {"kernels", jk}});
  }
  if (!json_path.empty()) {
    nlohmann::json j = {{"bench", "ce"},
                        {"device", prop.name},
                        {"sm", prop.major * 10 + prop.minor},
                        {"iters", iters},
                        {"copy_gbps", copy_gbps},
                        {"method", "median over iters of (CUDA-event time of 8 back-to-back launches) / 8; gbps = 2 x "
                                   "chunk bytes / time; moved_gbps = bytes the design moves / time"},
                        {"cases", jcases}};
    write_bench_json("ce", json_path, j);
    std::printf("wrote %s\n", json_path.c_str());
  }
  return kExitOk;
}

#else

int run_bench_ce(int, const std::string&) {
  throw UserError("qlora bench ce: needs a CUDA device (this build has no CUDA part)");
}

#endif

}  // namespace

int bench_ce(int iters, const std::string& json_path) { return run_bench_ce(iters, json_path); }

}  // namespace qlora::cli
