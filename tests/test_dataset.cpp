// Training data: every dataset format (completion / .txt, alpaca, chat with tools, pretokenized)
// with the real Llama 3 tokenizer, loss masks, malformed records (file:line, or skipped and
// counted), deterministic shuffle and split, thread-count independence, packing invariants, the
// prepared-data cache (hit, miss, corruption) and `qlora preprocess --show`.
// torch headers before Catch: c10 defines a CHECK macro that Catch must override.
#include "qlora/dataset.h"
#include "qlora/error.h"
#include "qlora/tokenizer.h"

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <nlohmann/json.hpp>

#include <fstream>
#include <map>
#include <random>
#include <set>

#include "test_util.h"

using Catch::Matchers::ContainsSubstring;
using namespace qlora;
using qlora::test::TempDir;
using qlora::test::write_file;
namespace fs = std::filesystem;

namespace {

const fs::path kAssets = fs::path(QLORA_SOURCE_DIR) / ".." / "shared" / "assets";
const fs::path kLlama3 = kAssets / "tokenizers" / "llama3";

#define REQUIRE_LLAMA3()                                                                            \
  do {                                                                                              \
    if (!fs::exists(kLlama3 / "tokenizer.json"))                                                    \
      SKIP("no shared tokenizer assets at " + kAssets.string() + " (a fresh clone has none)");      \
  } while (0)

const Tokenizer& llama3() {
  static const Tokenizer tok = load_tokenizer(kLlama3);
  return tok;
}

TrainConfig config_for(const std::vector<DatasetConfig>& datasets) {
  TrainConfig c;
  c.base_model = "unused";
  c.datasets = datasets;
  c.sequence_len = 256;
  c.chat_template = "llama3";
  return c;
}

DatasetConfig dataset(const fs::path& path, DatasetType type) {
  DatasetConfig d;
  d.path = path.string();
  d.type = type;
  return d;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const UserError& e) {
    return e.what();
  }
  return "no error";
}

// The decoded text of the trained tokens (labels != -100), in order.
std::string trained_text(const TokenizedExample& ex, const Tokenizer& tok) {
  std::vector<int32_t> ids;
  for (size_t i = 0; i < ex.labels.size(); ++i)
    if (ex.labels[i] != kIgnoreLabel) ids.push_back(ex.input_ids[i]);
  return tok.decode(ids);
}

bool same(const std::vector<TokenizedExample>& a, const std::vector<TokenizedExample>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i].input_ids != b[i].input_ids || a[i].labels != b[i].labels) return false;
  return true;
}

std::string completion_lines(int n, const std::string& prefix = "document") {
  std::string s;
  for (int i = 0; i < n; ++i) s += nlohmann::json({{"text", prefix + " number " + std::to_string(i) + " says hello"}}).dump() + "\n";
  return s;
}

}  // namespace

TEST_CASE("data: completion text is BOS + text + EOS, all trained; .txt files hold one example per line", "[data]") {
  REQUIRE_LLAMA3();
  const Tokenizer& tok = llama3();
  DataContext ctx;
  ctx.tokenizer = &tok;
  const TokenizedExample ex = tokenize_record(R"({"text": "Hello world", "other": 1})",
                                              DatasetConfig{}, ctx, "d.jsonl:1");
  std::vector<int32_t> expect = {tok.bos_id()};
  for (int32_t id : tok.encode("Hello world")) expect.push_back(id);
  expect.push_back(tok.eos_id());
  CHECK(ex.input_ids == expect);
  CHECK(ex.labels == ex.input_ids);

  DatasetConfig body;
  body.field = "body";
  CHECK(tokenize_record(R"({"body": "Hello world"})", body, ctx, "d.jsonl:1").input_ids == expect);

  TempDir dir;
  write_file(dir / "a.txt", "first line\n\n  \nsecond line\r\nthird");
  TrainConfig c = config_for({dataset(dir / "a.txt", DatasetType::completion)});
  c.shuffle_merged_datasets = false;
  const PreparedData data = prepare_data(c, tok, {});
  REQUIRE(data.train.size() == 3);
  CHECK(tok.decode(data.train[0].input_ids, true) == "first line");
  CHECK(tok.decode(data.train[1].input_ids, true) == "second line");
  CHECK(tok.decode(data.train[2].input_ids, true) == "third");
  CHECK(data.stats.records == 3);
  CHECK(data.stats.trainable_tokens == data.stats.tokens);
  CHECK_FALSE(data.from_cache);
  CHECK(data.cache_path.empty());
}

