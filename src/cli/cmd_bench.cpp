// qlora bench OP: time a kernel next to the plain-libtorch way of doing the same thing, in the
// same process, on the current CUDA device. Ops: nf4 (the single-pass NF4 dequant); model (the
// decoder end to end: src/cli/bench_model.cpp); train (QLoRA training steps: bench_train.cpp); flce (fused linear cross-entropy: bench_flce.cpp);
// ce (the in-place cross-entropy chunk kernels: bench_ce.cpp); fused (RMSNorm / SwiGLU / RoPE: bench_fused.cpp);
// tokenizer (encode throughput on the CPU: bench_tokenizer.cpp).
//
// Method (why): every figure is a median over --iters samples; each sample is one pass over
// several input/output sets in rotation (enough sets that their bytes are >= 4x the L2 cache, so
// the 50 MB L2 of an H100 cannot serve a kernel its inputs from the previous launch), timed with
// CUDA events on the current stream and divided by the number of launches. The reference
// bandwidth is a device-to-device copy measured in the same run (2 GiB -> 2 GiB, counting bytes
// read + written), so percentages compare like with like on the day.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "cli/bench_util.h"
#include "cli/commands.h"
#include "qlora/error.h"
#include "qlora/nf4.h"

#ifdef QLORA_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "../../kernels/nf4.cuh"  // the launcher, for the bench-only launch variants (1..3)
#endif

namespace qlora::cli {
namespace {

struct BenchOptions {
  std::string op;
  std::string dtype = "all";
  int iters = 50;
  std::string json_path;
  std::string cases;  // flce, fused: all or small ("" = the op's default)
};

#ifdef QLORA_WITH_CUDA

struct Shape {
  int64_t rows, cols;
};
constexpr int kLayouts = qlora::kernels::kDequantizeVariants;  // NF4DequantizeArgs::variant
const std::vector<Shape> kNF4Shapes = {{4096, 4096}, {1024, 4096}, {14336, 4096}, {4096, 14336}, {28672, 8192}};

// The same dequant in plain libtorch ops: nibbles -> int64 indices -> LUT gather (fp32), the
// nested absmax rebuilt by a code2 gather times the repeated absmax2 plus offset (each an fp32
// op, rounded once, as in our kernel and bnb), then one fp32 multiply and a cast. Needs numel to
// be a multiple of blocksize and nblocks of 256 (true for the bench shapes).
at::Tensor torch_dequant(const NF4Tensor& t, const at::Tensor& lut, at::ScalarType dt) {
  const int64_t n = t.numel(), nb = t.nblocks();
  const at::Tensor p = t.packed.view({-1});
  const at::Tensor idx = at::stack({p.bitwise_right_shift(4), p.bitwise_and(15)}, 1).view({-1}).narrow(0, 0, n);
  at::Tensor am = t.code2.index_select(0, t.absmax.to(at::kLong)) *
                  t.absmax2.repeat_interleave(t.nested_blocksize).narrow(0, 0, nb);
  am = am + static_cast<float>(t.offset);
  const at::Tensor v = lut.index_select(0, idx.to(at::kLong)).view({nb, t.blocksize}) * am.unsqueeze(1);
  return v.view(t.shape).to(dt);
}

qlora::kernels::NF4DequantizeArgs launcher_args(const NF4Tensor& t, at::Tensor& out, int variant) {
  qlora::kernels::NF4DequantizeArgs a;
  a.packed = t.packed.data_ptr<uint8_t>();
  a.numel = t.numel();
  a.blocksize = static_cast<int>(t.blocksize);
  a.nested = true;
  a.absmax_code = t.absmax.data_ptr<uint8_t>();
  a.code2 = t.code2.data_ptr<float>();
  a.absmax2 = t.absmax2.data_ptr<float>();
  a.offset = static_cast<float>(t.offset);
  a.nested_blocksize = static_cast<int>(t.nested_blocksize);
  a.out = out.data_ptr();
  a.out_type = out.scalar_type() == at::kHalf ? qlora::kernels::FloatType::f16 : qlora::kernels::FloatType::bf16;
  a.variant = variant;
  return a;
}

bool same_bits(const at::Tensor& a, const at::Tensor& b) {
  return at::equal(a.view(at::kShort), b.view(at::kShort));
}

std::string shape_str(const Shape& s) { return std::to_string(s.rows) + "x" + std::to_string(s.cols); }

int bench_nf4(const BenchOptions& o) {
  if (!at::hasCUDA() || at::getNumGPUs() == 0)
    throw UserError("qlora bench nf4: needs a CUDA device (none is visible)");
  std::vector<at::ScalarType> dtypes;
  if (o.dtype == "bf16" || o.dtype == "all") dtypes.push_back(at::kBFloat16);
  if (o.dtype == "fp16" || o.dtype == "all") dtypes.push_back(at::kHalf);
  if (o.iters < 1) throw UserError("qlora bench nf4: --iters must be >= 1, found " + std::to_string(o.iters));

  int dev = 0;
  cudaGetDevice(&dev);
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, dev);
  const double l2_bytes = prop.l2CacheSize > 0 ? prop.l2CacheSize : 50e6;

