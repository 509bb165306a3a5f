// Trainer setup and the whole run: device and dtype, model, tokenizer, data, LoRA, AdamW, schedule,
// loss scaler; then the step loop with its outputs (progress lines, metrics.jsonl, loss.svg, eval,
// checkpoints and resume, SIGINT/SIGTERM -> checkpoint and clean exit, PEFT adapter at the end).
// The step itself is trainer_step.cpp; saving and resuming a checkpoint, trainer_checkpoint.cpp.
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <iomanip>
#include <sstream>

#ifdef QLORA_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

#include "data/tokenizer_internal.h"
#include "qlora/checkpoint.h"
#include "qlora/dist.h"
#include "qlora/error.h"
#include "qlora/fused_layer.h"
#include "qlora/host_memory.h"
#include "qlora/log.h"
#include "qlora/metrics.h"
#include "qlora/safetensors.h"
#include "qlora/trainer.h"
#include "train/weight_offload.h"

namespace qlora {

namespace fs = std::filesystem;

namespace {

std::atomic<int> g_stop_signal{0};
extern "C" void on_stop_signal(int sig) { g_stop_signal.store(sig); }

// Installs SIGINT/SIGTERM handlers for the lifetime of the run, restoring the old ones after.
struct StopSignals {
  struct sigaction old_int {}, old_term {};
  StopSignals() {
    g_stop_signal.store(0);
    struct sigaction sa {};
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);
  }
  ~StopSignals() {
    sigaction(SIGINT, &old_int, nullptr);
    sigaction(SIGTERM, &old_term, nullptr);
  }
};

LrScheduleKind schedule_kind(LrScheduler s) {
  switch (s) {
    case LrScheduler::cosine: return LrScheduleKind::cosine;
    case LrScheduler::linear: return LrScheduleKind::linear;
    case LrScheduler::constant: return LrScheduleKind::constant;
    case LrScheduler::constant_with_warmup: return LrScheduleKind::constant_with_warmup;
  }
  return LrScheduleKind::cosine;
}

const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return "bf16";
    case at::kHalf: return "fp16";
    case at::kFloat: return "fp32";
    default: return "?";
  }
}

// Peak memory: the CUDA allocator's peak on a GPU, the process's resident high-water mark on the CPU.
int64_t peak_memory_bytes(const at::Device& device) {
#ifdef QLORA_WITH_CUDA
  if (device.is_cuda()) {
    const auto s = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
    return s.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak;
  }
#else
  (void)device;
#endif
  std::ifstream in("/proc/self/status");
  std::string key;
  while (in >> key) {
    if (key == "VmHWM:") {
      int64_t kb = 0;
      in >> kb;
      return kb * 1024;
    }
    std::string rest;
    std::getline(in, rest);
  }
  return 0;
}

std::string sci(double v) {
  std::ostringstream s;
  s << std::scientific << std::setprecision(2) << v;
  return s.str();
}

std::string hms(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) seconds = 0;
  const auto s = static_cast<int64_t>(seconds + 0.5);
  char buf[32];
  std::snprintf(buf, sizeof buf, "%02lld:%02lld:%02lld", static_cast<long long>(s / 3600),
                static_cast<long long>(s / 60 % 60), static_cast<long long>(s % 60));
  return buf;
}

bool all_pretokenized(const TrainConfig& config) {
  for (const auto& d : config.datasets)
    if (d.type != DatasetType::pretokenized) return false;
  return !config.datasets.empty();
}

}  // namespace

at::Device resolve_train_device(const std::string& device) {
  const bool has_cuda = at::hasCUDA();
  if (device == "auto") return has_cuda ? at::Device(at::kCUDA, 0) : at::Device(at::kCPU);
  if (device == "cpu") return at::kCPU;
  if (device == "cuda" || device.rfind("cuda:", 0) == 0) {
    if (!has_cuda) throw UserError("device: '" + device + "' requested, but this build or machine has no CUDA device");
    int64_t index = 0;
    if (device.size() > 5) {
      try {
        size_t used = 0;
        index = std::stoll(device.substr(5), &used);
        if (used != device.size() - 5) throw std::invalid_argument("trailing");
      } catch (const std::exception&) {
        throw UserError("device: expected auto, cpu, cuda or cuda:N, found '" + device + "'");
      }
    }
    const int64_t n = static_cast<int64_t>(at::detail::getCUDAHooks().deviceCount());
    if (index < 0 || index >= n)
      throw UserError("device: '" + device + "' but there are " + std::to_string(n) + " CUDA devices");
    return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(index));
  }
  throw UserError("device: expected auto, cpu, cuda or cuda:N, found '" + device + "'");
}

