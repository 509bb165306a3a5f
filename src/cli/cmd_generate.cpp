// qlora generate MODEL [--adapter DIR] (--prompt TEXT | --prompt-ids IDS | --chat) ...: text from a
// base model (HF folder, 16-bit or bnb-4bit, or a llama .gguf) plus an optional PEFT adapter applied
// unmerged, with the KV-cache decoder and sampler of generate.h. --prompt alone is a raw completion
// (the tokenizer's BOS first, as tokenizer(prompt) in transformers); --chat --prompt renders one
// user turn with the model's chat template and the generation prompt; --chat alone is an
// interactive loop over stdin lines (history kept, the cache reused across turns; EOF or /exit
// ends it). Text streams to stdout as it is generated; the token counts and speeds go to the log
// (stderr). --json prints one JSON object instead (tokens, text, stop reason, speeds).
#include <ATen/ATen.h>

#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli/commands.h"
#include "cli/model_setup.h"
#include "qlora/chat_template.h"
#include "qlora/config.h"
#include "qlora/dataset.h"
#include "qlora/error.h"
#include "qlora/generate.h"
#include "qlora/log.h"
#include "qlora/lora.h"
#include "qlora/model.h"
#include "qlora/trainer.h"

namespace qlora::cli {

namespace {

namespace fs = std::filesystem;

std::vector<int32_t> parse_ids(const std::string& text) {
  std::vector<int32_t> ids;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    size_t used = 0;
    long long v = -1;
    try {
      v = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    while (used < item.size() && item[used] == ' ') ++used;
    if (used == 0 || used != item.size() || v < 0 || v > INT32_MAX)
      throw UserError("--prompt-ids: expected comma-separated token ids (e.g. 1,15043,29991), found '" + item + "'");
    ids.push_back(static_cast<int32_t>(v));
  }
  if (ids.empty()) throw UserError("--prompt-ids: no token ids given");
  return ids;
}

}  // namespace

CommandFn add_generate_command(CLI::App& app) {
  struct State {
    ModelSetupOptions model;
    std::string prompt, prompt_ids, system, chat_template;
    bool chat = false, json = false;
    int64_t max_new_tokens = 256, max_context = 0;
    SamplingOptions sampling;
    std::vector<std::string> stop;
  };
  auto st = std::make_shared<State>();
  auto* sub = app.add_subcommand("generate", "generate text (KV-cache decoding): qlora generate MODEL [--adapter DIR] "
                                             "(--prompt TEXT | --chat [--prompt TEXT])");
  add_model_setup_options(sub, st->model);
  sub->add_option("--prompt", st->prompt, "the prompt (raw completion; with --chat: the user's message)");
  sub->add_option("--prompt-ids", st->prompt_ids, "the prompt as comma-separated token ids (raw completion)");
  sub->add_flag("--chat", st->chat, "use the model's chat template; without --prompt: interactive (stdin lines, /exit)");
  sub->add_option("--system", st->system, "system message (--chat)");
  sub->add_option("--chat-template", st->chat_template, "llama3, chatml, mistral, hermes or alpaca (default: the tokenizer's)");
  sub->add_option("--max-new-tokens", st->max_new_tokens, "tokens to generate at most")->capture_default_str();
  sub->add_option("--temperature", st->sampling.temperature, "0 = greedy")->capture_default_str();
  sub->add_option("--top-k", st->sampling.top_k, "keep the k most likely tokens (0 = off)")->capture_default_str();
  sub->add_option("--top-p", st->sampling.top_p, "nucleus sampling mass in (0, 1]")->capture_default_str();
  sub->add_option("--repetition-penalty", st->sampling.repetition_penalty, "> 0, 1 = off")->capture_default_str();
  sub->add_option("--seed", st->sampling.seed, "sampler seed (same seed, same tokens)")->capture_default_str();
  sub->add_option("--stop", st->stop, "stop before this text (repeatable)");
  sub->add_option("--max-context", st->max_context, "KV cache positions at most (default: the model's context)");
  sub->add_flag("--json", st->json, "print one JSON object (tokens, text, stop reason, speeds) instead of streaming");
  return [st] {
    const State& s = *st;
    // Argument errors first, before anything is loaded.
    if (s.max_new_tokens < 0)
      throw UserError("--max-new-tokens: expected an integer >= 0, found " + std::to_string(s.max_new_tokens));
    if (!std::isfinite(s.sampling.temperature) || s.sampling.temperature < 0)
      throw UserError("--temperature: expected a number >= 0 (0 = greedy), found " + std::to_string(s.sampling.temperature));
    if (!(s.sampling.top_p > 0.0 && s.sampling.top_p <= 1.0))
      throw UserError("--top-p: expected a number in (0, 1], found " + std::to_string(s.sampling.top_p));
    if (s.sampling.top_k < 0) throw UserError("--top-k: expected an integer >= 0, found " + std::to_string(s.sampling.top_k));
    if (!(s.sampling.repetition_penalty > 0) || !std::isfinite(s.sampling.repetition_penalty))
      throw UserError("--repetition-penalty: expected a number > 0, found " + std::to_string(s.sampling.repetition_penalty));
    if (s.max_context < 0) throw UserError("--max-context: expected an integer >= 0, found " + std::to_string(s.max_context));
    if (!s.prompt_ids.empty() && (!s.prompt.empty() || s.chat))
      throw UserError("--prompt-ids: a raw token prompt; it cannot be combined with --prompt or --chat");
    if (!s.chat && s.prompt.empty() && s.prompt_ids.empty())
      throw UserError("qlora generate: expected --prompt TEXT, --prompt-ids IDS or --chat");
    const bool interactive = s.chat && s.prompt.empty();
    if (interactive && s.json) throw UserError("--json: needs a single prompt (--prompt or --prompt-ids), not the interactive chat");
    const std::vector<int32_t> given_ids = s.prompt_ids.empty() ? std::vector<int32_t>{} : parse_ids(s.prompt_ids);

    ModelSetup m = load_model_setup(s.model, "generate");
    const fs::path tok_path = s.model.tokenizer.empty() ? fs::path(s.model.model) : fs::path(s.model.tokenizer);
    std::optional<Tokenizer> tokenizer;
    std::error_code ec;
    // A token-id prompt needs no tokenizer; text (streamed or in the JSON) comes when there is one.
    const bool has_tokenizer = !s.model.tokenizer.empty() || fs::is_regular_file(tok_path, ec) ||
                               fs::exists(tok_path / "tokenizer.json", ec);
    if (given_ids.empty() || has_tokenizer) tokenizer = load_tokenizer(tok_path);
    const Tokenizer* tok = tokenizer ? &*tokenizer : nullptr;

    // The chat template family: required for --chat, else used for its end-of-turn stop tokens.
    std::optional<ChatTemplateKind> kind;
    ChatRenderOptions render;
    if (tok != nullptr) {
      TrainConfig tc;
      tc.chat_template = s.chat_template;
      ChatTemplateKind detected;
      if (s.chat && s.chat_template.empty()) {
        if (tok->chat_template().empty())
          throw UserError("--chat: the tokenizer of '" + tok_path.string() + "' has no chat template; pass --chat-template "
                          "llama3|chatml|mistral|hermes|alpaca");
        if (!detect_chat_template(tok->chat_template(), detected))
          throw UserError("--chat: the tokenizer's chat template is not one qlora recognises; pass --chat-template "
                          "llama3|chatml|mistral|hermes|alpaca");
      }
      const DataContext dc = make_data_context(tc, *tok);
      render = dc.chat_options;
      if (!s.chat_template.empty() || detect_chat_template(tok->chat_template(), detected)) kind = dc.chat_template;
    }
    GenerateOptions go;
    go.max_new_tokens = s.max_new_tokens;
    go.stop_ids = stop_token_ids(tok, m.model.config, kind);
    go.stop_strings = s.stop;
    if (!s.stop.empty() && tok == nullptr) throw UserError("--stop: needs a tokenizer (none found at " + tok_path.string() + ")");

    Sampler sampler = make_sampler(s.sampling);
    const int64_t max_len = s.max_context > 0 ? s.max_context : m.model.config.max_position_embeddings;
    DequantScratch scratch;
    const LoraModel* lora = m.lora ? &*m.lora : nullptr;
    auto stream_out = [&](const std::string& piece) {
      std::cout << piece << std::flush;
    };
    auto report = [&](const GenerateResult& r) {
      const int64_t decoded = std::max<int64_t>(0, static_cast<int64_t>(r.tokens.size()) - 1);
      log_info(cat("prompt ", r.prompt_tokens, " tokens (", r.prefill_tokens, " prefilled, ",
                   fixed(static_cast<double>(r.prefill_tokens) / std::max(r.prefill_seconds, 1e-9), 1), " tok/s), generated ",
                   r.tokens.size(), " tokens (decode ", fixed(static_cast<double>(decoded) / std::max(r.decode_seconds, 1e-9), 1),
                   " tok/s), stop: ", stop_reason_name(r.stop)));
    };
    auto render_ids = [&](const Conversation& conv) {
      ChatRenderOptions ro = render;
      ro.add_generation_prompt = true;
      EncodeOptions eo;
      eo.add_special_tokens = false;  // the template writes BOS itself (apply_chat_template does the same)
      return tok->encode(render_chat_text(*kind, conv, ro), eo);
    };

    Conversation conv;
    if (!s.system.empty()) {
      if (!s.chat) throw UserError("--system: only with --chat");
      conv.messages.push_back({"system", s.system, {}, {}, {}});
    }
    if (!interactive) {
      std::vector<int32_t> ids = given_ids;
      if (ids.empty() && s.chat) {
        conv.messages.push_back({"user", s.prompt, {}, {}, {}});
        ids = render_ids(conv);
      } else if (ids.empty()) {
        EncodeOptions eo;
        eo.add_special_tokens = true;
        ids = tok->encode(s.prompt, eo);
      }
      KVCache cache = make_kv_cache(m.model, 1, std::min<int64_t>(max_len, static_cast<int64_t>(ids.size()) + s.max_new_tokens), max_len);
      const GenerateResult r = generate(m.model, lora, tok, cache, scratch, ids, go, sampler, s.json ? nullptr : TextCallback(stream_out));
      if (s.json) {
        const int64_t decoded = std::max<int64_t>(0, static_cast<int64_t>(r.tokens.size()) - 1);
        nlohmann::json j = {{"prompt", ids},
                            {"prompt_tokens", r.prompt_tokens},
                            {"generated_tokens", r.tokens.size()},
                            {"tokens", r.tokens},
                            {"text", r.text},
                            {"stop", stop_reason_name(r.stop)},
                            {"prefill_tokens_per_s", static_cast<double>(r.prefill_tokens) / std::max(r.prefill_seconds, 1e-9)},
                            {"decode_tokens_per_s", static_cast<double>(decoded) / std::max(r.decode_seconds, 1e-9)}};
        std::cout << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
      } else {
        std::cout << "\n" << std::flush;
      }
      report(r);
      return kExitOk;
    }

    // Interactive chat: one user line per turn; the cache keeps the common prefix of the turns.
    KVCache cache = make_kv_cache(m.model, 1, std::min<int64_t>(max_len, 1024), max_len);
    const bool tty = ::isatty(STDIN_FILENO) != 0;
    std::string line;
    for (;;) {
      if (tty) std::cout << "> " << std::flush;
      if (!std::getline(std::cin, line) || line == "/exit") break;
      if (line.empty()) continue;
      conv.messages.push_back({"user", line, {}, {}, {}});
      const GenerateResult r = generate(m.model, lora, tok, cache, scratch, render_ids(conv), go, sampler, stream_out);
      std::cout << "\n" << std::flush;
      report(r);
      conv.messages.push_back({"assistant", r.text, {}, {}, {}});
    }
    return kExitOk;
  };
}

}  // namespace qlora::cli
