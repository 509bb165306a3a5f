// qlora eval MODEL [--adapter DIR] --data FILE [--type ...] [--seq N] [--batch B]: loss and perplexity
// of a base model plus an optional adapter over a dataset file. The loss is the trainer's own eval
// (qlora::evaluate on a Trainer holding this model, adapter and data as its val split): the mean
// over every non-ignored target token, masks and packing as in training (prepare_data with
// sequence_len --seq, no shuffle-dependent result, no cache). A .txt file is one text: tokenized
// whole (BOS first where the tokenizer adds one) and cut into chunks of --seq tokens, each
// predicting its own tokens after the first (the usual perplexity of a long text); a .jsonl file
// gives one example per record, longer ones truncated to --seq as in training.
#include <ATen/ATen.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli/commands.h"
#include "cli/model_setup.h"
#include "qlora/config.h"
#include "qlora/dataset.h"
#include "qlora/dist.h"
#include "qlora/error.h"
#include "qlora/log.h"
#include "qlora/trainer.h"

namespace qlora::cli {

namespace {

namespace fs = std::filesystem;

DatasetType dataset_type(const std::string& name) {
  if (name == "text" || name == "completion") return DatasetType::completion;
  if (name == "alpaca") return DatasetType::alpaca;
  if (name == "chat" || name == "chat_template") return DatasetType::chat_template;
  if (name == "input_ids" || name == "pretokenized") return DatasetType::pretokenized;
  throw UserError("--type: expected text, completion, alpaca, chat or input_ids, found '" + name + "'");
}

bool is_txt(const std::string& path) { return path.size() >= 4 && path.compare(path.size() - 4, 4, ".txt") == 0; }

// The whole text file as consecutive chunks of `seq` tokens (the last one shorter); every token is
// a target (the first of each chunk has no context, so it is never predicted: the shift).
std::vector<TokenizedExample> text_chunks(const std::string& path, const Tokenizer& tokenizer, int seq) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw UserError("--data '" + path + "': cannot open for reading");
  std::stringstream text;
  text << in.rdbuf();
  EncodeOptions eo;
  eo.add_special_tokens = true;
  const std::vector<int32_t> ids = tokenizer.encode(text.str(), eo);
  std::vector<TokenizedExample> out;
  for (size_t start = 0; start < ids.size(); start += static_cast<size_t>(seq)) {
    const size_t end = std::min(ids.size(), start + static_cast<size_t>(seq));
    if (end - start < 2) break;  // a lone token predicts nothing
    TokenizedExample ex;
    ex.input_ids.assign(ids.begin() + static_cast<ptrdiff_t>(start), ids.begin() + static_cast<ptrdiff_t>(end));
    ex.labels = ex.input_ids;
    out.push_back(std::move(ex));
  }
  if (out.empty()) throw UserError("--data '" + path + "': fewer than 2 tokens of text");
  return out;
}

// Targets of an example as make_batch counts them: labels[t + 1] != ignore.
int64_t target_tokens(const TokenizedExample& ex) {
  int64_t n = 0;
  for (size_t i = 1; i < ex.labels.size(); ++i) n += ex.labels[i] != kIgnoreLabel;
  return n;
}

}  // namespace