TEST_CASE("data: alpaca trains on the output and EOS only, unless train_on_inputs", "[data]") {
  REQUIRE_LLAMA3();
  const Tokenizer& tok = llama3();
  TrainConfig c = config_for({dataset("a.jsonl", DatasetType::alpaca)});
  DataContext ctx = make_data_context(c, tok);
  const std::string with_input = R"({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"})";
  const TokenizedExample ex = tokenize_record(with_input, c.datasets[0], ctx, "a.jsonl:1");
  CHECK(ex.input_ids.front() == tok.bos_id());
  CHECK(ex.input_ids.back() == tok.eos_id());
  CHECK(ex.labels.back() == tok.eos_id());
  CHECK(trained_text(ex, tok) == "5<|end_of_text|>");
  const std::string all = tok.decode(ex.input_ids);
  CHECK_THAT(all, ContainsSubstring("### Instruction:\nAdd the numbers."));
  CHECK_THAT(all, ContainsSubstring("### Input:\n2 and 3"));
  CHECK_THAT(all, ContainsSubstring("### Response:\n"));

  const TokenizedExample no_input =
      tokenize_record(R"({"instruction": "Say hi.", "input": "", "output": "Hi!"})", c.datasets[0], ctx, "a.jsonl:2");
  CHECK_THAT(tok.decode(no_input.input_ids), !ContainsSubstring("### Input:"));
  CHECK(trained_text(no_input, tok) == "Hi!<|end_of_text|>");
  CHECK(tokenize_record(R"({"instruction": "Say hi.", "output": "Hi!"})", c.datasets[0], ctx, "a.jsonl:3").input_ids ==
        no_input.input_ids);

  ctx.train_on_inputs = true;
  const TokenizedExample all_trained = tokenize_record(with_input, c.datasets[0], ctx, "a.jsonl:1");
  CHECK(all_trained.input_ids == ex.input_ids);
  CHECK(all_trained.labels == all_trained.input_ids);

  CHECK_THAT(error_of([&] { tokenize_record(R"({"instruction": "x"})", c.datasets[0], ctx, "a.jsonl:4"); }),
             ContainsSubstring("a.jsonl:4: missing field 'output'"));
  CHECK_THAT(error_of([&] { tokenize_record(R"({"instruction": "x", "input": 3, "output": "y"})", c.datasets[0], ctx, "a.jsonl:5"); }),
             ContainsSubstring("a.jsonl:5: field 'input': expected a string, found an integer"));
}

