// qlora bench train --shape NAME: QLoRA training steps timed end to end on a random model of a named
// shape (random_llama: built in memory on the device, nothing downloaded or written), through the
// real trainer (make_trainer + train_step: checkpointed layer loop, fused loss, AdamW). Prints
// tokens/s, MFU with its formula, peak memory and, on CUDA, a time split of one profiled step by
// kernel kind (dequant, GEMMs, attention, loss, optimizer, communication, other kernels, GPU idle).
//
// Method (why): --warmup steps first (cuBLAS heuristics, the dequant scratch and the allocator reach
// their steady state), then the peak-memory counter is reset and --steps steps are timed as one
// wall-clock interval ending in a device sync (a step already syncs once for its loss value, so the
// host cannot run ahead by more than a step). Peak memory is the caching allocator's peak over the
// timed steps (what torch.cuda.max_memory_allocated reports, so it compares with bench_hf.py).
// The time split comes from one more step under the Kineto profiler (CUDA kernel activity): each
// kernel's device time is summed into a kind chosen by its name; "GPU idle" is the step's wall time
// minus the summed kernel time (host work the GPU waited for; negative when kernels overlapped on
// the prefetch stream). The profiled step is not part of the timed figure.
//
// --seq-search (long context): from --seq, doubling, one warm-up + one timed step per length,
// until a step runs out of GPU memory (c10's error, or the trainer's OutOfMemory that it becomes);
// the longest length that trained is the figure (with --offload: activation offloading, as
// axolotl's activation_offloading).
//
// MFU = tokens/s x FLOPs per token / peak, with FLOPs per token = 4 N_base + 6 N_lora + 12 L s d
// (N_base: the frozen matmul parameters, lm_head included, forward + input-gradient GEMMs;
// N_lora: LoRA parameters, forward + both gradients; 12 L s d: attention scores and values, forward
// and backward, s the sequence length and d = heads x head_dim). The recompute of checkpointed
// layers is not counted (it is overhead, not useful work), as in the PaLM paper's MFU.
//
// --prompt-fraction F: the first F of every row is a prompt with no loss (labels -100), as supervised
// fine-tuning masks prompts; the loss skips those rows' lm_head GEMMs (src/loss/flce.cpp). tokens/s
// still counts every token, and the MFU formula above still counts every token's lm_head work, so
// with F > 0 it overstates the work done by F x 4 V H per token.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "cli/bench_util.h"
#include "cli/commands.h"
#include "qlora/error.h"
#include "qlora/host_memory.h"
#include "qlora/log.h"
#include "qlora/lora.h"
#include "qlora/model.h"
#include "qlora/trainer.h"
#include "util/timeline.h"

#ifdef QLORA_WITH_CUDA
#include <ATen/cuda/CachingHostAllocator.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime.h>
#include <torch/csrc/autograd/profiler_kineto.h>
#endif