CommandFn add_eval_command(CLI::App& app) {
  struct State {
    ModelSetupOptions model;
    std::string data, type = "text", chat_template;
    int seq = 2048, batch = 1;
    bool json = false, train_on_inputs = false;
  };
  auto st = std::make_shared<State>();
  auto* sub = app.add_subcommand("eval", "loss and perplexity over a dataset file: qlora eval MODEL [--adapter DIR] --data FILE");
  add_model_setup_options(sub, st->model);
  sub->add_option("--data", st->data, ".jsonl (one record per line) or .txt (one text, cut into --seq token chunks)")->required();
  sub->add_option("--type", st->type, "text, completion, alpaca, chat or input_ids (as the datasets' type in a config)")
      ->capture_default_str();
  sub->add_option("--seq", st->seq, "tokens per example (longer records are truncated, .txt is chunked)")->capture_default_str();
  sub->add_option("--batch", st->batch, "sequences of --seq tokens per forward (packed)")->capture_default_str();
  sub->add_option("--chat-template", st->chat_template, "for --type chat: llama3, chatml, mistral, hermes, alpaca (default: the tokenizer's)");
  sub->add_flag("--train-on-inputs", st->train_on_inputs, "count prompt tokens too (as train_on_inputs: true)");
  sub->add_flag("--json", st->json, "print one JSON object");
  return [st] {
    const State& s = *st;
    const DatasetType type = dataset_type(s.type);
    if (s.seq < 2) throw UserError("--seq: expected an integer >= 2, found " + std::to_string(s.seq));
    if (s.batch < 1) throw UserError("--batch: expected an integer >= 1, found " + std::to_string(s.batch));
    std::error_code ec;
    if (!fs::is_regular_file(s.data, ec)) throw UserError("--data '" + s.data + "': no such file");
    const bool txt = is_txt(s.data);
    if (txt && type != DatasetType::completion)
      throw UserError("--data '" + s.data + "': a .txt file is plain text (--type text); --type " + s.type + " needs a .jsonl file");

    Trainer t;  // only what evaluate() reads: model, adapter, val split, batching, a single-rank collective
    t.config.base_model = s.model.model;
    t.config.tokenizer_config = s.model.tokenizer;
    t.config.datasets = {DatasetConfig{.path = s.data, .type = type}};
    t.config.sequence_len = s.seq;
    t.config.micro_batch_size = s.batch;
    t.config.sample_packing = true;
    t.config.val_set_size = 0;
    t.config.train_on_inputs = s.train_on_inputs;
    t.config.chat_template = s.chat_template;
    ModelSetup m = load_model_setup(s.model, "eval");
    t.device = m.device;
    t.compute_dtype = m.model.compute_dtype;
    t.comm = make_single_rank_collective();
    t.model = std::move(m.model);
    if (m.lora) {
      t.lora = std::move(*m.lora);
    } else {
      t.lora.layers.resize(t.model.layers.size());  // no adapters: every projection is the base alone
    }
    const Tokenizer tokenizer = load_train_tokenizer(t.config, t.model.config.vocab_size);
    const auto t0 = std::chrono::steady_clock::now();
    t.data.val = txt ? text_chunks(s.data, tokenizer, s.seq) : prepare_data(t.config, tokenizer, fs::path()).train;
    t.batching.sequence_len = s.seq;
    t.batching.micro_batch_size = s.batch;
    t.batching.sample_packing = true;
    t.batching.pad_id = tokenizer.pad_id() >= 0 ? tokenizer.pad_id() : (tokenizer.eos_id() >= 0 ? tokenizer.eos_id() : 0);
    int64_t tokens = 0, targets = 0;
    for (const TokenizedExample& ex : t.data.val) {
      tokens += static_cast<int64_t>(ex.input_ids.size());
      targets += target_tokens(ex);
    }
    const auto t1 = std::chrono::steady_clock::now();
    const std::optional<double> loss = evaluate(t);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
    const double prep = std::chrono::duration<double>(t1 - t0).count();
    if (!loss) throw UserError("--data '" + s.data + "': no target tokens to evaluate (every label is masked)");
    const double ppl = std::exp(std::min(*loss, 700.0));
    const double tps = static_cast<double>(tokens) / std::max(secs, 1e-9);
    if (s.json) {
      const nlohmann::json j = {{"examples", t.data.val.size()}, {"tokens", tokens},     {"target_tokens", targets},
                                {"loss", *loss},                 {"perplexity", ppl},    {"tokens_per_s", tps},
                                {"seconds", secs},               {"prepare_seconds", prep}};
      std::cout << j.dump() << "\n";
    } else {
      std::cout << "examples:    " << t.data.val.size() << "\n"
                << "tokens:      " << tokens << " (" << targets << " targets)\n"
                << "loss:        " << fixed(*loss, 6) << "\n"
                << "perplexity:  " << fixed(ppl, 4) << "\n"
                << "tokens/s:    " << fixed(tps, 1) << " (" << fixed(secs, 2) << " s)\n";
    }
    return kExitOk;
  };
}

}  // namespace qlora::cli
