// The trainer (issue 7): one device (CPU or one CUDA GPU). Setup turns a TrainConfig into a model
// (NF4 base + fp32 LoRA masters), the prepared data as a stream of planned micro-batches, AdamW,
// the LR schedule and (fp16) the loss scaler; one optimizer step runs the explicit layer loop of
// DESIGN.md (activation checkpointing: only each layer's input kept, each layer recomputed in the
// backward with the RNG state of its forward), the fused loss with the step's exact normalizer,
// unscale/inf check, clipping and AdamW. run_training adds the outputs: progress lines,
// metrics.jsonl, loss.svg, eval, checkpoints/resume, SIGINT handling, the PEFT adapter.
// Plain structs and free functions (trainer.cpp: setup and the run; trainer_step.cpp: one step).
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "qlora/config.h"
#include "qlora/dataset.h"
#include "qlora/dist.h"
#include "qlora/fsdp.h"
#include "qlora/host_memory.h"
#include "qlora/lora.h"
#include "qlora/model.h"
#include "qlora/optim.h"
#include "qlora/tokenizer.h"

namespace qlora {

class OffloadedWeight;

// Knobs that are not part of the recipe: set by tests (and the CLI), never by YAML.
struct TrainerOptions {
  int64_t stop_after_step = -1;        // >= 0: stop after this global step as if interrupted
                                       // (checkpoint written, run_training returns interrupted)
  int64_t inject_overflow_step = -1;   // test hook: that step's loss is multiplied by inf
  bool force_loss_scaler = false;      // use the dynamic loss scaler whatever the compute dtype
  double init_loss_scale = 0.0;        // > 0: the scaler's initial scale (default GradScaler's 2^16)
  bool write_outputs = true;           // false: no metrics/svg/checkpoints/adapter (unit tests)
  int64_t throw_at_step = -1;          // test hook: this rank throws before step N+1 (launcher tests)
  std::string inject_oom_phase;        // test hook: "load", "forward", "loss", "backward" or
                                       // "optimizer": a c10::OutOfMemoryError when that phase starts
  bool recompute_unread_outputs = false;  // measurement switch: a checkpointed layer's recompute
                                          // also runs down_proj and the last residual add, whose
                                          // result the backward never reads (the way before 2026-12-07;
                                          // whole, not split: gradient_checkpointing_split_layers ignored)
  bool track_phase_peaks = false;  // CUDA: Trainer::phase_peak_bytes (each phase change resets the
                                   // allocator's peak counters: the overall peak is their maximum)
};

// The phases of training an out-of-memory error is reported in (OutOfMemory, exit status 3).
enum class TrainPhase { load, forward, loss, backward, optimizer };
const char* to_string(TrainPhase phase);

// Where the micro-batch stream stands: epoch e's plan is plan_micro_batches with seed + e, and
// `micro_batch` indexes into it. Saved in checkpoints so a resumed run sees the same batches.
struct DataPosition {
  int64_t epoch = 0;
  int64_t micro_batch = 0;
};

// Multi-rank (issue 8): every rank runs its own Trainer with the same config. Each optimizer step
// takes the next world * gradient_accumulation_steps micro-batches of the one global stream, rank r
// the ones whose index within the step is r modulo world; the loss is normalized by the step's
// target tokens over all ranks, so the step equals one rank running all of them. The decoder layers
// and LoRA masters are sharded (qlora/fsdp.h); embeddings, norms and lm_head are replicated.
struct Trainer {
  TrainConfig config;
  TrainerOptions options;
  at::Device device = at::kCPU;
  // Set when gpu_memory_limit capped the allocator: its last owner lifts the cap, so a process that
  // builds another trainer (or a test that runs after) gets the whole device again.
  std::shared_ptr<void> gpu_memory_cap;
  at::ScalarType compute_dtype = at::kFloat;
  std::shared_ptr<Collective> comm;                  // always set: single-rank when not distributed
  std::optional<Fsdp> fsdp;                          // set for a run given a collective (any world size)
  int rank() const { return comm->rank(); }
  int world() const { return comm->world_size(); }

