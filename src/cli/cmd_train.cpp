// qlora train CONFIG [key=value ...]: fine-tune a LoRA adapter (src/train/trainer.cpp). Exit 0
// when the run finished or was stopped cleanly by SIGINT/SIGTERM (a checkpoint was written;
// resume_from_checkpoint=auto continues it); 2 bad input; 3 out of GPU memory (the message names the
// phase and what to lower); 4 training stopped on non-finite losses (bf16/fp32, beyond
// nonfinite_skip_limit; the message names the step and the last good checkpoint); 5 an output could
// not be written (disk full, a file size limit, an I/O error: the message names the file and the
// cause; the checkpoints saved before are intact). Started by scripts/launch or torchrun (WORLD_SIZE
// set), each process is one rank: device cuda:LOCAL_RANK (with device: auto), collectives over
// NCCL (CPU: the TCPStore engine), layers and LoRA sharded; rank > 0 logs warnings only.
#include <cstdlib>

#include "cli/commands.h"
#include "qlora/config.h"
#include "qlora/dist.h"
#include "qlora/error.h"
#include "qlora/log.h"
#include "qlora/trainer.h"

namespace qlora::cli {

namespace {

// QLORA_TEST_THROW_AT=RANK:STEP makes that rank throw before that step (launcher tests).
int64_t test_throw_step(int rank) {
  const char* v = std::getenv("QLORA_TEST_THROW_AT");
  if (!v) return -1;
  int r = -1;
  long long step = -1;
  if (std::sscanf(v, "%d:%lld", &r, &step) != 2) throw UserError("QLORA_TEST_THROW_AT: expected RANK:STEP, found '" + std::string(v) + "'");
  return r == rank ? step : -1;
}

// Fault-injection hooks of the tests (never set by users): QLORA_TEST_OOM_PHASE=PHASE (an
// out-of-memory error when that phase starts), QLORA_TEST_OVERFLOW_STEP=N (step N's loss times inf).
void read_test_hooks(TrainerOptions& o) {
  if (const char* v = std::getenv("QLORA_TEST_OOM_PHASE")) o.inject_oom_phase = v;
  if (const char* v = std::getenv("QLORA_TEST_OVERFLOW_STEP")) o.inject_overflow_step = std::atoll(v);
}

// The command: one rank, or the rank of a launcher's (WORLD_SIZE set) with its process group.
int run_train(const std::string& config_path, const std::vector<std::string>& overrides) {
  TrainConfig config = load_config(config_path, overrides);
  const std::optional<DistEnv> env = read_dist_env();
  TrainerOptions options;
  read_test_hooks(options);
  if (!env) {
    options.throw_at_step = test_throw_step(0);
    run_training(config, options);
    return kExitOk;
  }
  if (env->rank > 0 && log_enabled(LogLevel::info)) init_logging("warn", env->rank);
  if (config.device == "auto") config.device = at::hasCUDA() ? "cuda:" + std::to_string(env->local_rank) : "cpu";
  const at::Device device = resolve_train_device(config.device);
  options.throw_at_step = test_throw_step(env->rank);
  std::shared_ptr<Collective> comm = make_process_group_collective(*env, device);
  log_info(cat("rank ", env->rank, " of ", env->world_size, " on ", device.str(), " (", comm->engine(), ", master ",
               env->master_addr, ":", env->master_port, ")"));
  run_training(config, options, comm);
  return kExitOk;
}

}  // namespace

CommandFn add_train_command(CLI::App& app) {
  struct State {
    std::string config_path;
    std::vector<std::string> overrides;
  };
  auto st = std::make_shared<State>();
  auto* sub = app.add_subcommand("train", "train a LoRA adapter: qlora train CONFIG [key=value ...]");
  sub->add_option("config", st->config_path, "YAML config file")->required();
  sub->add_option("overrides", st->overrides, "key=value overrides, e.g. max_steps=100 learning_rate=1e-4");
  return [st] { return run_train(st->config_path, st->overrides); };
}

}  // namespace qlora::cli
