// `qlora eval` through the real binary: the loss it prints equals the fused loss computed here
// directly (each document through llama_hidden_states, then fused_linear_cross_entropy over its
// shifted targets), with and without an adapter, for pretokenized JSONL and for a .txt file cut
// into --seq token chunks; malformed arguments are one-line errors with exit status 2.
// torch headers before Catch: c10 defines a CHECK macro that Catch must override.
#include "qlora/error.h"
#include "qlora/flce.h"
#include "qlora/lora.h"
#include "qlora/model.h"
#include "qlora/tokenizer.h"
#include "trainer_fixture.h"

#include <ATen/CPUGeneratorImpl.h>

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <cmath>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

using Catch::Matchers::ContainsSubstring;
namespace fs = std::filesystem;
using nlohmann::json;
using qlora::test::run_qlora;
using qlora::test::TempDir;

namespace {

json eval_json(const std::string& args) {
  const qlora::test::Run r = run_qlora("eval " + args + " --device cpu --json");
  CAPTURE(args, r.output);
  REQUIRE(r.status == 0);
  const size_t brace = r.output.find("{\"");
  REQUIRE(brace != std::string::npos);
  return json::parse(r.output.substr(brace, r.output.find('\n', brace) - brace));
}

// Sum of token losses of one document (targets ids[1:]) and their count.
std::pair<double, int64_t> document_loss(const qlora::LlamaWeights& m, const qlora::LoraModel* lora,
                                         const std::vector<int64_t>& ids) {
  at::NoGradGuard no_grad;
  qlora::DequantScratch scratch;
  const at::Tensor t = at::tensor(ids, at::kLong).unsqueeze(0);
  const at::Tensor h = qlora::llama_hidden_states(m, {t, {}}, scratch, lora);
  const int64_t n = static_cast<int64_t>(ids.size());
  qlora::FlceOptions o;
  o.reduction = qlora::FlceOptions::Reduction::sum;
  const at::Tensor loss = qlora::fused_linear_cross_entropy(h[0].narrow(0, 0, n - 1), m.lm_head, t[0].narrow(0, 1, n - 1), o);
  return {loss.item<double>(), n - 1};
}

std::vector<std::vector<int64_t>> read_id_lines(const fs::path& jsonl) {
  std::vector<std::vector<int64_t>> docs;
  std::istringstream in(qlora::test::read_file(jsonl));
  std::string line;
  while (std::getline(in, line))
    if (!line.empty()) docs.push_back(json::parse(line)["input_ids"].get<std::vector<int64_t>>());
  return docs;
}

// A byte-level tokenizer over a-j, space (Ġ) and newline (Ċ): ids 0..11, inside the fixture's
// vocabulary of 100.
void write_small_tokenizer(const fs::path& path) {
  json vocab = json::object();
  for (int i = 0; i < 10; ++i) vocab[std::string(1, static_cast<char>('a' + i))] = i;
  vocab["\xC4\xA0"] = 10;
  vocab["\xC4\x8A"] = 11;
  const json j = {{"version", "1.0"},
                  {"added_tokens", json::array()},
                  {"normalizer", nullptr},
                  {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
                  {"post_processor", nullptr},
                  {"decoder", {{"type", "ByteLevel"}}},
                  {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", json::array()}}}};
  qlora::test::write_file(path, j.dump());
}

}  // namespace

TEST_CASE("eval: the printed loss is the fused loss over every target token", "[eval]") {
  TempDir d("qlora_eval_test");
  qlora::test::write_trainer_fixture(d.path);
  const std::string model = (d / "model").string(), data = (d / "data.jsonl").string();
  const qlora::LlamaWeights m = qlora::load_llama(d / "model", {.load_in_4bit = false, .compute_dtype = at::kFloat});
  const std::vector<std::vector<int64_t>> docs = read_id_lines(d / "data.jsonl");

  // An adapter with non-zero B, as PEFT files.
  qlora::LoraOptions lo;
  lo.r = 4;
  lo.alpha = 8;
  lo.target_modules = {"q_proj", "v_proj", "down_proj"};
  qlora::LoraModel lora = qlora::make_lora(m, lo, 3);
  {
    at::NoGradGuard no_grad;
    auto gen = at::make_generator<at::CPUGeneratorImpl>(4);
    for (auto& layer : lora.layers)
      for (const std::string& name : qlora::lora_projection_names())
        if (auto& a = qlora::lora_projection(layer, name)) a->B.copy_(at::randn(a->B.sizes(), gen, at::kFloat) * 0.3);
  }
  qlora::save_peft_adapter(d / "adapter", lora, m.config, "tiny");

  for (const qlora::LoraModel* l : {static_cast<const qlora::LoraModel*>(nullptr), static_cast<const qlora::LoraModel*>(&lora)}) {
    CAPTURE(l != nullptr);
    double sum = 0;
    int64_t count = 0, tokens = 0;
    for (const auto& ids : docs) {
      const auto [s, n] = document_loss(m, l, ids);
      sum += s;
      count += n;
      tokens += static_cast<int64_t>(ids.size());
    }
    const double want = sum / static_cast<double>(count);
    const std::string adapter = l ? " --adapter " + (d / "adapter").string() : "";
    for (const std::string batch : {"1", "3"}) {
      CAPTURE(batch);
      const json j = eval_json(model + adapter + " --data " + data + " --type input_ids --seq 32 --batch " + batch);
      CHECK(j["examples"] == docs.size());
      CHECK(j["tokens"] == tokens);
      CHECK(j["target_tokens"] == count);
      CHECK(std::abs(j["loss"].get<double>() - want) <= 1e-5 * want);
      CHECK(std::abs(j["perplexity"].get<double>() - std::exp(want)) <= 1e-4 * std::exp(want));
    }
  }
  // The adapter changes the loss (so the comparison above saw it applied).
  const double base = eval_json(model + " --data " + data + " --type input_ids --seq 32")["loss"].get<double>();
  const double adapted =
      eval_json(model + " --adapter " + (d / "adapter").string() + " --data " + data + " --type input_ids --seq 32")["loss"].get<double>();
  CHECK(std::abs(base - adapted) > 1e-3);

  // Plain output names the numbers.
  const qlora::test::Run r = run_qlora("eval " + model + " --data " + data + " --type input_ids --seq 32 --device cpu");
  CHECK(r.status == 0);
  CHECK_THAT(r.output, ContainsSubstring("perplexity:"));
  CHECK_THAT(r.output, ContainsSubstring("loss:"));
}

TEST_CASE("eval: a .txt file is one text cut into --seq token chunks", "[eval]") {
  TempDir d("qlora_eval_test");
  qlora::test::write_trainer_fixture(d.path);
  write_small_tokenizer(d / "tokenizer.json");
  std::string text;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(8);
  const at::Tensor r = at::randint(0, 12, {203}, gen, at::kLong);
  for (int64_t i = 0; i < r.numel(); ++i) {
    const int64_t v = r[i].item<int64_t>();
    text += v < 10 ? static_cast<char>('a' + v) : v == 10 ? ' ' : '\n';
  }
  qlora::test::write_file(d / "text.txt", text);
  const qlora::Tokenizer tok = qlora::load_tokenizer(d / "tokenizer.json");
  const std::vector<int32_t> ids = tok.encode(text, {.add_special_tokens = true});
  REQUIRE(ids.size() == 203);

  const qlora::LlamaWeights m = qlora::load_llama(d / "model", {.load_in_4bit = false, .compute_dtype = at::kFloat});
  double sum = 0;
  int64_t count = 0;
  for (size_t start = 0; start < ids.size(); start += 16) {
    const size_t end = std::min(ids.size(), start + 16);
    const auto [s, n] = document_loss(m, nullptr, std::vector<int64_t>(ids.begin() + static_cast<ptrdiff_t>(start), ids.begin() + static_cast<ptrdiff_t>(end)));
    sum += s;
    count += n;
  }
  const json j = eval_json((d / "model").string() + " --tokenizer " + (d / "tokenizer.json").string() + " --data " +
                           (d / "text.txt").string() + " --seq 16 --batch 4");
  CHECK(j["examples"] == 13);             // 12 chunks of 16 and one of 11
  CHECK(j["target_tokens"] == count);     // 12 * 15 + 10
  CHECK(count == 190);
  CHECK(std::abs(j["loss"].get<double>() - sum / count) <= 1e-5 * (sum / count));
}

TEST_CASE("eval command: argument errors are one line and exit 2", "[eval]") {
  TempDir d("qlora_eval_test");
  qlora::test::write_trainer_fixture(d.path);
  const std::string model = (d / "model").string(), data = (d / "data.jsonl").string();
  auto one_line_error = [](const std::string& args, const std::string& needle) {
    const qlora::test::Run r = qlora::test::expect_user_error(args, needle);
    CHECK(std::count(r.output.begin(), r.output.end(), '\n') == 1);
  };
  one_line_error("eval " + model + " --data " + (d / "missing.jsonl").string(), "no such file");
  one_line_error("eval " + (d / "missing").string() + " --data " + data + " --type input_ids", "does not exist");
  one_line_error("eval " + model + " --data " + data + " --type jsonl", "--type");
  one_line_error("eval " + model + " --data " + data + " --type input_ids --seq 1", "--seq");
  one_line_error("eval " + model + " --data " + data + " --type input_ids --batch 0", "--batch");
  // After the model has loaded (its info line printed): a missing tokenizer, a record that does not
  // fit the type (named by file:line).
  qlora::test::write_file(d / "bad.jsonl", "{\"input_ids\": [1, 2, 3]}\n{\"text\": \"x\"}\n");
  for (const auto& [args, needle] : std::vector<std::pair<std::string, std::string>>{
           {"--data " + data + " --type alpaca --tokenizer " + (d / "none.json").string(), "none.json"},
           {"--data " + (d / "bad.jsonl").string() + " --type input_ids", "bad.jsonl:2"}}) {
    const qlora::test::Run r = run_qlora("eval " + model + " --device cpu " + args);
    CAPTURE(r.output);
    CHECK(r.status == 2);
    CHECK_THAT(r.output, ContainsSubstring(needle));
  }
}