  const double copy_gbps = measure_copy_gbps(o.iters);
  std::printf("qlora bench nf4 on %s (sm_%d%d, %d SMs, L2 %.0f MB), iters %d\n", prop.name, prop.major, prop.minor,
              prop.multiProcessorCount, l2_bytes / 1e6, o.iters);
  std::printf("device-to-device copy (2 GiB -> 2 GiB, read + written): %.0f GB/s\n", copy_gbps);
  std::printf("nested NF4, blocksize 64; GB/s count packed + absmax codes + absmax2 + output bytes\n");
  std::printf("ours = the kernel (variant 0, the runtime's) via its launcher; %%copy = of the 2 GiB copy above; "
              "copy= = a copy moving the same bytes (read + written) as this dequant, timed the same way; "
              "ours launches with programmatic dependent launch (PDL) on sm_90; v1 = ours with streaming stores, v2 = ours "
              "without PDL, v3 = ours with its loads before the PDL wait (kernels/nf4.cu); api = nf4_dequantize_out (checks + launch); torch = plain "
              "libtorch ops; bits equal: torch, v1 and api outputs vs ours\n\n");
  std::printf("%-12s %-5s %5s | %9s %8s %6s | %10s %6s | %8s %8s %6s %8s %6s | %9s | %9s %8s %8s | %s\n", "shape",
              "out", "sets", "ours ms", "GB/s", "%copy", "copy= GB/s", "%copy=", "v1 GB/s", "v2 GB/s", "%copy",
              "v3 GB/s", "%copy", "api ms", "torch ms", "GB/s", "speedup", "bits equal");

  nlohmann::json results = nlohmann::json::array();
  const auto opt_cuda = at::TensorOptions().device(at::kCUDA);
  at::Tensor lut = at::empty({16}, at::kFloat);
  std::copy(nf4_codebook().begin(), nf4_codebook().end(), lut.data_ptr<float>());
  lut = lut.to(at::kCUDA);
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();

