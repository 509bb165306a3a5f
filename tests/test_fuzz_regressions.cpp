// Inputs the libFuzzer targets of fuzz/ found (docs/FUZZING.md), minimized, each asserting the
// one-line UserError the parser now gives instead of the crash, the undefined behaviour or the
// foreign exception it gave before.
// torch headers before Catch: c10 defines a CHECK macro that Catch must override.
#include "qlora/bnb4bit.h"
#include "qlora/chat_template.h"
#include "qlora/config.h"
#include "qlora/dataset.h"
#include "qlora/error.h"
#include "qlora/gguf.h"
#include "qlora/safetensors.h"
#include "qlora/tokenizer.h"

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <nlohmann/json.hpp>

#include <cstring>
#include <functional>
#include <string>

#include "test_util.h"

using Catch::Matchers::ContainsSubstring;
using namespace qlora;
using qlora::test::TempDir;

namespace {

// The UserError message of `f`; fails the test when `f` throws nothing or anything else.
std::string user_error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const UserError& e) {
    return e.what();
  }
  FAIL("expected a UserError, nothing was thrown");
  return "";
}

at::Tensor bytes_tensor(const std::string& s) {
  at::Tensor t = at::empty({static_cast<int64_t>(s.size())}, at::kByte);
  if (!s.empty()) std::memcpy(t.data_ptr(), s.data(), s.size());
  return t;
}

// A real bnb-4bit weight's entries with `quant_state` as its quant-state JSON.
std::map<std::string, at::Tensor> bnb_entries_with(const std::string& quant_state) {
  std::map<std::string, at::Tensor> entries;
  for (auto& [name, t] : bnb4bit_entries("w", nf4_quantize(at::randn({64, 32}), 64, false))) entries[name] = t;
  entries[std::string("w") + kBnbQuantStateSuffix] = bytes_tensor(quant_state);
  return entries;
}

// A tokenizer.json in a fresh directory, loaded.
Tokenizer load_json(const TempDir& dir, const std::string& tokenizer_json, const std::string& config_json = "") {
  test::write_file(dir / "tokenizer.json", tokenizer_json);
  if (!config_json.empty()) test::write_file(dir / "tokenizer_config.json", config_json);
  return load_tokenizer(dir.path);
}

}  // namespace

TEST_CASE("fuzz bnb_quant_state: a quant_state shape whose element count overflows int64", "[fuzz][bnb4bit]") {
  // Before: signed overflow in NF4Tensor::numel (UBSan), then nonsense block counts.
  const std::string qs =
      R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float16", "shape": [4294967296, 4294967296]})";
  CHECK_THAT(user_error_of([&] { bnb4bit_from_entries("w", bnb_entries_with(qs), "m.safetensors"); }),
             ContainsSubstring("m.safetensors: w.quant_state.bitsandbytes__nf4: 'shape': expected at most 2^60 elements in all"));
  const std::string near_max =
      R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float16", "shape": [9223372036854775807]})";
  CHECK_THAT(user_error_of([&] { bnb4bit_from_entries("w", bnb_entries_with(near_max), "m.safetensors"); }),
             ContainsSubstring("'shape': expected at most 2^60 elements in all, found [9223372036854775807]"));
}

TEST_CASE("fuzz safetensors: an index naming a shard whose name is too long for the OS", "[fuzz][safetensors]") {
  // Before: std::filesystem::exists threw filesystem_error (ENAMETOOLONG) out of the constructor.
  TempDir dir;
  save_safetensors(dir / "model-00001-of-00002.safetensors", {{"a", at::ones({2})}});
  const std::string shard = "model-00002-of-" + std::string(300, '6') + ".safetensors";
  test::write_file(dir / "model.safetensors.index.json",
                   R"({"weight_map": {"a": "model-00001-of-00002.safetensors", "c": ")" + shard + R"("}})");
  CHECK_THAT(user_error_of([&] { SafetensorsCheckpoint ckpt(dir.path); }),
             ContainsSubstring("model.safetensors.index.json: weight_map['c'] names " + shard +
                               ", which does not exist (File name too long)"));
}

namespace {
const std::string kByteLevel = R"("pre_tokenizer": {"type": "ByteLevel"})";
// A byte-level tokenizer.json of the tokens "a" and "<s>" whose post-processor puts `special` first.
std::string with_post_processor(const std::string& special_tokens) {
  return R"({"model": {"type": "BPE", "vocab": {"a": 0, "<s>": 1}, "merges": []}, )" + kByteLevel +
         R"(, "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>"}}], "special_tokens": )" +
         special_tokens + "}}";
}
}  // namespace

TEST_CASE("fuzz tokenizer_load: a vocab id far beyond the token count", "[fuzz][tokenizer]") {
  // Before: tokens.resize(2^30 + 1), a 32 GiB allocation (std::bad_alloc or the OOM killer).
  TempDir dir;
  CHECK_THAT(user_error_of([&] {
               load_json(dir, R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1073741824}, "merges": []}, )" + kByteLevel + "}");
             }),
             ContainsSubstring("tokenizer.json: model.vocab[\"b\"] must be a token id in [0, 65538) (the file's token count + "
                               "65536 unused ids), found 1073741824"));
  CHECK_THAT(user_error_of([&] {
               load_json(dir, R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "added_tokens": [{"id": 900000, "content": "x"}], )" +
                                  kByteLevel + "}");
             }),
             ContainsSubstring("added token 'x' id must be a token id in [0, 65538)"));
}