TEST_CASE("data: chat messages with tools are masked per segment", "[data]") {
  REQUIRE_LLAMA3();
  const Tokenizer& tok = llama3();
  TrainConfig c = config_for({dataset("c.jsonl", DatasetType::chat_template)});
  const DataContext ctx = make_data_context(c, tok);
  CHECK(ctx.chat_template == ChatTemplateKind::llama3);
  const std::string record = R"({"messages": [
      {"role": "system", "content": "You are terse."},
      {"role": "user", "content": "Weather in Paris?"},
      {"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
      {"role": "tool", "content": "{\"temp\": 21}"},
      {"role": "assistant", "content": "It is 21 degrees."}],
    "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]})";
  // One line, keys in the user's order (the template prints tools in that order).
  const std::string line = nlohmann::ordered_json::parse(record).dump();
  const TokenizedExample ex = tokenize_record(line, c.datasets[0], ctx, "c.jsonl:1");
  REQUIRE(ex.labels.size() == ex.input_ids.size());
  CHECK(ex.input_ids.front() == tok.bos_id());
  CHECK(ex.labels.front() == kIgnoreLabel);
  const std::string text = tok.decode(ex.input_ids);
  CHECK_THAT(text, ContainsSubstring("get_weather"));        // the tools list is in the prompt
  CHECK_THAT(text, ContainsSubstring("Weather of a city"));
  const std::string trained = trained_text(ex, tok);
  CHECK_THAT(trained, ContainsSubstring("\"name\": \"get_weather\""));   // the tool call is trained
  CHECK_THAT(trained, ContainsSubstring("It is 21 degrees.<|eot_id|>"));
  CHECK_THAT(trained, !ContainsSubstring("Weather in Paris?"));
  CHECK_THAT(trained, !ContainsSubstring("You are terse."));
  CHECK_THAT(trained, !ContainsSubstring("temp"));                        // the tool's answer is not
  // The segments concatenated are the rendered text: tokenizing segment by segment keeps it.
  CHECK(text == render_chat_text(ChatTemplateKind::llama3,
                                 conversation_from_json(nlohmann::ordered_json::parse(record)["messages"],
                                                        nlohmann::ordered_json::parse(record)["tools"], "x"),
                                 ctx.chat_options));

  DataContext on_inputs = ctx;
  on_inputs.train_on_inputs = true;
  const TokenizedExample all = tokenize_record(line, c.datasets[0], on_inputs, "c.jsonl:1");
  CHECK(all.input_ids == ex.input_ids);
  CHECK(all.labels == all.input_ids);

  DatasetConfig renamed = c.datasets[0];
  renamed.field_messages = "conversation";
  renamed.field_tools = "functions";
  std::string renamed_line = line;
  renamed_line.replace(renamed_line.find("\"messages\""), 10, "\"conversation\"");
  renamed_line.replace(renamed_line.find("\"tools\""), 7, "\"functions\"");
  CHECK(tokenize_record(renamed_line, renamed, ctx, "c.jsonl:1").input_ids == ex.input_ids);

  CHECK_THAT(error_of([&] { tokenize_record(R"({"msgs": []})", c.datasets[0], ctx, "c.jsonl:7"); }),
             ContainsSubstring("c.jsonl:7: missing field 'messages'"));
  CHECK_THAT(error_of([&] { tokenize_record(R"({"messages": "hi"})", c.datasets[0], ctx, "c.jsonl:8"); }),
             ContainsSubstring("c.jsonl:8: field 'messages': expected a list"));
  CHECK_THAT(error_of([&] { tokenize_record(R"({"messages": [{"role": "user", "content": "x"}], "tools": 5})", c.datasets[0], ctx, "c.jsonl:9"); }),
             ContainsSubstring("c.jsonl:9: field 'tools': expected a list of tools"));
  CHECK_THAT(error_of([&] { tokenize_record(R"({"messages": [{"content": "x"}]})", c.datasets[0], ctx, "c.jsonl:10"); }),
             ContainsSubstring("c.jsonl:10"));

  // No template configured: the tokenizer's own is detected.
  TrainConfig detect = c;
  detect.chat_template.clear();
  CHECK(make_data_context(detect, tok).chat_template == ChatTemplateKind::llama3);
}

TEST_CASE("data: pretokenized input_ids and labels are validated", "[data]") {
  REQUIRE_LLAMA3();
  const Tokenizer& tok = llama3();
  TrainConfig c = config_for({dataset("p.jsonl", DatasetType::pretokenized)});
  const DataContext ctx = make_data_context(c, tok);
  const DatasetConfig& d = c.datasets[0];
  const TokenizedExample ex = tokenize_record(R"({"input_ids": [1, 2, 3], "labels": [-100, 2, 3]})", d, ctx, "p.jsonl:1");
  CHECK(ex.input_ids == std::vector<int32_t>{1, 2, 3});
  CHECK(ex.labels == std::vector<int32_t>{-100, 2, 3});
  CHECK(tokenize_record(R"({"input_ids": [5, 6]})", d, ctx, "p.jsonl:2").labels == std::vector<int32_t>{5, 6});
  const std::string vocab = std::to_string(tok.vocab_size());
  CHECK_THAT(error_of([&] { tokenize_record("{\"input_ids\": [1, " + vocab + "]}", d, ctx, "p.jsonl:3"); }),
             ContainsSubstring("p.jsonl:3: field 'input_ids'[1]: token id " + vocab + " is outside the tokenizer's vocabulary [0, " + vocab + ")"));
  CHECK_THAT(error_of([&] { tokenize_record(R"({"input_ids": [1, -100]})", d, ctx, "p.jsonl:4"); }),
             ContainsSubstring("p.jsonl:4: field 'input_ids'[1]: token id -100 is outside"));
  CHECK_THAT(error_of([&] { tokenize_record(R"({"input_ids": [1, "x"]})", d, ctx, "p.jsonl:5"); }),
             ContainsSubstring("p.jsonl:5: field 'input_ids'[1]: expected an integer token id, found \"x\""));
  CHECK_THAT(error_of([&] { tokenize_record(R"({"input_ids": [1, 2.5]})", d, ctx, "p.jsonl:6"); }),
             ContainsSubstring("expected an integer token id, found 2.5"));
  CHECK_THAT(error_of([&] { tokenize_record(R"({"input_ids": [1, 2], "labels": [1]})", d, ctx, "p.jsonl:7"); }),
             ContainsSubstring("p.jsonl:7: field 'labels': expected 2 labels (one per input id), found 1"));
  CHECK_THAT(error_of([&] { tokenize_record(R"({"input_ids": []})", d, ctx, "p.jsonl:8"); }),
             ContainsSubstring("p.jsonl:8: field 'input_ids': expected at least one token id"));
  CHECK_THAT(error_of([&] { tokenize_record(R"({"input_ids": 7})", d, ctx, "p.jsonl:9"); }),
             ContainsSubstring("p.jsonl:9: field 'input_ids': expected a list of token ids, found an integer"));
  // Longer than sequence_len: cut (and counted by prepare_data).
  DataContext short_ctx = ctx;
  short_ctx.sequence_len = 2;
  bool truncated = false;
  const TokenizedExample cut = tokenize_json(nlohmann::ordered_json::parse(R"({"input_ids": [1, 2, 3]})"), d, short_ctx, "x", &truncated);
  CHECK(truncated);
  CHECK(cut.input_ids == std::vector<int32_t>{1, 2});
  CHECK(cut.labels == std::vector<int32_t>{1, 2});
}