at::ScalarType resolve_compute_dtype(const TrainConfig& config, const at::Device& device) {
  if (config.fp16) return at::kHalf;
  if (config.bf16 == Bf16Mode::on) return at::kBFloat16;
  if (!device.is_cuda()) return at::kFloat;
  if (config.bf16 == Bf16Mode::off) return at::kFloat;
  bool has_bf16 = false;
#ifdef QLORA_WITH_CUDA
  has_bf16 = at::cuda::getDeviceProperties(device.index())->major >= 8;
#endif
  return has_bf16 ? at::kBFloat16 : at::kHalf;  // Turing (T4): fp16 with the loss scaler
}

Tokenizer load_train_tokenizer(const TrainConfig& config, int64_t model_vocab_size) {
  const fs::path path = config.tokenizer_config.empty() ? fs::path(config.base_model) : fs::path(config.tokenizer_config);
  std::error_code ec;
  const bool has_json = fs::is_regular_file(path, ec) || fs::exists(path / "tokenizer.json", ec);
  if (has_json || !all_pretokenized(config)) return load_tokenizer(path);
  // Pretokenized data needs only the vocabulary size (ids are checked against it).
  log_info(cat("no tokenizer.json in ", path.string(), ": the datasets are pretokenized, so token ids are only checked "
               "against the model's vocabulary (", model_vocab_size, ")"));
  Tokenizer tok;
  TokenizerImpl& t = tok.impl();
  t.source = "(vocabulary-only placeholder for pretokenized data)";
  t.tokens.resize(static_cast<size_t>(model_vocab_size));
  for (int64_t i = 0; i < model_vocab_size; ++i) t.tokens[static_cast<size_t>(i)] = "<id_" + std::to_string(i) + ">";
  static std::atomic<uint64_t> serial{0};
  t.serial = (uint64_t{0xF1} << 56) + ++serial;  // distinct from every loaded tokenizer's BPE cache
  finish_tokenizer(t);
  return tok;
}

bool plan_recompute_storage(const TrainConfig& config, int64_t num_layers, int64_t hidden, at::ScalarType dtype,
                            bool cuda, const HostMemory& host, int local_ranks) {
  const AutoBool split = config.gradient_checkpointing_split_layers;
  if (!config.gradient_checkpointing) return false;
  if (!config.activation_offloading || !cuda) return split == AutoBool::on;
  const int64_t layers = config.gradient_checkpointing_layers < 0 ? num_layers
                                                                  : std::min<int64_t>(num_layers, config.gradient_checkpointing_layers);
  const int64_t tokens = int64_t{config.micro_batch_size} * config.sequence_len;
  const int64_t elem = static_cast<int64_t>(c10::elementSize(dtype));
  bool on = split != AutoBool::off;
  if (split == AutoBool::auto_ && !host_memory_fits(offload_pinned_bytes(2 * layers, tokens, hidden, elem), local_ranks, host)) {
    on = false;
    log_info("gradient_checkpointing_split_layers (auto): off, host memory holds the offloaded layer inputs but not "
             "their mid residuals too");
  }
  const int64_t kept = (on ? 2 : 1) * layers;
  check_host_memory_fits(offload_pinned_bytes(kept, tokens, hidden, elem), local_ranks, host, "activation_offloading",
                         cat(layers, " layer inputs", on ? cat(" + ", layers, " mid residuals") : std::string(), " x ",
                             tokens, " tokens x ", hidden, " x ", elem, " bytes"));
  return on;
}