TEST_CASE("fuzz tokenizer_load: malformed post_processor special_tokens", "[fuzz][tokenizer]") {
  TempDir dir;
  // Before: nlohmann::json type_error 305 (operator[] on a number) escaped.
  CHECK_THAT(user_error_of([&] { load_json(dir, with_post_processor(R"({"<s>": 5})")); }),
             ContainsSubstring("tokenizer.json: post_processor special_tokens[\"<s>\"] must be an object with an \"ids\" list, found 5"));
  // Before: the const operator[] of a missing "ids" key failed nlohmann's assertion (abort).
  CHECK_THAT(user_error_of([&] { load_json(dir, with_post_processor(R"({"<s>": {}})")); }),
             ContainsSubstring("post_processor special_tokens[\"<s>\"] must be an object with an \"ids\" list, found {}"));
  // Before: loaded with BOS 99999, which encode(add_special_tokens) then emitted and decode rejected.
  CHECK_THAT(user_error_of([&] { load_json(dir, with_post_processor(R"({"<s>": {"ids": [99999]}})")); }),
             ContainsSubstring("post_processor special token '<s>' has id 99999, outside the vocabulary of 2 tokens"));
  const Tokenizer ok = load_json(dir, with_post_processor(R"({"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}})"));
  CHECK(ok.bos_id() == 1);
}

TEST_CASE("fuzz tokenizer_load: a chat_template list entry whose name is not a string", "[fuzz][tokenizer]") {
  // Before: json::value("name", "") threw type_error 302 for {"name": 1}. Entries other than
  // {"name": "default", "template": "..."} are skipped, as they were for other names.
  TempDir dir;
  const std::string tok = R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, )" + kByteLevel + "}";
  const Tokenizer t = load_json(dir, tok, R"({"chat_template": [{"name": 1}, {"name": "default", "template": "T"}]})");
  CHECK(t.chat_template() == "T");
}

TEST_CASE("fuzz tokenizer_load: a sentencepiece token <0x-1> is not a byte token", "[fuzz][tokenizer]") {
  // Before: sscanf("%2X") read "-1" as 0xFFFFFFFF and wrote byte_ids[4294967295] (UBSan, heap overflow).
  TempDir dir;
  const Tokenizer t = load_json(
      dir, R"({"model": {"type": "BPE", "vocab": {"a": 0, "<0x-1>": 1, "<0x41>": 2}, "merges": [], "byte_fallback": true}, )"
           R"("pre_tokenizer": {"type": "Metaspace"}})");
  CHECK(t.token_to_id("<0x-1>") == 1);
  CHECK(t.decode({1}) == "<0x-1>");   // an ordinary token: decodes to its text
  CHECK(t.decode({2}) == "A");        // a byte token
  CHECK(t.encode("A") == std::vector<int32_t>{2});
}

TEST_CASE("fuzz config: an override list index too large for std::stol", "[fuzz][config]") {
  // Before: std::out_of_range ("stol") escaped from the override parser.
  const std::string yaml = "base_model: m\ndatasets:\n  - path: a.jsonl\n";
  CHECK_THAT(user_error_of([&] { parse_config(yaml, "t.yaml", {"datasets.99999999999999999999.path=x"}); }),
             ContainsSubstring("override 'datasets.99999999999999999999.path=x': list index 99999999999999999999 is too large"));
  CHECK_THAT(user_error_of([&] { parse_config(yaml, "t.yaml", {"datasets[99999999999999999999].path=x"}); }),
             ContainsSubstring("list index 99999999999999999999 is too large"));
  // A nine-digit index is still an index, reported against the list's size.
  CHECK_THAT(user_error_of([&] { parse_config(yaml, "t.yaml", {"datasets.999999999.path=x"}); }),
             ContainsSubstring("index 999999999 is past the end of a list of 1"));
}

TEST_CASE("fuzz dataset_line: a number too large for a double in a JSON record", "[fuzz][dataset]") {
  // Before: nlohmann threw out_of_range 406 ("number overflow parsing '1e999'"), which the
  // parsers did not catch (they caught parse_error only): JSONL lines, tokenizer.json, and the
  // JSON string of a tool call's arguments.
  TempDir dir;
  const Tokenizer tok = load_json(dir, R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, )" + kByteLevel + "}");
  DataContext ctx;
  ctx.tokenizer = &tok;
  CHECK_THAT(user_error_of([&] { tokenize_record(R"({"text": 1e999})", DatasetConfig{}, ctx, "d.jsonl:3"); }),
             ContainsSubstring("d.jsonl:3: invalid JSON: [json.exception.out_of_range.406] number overflow parsing '1e999'"));

  TrainConfig config;
  config.datasets.push_back(DatasetConfig{});
  config.datasets[0].path = (dir / "d.jsonl").string();
  test::write_file(dir / "d.jsonl", "{\"text\": \"a\"}\n{\"text\": 1e999}\n");
  CHECK_THAT(user_error_of([&] { prepare_data(config, tok, ""); }),
             ContainsSubstring("d.jsonl:2: invalid JSON: [json.exception.out_of_range.406]"));

  const auto messages = nlohmann::ordered_json::parse(
      R"([{"role": "assistant", "content": null, "tool_calls": [{"function": {"name": "f", "arguments": "{\"a\": 1e999}"}}]}])");
  CHECK_THAT(user_error_of([&] { conversation_from_json(messages, nullptr, "c.jsonl:1"); }),
             ContainsSubstring("c.jsonl:1: messages[0].tool_calls[0].function.arguments: expected a JSON object in the string"));

  TempDir tdir;
  CHECK_THAT(user_error_of([&] { load_json(tdir, R"({"model": {"type": "BPE", "dropout": 1e999}})"); }),
             ContainsSubstring("tokenizer.json: not valid JSON ([json.exception.out_of_range.406]"));
}