TEST_CASE("data: malformed JSONL is an error naming file:line, or skipped and counted", "[data]") {
  REQUIRE_LLAMA3();
  const Tokenizer& tok = llama3();
  TempDir dir;
  const fs::path p = dir / "bad.jsonl";
  write_file(p, R"({"text": "good one"})" "\n" R"({"text": "good two"})" "\n" R"({"text": "broken)" "\n\n[1, 2]\n" R"({"txt": "x"})" "\n" R"({"text": 5})" "\n" R"({"text": "good three"})" "\n");
  TrainConfig c = config_for({dataset(p, DatasetType::completion)});
  const std::string msg = error_of([&] { prepare_data(c, tok, {}); });
  CHECK_THAT(msg, ContainsSubstring(p.string() + ":3: invalid JSON"));
  CHECK_THAT(msg, ContainsSubstring("skip_bad_lines"));
  for (int threads : {1, 3}) {  // the first bad line is reported, whatever the threads
    c.dataset_num_proc = threads;
    CHECK_THAT(error_of([&] { prepare_data(c, tok, {}); }), ContainsSubstring(p.string() + ":3: invalid JSON"));
  }
  write_file(dir / "obj.jsonl", "{\"text\": \"a\"}\n[1, 2]\n");
  CHECK_THAT(error_of([&] { prepare_data(config_for({dataset(dir / "obj.jsonl", DatasetType::completion)}), tok, {}); }),
             ContainsSubstring(":2: expected a JSON object per line, found a list"));
  write_file(dir / "miss.jsonl", "{\"text\": \"a\"}\n{\"txt\": \"a\"}\n");
  CHECK_THAT(error_of([&] { prepare_data(config_for({dataset(dir / "miss.jsonl", DatasetType::completion)}), tok, {}); }),
             ContainsSubstring("miss.jsonl:2: missing field 'text' (expected a string)"));
  write_file(dir / "type.jsonl", "{\"text\": [\"a\"]}\n");
  CHECK_THAT(error_of([&] { prepare_data(config_for({dataset(dir / "type.jsonl", DatasetType::completion)}), tok, {}); }),
             ContainsSubstring("type.jsonl:1: field 'text': expected a string, found a list"));

  c.skip_bad_lines = true;
  c.shuffle_merged_datasets = false;
  const PreparedData data = prepare_data(c, tok, {});
  CHECK(data.stats.skipped_lines == 4);   // lines 3, 5, 6, 7 (line 4 is blank: not a record)
  CHECK(data.stats.records == 3);
  REQUIRE(data.train.size() == 3);
  CHECK(tok.decode(data.train[2].input_ids, true) == "good three");
}