  for (const Shape& s : kNF4Shapes) {
    // One quantized weight, cloned into every set (the contents do not matter to the timing).
    const at::Tensor w = at::randn({s.rows, s.cols}, opt_cuda.dtype(at::kBFloat16)) * 0.02;
    const NF4Tensor q0 = nf4_quantize(w, 64, /*nested=*/true);
    const int64_t n = q0.numel();
    for (at::ScalarType dt : dtypes) {
      const double in_bytes = static_cast<double>(q0.packed.numel() + q0.absmax.numel() + 4 * q0.absmax2.numel());
      const double bytes = in_bytes + static_cast<double>(n) * 2.0;
      const int nsets = static_cast<int>(std::clamp(std::ceil(4.0 * l2_bytes / bytes), 2.0, 32.0));
      std::vector<NF4Tensor> sets(nsets, q0);
      std::vector<at::Tensor> outs(nsets);
      for (int i = 0; i < nsets; ++i) {
        sets[i].packed = q0.packed.clone();
        sets[i].absmax = q0.absmax.clone();
        sets[i].absmax2 = q0.absmax2.clone();
        outs[i] = at::empty({n}, opt_cuda.dtype(dt));
      }
      // The kernel alone (launcher, no host-side checks) in each thread layout (kernels/nf4.cu;
      // 0 is the runtime's); then the C++ API the trainer calls (nf4_dequantize_out: validation
      // + launch), whose host cost shows on the small shapes, where one launch moves ~10 MB.
      auto launch = [&](const qlora::kernels::NF4DequantizeArgs& a) {
        const cudaError_t err = qlora::kernels::nf4_dequantize(a, stream.stream());
        TORCH_CHECK(err == cudaSuccess, "nf4_dequantize (variant ", a.variant, "): ", cudaGetErrorString(err));
      };
      double layout_ms[kLayouts];
      bool layout_equal[kLayouts];
      at::Tensor ours_out;
      for (int v = 0; v < kLayouts; ++v) {
        std::vector<qlora::kernels::NF4DequantizeArgs> args;
        for (int i = 0; i < nsets; ++i) args.push_back(launcher_args(sets[i], outs[i], v));
        layout_ms[v] = time_ms([&](int i) { launch(args[i]); }, nsets, o.iters);
        if (v == 0) ours_out = outs[0].clone();
        layout_equal[v] = same_bits(outs[0], ours_out);
      }
      const double ours = layout_ms[0];
      // A copy that reads and writes the same number of bytes as this dequant, in as many
      // rotated sets: what the memory system gives at this size, fixed per-launch costs included.
      std::vector<at::Tensor> copy_src(nsets), copy_dst(nsets);
      const int64_t copy_elems = static_cast<int64_t>(bytes / 4);  // bf16 elements: bytes/2 read + bytes/2 written
      for (int i = 0; i < nsets; ++i) {
        copy_src[i] = at::empty({copy_elems}, opt_cuda.dtype(at::kBFloat16)).fill_(1.0);
        copy_dst[i] = at::empty({copy_elems}, opt_cuda.dtype(at::kBFloat16));
      }
      const double copy_same_ms = time_ms([&](int i) { copy_dst[i].copy_(copy_src[i]); }, nsets, o.iters);
      const double copy_same_gbps = 4.0 * static_cast<double>(copy_elems) / (copy_same_ms * 1e-3) / 1e9;
      copy_src.clear();
      copy_dst.clear();
      const bool variants_equal = std::all_of(layout_equal, layout_equal + kLayouts, [](bool b) { return b; });
      const double api = time_ms([&](int i) { nf4_dequantize_out(sets[i], outs[i]); }, nsets, o.iters);
      const bool api_equal = same_bits(outs[0], ours_out);

      at::Tensor torch_out;
      const double ref = time_ms([&](int i) { torch_out = torch_dequant(sets[i], lut, dt); }, nsets,
                                 std::max(3, o.iters / 5));
      const bool torch_equal = same_bits(torch_dequant(sets[0], lut, dt).view({-1}), ours_out);
      torch_out = at::Tensor();

      auto gbps = [&](double ms) { return bytes / (ms * 1e-3) / 1e9; };
      const char* dname = dt == at::kHalf ? "fp16" : "bf16";
      std::printf("%-12s %-5s %5d | %9.4f %8.0f %5.1f%% | %10.0f %5.1f%% | %8.0f %8.0f %5.1f%% %8.0f %5.1f%% | %9.4f | "
                  "%9.4f %8.0f %7.2fx | %s, %s, %s\n",
                  shape_str(s).c_str(), dname, nsets, ours, gbps(ours), 100.0 * gbps(ours) / copy_gbps, copy_same_gbps,
                  100.0 * gbps(ours) / copy_same_gbps, gbps(layout_ms[1]), gbps(layout_ms[2]),
                  100.0 * gbps(layout_ms[2]) / copy_gbps, gbps(layout_ms[3]), 100.0 * gbps(layout_ms[3]) / copy_gbps, api,
                  ref, gbps(ref), ref / ours,
                  torch_equal ? "yes" : "NO", variants_equal ? "yes" : "NO", api_equal ? "yes" : "NO");
      std::fflush(stdout);
      results.push_back({{"shape", {s.rows, s.cols}},
                         {"out_dtype", dname},
                         {"numel", n},
                         {"bytes_per_element", bytes / static_cast<double>(n)},
                         {"sets", nsets},
                         {"ours_ms", ours},
                         {"ours_gbps", gbps(ours)},
                         {"ours_pct_copy", 100.0 * gbps(ours) / copy_gbps},
                         {"copy_same_bytes_gbps", copy_same_gbps},
                         {"ours_pct_copy_same_bytes", 100.0 * gbps(ours) / copy_same_gbps},
                         {"variant_ms", std::vector<double>(layout_ms, layout_ms + kLayouts)},
                         {"variants_bits_equal", variants_equal},
                         {"api_ms", api},
                         {"api_bits_equal", api_equal},
                         {"torch_ms", ref},
                         {"torch_gbps", gbps(ref)},
                         {"speedup_vs_torch", ref / ours},
                         {"torch_bits_equal", torch_equal}});
    }
  }

  if (!o.json_path.empty()) {
    nlohmann::json j = {{"bench", "nf4"},
                        {"device", prop.name},
                        {"sm", prop.major * 10 + prop.minor},
                        {"sms", prop.multiProcessorCount},
                        {"l2_bytes", l2_bytes},
                        {"iters", o.iters},
                        {"copy_gbps", copy_gbps},
                        {"blocksize", 64},
                        {"nested", true},
                        {"method", "median over iters of (CUDA-event time of >= 8 back-to-back launches over `sets` rotated "
                                   "input/output sets) / launches; GB/s = bytes / time, 1 GB = 1e9 bytes"},
                        {"results", results}};
    write_bench_json("nf4", o.json_path, j);
    std::printf("\nwrote %s\n", o.json_path.c_str());
  }
  return kExitOk;
}

#else

int bench_nf4(const BenchOptions&) {
  throw UserError("qlora bench nf4: needs a CUDA device (this build has no CUDA part)");
}

#endif

}  // namespace