namespace qlora::cli {
namespace {

using nlohmann::json;

struct TrainBenchOptions {
  std::string shape;
  int rank = 16;
  int steps = 10;
  int warmup = 3;
  double peak_tflops = 0;  // 0: from the device name (peak_tflops_for)
  bool no_profile = false;
  bool offload = false;      // activation_offloading: checkpointed layer inputs in pinned CPU memory
  bool embedding_offload = false;  // embedding_offloading: the input embedding table in pinned CPU memory
  bool lm_head_offload = false;    // lm_head_offloading: lm_head in pinned CPU memory, on the GPU for the loss
  int64_t mlp_tile_tokens = 0;     // mlp_tile_tokens: the layers' MLP over tiles of N tokens (0: off)
  bool seq_search = false;   // find the longest --seq that trains (doubling until out of memory)
  int64_t max_seq = 262144;
  double gpu_memory_limit = 0;  // GiB the caching allocator may hold (an 80 GB card's budget on a larger one)
  int64_t checkpoint_layers = -1;  // gradient_checkpointing_layers: the first N layers recompute (-1: all)
  bool no_fused_kernels = false;   // fused_kernels: false (the ATen ops instead of the fused kernels)
  bool recompute_unread = false;   // TrainerOptions::recompute_unread_outputs (the recompute as before 2026-12-07)
  bool no_reuse_weights = false;   // gradient_checkpointing_reuse_weights off: the backward dequantizes again
  bool split_layers = false;       // gradient_checkpointing_split_layers: true (default auto: with --offload)
  bool no_split_layers = false;    // gradient_checkpointing_split_layers: false
  double prompt_fraction = 0;      // the first fraction of each row has no loss (labels -100)
  int top_kernels = 8;             // the profiled step's most expensive "other" kernels, by name
  AttentionBackend attention = AttentionBackend::auto_;  // attention_backend: the SDPA kernel tried first
  std::shared_ptr<const BenchRunOptions> run;
};

// Dense peak of the compute dtype, TFLOP/s, from NVIDIA's data sheets (no sparsity): H100/H200 SXM
// bf16/fp16 989.4; A100 312; L4 121; A10 125; T4 fp16 65. 0 when the device is not known.
double peak_tflops_for(const std::string& device_name) {
  const std::vector<std::pair<std::string, double>> table = {
      {"H100", 989.4}, {"H200", 989.4}, {"A100", 312.0}, {"L4", 121.0}, {"A10", 125.0}, {"T4", 65.0}};
  for (const auto& [key, tflops] : table)
    if (device_name.find(key) != std::string::npos) return tflops;
  return 0.0;
}

struct FlopsPerToken {
  int64_t n_base = 0;  // frozen matmul parameters (7 projections x layers + lm_head)
  int64_t n_lora = 0;
  double attention = 0;  // 12 L s d
  double total() const { return 4.0 * static_cast<double>(n_base) + 6.0 * static_cast<double>(n_lora) + attention; }
};

FlopsPerToken flops_per_token(const LlamaWeights& model, const LoraModel& lora, int64_t seq) {
  FlopsPerToken f;
  for (const DecoderLayerWeights& l : model.layers)
    for (const std::string& p : lora_projection_names()) {
      const LinearWeight& w = base_projection(l, p);
      f.n_base += w.out_features * w.in_features;
    }
  f.n_base += model.config.vocab_size * model.config.hidden_size;  // lm_head (tied or not, it is a GEMM)
  f.n_lora = lora_parameter_count(lora);
  const double d = static_cast<double>(model.config.num_attention_heads * model.config.head_dim);
  f.attention = 12.0 * static_cast<double>(model.config.num_hidden_layers) * static_cast<double>(seq) * d;
  return f;
}

// The kind of a CUDA kernel, from its name (cuBLAS on Hopper names its kernels nvjet_*, older
// ones *gemm*; SDPA's kernels are flash / fmha / efficient attention; AdamW and clipping run
// _foreach ops, whose kernels are multi_tensor_apply_kernel).
[[maybe_unused]] std::string kernel_kind(const std::string& name) {  // used by the CUDA build only
  std::string n = name;
  std::transform(n.begin(), n.end(), n.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  auto has = [&](const char* s) { return n.find(s) != std::string::npos; };
  if (has("nf4")) return "dequant";
  if (has("gemm") || has("nvjet") || has("cutlass") || has("xmma") || has("gemv")) return "gemm";
  if (has("flash") || has("fmha") || has("attention") || has("attn")) return "attention";
  if (has("cross_entropy")) return "loss";
  if (has("multi_tensor_apply")) return "optimizer";
  if (has("nccl")) return "communication";
  return "other kernels";
}

#ifdef QLORA_WITH_CUDA
// Device time per kernel kind (ms) over one call of fn, from the Kineto profiler; "GPU idle" and
// "wall" (ms) added.
std::map<std::string, double> profile_step(const std::function<void()>& fn,
                                           std::map<std::string, double>& other_by_name, IdleSummary& idle,
                                           size_t n_gaps) {
  namespace prof = torch::autograd::profiler;
  using torch::profiler::impl::ActivityType;
  const torch::profiler::impl::ProfilerConfig cfg(torch::profiler::impl::ProfilerState::KINETO);
  const std::set<ActivityType> acts = {ActivityType::CPU, ActivityType::CUDA};
  prof::prepareProfiler(cfg, acts);
  prof::enableProfiler(cfg, acts);
  c10::cuda::device_synchronize();
  const auto t0 = std::chrono::steady_clock::now();
  fn();
  c10::cuda::device_synchronize();
  const double wall = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  const std::unique_ptr<prof::ProfilerResult> result = prof::disableProfiler();
  std::map<std::string, double> ms;
  double kernels = 0;
  std::vector<TimedEvent> device_events, host_events;
  for (const auto& e : result->events()) {
    const auto start = static_cast<int64_t>(e.startNs()), end = static_cast<int64_t>(e.endNs());
    // Kernels only: memcpy / memset activities are counted under "other kernels" by their names,
    // CPU-side events (deviceType CPU) only name what the host did during an idle gap.
    if (e.deviceType() != c10::DeviceType::CUDA) {
      host_events.push_back({start, end, e.name()});
      continue;
    }
    device_events.push_back({start, end, e.name()});
    const double t = static_cast<double>(e.durationNs()) / 1e6;
    const std::string kind = kernel_kind(e.name());
    ms[kind] += t;
    if (kind == "other kernels") other_by_name[e.name()] += t;
    kernels += t;
  }
  ms["GPU idle"] = wall - kernels;
  ms["wall"] = wall;
  idle = idle_gaps(std::move(device_events), host_events, n_gaps, /*min_gap_ns=*/20000);
  return ms;
}
#endif

// One configuration measured: the trainer built on (a shallow copy of) the model, random rows of
// `seq` tokens, warm-up, timed steps, and optionally one profiled step.
struct Measurement {
  int64_t seq = 0;
  double seconds_per_step = 0, tokens_per_s = 0, last_loss = 0;
  int64_t peak_bytes = 0;
  FlopsPerToken flops;
  std::map<std::string, double> split;  // CUDA time split (empty when not profiled)
  std::map<std::string, double> other_by_name;  // ms of each "other" kernel name in the profiled step
  IdleSummary idle;                             // the profiled step's gaps between kernels
  std::array<int64_t, 5> phase_peak_bytes{};    // the timed steps' peak within each TrainPhase
};

Measurement measure(const TrainConfig& base_config, const LlamaWeights& model, int64_t seq, int64_t batch, int steps,
                    int warmup, bool profile, uint64_t seed, double prompt_fraction, bool recompute_unread,
                    size_t n_gaps = 0) {
  TrainConfig config = base_config;
  config.sequence_len = static_cast<int>(seq);
  config.max_steps = warmup + steps + (profile ? 1 : 0);
  [[maybe_unused]] const at::Device device = model.device;  // read by the CUDA build only
  // Random token rows of exactly seq tokens (no padding, no packing), every position a target but
  // the first `prompt` ones (a masked prompt).
  const int64_t prompt = static_cast<int64_t>(prompt_fraction * static_cast<double>(seq));
  PreparedData data;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed + 1);
  const int64_t rows = config.max_steps * batch;
  const at::Tensor ids = at::randint(model.config.vocab_size, {rows, seq}, gen, at::TensorOptions().dtype(at::kInt));
  const int32_t* p = ids.data_ptr<int32_t>();
  for (int64_t i = 0; i < rows; ++i) {
    TokenizedExample ex;
    ex.input_ids.assign(p + i * seq, p + (i + 1) * seq);
    ex.labels = ex.input_ids;
    std::fill(ex.labels.begin(), ex.labels.begin() + prompt, -100);
    data.train.push_back(std::move(ex));
  }
  data.stats.records = rows;
  data.stats.tokens = rows * seq;
  data.stats.trainable_tokens = rows * (seq - prompt);
  TrainerOptions topt;
  topt.write_outputs = false;
  topt.recompute_unread_outputs = recompute_unread;
  topt.track_phase_peaks = true;
  TrainerInputs inputs;
  inputs.model = model;  // shares the weight tensors
  inputs.data = std::move(data);
  Trainer t = make_trainer(config, topt, nullptr, std::move(inputs));

  Measurement m;
  m.seq = seq;
  m.flops = flops_per_token(t.model, t.lora, seq);
  auto sync = [&] {
#ifdef QLORA_WITH_CUDA
    if (device.is_cuda()) c10::cuda::device_synchronize();
#endif
  };
  for (int i = 0; i < warmup; ++i) train_step(t);
  sync();
#ifdef QLORA_WITH_CUDA
  if (device.is_cuda()) c10::cuda::CUDACachingAllocator::resetPeakStats(device.index());
#endif
  t.phase_peak_bytes = {};  // the timed steps only
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < steps; ++i) m.last_loss = train_step(t).loss;
  sync();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  m.seconds_per_step = secs / steps;
  m.tokens_per_s = static_cast<double>(steps) * static_cast<double>(batch * seq) / secs;
#ifdef QLORA_WITH_CUDA
  if (device.is_cuda()) {
    // Every phase change reset the allocator's peak counters: the peak is the phases' maximum.
    note_phase_peak(t);
    m.phase_peak_bytes = t.phase_peak_bytes;
    m.peak_bytes = *std::max_element(m.phase_peak_bytes.begin(), m.phase_peak_bytes.end());
    if (profile) m.split = profile_step([&] { train_step(t); }, m.other_by_name, m.idle, n_gaps);
  }
#else
  (void)profile;
#endif
  return m;
}

std::string shape_list() {
  std::string s;
  for (const std::string& n : model_shape_names()) s += (s.empty() ? "" : ", ") + n;
  return s;
}

int run_bench_train(const TrainBenchOptions& o, const std::string& dtype_name, const std::string& json_path) {
  const BenchRunOptions& r = *o.run;
  if (o.shape.empty()) throw UserError("qlora bench train: --shape is required (one of: " + shape_list() + ")");
  if (r.seq < 2 || r.batch < 1) throw UserError("qlora bench train: --seq must be >= 2 and --batch >= 1");
  if (!(o.prompt_fraction >= 0 && o.prompt_fraction < 1)) {
    char found[32];
    std::snprintf(found, sizeof found, "%g", o.prompt_fraction);
    throw UserError(std::string("qlora bench train: --prompt-fraction must be in [0, 1), found ") + found);
  }
  if (o.rank < 1) throw UserError("qlora bench train: --rank must be >= 1, found " + std::to_string(o.rank));
  if (o.mlp_tile_tokens < 0)
    throw UserError("qlora bench train: --mlp-tile-tokens must be >= 0 (0: off), found " + std::to_string(o.mlp_tile_tokens));
  if (o.steps < 1 || o.warmup < 0) throw UserError("qlora bench train: --steps must be >= 1 and --warmup >= 0");
  if (o.seq_search && r.device != "cuda")
    throw UserError("qlora bench train: --seq-search finds the longest sequence that fits in GPU memory: needs --device cuda");
  const HFConfig shape = model_shape_config(o.shape);

  TrainConfig config;
  config.base_model = "random:" + o.shape;  // never read: the model is built in memory
  config.adapter = AdapterType::qlora;
  config.load_in_4bit = !r.no_4bit;
  config.lora_r = o.rank;
  config.lora_alpha = 2.0 * o.rank;
  config.lora_dropout = 0.0;
  config.lora_target_linear = true;
  config.sample_packing = false;
  config.micro_batch_size = static_cast<int>(r.batch);
  config.gradient_accumulation_steps = 1;
  config.lr_scheduler = LrScheduler::constant;
  config.gradient_checkpointing = true;
  config.activation_offloading = o.offload;
  config.embedding_offloading = o.embedding_offload;
  config.lm_head_offloading = o.lm_head_offload;
  config.mlp_tile_tokens = o.mlp_tile_tokens;
  config.gradient_checkpointing_layers = o.checkpoint_layers;
  config.gradient_checkpointing_reuse_weights = !o.no_reuse_weights;
  config.gradient_checkpointing_split_layers = o.split_layers      ? AutoBool::on
                                               : o.no_split_layers ? AutoBool::off
                                                                   : AutoBool::auto_;
  config.fused_kernels = !o.no_fused_kernels;
  config.attention_backend = o.attention;
  config.gpu_memory_limit = o.gpu_memory_limit;
  config.device = r.device;
  config.seed = static_cast<int64_t>(r.seed);
  if (dtype_name == "fp16") {
    config.fp16 = true;
    config.bf16 = Bf16Mode::off;
  } else if (dtype_name == "fp32") {
    config.bf16 = Bf16Mode::off;
  } else {
    config.bf16 = Bf16Mode::on;  // bf16 or "all" (bench's default --dtype)
  }
  const at::Device device = resolve_train_device(config.device);
  std::string device_name = "cpu";
#ifdef QLORA_WITH_CUDA
  if (device.is_cuda()) {
    c10::cuda::set_device(device.index());
    cudaDeviceProp prop{};
    cudaGetDeviceProperties(&prop, device.index());
    device_name = prop.name;
  }
#endif

  ModelLoadOptions mo;
  mo.load_in_4bit = config.load_in_4bit;
  mo.compute_dtype = resolve_compute_dtype(config, device);
  mo.device = device;
  const auto t_build = std::chrono::steady_clock::now();
  LlamaWeights model = random_llama(shape, mo, r.seed);
  // The trainers share these tensors: offload this copy's tables, or their GPU memory stays held here.
  offload_frozen_tables(model, config, device);
  const double build_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_build).count();
  const char* attention_name = o.attention == AttentionBackend::flash       ? "flash"
                               : o.attention == AttentionBackend::cudnn     ? "cudnn"
                               : o.attention == AttentionBackend::efficient ? "efficient"
                               : o.attention == AttentionBackend::math      ? "math"
                                                                            : "auto";
  const char* dtype_label = mo.compute_dtype == at::kBFloat16 ? "bf16" : mo.compute_dtype == at::kHalf ? "fp16" : "fp32";
  std::printf("qlora bench train --shape %s on %s: %s base, compute %s, LoRA r %d (alpha %d) on all 7 projections, "
              "batch %lld, gradient checkpointing%s%s%s%s%s%s%s%s%s%s; model built in %.1f s\n",
              o.shape.c_str(), device_name.c_str(), mo.load_in_4bit ? "NF4" : "16-bit", dtype_label, o.rank, 2 * o.rank,
              static_cast<long long>(r.batch),
              o.checkpoint_layers >= 0 ? (" of the first " + std::to_string(o.checkpoint_layers) + " layers").c_str() : "",
              o.offload ? " + activation offloading" : "", o.embedding_offload ? ", embedding in host memory" : "",
              o.lm_head_offload ? ", lm_head in host memory" : "",
              o.mlp_tile_tokens > 0 ? (", MLP in tiles of " + std::to_string(o.mlp_tile_tokens) + " tokens").c_str() : "",
              o.no_fused_kernels ? ", fused kernels off" : "",
              o.recompute_unread ? ", recompute of unread outputs" : "",
              o.no_reuse_weights ? ", backward dequantizes again" : "",
              o.attention == AttentionBackend::auto_ ? "" : (std::string(", ") + attention_name + " attention first").c_str(),
              o.prompt_fraction > 0 ? (", the first " + std::to_string(static_cast<int>(100 * o.prompt_fraction + 0.5)) +
                                       " % of each row a masked prompt").c_str()
                                    : "",
              build_s);
  std::fflush(stdout);
  json out = {{"shape", o.shape}, {"device", device_name}, {"dtype", dtype_label}, {"nf4", mo.load_in_4bit},
              {"rank", o.rank},   {"batch", r.batch},      {"offload", o.offload}, {"embedding_offload", o.embedding_offload}, {"lm_head_offload", o.lm_head_offload}, {"mlp_tile_tokens", o.mlp_tile_tokens},
              {"checkpoint_layers", o.checkpoint_layers}, {"fused_kernels", !o.no_fused_kernels},
              {"recompute_unread_outputs", o.recompute_unread},
              {"reuse_weights", !o.no_reuse_weights},
              {"attention", attention_name},
              {"prompt_fraction", o.prompt_fraction}};

