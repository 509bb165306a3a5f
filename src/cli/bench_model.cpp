// qlora bench model MODEL_DIR: the Llama-family decoder (model.h) end to end -- load time, memory
// after load, and forward time, tokens/s and peak memory at a given batch x sequence length, with
// NF4 (default) or 16-bit linear weights; on CUDA, or on the CPU for tiny models.
//
// Method (why): load time is wall clock around load_llama (config, safetensors, host -> device,
// quantization at load) ending in a device sync. Memory figures are the CUDA caching allocator's
// own counters (what torch.cuda.memory_allocated/max_memory_allocated report in Python), so they
// compare with HF-side figures taken the same way. The forward runs under NoGradGuard on random
// token ids (seeded); one warm-up pass first (cuBLAS/SDPA heuristics, and the NF4 dequant scratch
// grows to its final size), then --iters timed passes, each bracketed by CUDA events on the current
// stream; the figure is the median. The peak counter is reset after the warm-up and "peak extra"
// is that peak minus what was allocated right after the load: what one forward needs on top of
// the loaded weights, the dequant scratch included. Logits and final hidden states are timed
// separately: their difference is the lm_head GEMM + fp32 upcast.
#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "cli/bench_util.h"
#include "cli/commands.h"
#include "qlora/error.h"
#include "qlora/model.h"

#ifdef QLORA_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#endif