TEST_CASE("data: empty and missing datasets, nothing to train on", "[data]") {
  REQUIRE_LLAMA3();
  const Tokenizer& tok = llama3();
  TempDir dir;
  write_file(dir / "empty.jsonl", "\n  \n");
  CHECK_THAT(error_of([&] { prepare_data(config_for({dataset(dir / "empty.jsonl", DatasetType::completion)}), tok, {}); }),
             ContainsSubstring("datasets[0].path '" + (dir / "empty.jsonl").string() + "': no records (the file is empty or blank)"));
  CHECK_THAT(error_of([&] { prepare_data(config_for({dataset(dir / "nope.jsonl", DatasetType::completion)}), tok, {}); }),
             ContainsSubstring("nope.jsonl': no such file"));
  // Every label masked: nothing would be trained.
  write_file(dir / "masked.jsonl", "{\"input_ids\": [1, 2, 3], \"labels\": [-100, -100, -100]}\n{\"input_ids\": [4, 5], \"labels\": [4, -100]}\n");
  CHECK_THAT(error_of([&] { prepare_data(config_for({dataset(dir / "masked.jsonl", DatasetType::pretokenized)}), tok, {}); }),
             ContainsSubstring("every label of all 2 examples is masked"));
  // Some masked-out examples are left out and counted.
  write_file(dir / "some.jsonl", "{\"input_ids\": [1, 2, 3], \"labels\": [-100, -100, -100]}\n{\"input_ids\": [4, 5]}\n");
  const PreparedData some = prepare_data(config_for({dataset(dir / "some.jsonl", DatasetType::pretokenized)}), tok, {});
  CHECK(some.stats.dropped == 1);
  CHECK(some.stats.records == 1);
  // Everything skipped.
  write_file(dir / "allbad.jsonl", "nope\n");
  TrainConfig skip = config_for({dataset(dir / "allbad.jsonl", DatasetType::completion)});
  skip.skip_bad_lines = true;
  CHECK_THAT(error_of([&] { prepare_data(skip, tok, {}); }), ContainsSubstring("no usable examples (1 malformed records skipped)"));
  // No chat template anywhere.
  TrainConfig chat = config_for({dataset(dir / "c.jsonl", DatasetType::chat_template)});
  chat.chat_template = "nonsense";
  CHECK_THAT(error_of([&] { make_data_context(chat, tok); }), ContainsSubstring("chat_template"));
}

TEST_CASE("data: mixing, shuffle and validation split are deterministic; truncation is counted", "[data]") {
  REQUIRE_LLAMA3();
  const Tokenizer& tok = llama3();
  TempDir dir;
  write_file(dir / "a.jsonl", completion_lines(60, "alpha"));
  write_file(dir / "b.jsonl", completion_lines(40, "beta"));
  TrainConfig c = config_for({dataset(dir / "a.jsonl", DatasetType::completion), dataset(dir / "b.jsonl", DatasetType::completion)});
  c.val_set_size = 0.1;
  const PreparedData a = prepare_data(c, tok, {});
  CHECK(a.train.size() == 90);
  CHECK(a.val.size() == 10);
  CHECK(a.stats.records == 100);
  const PreparedData again = prepare_data(c, tok, {});
  CHECK(same(a.train, again.train));
  CHECK(same(a.val, again.val));
  // Both datasets are mixed into the first half of the order.
  int beta_first_half = 0;
  for (size_t i = 0; i < 45; ++i) beta_first_half += tok.decode(a.train[i].input_ids).find("beta") != std::string::npos;
  CHECK(beta_first_half > 5);
  c.seed = 7;
  const PreparedData other = prepare_data(c, tok, {});
  CHECK_FALSE(same(a.train, other.train));
  // val_set_size >= 1 is a count; unshuffled keeps file order and takes the last ones.
  c.val_set_size = 3;
  c.shuffle_merged_datasets = false;
  const PreparedData plain = prepare_data(c, tok, {});
  CHECK(plain.val.size() == 3);
  CHECK(tok.decode(plain.train[0].input_ids, true) == "alpha number 0 says hello");
  CHECK(tok.decode(plain.val[2].input_ids, true) == "beta number 39 says hello");
  c.val_set_size = 100;
  CHECK_THAT(error_of([&] { prepare_data(c, tok, {}); }), ContainsSubstring("val_set_size: 100 takes 100 of the 100 examples"));
  // Truncation.
  c.val_set_size = 0;
  c.sequence_len = 4;
  const PreparedData cut = prepare_data(c, tok, {});
  CHECK(cut.stats.truncated == 100);
  for (const auto& ex : cut.train) CHECK(ex.input_ids.size() == 4);
}

