// libFuzzer target: one dataset line through its format's parser (src/data/dataset_format.cpp and
// the chat code it calls: conversation_from_json, render_chat) with the real Llama 3 tokenizer
// from the test assets (without them the target says so and exits 0).
// Input: byte 0 picks the format and options: bits 0-1 the dataset type (completion, alpaca,
// chat_template, pretokenized), bits 2-4 the chat template (llama3, chatml, mistral, alpaca,
// hermes; 5-7 wrap around), bit 5 train_on_inputs, bit 6 sequence_len 16 instead of 2048, bit 7
// no BOS/EOS. The rest is the line (a JSON record, as in a .jsonl file). An example that comes out
// must have one label per id, every id in the vocabulary, every label -100 or its id (the
// pre-tokenized format excepted: its labels are the record's), and at most
// sequence_len tokens.
#include <cstdint>

#include "fuzz_util.h"
#include "qlora/chat_template.h"
#include "qlora/config.h"
#include "qlora/dataset.h"
#include "qlora/tokenizer.h"

namespace {

namespace fs = std::filesystem;
using namespace qlora;

const DatasetType kTypes[] = {DatasetType::completion, DatasetType::alpaca, DatasetType::chat_template, DatasetType::pretokenized};
const char* const kTemplates[] = {"llama3", "chatml", "mistral", "alpaca", "hermes"};

std::unique_ptr<Tokenizer> g_tok;

void write_seeds(const fs::path& dir) {
  struct Seed { const char* name; uint8_t selector; const char* line; };
  const Seed seeds[] = {
      {"completion", 0, R"({"text": "Hello world", "other": 1})"},
      {"completion-short", 0x40, R"({"text": "In the beginning God created the heaven and the earth."})"},
      {"alpaca", 1, R"({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"})"},
      {"alpaca-noinput", 0x21, R"({"instruction": "Say hi.", "output": "Hi!"})"},
      {"alpaca-null-input", 0x81, R"({"instruction": "Say hi.", "input": null, "output": "Hi!"})"},
      {"pretokenized", 3, R"({"input_ids": [1, 2, 3], "labels": [-100, 2, 3]})"},
      {"pretokenized-nolabels", 3, R"({"input_ids": [128000, 9906, 128009]})"},
  };
  for (const Seed& s : seeds) fuzz::write_bytes(dir / s.name, std::string(1, static_cast<char>(s.selector)) + s.line);
  const std::string chat =
      R"({"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Weather in Paris?"},)"
      R"( {"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},)"
      R"( {"role": "tool", "content": "{\"temp\": 21}"}, {"role": "assistant", "content": "It is 21 degrees."}],)"
      R"( "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",)"
      R"( "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]})";
  const std::string plain_chat =
      R"({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},)"
      R"( {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye."}]})";
  const std::string string_args =
      R"({"messages": [{"role": "user", "content": "t?"}, {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",)"
      R"( "function": {"name": "f", "arguments": "{\"a\": 1}"}}]}, {"role": "ipython", "tool_call_id": "c1", "name": "f", "content": "2"}]})";
  for (int k = 0; k < 5; ++k) {
    const char sel = static_cast<char>(2 | (k << 2));
    fuzz::write_bytes(dir / ("chat-tools-" + std::string(kTemplates[k])), std::string(1, sel) + chat);
    fuzz::write_bytes(dir / ("chat-plain-" + std::string(kTemplates[k])), std::string(1, static_cast<char>(sel | 0x20)) + plain_chat);
    fuzz::write_bytes(dir / ("chat-strargs-" + std::string(kTemplates[k])), std::string(1, sel) + string_args);
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (const fs::path seeds = fuzz::seed_output_dir(); !seeds.empty()) {
    write_seeds(seeds);
    std::exit(0);
  }
  const fs::path assets = fuzz::require_assets("fuzz_dataset_line");
  g_tok = std::make_unique<Tokenizer>(load_tokenizer(assets / "tokenizers" / "llama3"));
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const uint8_t sel = data[0];
  TrainConfig config;
  config.datasets.push_back(DatasetConfig{});
  config.datasets[0].path = "fuzz.jsonl";
  config.datasets[0].type = kTypes[sel & 3];
  config.chat_template = kTemplates[((sel >> 2) & 7) % 5];
  config.train_on_inputs = sel & 0x20;
  config.sequence_len = (sel & 0x40) ? 16 : 2048;
  DataContext ctx = make_data_context(config, *g_tok);
  if (sel & 0x80) ctx.add_bos = ctx.add_eos = false;

  const std::string line(reinterpret_cast<const char*>(data + 1), size - 1);
  TokenizedExample ex;
  if (!fuzz::expect_user_error([&] { ex = tokenize_record(line, config.datasets[0], ctx, "fuzz.jsonl:1"); })) return 0;
  if (ex.labels.size() != ex.input_ids.size())
    fuzz::invariant_failed(std::to_string(ex.input_ids.size()) + " ids but " + std::to_string(ex.labels.size()) + " labels");
  if (ex.input_ids.size() > static_cast<size_t>(config.sequence_len))
    fuzz::invariant_failed(std::to_string(ex.input_ids.size()) + " ids, more than sequence_len");
  for (size_t i = 0; i < ex.input_ids.size(); ++i) {
    const int32_t id = ex.input_ids[i];
    if (id < 0 || id >= g_tok->vocab_size()) fuzz::invariant_failed("id " + std::to_string(id) + " outside the vocabulary");
    // Pre-tokenized records bring their own labels; every other format labels a token with itself.
    if (config.datasets[0].type != DatasetType::pretokenized && ex.labels[i] != id && ex.labels[i] != kIgnoreLabel)
      fuzz::invariant_failed("label " + std::to_string(ex.labels[i]) + " for id " + std::to_string(id));
  }
  return 0;
}
