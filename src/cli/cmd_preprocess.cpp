// qlora preprocess CONFIG [key=value ...] [--show N]: tokenize the config's datasets exactly as
// `qlora train` will (same cache), print what came out (records, tokens, trainable share,
// truncations, skipped lines, speed, cache hit or miss) and N examples with the masked spans marked.
#include <iomanip>
#include <iostream>
#include <sstream>

#include "cli/commands.h"
#include "qlora/config.h"
#include "qlora/dataset.h"
#include "qlora/error.h"
#include "qlora/log.h"
#include "qlora/tokenizer.h"

namespace qlora::cli {

namespace {

}  // namespace

CommandFn add_preprocess_command(CLI::App& app) {
  struct State {
    std::string config_path;
    std::vector<std::string> overrides;
    int show = 0;
    bool no_cache = false;
  };
  auto st = std::make_shared<State>();
  auto* sub = app.add_subcommand(
      "preprocess", "tokenize a config's datasets (cached for train) and print statistics: qlora preprocess CONFIG [key=value ...]");
  sub->add_option("config", st->config_path, "YAML config file")->required();
  sub->add_option("overrides", st->overrides, "key=value overrides, e.g. sequence_len=1024 datasets.0.path=data.jsonl");
  sub->add_option("--show", st->show,
                  "print N training examples as text; the masked (not trained) spans are wrapped in \u27E6 \u27E7")
      ->check(CLI::NonNegativeNumber);
  sub->add_flag("--no-cache", st->no_cache, "neither read nor write the prepared-data cache");
  return [st] {
    const TrainConfig config = load_config(st->config_path, st->overrides);
    const std::string tok_path = config.tokenizer_config.empty() ? config.base_model : config.tokenizer_config;
    const Tokenizer tokenizer = load_tokenizer(tok_path);
    const std::filesystem::path cache_dir = st->no_cache ? std::filesystem::path() : prepared_data_dir(config);
    const PreparedData data = prepare_data(config, tokenizer, cache_dir);
    const DatasetStats& s = data.stats;

    std::cout << "datasets:      " << config.datasets.size() << " file" << (config.datasets.size() == 1 ? "" : "s") << ", "
              << fixed(static_cast<double>(s.bytes) / 1e6, 2) << " MB\n"
              << "records:       " << s.records << " (train " << data.train.size() << ", val " << data.val.size() << ")\n"
              << "tokens:        " << s.tokens << " (" << fixed(static_cast<double>(s.tokens) / std::max<int64_t>(1, s.records), 1)
              << " per record)\n"
              << "trainable:     " << s.trainable_tokens << " ("
              << fixed(100.0 * static_cast<double>(s.trainable_tokens) / std::max<int64_t>(1, s.tokens), 1) << " %)\n"
              << "truncated:     " << s.truncated << " (to sequence_len " << config.sequence_len << ")\n"
              << "skipped lines: " << s.skipped_lines << "\n"
              << "dropped:       " << s.dropped << " (no trained token)\n";
    if (data.from_cache) {
      std::cout << "cache:         hit " << data.cache_path.string() << "\n";
    } else {
      std::cout << "tokenized:     " << fixed(s.tokenize_seconds, 2) << " s on " << s.threads << " thread"
                << (s.threads == 1 ? "" : "s") << ", "
                << fixed(static_cast<double>(s.bytes) / 1e6 / std::max(s.tokenize_seconds, 1e-9), 1) << " MB/s\n"
                << "cache:         " << (data.cache_path.empty() ? std::string("off") : "miss, written to " + data.cache_path.string())
                << "\n";
    }
    const size_t n = std::min(data.train.size(), static_cast<size_t>(st->show));
    for (size_t i = 0; i < n; ++i) {
      const TokenizedExample& ex = data.train[i];
      int64_t trained = 0;
      for (int32_t l : ex.labels) trained += l != kIgnoreLabel;
      std::cout << "\n--- example " << i << " (" << ex.input_ids.size() << " tokens, " << trained
                << " trained; \u27E6masked\u27E7) ---\n"
                << format_example(ex, tokenizer) << "\n";
    }
    return kExitOk;
  };
}

}  // namespace qlora::cli
