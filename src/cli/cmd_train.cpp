// qlora train CONFIG [key=value ...]: fine-tune a LoRA adapter on one device (src/train/trainer.cpp).
// Exit 0 when the run finished or was stopped cleanly by SIGINT/SIGTERM (a checkpoint was written;
// resume_from_checkpoint=auto continues it).
#include "cli/commands.h"
#include "qlora/config.h"
#include "qlora/error.h"
#include "qlora/log.h"
#include "qlora/trainer.h"

namespace qlora::cli {

CommandFn add_train_command(CLI::App& app) {
  struct State {
    std::string config_path;
    std::vector<std::string> overrides;
  };
  auto st = std::make_shared<State>();
  auto* sub = app.add_subcommand("train", "train a LoRA adapter: qlora train CONFIG [key=value ...]");
  sub->add_option("config", st->config_path, "YAML config file")->required();
  sub->add_option("overrides", st->overrides, "key=value overrides, e.g. max_steps=100 learning_rate=1e-4");
  return [st] {
    const TrainConfig config = load_config(st->config_path, st->overrides);
    run_training(config);
    return kExitOk;
  };
}

}  // namespace qlora::cli