TEST_CASE("data: the result does not depend on the number of threads", "[data]") {
  REQUIRE_LLAMA3();
  const Tokenizer& tok = llama3();
  TempDir dir;
  std::string chat;
  for (int i = 0; i < 150; ++i)
    chat += nlohmann::json({{"messages", {{{"role", "user"}, {"content", "question " + std::to_string(i)}},
                                          {{"role", "assistant"}, {"content", "answer " + std::to_string(i * 7)}}}}})
                .dump() + "\n";
  write_file(dir / "chat.jsonl", chat);
  write_file(dir / "text.jsonl", completion_lines(500));
  TrainConfig c = config_for({dataset(dir / "text.jsonl", DatasetType::completion), dataset(dir / "chat.jsonl", DatasetType::chat_template)});
  c.val_set_size = 0.05;
  c.dataset_num_proc = 1;
  const PreparedData one = prepare_data(c, tok, {});
  CHECK(one.stats.threads == 1);
  c.dataset_num_proc = 4;
  const PreparedData four = prepare_data(c, tok, {});
  CHECK(four.stats.threads == 4);
  CHECK(same(one.train, four.train));
  CHECK(same(one.val, four.val));
  CHECK(one.stats.tokens == four.stats.tokens);
  CHECK(one.stats.trainable_tokens == four.stats.trainable_tokens);
  CHECK(one.stats.trainable_tokens < one.stats.tokens);
}

namespace {

std::vector<TokenizedExample> synthetic_examples(const std::vector<int>& lengths) {
  std::vector<TokenizedExample> v;
  int32_t next = 1;
  for (size_t d = 0; d < lengths.size(); ++d) {
    TokenizedExample ex;
    for (int t = 0; t < lengths[d]; ++t) {
      ex.input_ids.push_back(next);
      ex.labels.push_back(t % 3 == 1 ? kIgnoreLabel : next);   // some masked labels
      ++next;
    }
    v.push_back(ex);
  }
  return v;
}

}  // namespace

TEST_CASE("data: packing keeps documents whole and apart", "[data]") {
  std::mt19937 rng(3);
  std::vector<int> lengths;
  for (int i = 0; i < 300; ++i) lengths.push_back(1 + static_cast<int>(rng() % 64));
  const auto examples = synthetic_examples(lengths);
  BatchingOptions o;
  o.sequence_len = 64;
  o.micro_batch_size = 3;
  o.pad_id = 0;
  const auto plan = plan_micro_batches(examples, o);
  CHECK(plan == plan_micro_batches(examples, o));        // deterministic
  BatchingOptions o2 = o;
  o2.seed = 43;
  CHECK(plan != plan_micro_batches(examples, o2));
  std::multiset<int64_t> seen;
  int64_t targets = 0;
  for (const auto& indices : plan) {
    for (int64_t i : indices) seen.insert(i);
    const Batch b = make_batch(examples, indices, o);
    REQUIRE(b.input_ids.size(0) == 1);
    const int64_t L = b.input_ids.size(1);
    CHECK(L <= o.sequence_len * o.micro_batch_size);
    CHECK(b.n_padding == 0);
    CHECK(b.n_tokens == L);
    const auto ids = b.input_ids.accessor<int64_t, 2>();
    const auto pos = b.position_ids.accessor<int64_t, 2>();
    const auto tgt = b.target_ids.accessor<int64_t, 2>();
    int64_t off = 0, n_targets = 0;
    for (int64_t i : indices) {  // each document whole, in order, positions from 0
      const auto& ex = examples[static_cast<size_t>(i)];
      const int64_t n = static_cast<int64_t>(ex.input_ids.size());
      for (int64_t t = 0; t < n; ++t) {
        CHECK(ids[0][off + t] == ex.input_ids[static_cast<size_t>(t)]);
        CHECK(pos[0][off + t] == t);
        const int64_t expect = t + 1 < n ? ex.labels[static_cast<size_t>(t + 1)] : kIgnoreLabel;
        CHECK(tgt[0][off + t] == expect);   // the last token of a document predicts nothing
        n_targets += expect != kIgnoreLabel;
      }
      off += n;
    }
    CHECK(off == L);
    CHECK(b.n_target_tokens == n_targets);
    CHECK(b.n_target_tokens == (b.target_ids != kIgnoreLabel).sum().item<int64_t>());
    targets += b.n_target_tokens;
  }
  CHECK(seen.size() == examples.size());                    // every example exactly once
  CHECK(std::set<int64_t>(seen.begin(), seen.end()).size() == examples.size());
  int64_t expect_targets = 0;
  for (const auto& ex : examples)
    for (size_t t = 1; t < ex.labels.size(); ++t) expect_targets += ex.labels[t] != kIgnoreLabel;
  CHECK(targets == expect_targets);
  // Bins are nearly full (first-fit-decreasing): rows hold >= 90 % of their capacity on average.
  int64_t total = 0;
  for (int l : lengths) total += l;
  CHECK(static_cast<double>(total) >= 0.9 * static_cast<double>(plan.size() * o.sequence_len * o.micro_batch_size));
  // Too many tokens for one row is refused.
  std::vector<int64_t> all(examples.size());
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<int64_t>(i);
  CHECK_THROWS(make_batch(examples, all, o));
}