  if (o.seq_search) {
    // The longest sequence that trains: doubling from --seq until a step runs out of memory.
    json tried = json::array();
    std::optional<Measurement> best;
    for (int64_t seq = r.seq; seq <= o.max_seq; seq *= 2) {
#ifdef QLORA_WITH_CUDA
      // The previous length's pinned offload buffers sit in the caching host allocator: give them
      // back before the next, larger try (they were 32 GiB at 131,072 tokens of the 8B shape).
      at::getHostAllocator(at::kCUDA)->empty_cache();
#endif
      if (o.offload) {
        const int64_t layers = o.checkpoint_layers < 0 ? shape.num_hidden_layers
                                                       : std::min<int64_t>(shape.num_hidden_layers, o.checkpoint_layers);
        const int64_t need = offload_pinned_bytes(layers, seq * r.batch, shape.hidden_size,
                                                  static_cast<int64_t>(c10::elementSize(mo.compute_dtype)));
        const HostMemory host = host_memory_available();
        if (host.available >= 0 && static_cast<double>(need) > 0.9 * static_cast<double>(host.available)) {
          std::printf("  seq %7lld: not tried: the offloaded layer inputs need %.1f GiB of pinned host memory, more "
                      "than 90 %% of the %.1f GiB available (%s)\n",
                      static_cast<long long>(seq), static_cast<double>(need) / (1 << 30),
                      static_cast<double>(host.available) / (1 << 30), host.source.c_str());
          tried.push_back({{"seq", seq}, {"fits", false}, {"reason", "host memory"}, {"pinned_bytes_needed", need},
                           {"host_bytes_available", host.available}});
          break;
        }
      }
      try {
        const Measurement m = measure(config, model, seq, r.batch, 1, 1, false, r.seed, o.prompt_fraction,
                                      o.recompute_unread);
        std::printf("  seq %7lld: fits, %.0f tokens/s, peak %.2f GiB\n", static_cast<long long>(seq), m.tokens_per_s,
                    static_cast<double>(m.peak_bytes) / (1 << 30));
        tried.push_back({{"seq", seq}, {"fits", true}, {"tokens_per_s", m.tokens_per_s}, {"peak_memory_bytes", m.peak_bytes}});
        best = m;
      } catch (const std::exception& e) {
        // c10's out-of-memory error, or the trainer's OutOfMemory (qlora/error.h) that a step's
        // out-of-memory becomes, with the phase named: either ends the search. Anything else is a
        // real failure.
        const bool oom = dynamic_cast<const c10::OutOfMemoryError*>(&e) || dynamic_cast<const OutOfMemory*>(&e);
        if (!oom) throw;
        std::printf("  seq %7lld: out of memory (%s)\n", static_cast<long long>(seq), e.what());
        tried.push_back({{"seq", seq}, {"fits", false}, {"error", e.what()}});
#ifdef QLORA_WITH_CUDA
        c10::cuda::CUDACachingAllocator::emptyCache();
#endif
        break;
      }
      std::fflush(stdout);
    }
    out["seq_search"] = tried;
    out["longest_seq"] = best ? best->seq : 0;
    std::printf("  longest sequence that trains at batch %lld: %lld\n", static_cast<long long>(r.batch),
                static_cast<long long>(best ? best->seq : 0));
  } else {
    const bool profile = device.is_cuda() && !o.no_profile;
    const Measurement m = measure(config, model, r.seq, r.batch, o.steps, o.warmup, profile, r.seed, o.prompt_fraction,
                                  o.recompute_unread, static_cast<size_t>(std::max(0, o.top_kernels)));
    const double peak_tf = o.peak_tflops > 0 ? o.peak_tflops : (device.is_cuda() ? peak_tflops_for(device_name) : 0.0);
    const double achieved_tf = m.tokens_per_s * m.flops.total() / 1e12;
    const double mfu = peak_tf > 0 ? achieved_tf / peak_tf : 0.0;
    std::printf("  seq %lld: %d timed steps (after %d warm-up): %.3f s/step, %.0f tokens/s, last loss %.4f\n",
                static_cast<long long>(m.seq), o.steps, o.warmup, m.seconds_per_step, m.tokens_per_s, m.last_loss);
    std::printf("  FLOPs/token = 4 N_base + 6 N_lora + 12 L s d = 4 x %lld + 6 x %lld + %.3g = %.4g -> %.1f TFLOP/s",
                static_cast<long long>(m.flops.n_base), static_cast<long long>(m.flops.n_lora), m.flops.attention,
                m.flops.total(), achieved_tf);
    if (peak_tf > 0) std::printf(", MFU %.1f %% of %.1f TFLOP/s\n", 100.0 * mfu, peak_tf);
    else std::printf(" (MFU: no peak known for this device; give --peak-tflops)\n");
    if (device.is_cuda()) {
      std::printf("  peak memory (caching allocator): %.2f GiB; by phase:", static_cast<double>(m.peak_bytes) / (1 << 30));
      json jp;
      for (TrainPhase ph : {TrainPhase::forward, TrainPhase::loss, TrainPhase::backward, TrainPhase::optimizer}) {
        const int64_t b = m.phase_peak_bytes[static_cast<size_t>(ph)];
        std::printf(" %s %.2f", to_string(ph), static_cast<double>(b) / (1 << 30));
        jp[to_string(ph)] = b;
      }
      std::printf(" GiB\n");
      out["phase_peak_memory_bytes"] = jp;
    }
    out.update({{"seq", m.seq},
                {"steps", o.steps},
                {"warmup", o.warmup},
                {"seconds_per_step", m.seconds_per_step},
                {"tokens_per_s", m.tokens_per_s},
                {"last_loss", m.last_loss},
                {"flops_per_token", m.flops.total()},
                {"n_base", m.flops.n_base},
                {"n_lora", m.flops.n_lora},
                {"achieved_tflops", achieved_tf},
                {"peak_tflops", peak_tf},
                {"mfu", mfu},
                {"peak_memory_bytes", m.peak_bytes}});
    if (!m.split.empty()) {
      const double wall = m.split.at("wall");
      std::printf("  time split of one profiled step (%.1f ms wall, device time by kernel kind):\n", wall);
      json js;
      for (const char* k : {"dequant", "gemm", "attention", "loss", "optimizer", "communication", "other kernels", "GPU idle"}) {
        const auto it = m.split.find(k);
        const double v = it == m.split.end() ? 0.0 : it->second;
        std::printf("    %-14s %9.2f ms  %5.1f %%\n", k, v, 100.0 * v / wall);
        js[k] = v;
      }
      js["wall"] = wall;
      out["time_split_ms"] = js;
      std::printf("    (loss: the cross-entropy kernel; the lm_head GEMMs of the loss are under gemm)\n");
      if (o.top_kernels > 0 && !m.other_by_name.empty()) {
        std::vector<std::pair<double, std::string>> top;
        for (const auto& [name, ms] : m.other_by_name) top.emplace_back(ms, name);
        std::sort(top.rbegin(), top.rend());
        if (top.size() > static_cast<size_t>(o.top_kernels)) top.resize(static_cast<size_t>(o.top_kernels));
        std::printf("  the most expensive other kernels:\n");
        json jt = json::array();
        for (const auto& [ms, name] : top) {
          std::printf("    %9.2f ms  %.110s\n", ms, name.c_str());
          jt.push_back({{"kernel", name}, {"ms", ms}});
        }
        out["top_other_kernels"] = jt;
      }
      if (o.top_kernels > 0 && !m.idle.longest.empty()) {
        // Between the first kernel and the last; the rest of "GPU idle" is before the first launch
        // and after the last kernel (the step's host-side start and end).
        std::printf("  GPU idle between kernels: %.2f ms; the longest gaps (kernel before -> kernel after, host op):\n",
                    m.idle.total_ms);
        json jg = json::array();
        for (const IdleGap& g : m.idle.longest) {
          std::printf("    %7.3f ms  %.50s -> %.50s  [%.40s]\n", g.ms, g.before.c_str(), g.after.c_str(), g.host.c_str());
          jg.push_back({{"ms", g.ms}, {"before", g.before}, {"after", g.after}, {"host", g.host}});
        }
        out["idle_between_kernels_ms"] = m.idle.total_ms;
        out["longest_idle_gaps"] = jg;
      }
    }
  }
  std::fflush(stdout);
  if (!json_path.empty()) {
    write_bench_json("train", json_path, out);
  }
  return kExitOk;
}

}  // namespace

