// The qlora command line: global options, the subcommand table, and the one place where errors
// become exit statuses (user error: one line, status 2; internal error: status 1).
#include <c10/util/Exception.h>

#include <iostream>
#include <utility>
#include <vector>

#include "cli/commands.h"
#include "qlora/error.h"
#include "qlora/log.h"
#include "qlora/version.h"

namespace qlora::cli {

int run(int argc, char** argv) {
  CLI::App app{"qlora.cpp: QLoRA fine-tuning of Llama-family models, one native binary", "qlora"};
  app.require_subcommand(0, 1);
  std::string log_level = "info";
  bool show_version = false;
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error, critical or off")->capture_default_str();
  app.add_flag("--version", show_version, "print version, git commit, libtorch version and CUDA devices");

  // Each add_*_command appends one subcommand; remember which function runs it.
  std::vector<std::pair<CLI::App*, CommandFn>> commands;
  auto add = [&](CommandFn fn) {
    std::vector<CLI::App*> subs = app.get_subcommands([](CLI::App*) { return true; });
    commands.emplace_back(subs.back(), std::move(fn));
  };
  add(add_train_command(app));
  add(add_eval_command(app));
  add(add_generate_command(app));
  add(add_merge_command(app));
  add(add_export_command(app));
  add(add_quantize_command(app));
  add(add_inspect_command(app));
  add(add_validate_command(app));
  add(add_preprocess_command(app));
  add(add_bench_command(app));
  add(add_check_compile_command(app));
  add(add_aoti_run_command(app));

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::cerr << "qlora: error: " << e.what() << " (see qlora --help)\n";
    return kExitUserError;
  }

  try {
    init_logging(log_level);
    if (show_version) {
      std::cout << "qlora " << version() << " (git " << git_commit() << ")\n"
                << "libtorch " << torch_version() << "\n"
                << "CUDA: " << describe_cuda() << "\n";
      return kExitOk;
    }
    for (auto& [sub, fn] : commands)
      if (sub->parsed()) return fn();
    std::cout << app.help();
    return kExitUserError;  // no subcommand given
  } catch (const WriteError& e) {  // a UserError, but not bad input: its own status
    log_error(e.what());
    return kExitWriteFailed;
  } catch (const UserError& e) {
    log_error(e.what());
    return kExitUserError;
  } catch (const OutOfMemory& e) {
    log_error(e.what());
    return kExitOutOfMemory;
  } catch (const TrainingStopped& e) {
    log_error(e.what());
    return kExitTrainingStopped;
  } catch (const c10::Error& e) {
    log_error(cat("internal error: ", e.what_without_backtrace()));
    return kExitInternal;
  } catch (const std::exception& e) {
    log_error(cat("internal error: ", e.what()));
    return kExitInternal;
  }
}

}  // namespace qlora::cli