TEST_CASE("data: unpacked batches are rows padded to the longest", "[data]") {
  const auto examples = synthetic_examples({5, 2, 7, 3, 1});
  BatchingOptions o;
  o.sequence_len = 16;
  o.micro_batch_size = 2;
  o.sample_packing = false;
  o.pad_id = 99;
  const auto plan = plan_micro_batches(examples, o);
  REQUIRE(plan.size() == 3);
  CHECK(plan[0].size() == 2);
  CHECK(plan[2].size() == 1);
  const Batch b = make_batch(examples, {0, 1}, o);
  REQUIRE(b.input_ids.sizes() == at::IntArrayRef({2, 5}));
  CHECK(b.n_tokens == 7);
  CHECK(b.n_padding == 3);
  const auto ids = b.input_ids.accessor<int64_t, 2>();
  const auto tgt = b.target_ids.accessor<int64_t, 2>();
  for (int t = 2; t < 5; ++t) {
    CHECK(ids[1][t] == 99);
    CHECK(tgt[1][t] == kIgnoreLabel);
  }
  CHECK(tgt[1][1] == kIgnoreLabel);                       // last real token predicts nothing
  CHECK(tgt[1][0] == (examples[1].labels[1]));
  CHECK(b.n_target_tokens == (b.target_ids != kIgnoreLabel).sum().item<int64_t>());
  CHECK(b.position_ids[0].equal(at::arange(5, at::kLong)));
}

TEST_CASE("data: the prepared-data cache hits, misses on change, and never trusts a corrupt file", "[data]") {
  REQUIRE_LLAMA3();
  const Tokenizer& tok = llama3();
  TempDir dir;
  write_file(dir / "a.jsonl", completion_lines(50));
  TrainConfig c = config_for({dataset(dir / "a.jsonl", DatasetType::completion)});
  c.val_set_size = 5;
  const fs::path cache = dir / "prepared";
  const PreparedData first = prepare_data(c, tok, cache);
  CHECK_FALSE(first.from_cache);
  REQUIRE(fs::exists(first.cache_path));
  CHECK(first.cache_path == data_cache_file(cache, first.cache_key));
  const PreparedData hit = prepare_data(c, tok, cache);
  CHECK(hit.from_cache);
  CHECK(hit.cache_key == first.cache_key);
  CHECK(same(hit.train, first.train));
  CHECK(same(hit.val, first.val));
  CHECK(hit.stats.tokens == first.stats.tokens);
  CHECK(hit.stats.records == first.stats.records);

  SECTION("a changed option or file is another key") {
    TrainConfig longer = c;
    longer.sequence_len = 512;
    CHECK(prepare_data(longer, tok, cache).cache_key != first.cache_key);
    TrainConfig seeded = c;
    seeded.seed = 1;
    CHECK_FALSE(prepare_data(seeded, tok, cache).from_cache);
    TrainConfig masked = c;
    masked.train_on_inputs = true;
    CHECK(prepare_data(masked, tok, cache).cache_key != first.cache_key);
    write_file(dir / "a.jsonl", completion_lines(50) + "{\"text\": \"one more\"}\n");
    const PreparedData changed = prepare_data(c, tok, cache);
    CHECK_FALSE(changed.from_cache);
    CHECK(changed.cache_key != first.cache_key);
    CHECK(changed.stats.records == 51);
  }
  SECTION("a corrupt or truncated file is rebuilt") {
    const std::string good = test::read_file(first.cache_path);
    for (int variant = 0; variant < 4; ++variant) {
      std::string bad = good;
      if (variant == 0) bad[bad.size() / 2] ^= 0x20;             // one flipped bit
      if (variant == 1) bad.resize(bad.size() - 9);             // truncated
      if (variant == 2) bad = "garbage";
      if (variant == 3) bad.resize(20);
      write_file(first.cache_path, bad);
      PreparedData probe;
      std::string why;
      CHECK_FALSE(read_data_cache(first.cache_path, first.cache_key, probe, why));
      CHECK_FALSE(why.empty());
      const PreparedData rebuilt = prepare_data(c, tok, cache);
      CHECK_FALSE(rebuilt.from_cache);
      CHECK(same(rebuilt.train, first.train));
      CHECK(read_data_cache(first.cache_path, first.cache_key, probe, why));   // rewritten whole
    }
    PreparedData probe;
    std::string why;
    CHECK_FALSE(read_data_cache(first.cache_path, "0000000000000000", probe, why));
    CHECK_THAT(why, ContainsSubstring("other data or options"));
  }
}