namespace qlora::cli {
namespace {
using nlohmann::json;

struct ModelBenchOptions {
  std::string model_dir;
  std::shared_ptr<BenchRunOptions> run;  // --seq, --batch, --no-4bit, --device, --seed
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double gib(int64_t bytes) { return static_cast<double>(bytes) / (1024.0 * 1024.0 * 1024.0); }

struct MemStats {
  int64_t allocated = 0, reserved = 0, peak = 0;  // bytes (CPU: resident set now / its high-water mark)
};

// CPU fallback: the process's resident set (VmRSS) and its high-water mark (VmHWM), in bytes.
MemStats cpu_mem() {
  MemStats m;
  std::ifstream f("/proc/self/status");
  std::string key;
  int64_t kb = 0;
  std::string unit;
  while (f >> key) {
    if (key == "VmRSS:" && f >> kb >> unit) m.allocated = kb * 1024;
    else if (key == "VmHWM:" && f >> kb >> unit) m.peak = kb * 1024;
  }
  m.reserved = m.allocated;
  return m;
}

#ifdef QLORA_WITH_CUDA
MemStats cuda_mem() {
  const auto s = c10::cuda::CUDACachingAllocator::getDeviceStats(c10::cuda::current_device());
  const auto agg = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
  return {s.allocated_bytes[agg].current, s.reserved_bytes[agg].current, s.allocated_bytes[agg].peak};
}
void cuda_reset_peak() { c10::cuda::CUDACachingAllocator::resetPeakStats(c10::cuda::current_device()); }
void cuda_sync() { c10::cuda::device_synchronize(); }
#endif

struct Device {
  bool cuda = false;
  std::string name = "cpu";
  MemStats mem() const {
#ifdef QLORA_WITH_CUDA
    if (cuda) return cuda_mem();
#endif
    return cpu_mem();
  }
  void reset_peak() const {
#ifdef QLORA_WITH_CUDA
    if (cuda) cuda_reset_peak();
#endif
  }
  void sync() const {
#ifdef QLORA_WITH_CUDA
    if (cuda) cuda_sync();
#endif
  }
};

// Milliseconds of each of `iters` calls of fn, after one warm-up call. CUDA: events on the current
// stream around the call (the host may run ahead; the events measure the device); CPU: wall clock.
std::vector<double> time_forward(const Device& dev, int iters, const std::function<at::Tensor()>& fn) {
  fn();
  dev.sync();
  dev.reset_peak();
  std::vector<double> ms;
#ifdef QLORA_WITH_CUDA
  if (dev.cuda) {
    at::cuda::CUDAEvent start(cudaEventDefault), stop(cudaEventDefault);
    for (int i = 0; i < iters; ++i) {
      const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
      start.record(stream);
      at::Tensor out = fn();
      stop.record(stream);
      stop.synchronize();
      ms.push_back(static_cast<double>(start.elapsed_time(stop)));
    }
    return ms;
  }
#endif
  for (int i = 0; i < iters; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    at::Tensor out = fn();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  return ms;
}

at::ScalarType compute_dtype(const std::string& name) {
  if (name == "bf16" || name == "all") return at::kBFloat16;  // "all": bench's --dtype left at its nf4 default
  if (name == "fp16") return at::kHalf;
  if (name == "fp32") return at::kFloat;
  throw UserError("qlora bench model: --dtype must be bf16, fp16 or fp32, found " + name);
}

// Matmul FLOPs of one forward, the convention of training-throughput reports: 2 per multiply-add
// of every linear layer and the lm_head, plus causal attention (QK^T and PV over the lower
// triangle: 2 * 2 * T^2/2 * head_dim per head). The NF4 dequant is work on top, not counted.
double forward_flops(const HFConfig& c, int64_t batch, int64_t seq, int64_t linear_params) {
  const double tokens = static_cast<double>(batch * seq);
  const double gemm = 2.0 * tokens * static_cast<double>(linear_params + c.vocab_size * c.hidden_size);
  const double attn = 2.0 * static_cast<double>(c.num_hidden_layers * batch * c.num_attention_heads * c.head_dim) *
                      static_cast<double>(seq) * static_cast<double>(seq);
  return gemm + attn;
}

int run_bench_model(const ModelBenchOptions& mo, const std::string& dtype_name, int iters_given, const std::string& json_path) {
  const BenchRunOptions& o = *mo.run;
  if (mo.model_dir.empty())
    throw UserError("qlora bench model: MODEL_DIR is required (qlora bench model MODEL_DIR [--seq N] [--batch N] ...)");
  if (o.seq < 1 || o.batch < 1)
    throw UserError("qlora bench model: --seq and --batch must be >= 1, found " + std::to_string(o.seq) + " and " + std::to_string(o.batch));
  const int iters = iters_given > 0 ? iters_given : 5;
  const at::ScalarType dtype = compute_dtype(dtype_name);
  Device dev;
  if (o.device == "cuda") {
#ifdef QLORA_WITH_CUDA
    if (!at::hasCUDA() || at::getNumGPUs() == 0)
      throw UserError("qlora bench model: needs a CUDA device (none is visible; --device cpu runs tiny models on the CPU)");
    dev.cuda = true;
    cudaDeviceProp prop{};
    cudaGetDeviceProperties(&prop, c10::cuda::current_device());
    dev.name = prop.name;
    // The caching allocator sets up its per-device state on the first CUDA allocation; its stats
    // calls fail ("Invalid device argument") before that.
    (void)at::empty({1}, at::TensorOptions(at::kFloat).device(at::kCUDA));
#else
    throw UserError("qlora bench model: this build has no CUDA part (--device cpu runs tiny models on the CPU)");
#endif
  } else if (o.device != "cpu") {
    throw UserError("qlora bench model: --device must be cuda or cpu, found " + o.device);
  }

  ModelLoadOptions lo;
  lo.load_in_4bit = !o.no_4bit;
  lo.compute_dtype = dtype;
  lo.device = at::Device(at::kCPU);
#ifdef QLORA_WITH_CUDA
  if (dev.cuda) lo.device = at::Device(at::kCUDA, c10::cuda::current_device());
#endif
  const char* dtype_label = dtype == at::kBFloat16 ? "bf16" : dtype == at::kHalf ? "fp16" : "fp32";
  std::printf("qlora bench model %s on %s: %s linears, compute %s, batch %lld x seq %lld, iters %d\n", mo.model_dir.c_str(),
              dev.name.c_str(), o.no_4bit ? "16-bit" : "NF4", dtype_label, static_cast<long long>(o.batch),
              static_cast<long long>(o.seq), iters);
  std::fflush(stdout);

  dev.sync();
  dev.reset_peak();
  const MemStats before = dev.mem();
  const auto t0 = std::chrono::steady_clock::now();
  const LlamaWeights model = load_llama(mo.model_dir, lo);
  dev.sync();
  const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const MemStats loaded = dev.mem();
  const ModelFootprint fp = model_footprint(model);
  const HFConfig& c = model.config;
  std::printf("load: %.2f s wall (config + safetensors -> %s%s), %lld parameters (%.3f B; linear %.3f B)\n", load_s,
              dev.cuda ? "GPU" : "CPU", o.no_4bit ? "" : ", NF4 at load", static_cast<long long>(fp.parameters),
              static_cast<double>(fp.parameters) / 1e9, static_cast<double>(fp.linear_parameters) / 1e9);
  if (dev.cuda)
    std::printf("memory after load: allocated %.2f GiB, reserved %.2f GiB, peak during load %.2f GiB "
                "(weights as held: %.2f GiB; as 16-bit: %.2f GiB)\n",
                gib(loaded.allocated - before.allocated), gib(loaded.reserved), gib(loaded.peak - before.allocated),
                gib(fp.bytes_as_loaded), gib(fp.bytes_16bit));
  else
    std::printf("memory after load: resident set +%.2f GiB (now %.2f GiB, high-water %.2f GiB) "
                "(weights as held: %.2f GiB; as 16-bit: %.2f GiB)\n",
                gib(loaded.allocated - before.allocated), gib(loaded.allocated), gib(loaded.peak), gib(fp.bytes_as_loaded),
                gib(fp.bytes_16bit));
  std::fflush(stdout);

  at::NoGradGuard no_grad;
  // Both rows' "peak extra" count from here, so both include the dequant scratch (which the first
  // row's warm-up allocates and the second one reuses).
  const int64_t base = dev.mem().allocated;
  at::manual_seed(o.seed);
  const at::Tensor ids = at::randint(c.vocab_size, {o.batch, o.seq}, at::TensorOptions(at::kLong)).to(lo.device);
  const ForwardInputs inputs{ids, at::Tensor()};
  DequantScratch scratch;
  const double tokens = static_cast<double>(o.batch * o.seq);
  const double flops = forward_flops(c, o.batch, o.seq, fp.linear_parameters);

  struct Row {
    std::string what;
    std::vector<double> ms;
    int64_t peak_extra = 0, peak = 0;
  };
  std::vector<Row> rows;
  auto measure = [&](const std::string& what, const std::function<at::Tensor()>& fn) {
    Row r{what, time_forward(dev, iters, fn)};
    const MemStats m = dev.mem();
    r.peak = m.peak;
    r.peak_extra = m.peak - base;
    rows.push_back(std::move(r));
  };
  measure("logits", [&] { return llama_logits(model, inputs, scratch); });
  measure("hidden", [&] { return llama_hidden_states(model, inputs, scratch); });
  const int64_t scratch_bytes = scratch.buffer.defined() ? static_cast<int64_t>(scratch.buffer.nbytes()) : 0;

  // CPU: the resident set's high-water mark stands in for the allocator peak (never reset).
  std::printf("\n%-22s %10s %10s %10s %12s %9s %15s %9s\n", "forward", "median ms", "min ms", "max ms", "tokens/s", "TFLOP/s",
              "peak extra GiB", "peak GiB");
  json jrows = json::object();
  for (const Row& r : rows) {
    const double med = median(r.ms);
    const double mn = *std::min_element(r.ms.begin(), r.ms.end()), mx = *std::max_element(r.ms.begin(), r.ms.end());
    const bool logits = r.what == "logits";
    // The hidden-state pass skips the lm_head: take its FLOPs out.
    const double f = logits ? flops : flops - 2.0 * tokens * static_cast<double>(c.vocab_size * c.hidden_size);
    const std::string label = logits ? "logits (fp32 [B,T,V])" : "hidden (final norm)";
    std::printf("%-22s %10.2f %10.2f %10.2f %12.0f %9.1f %15.2f %9.2f\n", label.c_str(), med, mn, mx, tokens / (med * 1e-3),
                f / (med * 1e-3) / 1e12, gib(r.peak_extra), gib(r.peak));
    jrows[r.what] = {{"median_ms", med},
                     {"min_ms", mn},
                     {"max_ms", mx},
                     {"samples_ms", r.ms},
                     {"tokens_per_s", tokens / (med * 1e-3)},
                     {"model_flops", f},
                     {"tflops", f / (med * 1e-3) / 1e12},
                     {"peak_bytes", r.peak},
                     {"peak_extra_bytes", r.peak_extra}};
  }
  std::printf("lm_head + upcast (logits - hidden): %.2f ms; NF4 dequant scratch: %.1f MiB\n",
              median(rows[0].ms) - median(rows[1].ms), static_cast<double>(scratch_bytes) / (1024.0 * 1024.0));
  std::fflush(stdout);

  if (!json_path.empty()) {
    json j = {{"bench", "model"},
              {"model_dir", mo.model_dir},
              {"device", dev.name},
              {"load_in_4bit", !o.no_4bit},
              {"compute_dtype", dtype_label},
              {"batch", o.batch},
              {"seq", o.seq},
              {"iters", iters},
              {"seed", o.seed},
              {"config",
               {{"model_type", c.model_type},
                {"num_hidden_layers", c.num_hidden_layers},
                {"hidden_size", c.hidden_size},
                {"intermediate_size", c.intermediate_size},
                {"num_attention_heads", c.num_attention_heads},
                {"num_key_value_heads", c.num_key_value_heads},
                {"head_dim", c.head_dim},
                {"vocab_size", c.vocab_size}}},
              {"parameters", fp.parameters},
              {"linear_parameters", fp.linear_parameters},
              {"load_s", load_s},
              {"memory_after_load",
               {{"allocated_bytes", loaded.allocated - before.allocated},
                {"reserved_bytes", loaded.reserved},
                {"peak_during_load_bytes", loaded.peak - before.allocated},
                {"weights_as_held_bytes", fp.bytes_as_loaded},
                {"weights_16bit_bytes", fp.bytes_16bit},
                {"source", dev.cuda ? "CUDACachingAllocator device stats" : "/proc/self/status VmRSS, VmHWM"}}},
              {"forward", jrows},
              {"dequant_scratch_bytes", scratch_bytes},
              {"method", "load: wall clock around load_llama + device sync. forward: NoGradGuard, random ids, 1 warm-up, "
                         "then iters passes each timed by CUDA events (CPU: wall clock); median. peak extra: allocator "
                         "peak after a reset post-warm-up, minus allocated after the load. TFLOP/s: 2*(linear+lm_head "
                         "params)*tokens + causal attention 2*L*B*heads*head_dim*T^2, NF4 dequant not counted"}};
    write_bench_json("model", json_path, j);
    std::printf("wrote %s\n", json_path.c_str());
  }
  return kExitOk;
}

}  // namespace

BenchModelFn add_bench_model_options(CLI::App& bench, std::shared_ptr<BenchRunOptions> run) {
  auto st = std::make_shared<ModelBenchOptions>();
  st->run = run;
  bench.add_option("model_dir", st->model_dir, "model: the Hugging Face model folder (config.json + safetensors)");
  bench.add_option("--seq", run->seq, "model, train: tokens per sequence")->capture_default_str();
  bench.add_option("--batch", run->batch, "model, train: sequences per forward (train: per step)")->capture_default_str();
  bench.add_flag("--no-4bit", run->no_4bit, "model, train: keep the linear weights 16-bit (default: NF4)");
  bench.add_option("--device", run->device, "model, train: cuda, or cpu for tiny models")
      ->check(CLI::IsMember({"cuda", "cpu"}))
      ->capture_default_str();
  bench.add_option("--seed", run->seed, "model, train: seed of the random token ids (train: and weights)")
      ->capture_default_str();
  return [st](const std::string& dtype, int iters, const std::string& json_path) {
    return run_bench_model(*st, dtype, iters, json_path);
  };
}

}  // namespace qlora::cli