CommandFn add_bench_command(CLI::App& app) {
  auto st = std::make_shared<BenchOptions>();
  auto* sub = app.add_subcommand("bench", "benchmark a kernel against plain libtorch, in the same process: "
                                          "qlora bench nf4 [--dtype bf16|fp16|all] [--iters N] [--json FILE]; "
                                          "the decoder: qlora bench model MODEL_DIR [--seq 2048] [--batch 1] "
                                          "[--dtype bf16] [--iters 5] [--no-4bit] [--device cuda|cpu] [--json FILE]; "
                                          "training: qlora bench train --shape llama-3.2-1b|llama-3-8b|... [--seq 2048] "
                                          "[--batch 1] [--rank 16] [--steps 10] [--warmup 3] [--json FILE]; "
                                          "fused linear cross-entropy: qlora bench flce [--iters 5] [--cases all|small] "
                                          "[--json FILE]; its cross-entropy kernels: qlora bench ce [--iters 20] [--json FILE]; "
                                          "the fused RMSNorm / SwiGLU / RoPE kernels: qlora bench fused [--cases all|small] "
                                          "[--iters 20] [--json FILE]; tokenizer encode throughput: qlora bench tokenizer [--tokenizer PATH] "
                                          "[--threads N] [--text FILE] [--iters 3] [--json FILE]");
  sub->add_option("op", st->op, "what to measure: nf4 (NF4 dequantize), model (load + forward, bench_model.cpp), "
                                 "train (QLoRA training steps on a random model of a named shape, bench_train.cpp), "
                                 "flce (fused linear cross-entropy, bench_flce.cpp), ce (its in-place cross-entropy kernels, bench_ce.cpp), fused (RMSNorm / SwiGLU / RoPE kernels vs the ATen ops, bench_fused.cpp), tokenizer (encode MB/s, "
                                 "bench_tokenizer.cpp)")
      ->required()
      ->check(CLI::IsMember({"nf4", "model", "train", "flce", "ce", "fused", "tokenizer"}));
  sub->add_option("--dtype", st->dtype, "output dtype(s); model: the compute dtype (all = bf16)")
      ->check(CLI::IsMember({"bf16", "fp16", "fp32", "all"}))
      ->capture_default_str();
  auto* iters = sub->add_option("--iters", st->iters, "timed samples per measurement (median); model, flce: default 5; ce, fused: 20 (fused on the CPU: 3)");
  iters->capture_default_str();
  sub->add_option("--json", st->json_path, "also write the results to this JSON file");
  sub->add_option("--cases", st->cases,
                  "flce: all (N=4096 and 16384 at H=4096 V=128256, N=8192 H=2304 V=256000, the default) or small "
                  "(N=4096 only); fused: all (a Llama-3-8B layer at 4,096 tokens) or small (tiny odd shapes); default "
                  "all on CUDA, small on the CPU")
      ->check(CLI::IsMember({"all", "small"}));
  auto run = std::make_shared<BenchRunOptions>();
  BenchModelFn bench_model = add_bench_model_options(*sub, run);
  BenchTrainFn bench_train = add_bench_train_options(*sub, run);
  BenchTokenizerFn bench_tokenizer = add_bench_tokenizer_options(*sub);
  return [st, iters, bench_model, bench_train, bench_tokenizer] {
    if (st->op == "model") return bench_model(st->dtype, iters->count() > 0 ? st->iters : 0, st->json_path);
    if (st->op == "train") return bench_train(st->dtype, st->json_path);
    if (st->op == "flce") return bench_flce(st->cases, iters->count() > 0 ? st->iters : 0, st->json_path);
    if (st->op == "fused") return bench_fused(st->cases, iters->count() > 0 ? st->iters : 0, st->json_path);
    if (st->op == "ce") return bench_ce(iters->count() > 0 ? st->iters : 0, st->json_path);
    if (st->op == "tokenizer") return bench_tokenizer(iters->count() > 0 ? st->iters : 0, st->json_path);
    if (st->dtype == "fp32") throw UserError("qlora bench nf4: --dtype must be bf16, fp16 or all (fp32 is for bench model)");
    return bench_nf4(*st);
  };
}

}  // namespace qlora::cli