BenchTrainFn add_bench_train_options(CLI::App& bench, std::shared_ptr<const BenchRunOptions> run) {
  auto st = std::make_shared<TrainBenchOptions>();
  st->run = std::move(run);
  std::string shapes;
  for (const std::string& n : model_shape_names()) shapes += (shapes.empty() ? "" : "|") + n;
  bench.add_option("--shape", st->shape, "train: model shape, " + shapes);
  bench.add_option("--rank", st->rank, "train: LoRA rank (alpha = 2 x rank) on all seven projections")->capture_default_str();
  bench.add_option("--steps", st->steps, "train: timed optimizer steps")->capture_default_str();
  bench.add_option("--warmup", st->warmup, "train: untimed steps first")->capture_default_str();
  bench.add_option("--peak-tflops", st->peak_tflops, "train: the device's peak TFLOP/s for MFU (default: from its name)");
  bench.add_flag("--no-profile", st->no_profile, "train: skip the profiled step (time split)");
  bench.add_flag("--offload", st->offload, "train: activation offloading (checkpointed layer inputs in pinned CPU memory)");
  bench.add_flag("--lm-head-offload", st->lm_head_offload,
                 "train: lm_head offloading (lm_head in pinned CPU memory, copied to the GPU during each forward for "
                 "the loss; a tied input embedding goes with it)");
  bench.add_flag("--embedding-offload", st->embedding_offload,
                 "train: embedding offloading (the input embedding table in pinned CPU memory; untied models)");
  bench.add_option("--mlp-tile-tokens", st->mlp_tile_tokens,
                   "train: each layer's MLP over tiles of N tokens (mlp_tile_tokens; long sequences); 0: off")
      ->capture_default_str();
  bench.add_flag("--seq-search", st->seq_search,
                 "train: the longest sequence that trains: from --seq, doubling until a step runs out of GPU memory");
  bench.add_option("--max-seq", st->max_seq, "train: where --seq-search stops")->capture_default_str();
  bench.add_option("--checkpoint-layers", st->checkpoint_layers,
                   "train: only the first N layers recompute in backward (gradient_checkpointing_layers); -1: all")
      ->capture_default_str();
  bench.add_flag("--no-fused-kernels", st->no_fused_kernels, "train: the ATen ops instead of the fused RMSNorm/SwiGLU kernels");
  bench.add_flag("--recompute-unread", st->recompute_unread,
                 "train: a checkpointed layer's recompute also runs down_proj and the last residual add, whose "
                 "result the backward never reads, and whole, not split (the recompute before 2026-12-07; for measuring "
                 "the saving)");
  bench.add_flag("--no-reuse-weights", st->no_reuse_weights,
                 "train: a recomputed layer's backward dequantizes its NF4 weights again instead of reusing the "
                 "recompute's (gradient_checkpointing_reuse_weights: false; for measuring the saving)");
  bench.add_flag("--split-layers", st->split_layers,
                 "train: a recomputed layer keeps its mid residual too and recomputes in two halves, without o_proj's "
                 "forward, also where it stays on the GPU (gradient_checkpointing_split_layers: true; default auto: with "
                 "--offload)");
  bench.add_flag("--no-split-layers", st->no_split_layers,
                 "train: a recomputed layer keeps only its input and recomputes whole (gradient_checkpointing_split_layers: "
                 "false; for measuring the split)")
      ->excludes("--split-layers");
  bench.add_option("--prompt-fraction", st->prompt_fraction,
                   "train: the first fraction of each row is a prompt with no loss (labels -100), as in supervised "
                   "fine-tuning; in [0, 1)")
      ->capture_default_str();
  const std::map<std::string, AttentionBackend> backends = {{"auto", AttentionBackend::auto_},
                                                             {"flash", AttentionBackend::flash},
                                                             {"cudnn", AttentionBackend::cudnn},
                                                             {"efficient", AttentionBackend::efficient},
                                                             {"math", AttentionBackend::math}};
  bench.add_option("--attention", st->attention,
                   "train: the attention kernel tried first, auto|flash|cudnn|efficient|math (attention_backend)")
      ->transform(CLI::CheckedTransformer(backends, CLI::ignore_case));
  bench.add_option("--top-kernels", st->top_kernels,
                   "train: list the N most expensive 'other' kernels and the N longest GPU idle gaps of the profiled step")
      ->capture_default_str();
  bench.add_option("--gpu-memory-limit", st->gpu_memory_limit,
                   "train: GiB the CUDA caching allocator may hold (as the gpu_memory_limit config key)");
  return [st](const std::string& dtype, const std::string& json_path) { return run_bench_train(*st, dtype, json_path); };
}

}  // namespace qlora::cli