void offload_frozen_tables(LlamaWeights& m, const TrainConfig& config, const at::Device& device) {
  if (!device.is_cuda()) return;
  const bool tied = m.lm_head.is_same(m.embed_tokens);
  if (config.lm_head_offloading && !m.lm_head.is_cpu()) {
    m.lm_head = m.lm_head.to(at::kCPU).pin_memory();  // the GPU copy is freed once nothing holds it
    if (tied) m.embed_tokens = m.lm_head;             // embed() gathers host rows then
    log_info(cat("lm_head_offloading: the ", fixed(static_cast<double>(m.lm_head.nbytes()) / (1 << 30), 2), " GiB lm_head",
                 tied ? " (tied: also the input embedding)" : "",
                 " waits in pinned host memory; on the GPU from each forward to its loss"));
  }
  if (config.embedding_offloading && !m.embed_tokens.is_cpu()) {
    if (m.lm_head.is_same(m.embed_tokens)) {
      log_warn("embedding_offloading: the input embedding is tied to lm_head, which needs it on the GPU (unless "
               "lm_head_offloading: true); it stays there");
    } else {
      m.embed_tokens = m.embed_tokens.to(at::kCPU).pin_memory();
      log_info(cat("embedding_offloading: the ", fixed(static_cast<double>(m.embed_tokens.nbytes()) / (1 << 30), 2),
                   " GiB input embedding table waits in pinned host memory"));
    }
  }
}

