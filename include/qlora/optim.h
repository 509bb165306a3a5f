// The optimizer step's utilities (issue 7): AdamW on fp32 parameters with explicit gradients (so a
// sharded trainer passes its local shards), HF transformers' learning-rate schedules, gradient
// clipping by global norm with a multi-rank hook, and the dynamic loss scaler for fp16 compute.
// Plain structs and free functions; ATen ops only, so the same code runs on CPU and CUDA tensors.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "qlora/safetensors.h"  // NamedTensors

namespace qlora {

// ---- AdamW ---------------------------------------------------------------------------------------

// torch.optim.AdamW's hyperparameters (amsgrad off). The learning rate is passed to each step,
// from the schedule. Default weight_decay is 0 (HF TrainingArguments), not torch's 1e-2.
struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
};

// Optimizer state: exp_avg / exp_avg_sq per parameter (fp32, shaped and placed like the
// parameter) and the number of steps taken (shared by every parameter: each step updates all).
struct AdamWState {
  std::vector<std::string> names;  // one per parameter, unique; the checkpoint keys
  std::vector<at::Tensor> exp_avg;
  std::vector<at::Tensor> exp_avg_sq;
  int64_t step = 0;
};

// Zero state for `params` (fp32 tensors on one device kind each; names unique and as many as params).
AdamWState adamw_init(const std::vector<std::string>& names, const std::vector<at::Tensor>& params);

// One AdamW step, in place on `params`, `state`: decoupled weight decay p *= 1 - lr*wd, then
// m = b1*m + (1-b1)*g, v = b2*v + (1-b2)*g*g, p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps),
// each as the same ATen operation torch::optim::AdamW uses (bitwise equal on CPU fp32). Grads may
// be any floating dtype (cast to fp32); an undefined grad leaves its parameter and state alone, as
// torch does. Runs as multi-tensor (_foreach) ops over the parameters with a gradient.
void adamw_step(AdamWState& state, const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                double lr, const AdamWOptions& options);

// Checkpoint form: "<prefix><name>.exp_avg", "<prefix><name>.exp_avg_sq" and "<prefix>step"
// (int64 scalar). Tensors are the state's own (no copy); the checkpoint writer copies to CPU.
NamedTensors adamw_state_tensors(const AdamWState& state, const std::string& prefix = "optimizer.");

// Loads a checkpoint form into `state` (already initialised for the current parameters, so the
// device and names are known): every name must be present with the parameter's shape, else a
// UserError naming the tensor and the expected and found shapes. Copies into the existing tensors.
void adamw_load_state(AdamWState& state, const NamedTensors& tensors, const std::string& prefix = "optimizer.");

// ---- learning-rate schedules -----------------------------------------------------------------------

enum class LrScheduleKind { constant, constant_with_warmup, linear, cosine };

struct LrSchedule {
  LrScheduleKind kind = LrScheduleKind::cosine;
  double base_lr = 0.0;
  int64_t warmup_steps = 0;
  int64_t total_steps = 0;   // num_training_steps (optimizer steps)
  double num_cycles = 0.5;   // cosine only (HF default: half a cosine, down to 0)
};

// "constant", "constant_with_warmup", "linear", "cosine" -> kind; anything else is a UserError.
LrScheduleKind lr_schedule_kind_from_string(const std::string& s);
std::string to_string(LrScheduleKind kind);

// HF TrainingArguments.get_warmup_steps: warmup_steps when > 0, else ceil(total_steps * warmup_ratio).
int64_t resolve_warmup_steps(int64_t warmup_steps, double warmup_ratio, int64_t total_steps);

// The multiplier transformers' get_<kind>_schedule_with_warmup lr_lambda returns after `step`
// optimizer steps (step 0 is the first step's lr), in the same double arithmetic.
double lr_multiplier(const LrSchedule& schedule, int64_t step);
// base_lr * lr_multiplier: the lr torch's LambdaLR sets for the optimizer step with index `step`.
double lr_at(const LrSchedule& schedule, int64_t step);

// ---- gradient clipping -------------------------------------------------------------------------------

// Sums a 1-element (or 0-d) fp32 tensor across ranks in place (e.g. an NCCL all-reduce). Empty: one rank.
using AllReduceFn = std::function<void(at::Tensor&)>;

// Sum over `grads` (undefined ones skipped) of the squared elements, accumulated in fp32: a
// 1-element fp32 tensor on the grads' device (CPU when there are none).
at::Tensor grad_sum_of_squares(const std::vector<at::Tensor>& grads);

struct ClipResult {
  double norm = 0.0;     // global L2 norm before clipping (inf or NaN when a grad is non-finite)
  bool finite = true;    // false: norm is inf/NaN and nothing was scaled
  bool clipped = false;  // the grads were multiplied by a coefficient < 1
};

// torch.nn.utils.clip_grad_norm_ over every rank's grads: the local sum of squares is summed by
// `all_reduce_sum` (each rank passes its shard's grads), norm = sqrt(sum); when finite and
// max_norm > 0, grads *= min(1, max_norm / (norm + 1e-6)) in place. A non-finite norm is
// reported, not applied (the caller skips the step). max_norm <= 0: measure only.
ClipResult clip_grad_norm(const std::vector<at::Tensor>& grads, double max_norm,
                          const AllReduceFn& all_reduce_sum = {});

// ---- dynamic loss scaling (fp16) --------------------------------------------------------------------

// torch.amp.GradScaler's defaults.
struct LossScalerOptions {
  double init_scale = 65536.0;  // 2^16
  double growth_factor = 2.0;
  double backoff_factor = 0.5;
  int64_t growth_interval = 2000;
};

// The scale and the count of consecutive finite steps live in 0-d tensors on the training device
// (fp32 and int32, as GradScaler keeps them) so that checking and updating never copy to the host.
struct LossScaler {
  LossScalerOptions options;
  at::Tensor scale;           // fp32 0-d
  at::Tensor growth_tracker;  // int32 0-d
  at::Tensor found_inf;       // fp32 0-d: > 0 when the last unscale saw inf/NaN (summed over ranks)
};

LossScaler make_loss_scaler(const LossScalerOptions& options, const at::Device& device);

// loss * scale, as GradScaler.scale (the 0-d scale does not change the loss's dtype; ours is fp32).
at::Tensor scale_loss(const LossScaler& scaler, const at::Tensor& loss);

// GradScaler.unscale_: grads *= 1/scale in place (inv_scale computed in double, rounded to fp32),
// with one fused non-finite check per (device, dtype) group (_amp_foreach_non_finite_check_and_
// unscale_). `all_reduce_sum` sums found_inf across ranks so every rank takes the same decision.
// Returns true when some grad held inf/NaN: the caller must skip the optimizer step.
bool unscale_grads(LossScaler& scaler, const std::vector<at::Tensor>& grads, const AllReduceFn& all_reduce_sum = {});

// GradScaler.update after the step (taken or skipped): inf seen -> scale *= backoff, tracker 0;
// else tracker + 1, and at growth_interval scale *= growth, tracker 0.
void update_loss_scale(LossScaler& scaler);

double loss_scale_value(const LossScaler& scaler);

// {"scale": S, "growth_factor": ..., "backoff_factor": ..., "growth_interval": ..., "_growth_tracker": N}
// (GradScaler.state_dict's keys); loading takes scale and _growth_tracker, checking their types.
nlohmann::json loss_scaler_state(const LossScaler& scaler);
void load_loss_scaler_state(LossScaler& scaler, const nlohmann::json& state);

}  // namespace qlora
