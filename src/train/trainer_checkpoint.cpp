// The trainer's checkpoints: save (LoRA weights, AdamW moments, RNG states, schedule, loss scaler,
// and what the tensors depend on: the base model's shape and the adapter's rank and targets) and
// resume, which checks all of it against this run before it replaces any of the trainer's state.
// The checkpoint format itself (atomic directories, manifests, shards) is checkpoint.cpp.
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <set>

#include "qlora/checkpoint.h"
#include "qlora/error.h"
#include "qlora/log.h"
#include "qlora/trainer.h"

namespace qlora {

namespace fs = std::filesystem;

namespace {

// Whole dim-0 rows of parameter i (its shard has rows_per_rank of them when sharded).
std::vector<int64_t> full_param_rows(const Trainer& t) {
  std::vector<int64_t> rows(t.params.size());
  for (size_t i = 0; i < t.params.size(); ++i) rows[i] = t.params[i].size(0);
  if (t.fsdp)
    for (const ShardedLayer& sl : t.fsdp->layers)
      for (const LoraShard& s : sl.lora) rows[s.param] = s.rows;
  return rows;
}

// What a checkpoint's tensors depend on: the base model's shape and the adapter's rank and
// targets. Saved in state.json and compared at resume, so that a checkpoint of another model or
// lora_r is named as such rather than as a tensor of an odd shape.
nlohmann::json model_identity(const Trainer& t) {
  const HFConfig& c = t.model.config;
  return {{"model_type", c.model_type}, {"num_hidden_layers", c.num_hidden_layers}, {"hidden_size", c.hidden_size},
          {"intermediate_size", c.intermediate_size}, {"num_attention_heads", c.num_attention_heads},
          {"num_key_value_heads", c.num_key_value_heads}, {"vocab_size", c.vocab_size}};
}

nlohmann::json adapter_identity(const Trainer& t) {
  const LoraOptions o = lora_options_from_config(t.config);
  std::vector<std::string> targets = o.target_modules;
  std::sort(targets.begin(), targets.end());
  return {{"lora_r", o.r}, {"target_modules", targets}};
}

// "key a (this run: b), ..." for every key of `now` whose value differs in `saved`; "" when none.
std::string identity_differences(const nlohmann::json& saved, const nlohmann::json& now) {
  std::string out;
  for (const auto& [key, value] : now.items()) {
    if (!saved.contains(key) || saved[key] == value) continue;
    out += cat(out.empty() ? "" : ", ", key, " ", saved[key].dump(), " (this run: ", value.dump(), ")");
  }
  return out;
}

// UserError when the checkpoint in `dir` was written for another model or adapter shape (state.json
// of checkpoints older than this check has no identity: the tensor checks below still apply).
void check_checkpoint_identity(const Trainer& t, const fs::path& dir, const nlohmann::json& state) {
  if (state.contains("model") && state["model"].is_object()) {
    const std::string diff = identity_differences(state["model"], model_identity(t));
    if (!diff.empty())
      throw UserError(cat("checkpoint ", dir.string(), " was trained on a different base model: ", diff,
                          " (expected the model of base_model ", t.config.base_model, ")"));
  }
  if (state.contains("adapter") && state["adapter"].is_object()) {
    const std::string diff = identity_differences(state["adapter"], adapter_identity(t));
    if (!diff.empty())
      throw UserError(cat("checkpoint ", dir.string(), " holds a different adapter: ", diff,
                          " (expected the same lora_r and targets; or start a new output_dir)"));
  }
}

}  // namespace

fs::path save_trainer_checkpoint(Trainer& t) {
  // Sharded runs: each rank writes the valid rows of its shards of the LoRA masters and their AdamW
  // state, with their global offsets; the RNG states are per rank.
  const std::vector<int64_t> rows = full_param_rows(t);
  NamedTensors tensors;
  std::vector<std::pair<std::string, ShardPlacement>> shards;
  auto add = [&](const std::string& name, const at::Tensor& local, size_t i) {
    if (!t.fsdp) {
      tensors.emplace_back(name, local.detach());
      return;
    }
    const ShardPlacement p = shard_placement(rows[i], t.world(), t.rank());
    tensors.emplace_back(name, local.detach().narrow(0, 0, p.rows));
    shards.emplace_back(name, p);
  };
  for (size_t i = 0; i < t.params.size(); ++i) add("lora." + t.param_names[i], t.params[i], i);
  for (size_t i = 0; i < t.params.size(); ++i) {
    add("optimizer." + t.optimizer.names[i] + ".exp_avg", t.optimizer.exp_avg[i], i);
    add("optimizer." + t.optimizer.names[i] + ".exp_avg_sq", t.optimizer.exp_avg_sq[i], i);
  }
  for (auto& [name, tensor] : adamw_state_tensors(t.optimizer, "optimizer."))
    if (tensor.dim() == 0) tensors.emplace_back(name, tensor);  // the step count
  for (auto& nt : rng_state_tensors()) tensors.push_back(std::move(nt));
  nlohmann::json state = {
      {"step", t.step},
      {"total_steps", t.total_steps},
      {"world_size", t.world()},
      {"data_position", {{"epoch", t.position.epoch}, {"micro_batch", t.position.micro_batch}}},
      {"scheduler", {{"kind", to_string(t.schedule.kind)}, {"base_lr", t.schedule.base_lr},
                     {"warmup_steps", t.schedule.warmup_steps}, {"total_steps", t.schedule.total_steps},
                     {"last_step", t.step}}},
      {"data_cache_key", t.data.cache_key},
      {"model", model_identity(t)},
      {"adapter", adapter_identity(t)},
  };
  if (t.scaler) state["loss_scaler"] = loss_scaler_state(*t.scaler);
  return save_sharded_checkpoint(t.config.output_dir, t.step, tensors, shards, state, t.config.save_total_limit, *t.comm);
}

void load_trainer_checkpoint(Trainer& t, const fs::path& dir) {
  const Checkpoint ck = load_checkpoint(dir);  // sharded checkpoints come back whole, at any world size
  if (ck.state.is_object()) check_checkpoint_identity(t, dir, ck.state);
  const std::vector<int64_t> rows = full_param_rows(t);
  // This rank's part of a whole tensor of parameter i's shape (checked), as the trainer holds it.
  auto local_part = [&](const std::string& name, size_t i) {
    const at::Tensor& src = ck.tensor(name);
    std::vector<int64_t> want = t.params[i].sizes().vec();
    want[0] = rows[i];
    if (src.sizes().vec() != want)
      throw UserError(cat("checkpoint ", dir.string(), ": tensor ", name, " has shape ", src.sizes(), " (expected ",
                          at::IntArrayRef(want), " for this config's model and lora_r ", t.config.lora_r,
                          "; a checkpoint of a different model, lora_r or targets?)"));
    return t.fsdp ? shard_rows(src, t.world(), t.rank()) : src;
  };
  // A LoRA tensor this run does not have: a checkpoint of more layers or other targets, which
  // would otherwise be resumed with part of its adapter silently dropped.
  std::set<std::string> expected;
  for (const std::string& n : t.param_names) expected.insert("lora." + n);
  for (const auto& [name, tensor] : ck.tensors)
    if (name.rfind("lora.", 0) == 0 && !expected.count(name))
      throw UserError(cat("checkpoint ", dir.string(), ": holds ", name, ", which this run's adapter does not have (",
                          expected.size(), " LoRA tensors of ", t.model.config.num_hidden_layers,
                          " layers; a checkpoint of a different model or lora targets?)"));
  // Every tensor is checked before any of the trainer's state is overwritten.
  std::vector<at::Tensor> lora_parts;
  for (size_t i = 0; i < t.params.size(); ++i) lora_parts.push_back(local_part("lora." + t.param_names[i], i));
  NamedTensors adam;
  for (size_t i = 0; i < t.params.size(); ++i)
    for (const char* k : {".exp_avg", ".exp_avg_sq"}) {
      const std::string name = "optimizer." + t.optimizer.names[i] + k;
      adam.emplace_back(name, local_part(name, i));
    }
  adam.emplace_back("optimizer.step", ck.tensor("optimizer.step"));
  {
    at::NoGradGuard no_grad;
    for (size_t i = 0; i < t.params.size(); ++i) t.params[i].copy_(lora_parts[i]);
  }
  adamw_load_state(t.optimizer, adam, "optimizer.");
  // The RNG states of the same rank when it existed in the saved run, else rank 0's.
  const size_t r = static_cast<size_t>(t.rank()) < ck.rank_tensors.size() ? static_cast<size_t>(t.rank()) : 0;
  restore_rng_state(ck.rank_tensors.empty() ? ck.tensors : ck.rank_tensors[r]);
  const nlohmann::json& s = ck.state;
  try {
    t.step = s.at("step").get<int64_t>();
    t.position.epoch = s.at("data_position").at("epoch").get<int64_t>();
    t.position.micro_batch = s.at("data_position").at("micro_batch").get<int64_t>();
    if (s.contains("total_steps") && s["total_steps"].get<int64_t>() != t.total_steps)
      log_warn(cat("checkpoint ", dir.string(), " was written by a run of ", s["total_steps"].get<int64_t>(),
                   " steps; this config runs ", t.total_steps, " (the schedule follows this config)"));
    if (s.contains("data_cache_key") && s["data_cache_key"].get<std::string>() != t.data.cache_key)
      log_warn(cat("checkpoint ", dir.string(), ": the prepared data differs from the data it was trained on"));
    if (t.scaler && s.contains("loss_scaler")) load_loss_scaler_state(*t.scaler, s["loss_scaler"]);
  } catch (const nlohmann::json::exception& e) {
    throw UserError(cat("checkpoint ", dir.string(), ": state.json is malformed (", e.what(), ")"));
  }
  t.plan_epoch = -1;  // re-planned for the restored epoch
}

LoraModel full_adapter(Trainer& t) { return t.fsdp ? gather_lora(*t.fsdp, t.lora, t.params) : t.lora; }

}  // namespace qlora
