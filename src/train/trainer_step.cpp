// One optimizer step (DESIGN.md "Data flow"): the micro-batch stream, the explicit layer loop with
// activation checkpointing (forward under no-grad keeping only each layer's input; backward layer by
// layer, recomputing each from its input with the RNG state of its forward so LoRA dropout draws the
// same mask), the fused loss with the step's exact normalizer, the loss-scale check, clipping, AdamW,
// and the no-grad evaluation loop.
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#ifdef QLORA_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include "qlora/config.h"
#include "qlora/error.h"
#include "qlora/flce.h"
#include "qlora/log.h"
#include "qlora/trainer.h"
#include "train/layer_input_offload.h"
#include "train/weight_offload.h"

namespace qlora {

namespace {

// lm_head on the compute device: the model's own, or (lm_head_offloading) the device copy, waited for.
at::Tensor lm_head_on_device(Trainer& t) { return t.lm_head_offload ? t.lm_head_offload->get() : t.model.lm_head; }

// The loss of final hidden states h [B, T, H]: sum of token losses / normalizer.
at::Tensor head_loss(Trainer& t, const at::Tensor& h, const at::Tensor& targets, double normalizer) {
  const at::Tensor x = rms_norm(h, t.model.norm, t.model.config.rms_norm_eps);
  FlceOptions o;
  o.reduction = FlceOptions::Reduction::mean;
  o.normalizer = normalizer;  // the step's target tokens, not this micro-batch's
  return fused_linear_cross_entropy(x.reshape({-1, x.size(-1)}), lm_head_on_device(t), targets.reshape({-1}), o);
}

// scratch.keep_for_backward on for one scope (a recompute's forward; off again however it ends).
struct KeepDequantized {
  DequantScratch& scratch;
  KeepDequantized(DequantScratch& s, bool on) : scratch(s) { scratch.keep_for_backward = on; }
  ~KeepDequantized() { scratch.keep_for_backward = false; }
  KeepDequantized(const KeepDequantized&) = delete;
  KeepDequantized& operator=(const KeepDequantized&) = delete;
};

}  // namespace

const char* to_string(TrainPhase phase) {
  switch (phase) {
    case TrainPhase::load: return "load";
    case TrainPhase::forward: return "forward";
    case TrainPhase::loss: return "loss";
    case TrainPhase::backward: return "backward";
    case TrainPhase::optimizer: return "optimizer";
  }
  return "?";
}

void note_phase_peak(Trainer& t) {
  if (!t.options.track_phase_peaks || !t.device.is_cuda()) return;
#ifdef QLORA_WITH_CUDA
  const auto st = c10::cuda::CUDACachingAllocator::getDeviceStats(t.device.index());
  const int64_t peak = st.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak;
  int64_t& slot = t.phase_peak_bytes[static_cast<size_t>(t.phase)];
  slot = std::max(slot, peak);
  c10::cuda::CUDACachingAllocator::resetPeakStats(t.device.index());
#endif
}

void enter_phase(Trainer& t, TrainPhase phase) {
  note_phase_peak(t);
  t.phase = phase;
  if (!t.options.inject_oom_phase.empty() && t.options.inject_oom_phase == to_string(phase))
    TORCH_CHECK_WITH(OutOfMemoryError, false, "test hook: CUDA out of memory at the start of the ", to_string(phase),
                     " phase");
}

std::string out_of_memory_message(const Trainer& t, const std::string& what) {
  const TrainConfig& c = t.config;
  std::string where = cat("out of GPU memory in the ", to_string(t.phase),
                          t.phase == TrainPhase::load ? std::string(" of ") + c.base_model : cat(" of step ", t.step + 1));
#ifdef QLORA_WITH_CUDA
  if (t.device.is_cuda()) {
    const auto st = c10::cuda::CUDACachingAllocator::getDeviceStats(t.device.index());
    const auto agg = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    where += cat(" on ", t.device.str(), " (", fixed(static_cast<double>(st.allocated_bytes[agg].current) / (1 << 30), 2),
                 " GiB in tensors, ", fixed(static_cast<double>(st.reserved_bytes[agg].current) / (1 << 30), 2),
                 " GiB reserved", c.gpu_memory_limit > 0 ? cat(", gpu_memory_limit ", c.gpu_memory_limit, " GiB") : "",
                 ")");
  }
#endif
  // What to lower, the cheapest first for this phase and config.
  std::vector<std::string> fixes;
  if (t.phase == TrainPhase::load) {
    if (!c.load_in_4bit) fixes.push_back("load_in_4bit: true (adapter: qlora)");
    if (c.gpu_memory_limit > 0) fixes.push_back(cat("gpu_memory_limit (", c.gpu_memory_limit, ")"));
    fixes.push_back("a GPU with more memory, or more GPUs (scripts/launch shards the layers)");
  } else {
    if (!c.gradient_checkpointing) fixes.push_back("gradient_checkpointing: true");
    else if (c.gradient_checkpointing_layers >= 0)
      fixes.push_back(cat("more recomputed layers (gradient_checkpointing_layers: ", c.gradient_checkpointing_layers,
                          ", -1 = all)"));
    if (c.micro_batch_size > 1) fixes.push_back(cat("micro_batch_size (", c.micro_batch_size, ")"));
    fixes.push_back(cat("sequence_len (", c.sequence_len, ")"));
    if (c.gradient_checkpointing && !c.activation_offloading) fixes.push_back("activation_offloading: true");
    if (t.split_layers && !c.activation_offloading) fixes.push_back("gradient_checkpointing_split_layers: false");
    if (t.device.is_cuda() && !c.lm_head_offloading && t.phase == TrainPhase::backward)
      fixes.push_back("lm_head_offloading: true");
    if (c.mlp_tile_tokens == 0 && c.sequence_len * c.micro_batch_size >= 32768)
      fixes.push_back("mlp_tile_tokens: 8192 (the MLP over tiles of tokens)");
    if (t.phase == TrainPhase::optimizer || c.lora_r > 16) fixes.push_back(cat("lora_r (", c.lora_r, ")"));
  }
  std::string lower;
  for (size_t i = 0; i < fixes.size(); ++i) lower += (i == 0 ? "" : i + 1 == fixes.size() ? ", or " : ", ") + fixes[i];
  std::string first = what.substr(0, what.find('\n'));
  if (first.size() > 160) first = first.substr(0, 160) + "...";
  return cat(where, ": try ", lower, " [", first, "]");
}

void check_nonfinite_step(Trainer& t, const StepResult& r, const std::filesystem::path& last_good) {
  if (t.scaler || (!r.skipped && std::isfinite(r.loss))) return;  // fp16: the scaler's business
  ++t.nonfinite_steps;
  if (t.nonfinite_steps <= t.config.nonfinite_skip_limit) {
    log_warn(cat("step ", t.step, ": non-finite loss or gradients (loss ", r.loss, ", grad-norm ", r.grad_norm,
                 "), no update; ", t.nonfinite_steps, " of nonfinite_skip_limit ", t.config.nonfinite_skip_limit,
                 " such steps so far"));
    return;
  }
  throw TrainingStopped(cat(
      "step ", t.step, ": the loss or the gradients are not finite (loss ", r.loss, ", grad-norm ", r.grad_norm, ") with ",
      c10::toString(t.compute_dtype), " compute; stopped",
      t.config.nonfinite_skip_limit > 0 ? cat(" after ", t.nonfinite_steps, " such steps (nonfinite_skip_limit ",
                                              t.config.nonfinite_skip_limit, ")")
                                        : std::string(),
      ". Last good checkpoint: ",
      last_good.empty() ? std::string("none written yet") : last_good.string() + " (resume_from_checkpoint=auto)",
      "; lower learning_rate, or set nonfinite_skip_limit: N to skip such steps"));
}

std::vector<int64_t> next_micro_batch(Trainer& t) {
  auto ensure_plan = [&t] {
    if (t.plan_epoch == t.position.epoch) return;
    BatchingOptions b = t.batching;
    b.seed = t.batching.seed + static_cast<uint64_t>(t.position.epoch);  // a new order each epoch
    t.plan = plan_micro_batches(t.data.train, b);
    t.plan_epoch = t.position.epoch;
    if (t.plan.empty()) throw UserError("the training split has no micro-batches");
  };
  ensure_plan();
  if (t.position.micro_batch >= static_cast<int64_t>(t.plan.size())) {
    ++t.position.epoch;
    t.position.micro_batch = 0;
    ensure_plan();
  }
  return t.plan.at(static_cast<size_t>(t.position.micro_batch++));
}

Batch make_train_batch(const Trainer& t, const std::vector<int64_t>& indices) {
  return make_batch(t.data.train, indices, t.batching);
}

namespace {

// A checkpointed forward's state for the backward: each recomputed layer's input (slot
// input_slot(i)) and, split, its mid residual (mid_slot(i)), in `offload` (pinned host memory with
// activation_offloading); the RNG state before each layer and, split, before its MLP.
struct RecomputeState {
  bool split;
  LayerInputOffload offload;
  std::vector<at::Tensor> rng, rng_mid;
  RecomputeState(size_t layers, bool split_layers, bool offload_to_host, const at::Device& device)
      : split(split_layers), offload(split_layers ? 2 * layers : layers, offload_to_host, device), rng(layers),
        rng_mid(split_layers ? layers : 0) {}
  size_t input_slot(size_t i) const { return split ? 2 * i : i; }
  size_t mid_slot(size_t i) const { return 2 * i + 1; }
  // Slot s's tensor, and the next ones the backward reads start coming back (slots are read in
  // descending order): one ahead, two when split (its attention half is short).
  at::Tensor take(size_t s) {
    at::Tensor x = offload.take(s);
    for (size_t ahead = 1; ahead <= (split ? 2u : 1u) && ahead <= s; ++ahead) offload.prefetch(s - ahead);
    return x;
  }
};

// backward(roots, grads) over the roots that need a gradient (a leaf input that does not, at layer
// 0, is not a root); nothing to do when none does.
void backward_where_needed(const std::vector<at::Tensor>& roots, const std::vector<at::Tensor>& grads) {
  std::vector<at::Tensor> r, g;
  for (size_t i = 0; i < roots.size(); ++i)
    if (roots[i].requires_grad()) {
      r.push_back(roots[i]);
      g.push_back(grads[i]);
    }
  if (!r.empty()) torch::autograd::backward(r, g);
}

// Backward of checkpointed layer k, dh its output's gradient: recompute it from its kept input
// with grad on and backpropagate. Returns that input, whose grad() is the next dh (k > 0). The
// recompute's own output is never read, only its backward: its last projection and add are skipped
// (decoder_layer_for_backward), unless asked to run them (a measurement switch); split, o_proj's
// forward too (the MLP half first, from the kept h_mid, then the attention half with h_mid's
// gradient). The NF4 weights a recompute dequantizes stay for its backward
// (gradient_checkpointing_reuse_weights); the RNG is reset to the forward's state before each part
// (the same dropout masks, as preserve_rng_state).
at::Tensor recompute_backward(Trainer& t, RecomputeState& kept, size_t k, const AttentionInputs& attn, at::Tensor dh) {
  const LlamaWeights& m = t.model;
  const bool reuse = t.config.gradient_checkpointing_reuse_weights;
  if (kept.split) {
    const at::Tensor h_mid = kept.take(kept.mid_slot(k)).detach().requires_grad_(true);
    set_rng_state(m.device, kept.rng_mid[k]);
    DecoderLayerTerms mlp_half;
    {
      KeepDequantized keep(t.scratch, reuse);
      mlp_half = mlp_block_for_backward(h_mid, m.layers[k], m, t.scratch, &t.lora.layers[k], true);
    }
    backward_where_needed({mlp_half.residual, mlp_half.mlp}, {dh, dh});
    mlp_half = {};
    dh = h_mid.grad();  // the attention half's upstream gradient
  }
  const at::Tensor hin = kept.take(kept.input_slot(k)).detach().requires_grad_(k > 0);
  set_rng_state(m.device, kept.rng[k]);
  std::vector<at::Tensor> roots;
  {
    KeepDequantized keep(t.scratch, reuse);
    if (kept.split) {
      const DecoderLayerTerms a = attention_block_for_backward(hin, m.layers[k], m, attn, t.scratch, &t.lora.layers[k], true);
      roots = {a.residual, a.mlp};
    } else if (t.options.recompute_unread_outputs) {
      roots = {decoder_layer(hin, m.layers[k], m, attn, t.scratch, &t.lora.layers[k], true)};
    } else {
      const DecoderLayerTerms terms = decoder_layer_for_backward(hin, m.layers[k], m, attn, t.scratch, &t.lora.layers[k], true);
      roots = {terms.residual, terms.mlp};
    }
  }
  backward_where_needed(roots, std::vector<at::Tensor>(roots.size(), dh));
  return hin;
}

}  // namespace

at::Tensor forward_backward(Trainer& t, const Batch& batch, double normalizer, double loss_multiplier) {
  const LlamaWeights& m = t.model;
  Fsdp* fsdp = t.fsdp ? &*t.fsdp : nullptr;
  // Sharded runs: gather layer i (waiting for its prefetch) and start gathering `next`.
  auto unshard = [&](size_t i, size_t next) {
    if (!fsdp) return;
    unshard_layer(*fsdp, i, t.params);
    if (fsdp->options.prefetch) prefetch_layer(*fsdp, next, t.params);
  };
  const at::Tensor pos = batch.position_ids.to(m.device);
  const at::Tensor targets = batch.target_ids.to(m.device);
  const int64_t B = batch.input_ids.size(0), T = batch.input_ids.size(1);
  const size_t L = m.layers.size();
  enter_phase(t, TrainPhase::forward);
  const AttentionInputs attn = attention_inputs(m, pos, B, T);
  const at::Tensor h0 = embed(m, batch.input_ids);  // frozen: no gradient needed below it
  // lm_head_offloading: its copy to the GPU overlaps the forward; dropped after the loss. Issued
  // after embed's own host-to-device copy (of an offloaded table's rows), which the first layer
  // waits for and which should not queue behind this one.
  if (t.lm_head_offload) t.lm_head_offload->prefetch();

  if (!t.config.gradient_checkpointing) {
    // The plain autograd graph: every layer's activations stay until the backward.
    // Sharded: every layer stays gathered until the backward has run through it.
    at::Tensor h = h0;
    for (size_t i = 0; i < L; ++i) {
      unshard(i, i + 1);
      h = decoder_layer(h, m.layers[i], m, attn, t.scratch, &t.lora.layers[i], true);
    }
    enter_phase(t, TrainPhase::loss);
    const at::Tensor loss = head_loss(t, h, targets, normalizer);
    if (t.lm_head_offload) t.lm_head_offload->release();  // the loss's graph holds it until its backward
    enter_phase(t, TrainPhase::backward);  // the whole graph's backward starts at the loss
    (loss_multiplier == 1.0 ? loss : loss * loss_multiplier).backward();
    if (fsdp)
      for (size_t k = L; k-- > 0;) {
        reduce_scatter_layer_grads(*fsdp, k, t.params);
        reshard_layer(*fsdp, k);
      }
    return loss.detach();
  }

  // Forward, activations not kept: only each layer's input h_i and the RNG state before it. With
  // activation_offloading the inputs wait in pinned host memory, copied on a side stream that
  // overlaps the layers' compute (layer_input_offload.h); on a CPU device there is nothing to offload.
  // Layers [0, recomputed) are checkpointed so; the others (gradient_checkpointing_layers)
  // keep their autograd graphs from this forward, trading memory for their recompute. A kept
  // layer's input is a leaf (its gradient is the next dh) and it stays gathered when sharded.
  // gradient_checkpointing_split_layers: each recomputed layer also keeps its mid residual h_mid
  // and the RNG state before its MLP, so the recompute runs in two halves (see attention_block).
  const int64_t n_ckpt = t.config.gradient_checkpointing_layers;
  const size_t recomputed = n_ckpt < 0 ? L : std::min(L, static_cast<size_t>(n_ckpt));
  const bool split = t.split_layers && !t.options.recompute_unread_outputs;
  RecomputeState kept(L, split, t.config.activation_offloading, m.device);
  std::vector<at::Tensor> inputs(L), outputs(L);  // the layers with graphs
  at::Tensor h = h0;
  for (size_t i = 0; i < L; ++i) {
    unshard(i, i + 1);  // all-gather layer i's NF4 bytes + LoRA shards; prefetch layer i + 1
    if (i < recomputed) {
      at::NoGradGuard no_grad;
      kept.offload.keep(kept.input_slot(i), h);
      kept.rng[i] = rng_state(m.device);
      if (split) {
        const AttentionBlockOutput a = attention_block(h, m.layers[i], m, attn, t.scratch, &t.lora.layers[i], true);
        kept.offload.keep(kept.mid_slot(i), a.h_mid);
        kept.rng_mid[i] = rng_state(m.device);
        h = a.h_mid + mlp_block(a.normed, m.layers[i], t.scratch, &t.lora.layers[i], true);
      } else {
        h = decoder_layer(h, m.layers[i], m, attn, t.scratch, &t.lora.layers[i], true);
      }
      if (fsdp && fsdp->options.reshard_after_forward && i + 1 < L) reshard_layer(*fsdp, i);
      // (the last layer stays gathered: the backward starts with it)
    } else {
      inputs[i] = h.detach().requires_grad_(i > 0);
      outputs[i] = decoder_layer(inputs[i], m.layers[i], m, attn, t.scratch, &t.lora.layers[i], true);
      h = outputs[i].detach();
    }
  }
  const at::Tensor rng_after_forward = rng_state(m.device);

  // Loss on the last hidden state, as a leaf: its gradient is the first upstream gradient.
  enter_phase(t, TrainPhase::loss);
  const at::Tensor h_last = h.detach().requires_grad_(true);
  const at::Tensor loss = head_loss(t, h_last, targets, normalizer);
  (loss_multiplier == 1.0 ? loss : loss * loss_multiplier).backward();
  if (t.lm_head_offload) t.lm_head_offload->release();
  at::Tensor dh = h_last.grad();
  enter_phase(t, TrainPhase::backward);

  // Backward layer by layer: recompute layer i from h_i with grad on (or take its kept graph),
  // backward dh, pass dh_i down.
  for (size_t k = L; k-- > 0;) {
    unshard(k, k - 1);  // prefetch in backward order (k - 1 wraps past 0 for k = 0: no layer, no-op)
    at::Tensor hin;
    if (k < recomputed) {
      hin = recompute_backward(t, kept, k, attn, std::move(dh));
    } else {
      hin = inputs[k];
      torch::autograd::backward({std::move(outputs[k])}, {dh});
    }
    if (fsdp) {
      reduce_scatter_layer_grads(*fsdp, k, t.params);  // sum over ranks into the local shards' grads
      reshard_layer(*fsdp, k);
    }
    if (k > 0) dh = hin.grad();
    inputs[k] = at::Tensor();  // free the kept input as soon as it is used
  }
  set_rng_state(m.device, rng_after_forward);  // as if the forward had run once, with grad
  return loss.detach();
}

namespace {
StepResult train_step_phases(Trainer& t, const std::vector<Batch>& batches);
}  // namespace

// An out-of-memory error anywhere in the step becomes one OutOfMemory report naming the phase.
StepResult train_step_on(Trainer& t, const std::vector<Batch>& batches) {
  try {
    return train_step_phases(t, batches);
  } catch (const c10::OutOfMemoryError& e) {
    throw OutOfMemory(out_of_memory_message(t, e.what_without_backtrace()));
  }
}

namespace {
StepResult train_step_phases(Trainer& t, const std::vector<Batch>& batches) {
  StepResult r;
  for (const Batch& b : batches) {
    r.tokens += b.n_tokens;
    r.target_tokens += b.n_target_tokens;
  }
  // The exact normalizer: the target tokens of the whole step over every rank (DESIGN "Numbers that
  // must hold"); a double tensor on the device so NCCL can sum it.
  {
    at::Tensor counts = at::tensor({static_cast<double>(r.tokens), static_cast<double>(r.target_tokens)},
                                   at::TensorOptions().dtype(at::kDouble)).to(t.device);
    t.comm->all_reduce(counts);
    counts = counts.cpu();
    r.tokens = static_cast<int64_t>(counts[0].item<double>());
    r.target_tokens = static_cast<int64_t>(counts[1].item<double>());
  }
  const double normalizer = static_cast<double>(std::max<int64_t>(1, r.target_tokens));
  const bool inject = t.options.inject_overflow_step >= 0 && t.step == t.options.inject_overflow_step;
  double multiplier = t.scaler ? loss_scale_value(*t.scaler) : 1.0;
  if (inject) {
    log_warn(cat("test hook: multiplying the loss of step ", t.step + 1, " by inf"));
    multiplier = std::numeric_limits<double>::infinity();
  }

  at::Tensor loss_sum = at::zeros({}, at::TensorOptions().dtype(at::kFloat).device(t.device));
  for (const Batch& b : batches) loss_sum.add_(forward_backward(t, b, normalizer, multiplier));
  enter_phase(t, TrainPhase::optimizer);
  if (t.fsdp) finish_grads(*t.fsdp, t.params);
  t.comm->all_reduce(loss_sum);  // each rank's share of the global mean
  const AllReduceFn sum_over_ranks = [&t](at::Tensor& x) { t.comm->all_reduce(x); };

  std::vector<at::Tensor> grads;
  grads.reserve(t.params.size());
  for (const at::Tensor& p : t.params) grads.push_back(p.grad());

  r.lr = lr_at(t.schedule, t.step);
  bool overflow = false;
  if (t.scaler) {
    overflow = unscale_grads(*t.scaler, grads, sum_over_ranks);
  } else if (inject) {
    overflow = true;  // no scaler to unscale: the hook's inf gradients are skipped all the same
  }
  if (!overflow) {
    const ClipResult clip = clip_grad_norm(grads, t.config.max_grad_norm, sum_over_ranks);
    r.grad_norm = clip.norm;
    overflow = !clip.finite;
  } else {
    r.grad_norm = std::numeric_limits<double>::infinity();
  }
  if (overflow) {
    r.skipped = true;
    log_warn(cat("step ", t.step + 1, ": non-finite gradients, step skipped",
                 t.scaler ? cat(" (loss scale ", loss_scale_value(*t.scaler), " -> lowered)") : std::string()));
  } else {
    adamw_step(t.optimizer, t.params, grads, r.lr, t.adamw);
  }
  if (t.scaler) update_loss_scale(*t.scaler);
  for (at::Tensor& p : t.params) p.mutable_grad() = at::Tensor();
  ++t.step;
  r.loss = loss_sum.item<double>();  // unmultiplied: finite even when the scaled loss overflowed
  return r;
}
}  // namespace

StepResult train_step(Trainer& t) {
  std::vector<Batch> batches;
  const int ga = std::max(1, t.config.gradient_accumulation_steps);
  const int world = t.world();
  batches.reserve(static_cast<size_t>(ga));
  // The step's world * ga micro-batches of the global stream; this rank takes every world-th.
  for (int i = 0; i < ga * world; ++i) {
    std::vector<int64_t> indices = next_micro_batch(t);
    if (i % world == t.rank()) batches.push_back(make_train_batch(t, indices));
  }
  return train_step_on(t, batches);
}

std::optional<double> evaluate(Trainer& t) {
  if (t.data.val.empty()) return std::nullopt;
  at::NoGradGuard no_grad;
  BatchingOptions b = t.batching;
  const std::vector<std::vector<int64_t>> plan = plan_micro_batches(t.data.val, b);
  const LlamaWeights& m = t.model;
  Fsdp* fsdp = t.fsdp ? &*t.fsdp : nullptr;
  // Summed over this rank's micro-batches (every world-th), then over ranks.
  at::Tensor totals = at::zeros({2}, at::TensorOptions().dtype(at::kDouble).device(t.device));
  FlceOptions o;
  o.reduction = FlceOptions::Reduction::sum;
  if (t.lm_head_offload) t.lm_head_offload->prefetch();  // on the GPU for the whole evaluation
  // Rounds of one micro-batch per rank. Sharded layers are gathered collectively, so a rank with
  // nothing to evaluate in a round (the plan's tail, or no target tokens) still joins the gathers.
  const size_t world = static_cast<size_t>(t.world());
  const size_t rounds = (plan.size() + world - 1) / world;
  for (size_t round = 0; round < rounds; ++round) {
    const size_t j = round * world + static_cast<size_t>(t.rank());
    std::optional<Batch> batch;
    if (j < plan.size()) batch = make_batch(t.data.val, plan[j], b);
    if (batch && batch->n_target_tokens == 0) batch.reset();
    if (!batch && !fsdp) continue;
    at::Tensor h;
    AttentionInputs attn;
    if (batch) {
      const at::Tensor pos = batch->position_ids.to(t.device);
      attn = attention_inputs(m, pos, batch->input_ids.size(0), batch->input_ids.size(1));
      h = embed(m, batch->input_ids);
    }
    for (size_t i = 0; i < m.layers.size(); ++i) {
      if (fsdp) {
        unshard_layer(*fsdp, i, t.params);
        if (fsdp->options.prefetch) prefetch_layer(*fsdp, i + 1, t.params);
      }
      if (batch) h = decoder_layer(h, m.layers[i], m, attn, t.scratch, &t.lora.layers[i], /*training=*/false);
      if (fsdp) reshard_layer(*fsdp, i);
    }
    if (!batch) continue;
    h = rms_norm(h, m.norm, m.config.rms_norm_eps);
    totals[0] += fused_linear_cross_entropy_forward(h.reshape({-1, h.size(-1)}), lm_head_on_device(t),
                                                    batch->target_ids.to(t.device).reshape({-1}), o)
                     .to(at::kDouble);
    totals[1] += static_cast<double>(batch->n_target_tokens);
  }
  if (t.lm_head_offload) t.lm_head_offload->release();
  t.comm->all_reduce(totals);
  const at::Tensor cpu = totals.cpu();
  if (cpu[1].item<double>() == 0) return std::nullopt;
  return cpu[0].item<double>() / cpu[1].item<double>();
}

}  // namespace qlora