namespace {

Trainer build_trainer(const TrainConfig& config, const TrainerOptions& options, std::shared_ptr<Collective> comm,
                      TrainerInputs inputs) {
  Trainer t;
  t.config = config;
  t.options = options;
  t.device = resolve_train_device(config.device);
#ifdef QLORA_WITH_CUDA
  if (t.device.is_cuda()) {
    c10::cuda::set_device(t.device.index());  // kernels and NCCL use the current device
    if (config.gpu_memory_limit > 0) {
      const double total = static_cast<double>(at::cuda::getDeviceProperties(t.device.index())->totalGlobalMem);
      const double fraction = config.gpu_memory_limit * double(1 << 30) / total;
      if (fraction > 1.0)
        throw UserError(cat("gpu_memory_limit: ", config.gpu_memory_limit, " GiB, but ", t.device.str(), " has ",
                            fixed(total / double(1 << 30), 1), " GiB"));
      (void)at::empty({1}, at::TensorOptions().device(t.device));  // the allocator exists once used
      const c10::DeviceIndex index = t.device.index();
      c10::cuda::CUDACachingAllocator::setMemoryFraction(fraction, index);
      t.gpu_memory_cap = std::shared_ptr<void>(new char, [index](void* p) {
        delete static_cast<char*>(p);
        c10::cuda::CUDACachingAllocator::setMemoryFraction(1.0, index);
      });
      log_info(cat("GPU memory capped at ", config.gpu_memory_limit, " GiB (", fixed(100 * fraction, 1), " % of ",
                   t.device.str(), ")"));
    }
  }
#endif
  t.compute_dtype = resolve_compute_dtype(config, t.device);
  set_fused_kernels(config.fused_kernels);
  set_attention_backend(config.attention_backend);
  set_mlp_tile_tokens(config.mlp_tile_tokens);
  const bool sharded = comm != nullptr;
  t.comm = sharded ? std::move(comm) : make_single_rank_collective();
  at::manual_seed(static_cast<uint64_t>(config.seed));  // dropout masks: same seed, same curve

  ModelLoadOptions mo;
  mo.load_in_4bit = config.adapter == AdapterType::qlora && config.load_in_4bit;
  mo.double_quant = config.bnb_4bit_use_double_quant;
  mo.compute_dtype = t.compute_dtype;
  mo.device = t.device;
  const auto t0 = std::chrono::steady_clock::now();
  const bool given_model = inputs.model.has_value();
  if (given_model) {
    if (inputs.model->device != t.device || inputs.model->compute_dtype != t.compute_dtype)
      throw std::invalid_argument("make_trainer: the given model is not on the config's device and compute dtype");
    t.model = std::move(*inputs.model);
  } else {
    enter_phase(t, TrainPhase::load);
    t.model = load_llama(config.base_model, mo);
  }
  log_info(cat("model ", given_model ? std::string("(built in memory)") : config.base_model, ": ", t.model.layers.size(),
               " layers, hidden ", t.model.config.hidden_size, ", vocab ", t.model.config.vocab_size, ", ",
               t.model.layers.front().q_proj.nf4 ? "NF4" : "16-bit", " base, compute ", dtype_name(t.compute_dtype),
               " on ", t.device.str(), " (", fixed(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 1),
               " s)"));

  {
    const auto env = read_dist_env();
    t.split_layers = plan_recompute_storage(config, static_cast<int64_t>(t.model.layers.size()), t.model.config.hidden_size,
                                            t.compute_dtype, t.device.is_cuda(), host_memory_available(),
                                            env ? env->local_world_size : 1);
  }
  offload_frozen_tables(t.model, config, t.device);
  if (config.lm_head_offloading && t.device.is_cuda() && t.model.lm_head.is_cpu())
    t.lm_head_offload = std::make_shared<OffloadedWeight>(t.model.lm_head, t.device);

  t.batching.pad_id = 0;
  if (inputs.data) {
    t.data = std::move(*inputs.data);
  } else {
    const Tokenizer tokenizer = load_train_tokenizer(config, t.model.config.vocab_size);
    // Rank 0 prepares (and caches) the data first; the others then read its cache.
    if (sharded && t.rank() != 0) t.comm->barrier();
    t.data = prepare_data(config, tokenizer, prepared_data_dir(config));
    if (sharded && t.rank() == 0) t.comm->barrier();
    t.batching.pad_id = tokenizer.pad_id() >= 0 ? tokenizer.pad_id() : (tokenizer.eos_id() >= 0 ? tokenizer.eos_id() : 0);
  }
  if (t.data.train.empty()) throw UserError("no training examples left after preparing the datasets");
  t.batching.sequence_len = config.sequence_len;
  t.batching.micro_batch_size = config.micro_batch_size;
  t.batching.sample_packing = config.sample_packing;
  t.batching.seed = static_cast<uint64_t>(config.seed);
  t.plan = plan_micro_batches(t.data.train, t.batching);
  t.plan_epoch = 0;
  t.micro_batches_per_epoch = static_cast<int64_t>(t.plan.size());
  if (t.micro_batches_per_epoch == 0) throw UserError("the training split makes no micro-batches");
  log_info(cat("data: ", t.data.train.size(), " train / ", t.data.val.size(), " val examples, ", t.data.stats.tokens,
               " tokens (", t.data.stats.trainable_tokens, " trained), ", t.micro_batches_per_epoch,
               " micro-batches per epoch", t.data.from_cache ? " (cached)" : ""));

  // Same seed on every rank: the same initial adapter, of which each rank keeps its shard.
  t.lora = make_lora(t.model, lora_options_from_config(config), static_cast<uint64_t>(config.seed));
  const int64_t n_lora_params = lora_parameter_count(t.lora);
  for (auto& [name, p] : named_lora_parameters(t.lora)) {
    t.param_names.push_back(name);
    t.params.push_back(p);
  }
  if (sharded) {
    FsdpOptions fo;
    fo.reshard_after_forward = config.fsdp_reshard_after_forward;
    fo.reduce_in_compute_dtype = config.fsdp_reduce_in_compute_dtype;
    t.fsdp = shard_model(t.model, t.lora, t.params, t.comm, fo);
    const FsdpFootprint f = fsdp_footprint(*t.fsdp);
    log_info(cat("sharded over ", t.world(), " rank(s) (", t.comm->engine(), "): this rank holds ",
                 fixed(static_cast<double>(f.frozen_local_bytes) / (1 << 20), 1), " of ",
                 fixed(static_cast<double>(f.frozen_total_bytes) / (1 << 20), 1), " MiB of layer weights and ",
                 f.lora_local_elems, " of ", f.lora_total_elems, " LoRA parameters"));
  }
  t.optimizer = adamw_init(t.param_names, t.params);
  t.adamw = {config.adam_beta1, config.adam_beta2, config.adam_epsilon, config.weight_decay};

  const int64_t ga = std::max(1, config.gradient_accumulation_steps);
  const int64_t per_step = ga * t.world();  // micro-batches of one optimizer step, all ranks together
  t.total_steps = config.max_steps > 0
                      ? config.max_steps
                      : std::max<int64_t>(1, static_cast<int64_t>(std::ceil(
                                                 config.num_epochs * static_cast<double>(t.micro_batches_per_epoch) /
                                                 static_cast<double>(per_step) - 1e-9)));
  t.schedule.kind = schedule_kind(config.lr_scheduler);
  t.schedule.base_lr = config.learning_rate;
  t.schedule.total_steps = t.total_steps;
  t.schedule.warmup_steps = resolve_warmup_steps(config.warmup_steps, config.warmup_ratio, t.total_steps);

  if (t.compute_dtype == at::kHalf || options.force_loss_scaler) {
    LossScalerOptions so;
    if (options.init_loss_scale > 0) so.init_scale = options.init_loss_scale;
    t.scaler = make_loss_scaler(so, t.device);
  }
  log_info(cat("LoRA r ", config.lora_r, ", alpha ", config.lora_alpha, ": ", n_lora_params,
               " trainable parameters; ", t.total_steps, " steps of ", t.world() > 1 ? cat(t.world(), " ranks x ") : std::string(),
               ga, " x ", config.micro_batch_size, " micro-batches, lr ", config.learning_rate, " (", to_string(t.schedule.kind), ", warmup ",
               t.schedule.warmup_steps, ")", config.gradient_checkpointing ? ", gradient checkpointing" : "",
               config.gradient_checkpointing && config.gradient_checkpointing_layers >= 0
                   ? cat(" (first ", config.gradient_checkpointing_layers, " layers recomputed)")
                   : std::string(),
               config.activation_offloading ? " (layer inputs offloaded to pinned CPU memory)" : "",
               t.scaler ? ", dynamic loss scaling" : ""));
  return t;
}

}  // namespace