  LlamaWeights model;
  // lm_head_offloading on CUDA: lm_head's pinned host copy and its device copy while the loss runs
  // (src/train/weight_offload.h); model.lm_head is then the host tensor. Unset otherwise.
  std::shared_ptr<OffloadedWeight> lm_head_offload;
  LoraModel lora;
  DequantScratch scratch;  // one per device; outlives every backward
  bool split_layers = false;  // gradient_checkpointing_split_layers, auto resolved (make_trainer)

  PreparedData data;
  BatchingOptions batching;
  DataPosition position;
  int64_t plan_epoch = -1;                           // the epoch `plan` was made for
  std::vector<std::vector<int64_t>> plan;            // micro-batches of epoch plan_epoch
  int64_t micro_batches_per_epoch = 0;

  std::vector<std::string> param_names;              // PEFT names of the LoRA masters
  std::vector<at::Tensor> params;                    // the masters themselves (fp32, requires grad);
                                                     // sharded: this rank's dim-0 shards of them
  AdamWState optimizer;
  AdamWOptions adamw;
  LrSchedule schedule;
  std::optional<LossScaler> scaler;                  // fp16 (or options.force_loss_scaler)

  int64_t step = 0;                                  // optimizer steps taken (skipped ones count)
  int64_t nonfinite_steps = 0;                       // steps skipped for non-finite loss/gradients (no scaler)
  int64_t total_steps = 0;
  TrainPhase phase = TrainPhase::load;               // what the step is doing (for OOM reports)
  // options.track_phase_peaks: the caching allocator's peak bytes within each phase, by TrainPhase
  // (the highest over every time the phase ran since they were last zeroed).
  std::array<int64_t, 5> phase_peak_bytes{};
};

// Marks the start of a phase (and fires options.inject_oom_phase when it names it).
void enter_phase(Trainer& trainer, TrainPhase phase);
// With options.track_phase_peaks on a CUDA device: the allocator's peak since the last call is
// counted to trainer.phase in phase_peak_bytes, and the peak counters are reset (enter_phase calls
// it; call it once more after the last step to count the tail of the last phase).
void note_phase_peak(Trainer& trainer);
// The one-line report of an out-of-memory error in trainer.phase: the phase, the step, the
// memory in use, and what to lower, by what the config has.
std::string out_of_memory_message(const Trainer& trainer, const std::string& what);

// embedding_offloading / lm_head_offloading on a CUDA device: those frozen tables of `model` to
// pinned host memory (a tied pair together, with lm_head_offloading). Tables already in host memory
// stay as they are, so a caller that keeps its own copy of the weights (qlora bench train) offloads
// that copy first and the GPU memory is really freed. make_trainer calls it.
void offload_frozen_tables(LlamaWeights& model, const TrainConfig& config, const at::Device& device);

// Whether the recomputed layers keep their mid residuals (gradient_checkpointing_split_layers; auto:
// on where they wait in pinned host memory -- activation_offloading on CUDA -- if `host` holds them
// besides the layer inputs; make_trainer sets Trainer::split_layers from it). With activation
// offloading on CUDA it also refuses, as a UserError, a run whose offloaded tensors ([micro_batch_size
// x sequence_len, hidden] per recomputed layer, two when split) cannot fit in the host's memory,
// before it starts instead of being OOM-killed in its first step.
bool plan_recompute_storage(const TrainConfig& config, int64_t num_layers, int64_t hidden, at::ScalarType dtype,
                            bool cuda, const HostMemory& host, int local_ranks);

// Device ("auto" -> cuda:0 when CUDA is present, else cpu) and compute dtype (fp16 when
// config.fp16; bf16 when config.bf16 is on, or auto on a GPU that has it; fp32 on the CPU unless
// bf16 is forced on). UserError for a CUDA device that is not there.
at::Device resolve_train_device(const std::string& device);
at::ScalarType resolve_compute_dtype(const TrainConfig& config, const at::Device& device);

// The tokenizer of config.tokenizer_config (or base_model). When that directory has no
// tokenizer.json and every dataset is pretokenized, a placeholder that only knows the vocabulary
// size (ids are checked against it) is returned instead, with an info line.
Tokenizer load_train_tokenizer(const TrainConfig& config, int64_t model_vocab_size);

// Everything before the first step (see the header comment). Logs what it set up. `comm`: the
// rank's collective (the layers and LoRA are sharded over it, even at world size 1); nullptr: a
// plain single-process run.
// inputs: what make_trainer would otherwise load -- a model built in memory (random_llama, on the
// config's device and compute dtype) and/or data made in memory (qlora bench train); unset parts are
// loaded from config.base_model and config.datasets.
struct TrainerInputs {
  std::optional<LlamaWeights> model;
  std::optional<PreparedData> data;
};
Trainer make_trainer(const TrainConfig& config, const TrainerOptions& options = {},
                     std::shared_ptr<Collective> comm = nullptr, TrainerInputs inputs = {});

// The next micro-batch index lists of the stream (advances trainer.position across epochs).
std::vector<int64_t> next_micro_batch(Trainer& trainer);
Batch make_train_batch(const Trainer& trainer, const std::vector<int64_t>& indices);

// What one optimizer step did.
struct StepResult {
  double loss = 0.0;         // mean over the step's target tokens (unscaled)
  double grad_norm = 0.0;    // global norm before clipping (inf/NaN when skipped for overflow)
  double lr = 0.0;
  bool skipped = false;      // non-finite gradients: no AdamW step (fp16: the scale was lowered)
  int64_t tokens = 0;        // non-padding tokens of the step
  int64_t target_tokens = 0;
};

// Forward + backward of one micro-batch, accumulating into the masters' .grad(): the loss is the
// SUM of the batch's token losses divided by `normalizer` (the step's target-token count), times
// `loss_multiplier` (the loss scale). Checkpointed layer loop when config.gradient_checkpointing.
// Returns the (unmultiplied) loss as a detached fp32 scalar.
at::Tensor forward_backward(Trainer& trainer, const Batch& batch, double normalizer, double loss_multiplier = 1.0);

// One optimizer step over the given micro-batches (normalizer = their total target tokens):
// forward_backward each, then (scaler) unscale + inf check, clip, AdamW with the schedule's lr,
// grads cleared. Increments trainer.step.
StepResult train_step_on(Trainer& trainer, const std::vector<Batch>& batches);
// The same on the next gradient_accumulation_steps micro-batches of the stream.
StepResult train_step(Trainer& trainer);

// Mean loss over every target token of the val split (no grad, no dropout); nullopt when empty.
std::optional<double> evaluate(Trainer& trainer);

// The non-finite policy (no loss scaler, i.e. bf16/fp32): a step whose loss or gradients are not
// finite was skipped (no AdamW update); up to config.nonfinite_skip_limit such steps are allowed,
// the next one throws TrainingStopped naming the step and `last_good_checkpoint` (may be empty).
void check_nonfinite_step(Trainer& trainer, const StepResult& result, const std::filesystem::path& last_good_checkpoint);

// Checkpoint contents (LoRA masters, optimizer, scheduler step, loss scaler, RNG, data position).
std::filesystem::path save_trainer_checkpoint(Trainer& trainer);
void load_trainer_checkpoint(Trainer& trainer, const std::filesystem::path& dir);

struct TrainRunResult {
  int64_t steps = 0;               // global step reached
  bool interrupted = false;        // SIGINT/SIGTERM (or options.stop_after_step)
  std::vector<double> losses;      // train loss of each step run by this call
  std::filesystem::path adapter_dir;  // output_dir (empty when interrupted)
  std::filesystem::path last_checkpoint;
};

// The whole run with its outputs (resume, metrics, eval, checkpoints, adapter, resolved config).
// SIGINT/SIGTERM during the run: the current step finishes, a checkpoint is written, and the
// result says interrupted.
// Multi-rank: every rank calls it; rank 0 writes the outputs (metrics, loss curve, adapter), every
// rank its checkpoint shard; a stop signal on any rank stops all after the same step.
TrainRunResult run_training(const TrainConfig& config, const TrainerOptions& options = {},
                            std::shared_ptr<Collective> comm = nullptr);

// The adapter with whole fp32 masters (gathered from every rank when sharded): what gets saved.
LoraModel full_adapter(Trainer& trainer);

}  // namespace qlora