TEST_CASE("data: fnv1a64 matches the reference values and chains", "[data]") {
  CHECK(fnv1a64("", 0) == 0xcbf29ce484222325ull);
  CHECK(fnv1a64("a", 1) == 0xaf63dc4c8601ec8cull);
  CHECK(fnv1a64("foobar", 6) == 0x85944171f73967e8ull);
  CHECK(fnv1a64("bar", 3, fnv1a64("foo", 3)) == fnv1a64("foobar", 6));
}

TEST_CASE("data: format_example marks the masked spans", "[data]") {
  REQUIRE_LLAMA3();
  const Tokenizer& tok = llama3();
  TokenizedExample ex;
  ex.input_ids = tok.encode("Question? Answer.");
  REQUIRE(ex.input_ids.size() >= 3);
  ex.labels = ex.input_ids;
  ex.labels[0] = ex.labels[1] = kIgnoreLabel;
  const std::string s = format_example(ex, tok);
  CHECK(s.rfind("\u27E6", 0) == 0);
  CHECK_THAT(s, ContainsSubstring("\u27E7"));
  std::string plain = s;
  for (const std::string mark : {"\u27E6", "\u27E7"})
    for (size_t p; (p = plain.find(mark)) != std::string::npos;) plain.erase(p, mark.size());
  CHECK(plain == "Question? Answer.");
}

TEST_CASE("data: qlora preprocess prints statistics and examples, and caches", "[data]") {
  REQUIRE_LLAMA3();
  TempDir dir;
  std::string lines;
  for (int i = 0; i < 20; ++i)
    lines += nlohmann::json({{"instruction", "Repeat " + std::to_string(i)}, {"output", "Repeated " + std::to_string(i)}}).dump() + "\n";
  write_file(dir / "alpaca.jsonl", lines);
  write_file(dir / "c.yaml", "base_model: " + kLlama3.string() + "\ndatasets:\n  - path: " + (dir / "alpaca.jsonl").string() +
                                 "\n    type: alpaca\noutput_dir: " + (dir / "out").string() + "\nval_set_size: 2\n");
  const auto first = test::run_qlora("preprocess " + (dir / "c.yaml").string() + " --show 2");
  INFO(first.output);
  REQUIRE(first.status == 0);
  CHECK_THAT(first.output, ContainsSubstring("records:       20 (train 18, val 2)"));
  CHECK_THAT(first.output, ContainsSubstring("trainable:"));
  CHECK_THAT(first.output, ContainsSubstring("MB/s"));
  CHECK_THAT(first.output, ContainsSubstring("cache:         miss"));
  CHECK_THAT(first.output, ContainsSubstring("--- example 1"));
  CHECK_THAT(first.output, ContainsSubstring("\u27E6<|begin_of_text|>Below is an instruction"));
  CHECK_THAT(first.output, ContainsSubstring("### Response:\n\u27E7Repeated "));
  CHECK(fs::exists(dir / "out" / "prepared"));
  const auto second = test::run_qlora("preprocess " + (dir / "c.yaml").string() + " sequence_len=2048");
  CHECK(second.status == 0);
  CHECK_THAT(second.output, ContainsSubstring("cache:         hit"));
  const auto bad = test::run_qlora("preprocess " + (dir / "c.yaml").string() + " datasets.0.type=completion");
  CHECK(bad.status == 2);
  CHECK_THAT(bad.output, ContainsSubstring("alpaca.jsonl:1: missing field 'text'"));
  const auto help = test::run_qlora("preprocess --help");
  CHECK_THAT(help.output, ContainsSubstring("\u27E6"));
}