// Setup runs out of GPU memory while it loads the model (or moves the adapter and optimizer
// state to the GPU): one OutOfMemory report for the "load" phase.
Trainer make_trainer(const TrainConfig& config, const TrainerOptions& options, std::shared_ptr<Collective> comm,
                     TrainerInputs inputs) {
  try {
    return build_trainer(config, options, std::move(comm), std::move(inputs));
  } catch (const c10::OutOfMemoryError& e) {
    Trainer t;
    t.config = config;
    t.device = resolve_train_device(config.device);
    t.phase = TrainPhase::load;
    throw OutOfMemory(out_of_memory_message(t, e.what_without_backtrace()));
  }
}

// ---- the run ----------------------------------------------------------------------------------

namespace {

// Runs one write of the run's outputs. The writers report a failed write (disk full, a file size
// limit, an I/O error) as a UserError naming the file; it is not bad input, so it goes on as a
// WriteError (exit status 5) with the same message.
template <class Write>
void write_output(Write&& write) {
  try {
    write();
  } catch (const WriteError&) {
    throw;
  } catch (const UserError& e) {
    throw WriteError(e.what());
  }
}

}  // namespace

TrainRunResult run_training(const TrainConfig& config, const TrainerOptions& options, std::shared_ptr<Collective> comm) {
  Trainer t = make_trainer(config, options, std::move(comm));
  TrainRunResult result;
  const fs::path out = config.output_dir;
  const bool outputs = options.write_outputs;
  const bool lead = t.rank() == 0;  // writes metrics, the loss curve, the adapter; logs the steps
  if (outputs && lead) fs::create_directories(out);
  if (outputs) t.comm->barrier();  // the output directory exists before any rank looks into it

  std::optional<fs::path> resume;
  if (outputs) resume = resolve_resume_checkpoint(config.resume_from_checkpoint, out);
  if (resume) {
    load_trainer_checkpoint(t, *resume);
    log_info(cat("resumed from ", resume->string(), " at step ", t.step, " (epoch ", t.position.epoch, ", micro-batch ",
                 t.position.micro_batch, ")"));
  }
  std::optional<MetricsLog> metrics;
  if (outputs && lead) {
    write_output([&] { metrics = open_metrics_log(out / "metrics.jsonl", resume ? t.step : -1); });
    write_output([&] { write_file_atomic(out / "config.resolved.yaml", config_to_yaml(config)); });
  }
  const std::string title = cat("qlora: ", fs::path(config.base_model).filename().string(), " r", config.lora_r);
  auto write_svg = [&] {
    if (outputs && lead)
      write_output([&] { write_loss_curve_svg(out / "loss.svg", read_loss_curve(out / "metrics.jsonl"), title); });
  };
  auto run_eval = [&] {
    const std::optional<double> ev = evaluate(t);
    if (!ev) return false;
    const double ppl = std::exp(std::min(*ev, 700.0));
    if (lead) log_info(cat("eval step ", t.step, ": loss ", fixed(*ev, 4), ", perplexity ", fixed(ppl, 2)));
    if (metrics)
      write_output([&] { append_metrics(*metrics, {{"step", t.step}, {"eval_loss", *ev}, {"eval_perplexity", ppl}}); });
    return true;
  };

  StopSignals signals;
  const auto start = std::chrono::steady_clock::now();
  const int64_t first_step = t.step;
  int64_t last_saved = -1, last_eval = -1;
  const int w = static_cast<int>(std::to_string(t.total_steps).size());
  while (t.step < t.total_steps) {
    if (options.throw_at_step >= 0 && t.step == options.throw_at_step)
      throw std::runtime_error(cat("test hook: rank ", t.rank(), " fails before step ", t.step + 1));
    const auto s0 = std::chrono::steady_clock::now();
    const StepResult r = train_step(t);
    const auto s1 = std::chrono::steady_clock::now();
    const double dt = std::chrono::duration<double>(s1 - s0).count();
    const double elapsed = std::chrono::duration<double>(s1 - start).count();
    const double eta = elapsed / static_cast<double>(t.step - first_step) * static_cast<double>(t.total_steps - t.step);
    result.losses.push_back(r.loss);
    std::ostringstream step_str;
    step_str << std::setw(w) << t.step << "/" << t.total_steps;
    if (lead) log_info(cat("step ", step_str.str(), " | loss ", fixed(r.loss, 4), " | lr ", sci(r.lr), " | grad-norm ",
                 fixed(r.grad_norm, 3), r.skipped ? " (skipped)" : "", " | ", fixed(r.tokens / std::max(dt, 1e-9), 0),
                 " tok/s | peak mem ", fixed(static_cast<double>(peak_memory_bytes(t.device)) / (1 << 20), 1),
                 " MiB | ETA ", hms(eta)));
    if (metrics && (config.logging_steps <= 1 || t.step % config.logging_steps == 0 || t.step == t.total_steps)) {
      nlohmann::json rec = {{"step", t.step},
                            {"loss", r.loss},
                            {"lr", r.lr},
                            {"grad_norm", std::isfinite(r.grad_norm) ? nlohmann::json(r.grad_norm) : nlohmann::json()},
                            {"tokens", r.tokens},
                            {"tokens_per_s", r.tokens / std::max(dt, 1e-9)},
                            {"epoch", (static_cast<double>(t.position.epoch) +
                                       static_cast<double>(t.position.micro_batch) /
                                           static_cast<double>(t.micro_batches_per_epoch))},
                            {"peak_memory_bytes", peak_memory_bytes(t.device)}};
      if (r.skipped) rec["skipped"] = true;
      if (t.scaler) rec["loss_scale"] = loss_scale_value(*t.scaler);
      write_output([&] { append_metrics(*metrics, rec); });
    }
    // bf16/fp32: a skipped non-finite step counts against nonfinite_skip_limit (then: exit 4).
    check_nonfinite_step(t, r, result.last_checkpoint.empty() && resume ? *resume : result.last_checkpoint);
    if (config.eval_steps > 0 && t.step % config.eval_steps == 0 && run_eval()) last_eval = t.step;
    // A signal on any rank stops every rank after this same step.
    at::Tensor stop_flag = at::full({1}, g_stop_signal.load() != 0 ? 1.0 : 0.0,
                                    at::TensorOptions().dtype(at::kFloat).device(t.device));
    t.comm->all_reduce(stop_flag, ReduceOp::max);
    const bool stop = stop_flag.item<float>() > 0 || (options.stop_after_step >= 0 && t.step >= options.stop_after_step);
    if (outputs && ((config.save_steps > 0 && t.step % config.save_steps == 0) || stop)) {
      result.last_checkpoint = save_trainer_checkpoint(t);
      last_saved = t.step;
      write_svg();
      if (lead) log_info(cat("checkpoint ", result.last_checkpoint.string()));
    }
    if (stop) {
      const int sig = g_stop_signal.load();
      log_info(cat(sig != 0 ? cat("signal ", sig, ": ") : std::string(), "stopped after step ", t.step, "; resume with ",
                   "resume_from_checkpoint=auto"));
      result.interrupted = true;
      break;
    }
  }
  result.steps = t.step;
  if (result.interrupted) return result;

  if (!t.data.val.empty() && last_eval != t.step) run_eval();
  if (outputs) {
    if (last_saved != t.step) result.last_checkpoint = save_trainer_checkpoint(t);
    const LoraModel adapter = full_adapter(t);  // collective when sharded: every rank takes part
    if (lead) write_output([&] { save_peft_adapter(out, adapter, t.model.config, config.base_model); });
    t.comm->barrier();  // no rank reports done before the adapter is on disk
    result.adapter_dir = out;
    write_svg();
    if (lead) log_info(cat("done: ", t.step, " steps; adapter in ", out.string(), " (adapter_config.json, adapter_model.safetensors), "
                 "loss curve ", (out / "loss.svg").string()));
  }
  return result;
}

}  // namespace qlora
