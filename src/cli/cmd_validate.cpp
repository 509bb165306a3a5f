// qlora validate CONFIG [key=value ...]: parse, override and check a config, print the resolved
// result. Writes nothing.
#include <iostream>

#include "cli/commands.h"
#include "qlora/config.h"
#include "qlora/error.h"

namespace qlora::cli {

CommandFn add_validate_command(CLI::App& app) {
  struct State {
    std::string config_path;
    std::vector<std::string> overrides;
    bool list_keys = false;
  };
  auto st = std::make_shared<State>();
  auto* sub = app.add_subcommand("validate", "check a config and print it resolved (defaults filled in); writes nothing");
  sub->add_option("config", st->config_path, "YAML config file");
  sub->add_option("overrides", st->overrides, "key=value overrides, e.g. lora_r=32 datasets.0.path=data.jsonl");
  sub->add_flag("--list-keys", st->list_keys, "list every config key with its type, default and meaning");
  return [st] {
    if (st->list_keys) {
      std::cout << describe_config_keys();
      return kExitOk;
    }
    if (st->config_path.empty()) throw UserError("qlora validate: expected a CONFIG.yaml argument");
    const TrainConfig config = load_config(st->config_path, st->overrides);
    std::cout << "# resolved config: " << st->config_path << "\n" << config_to_yaml(config);
    return kExitOk;
  };
}

}  // namespace qlora::cli
