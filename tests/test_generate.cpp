// Generation (generate.h): the KV-cache decoder against the full forward (every step, prefill then
// one token at a time, chunked prefills, GQA, odd sizes, biases, a sliding window shorter than the
// sequence, NF4, a LoRA, batch 2, cache growth), the sampler (greedy, top-k, top-p on a hand-made
// distribution, temperature edges, repetition penalty, seeds), UTF-8-safe streaming with stop
// strings, the generation loop (greedy = argmax of the full forward, EOS, prefix reuse), and the
// generate command's argument errors through the real binary.
// torch headers before Catch: c10 defines a CHECK macro that Catch must override.
#include "qlora/error.h"
#include "qlora/generate.h"
#include "qlora/hf_config.h"
#include "qlora/lora.h"
#include "qlora/model.h"
#include "qlora/safetensors.h"
#include "qlora/tokenizer.h"
#include "test_util.h"

#include <ATen/CPUGeneratorImpl.h>

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <cmath>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

using Catch::Matchers::ContainsSubstring;
namespace fs = std::filesystem;
using nlohmann::json;
using qlora::test::TempDir;

namespace {

struct Shape {
  std::string name;
  std::string model_type = "llama";
  int64_t hidden = 64, inter = 96, layers = 2, heads = 4, kv_heads = 2, head_dim = 16, vocab = 100;
  int64_t window = 0;  // mistral sliding_window
  bool in_4bit = false;
  uint64_t seed = 1;
};

std::vector<Shape> shapes() {
  return {
      {.name = "llama GQA 4:2"},
      {.name = "odd: hidden 96, 3 heads, 1 KV head, head_dim 32, vocab 77", .hidden = 96, .inter = 200, .heads = 3,
       .kv_heads = 1, .head_dim = 32, .vocab = 77, .seed = 2},
      {.name = "mistral, sliding window 5", .model_type = "mistral", .kv_heads = 1, .vocab = 90, .window = 5, .seed = 3},
      {.name = "qwen2 (q/k/v biases)", .model_type = "qwen2", .inter = 112, .vocab = 80, .seed = 4},
      {.name = "llama NF4", .in_4bit = true, .seed = 5},
  };
}

// A random fp32 checkpoint of `s` (config.json + model.safetensors) in `dir`.
void write_model(const fs::path& dir, const Shape& s) {
  json c = {{"model_type", s.model_type},   {"architectures", {s.model_type == "llama" ? "LlamaForCausalLM" : s.model_type == "mistral" ? "MistralForCausalLM" : "Qwen2ForCausalLM"}},
            {"hidden_size", s.hidden},      {"intermediate_size", s.inter},     {"num_hidden_layers", s.layers},
            {"num_attention_heads", s.heads}, {"num_key_value_heads", s.kv_heads}, {"head_dim", s.head_dim},
            {"vocab_size", s.vocab},        {"max_position_embeddings", 64},    {"rms_norm_eps", 1e-5},
            {"rope_theta", 10000.0},        {"tie_word_embeddings", false},     {"hidden_act", "silu"},
            {"torch_dtype", "float32"}};
  if (s.model_type == "mistral") c["sliding_window"] = s.window > 0 ? json(s.window) : json(nullptr);
  if (s.model_type == "qwen2") c["use_sliding_window"] = false;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(s.seed);
  auto randn = [&](std::vector<int64_t> shape, double scale) { return at::randn(shape, gen, at::kFloat) * scale; };
  const int64_t q_out = s.heads * s.head_dim, kv_out = s.kv_heads * s.head_dim;
  const double w = 1.0 / std::sqrt(static_cast<double>(s.hidden));
  qlora::NamedTensors t;
  t.emplace_back("model.embed_tokens.weight", randn({s.vocab, s.hidden}, 1.0));
  for (int64_t i = 0; i < s.layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    t.emplace_back(p + "input_layernorm.weight", randn({s.hidden}, 0.1) + 1.0);
    t.emplace_back(p + "post_attention_layernorm.weight", randn({s.hidden}, 0.1) + 1.0);
    // Large q/k weights: attention far from uniform, so a wrong mask or position shows.
    t.emplace_back(p + "self_attn.q_proj.weight", randn({q_out, s.hidden}, 3 * w));
    t.emplace_back(p + "self_attn.k_proj.weight", randn({kv_out, s.hidden}, 3 * w));
    t.emplace_back(p + "self_attn.v_proj.weight", randn({kv_out, s.hidden}, w));
    t.emplace_back(p + "self_attn.o_proj.weight", randn({s.hidden, q_out}, w));
    if (s.model_type == "qwen2") {
      t.emplace_back(p + "self_attn.q_proj.bias", randn({q_out}, 0.2));
      t.emplace_back(p + "self_attn.k_proj.bias", randn({kv_out}, 0.2));
      t.emplace_back(p + "self_attn.v_proj.bias", randn({kv_out}, 0.2));
    }
    t.emplace_back(p + "mlp.gate_proj.weight", randn({s.inter, s.hidden}, w));
    t.emplace_back(p + "mlp.up_proj.weight", randn({s.inter, s.hidden}, w));
    t.emplace_back(p + "mlp.down_proj.weight", randn({s.hidden, s.inter}, 1.0 / std::sqrt(static_cast<double>(s.inter))));
  }
  t.emplace_back("model.norm.weight", randn({s.hidden}, 0.1) + 1.0);
  t.emplace_back("lm_head.weight", randn({s.vocab, s.hidden}, w));
  fs::create_directories(dir);
  qlora::write_file_atomic(dir / "config.json", c.dump(2));
  qlora::save_safetensors(dir / "model.safetensors", t);
}

qlora::LlamaWeights load(const fs::path& dir, const Shape& s) {
  return qlora::load_llama(dir, {.load_in_4bit = s.in_4bit, .compute_dtype = at::kFloat});
}

// A LoRA on all seven projections with non-zero B (PEFT's init has B = 0: no effect to test).
qlora::LoraModel random_lora(const qlora::LlamaWeights& m, uint64_t seed) {
  qlora::LoraOptions o;
  o.r = 4;
  o.alpha = 8;
  o.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  qlora::LoraModel lora = qlora::make_lora(m, o, seed);
  at::NoGradGuard no_grad;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed + 1);
  for (auto& layer : lora.layers)
    for (const std::string& name : qlora::lora_projection_names())
      if (auto& a = qlora::lora_projection(layer, name)) a->B.copy_(at::randn(a->B.sizes(), gen, at::kFloat) * 0.2);
  return lora;
}

at::Tensor random_ids(int64_t vocab, std::vector<int64_t> shape, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randint(0, vocab, shape, gen, at::TensorOptions().dtype(at::kLong));
}

double rel_diff(const at::Tensor& a, const at::Tensor& b) {
  return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item<double>();
}

// Feeds `ids` [B, T] through the cache in chunks of the given sizes (the last one repeated until
// the end) and returns the worst relative difference to `full` over every new position.
double cached_vs_full(const qlora::LlamaWeights& m, const qlora::LoraModel* lora, const at::Tensor& ids,
                      const at::Tensor& full, std::vector<int64_t> chunks, int64_t capacity) {
  qlora::DequantScratch scratch;
  qlora::KVCache cache = qlora::make_kv_cache(m, ids.size(0), capacity);
  double worst = 0;
  int64_t pos = 0, c = 0;
  const int64_t T = ids.size(1);
  while (pos < T) {
    const int64_t n = std::min(chunks[std::min<size_t>(static_cast<size_t>(c++), chunks.size() - 1)], T - pos);
    const at::Tensor all = qlora::llama_forward_cached(m, ids.narrow(1, pos, n), cache, scratch, lora, /*all_logits=*/true);
    REQUIRE(all.sizes() == at::IntArrayRef{ids.size(0), n, m.config.vocab_size});
    worst = std::max(worst, rel_diff(all, full.narrow(1, pos, n)));
    pos += n;
    CHECK(cache.length == pos);
  }
  // The last-position form is the last row of all_logits.
  qlora::KVCache c2 = qlora::make_kv_cache(m, ids.size(0), T);
  const at::Tensor last = qlora::llama_forward_cached(m, ids, c2, scratch, lora);
  REQUIRE(last.sizes() == at::IntArrayRef{ids.size(0), m.config.vocab_size});
  worst = std::max(worst, rel_diff(last, full.select(1, T - 1)));
  return worst;
}

}  // namespace

TEST_CASE("generate: cached decoding equals the full forward at every position", "[generate]") {
  TempDir d("qlora_gen_test");
  for (const Shape& s : shapes()) {
    CAPTURE(s.name);
    const fs::path dir = d / std::to_string(s.seed);
    write_model(dir, s);
    const qlora::LlamaWeights m = load(dir, s);
    if (s.window > 0) REQUIRE(m.layers[0].sliding_window == s.window);
    const qlora::LoraModel lora = random_lora(m, s.seed);
    for (const qlora::LoraModel* l : {static_cast<const qlora::LoraModel*>(nullptr), &lora}) {
      CAPTURE(l != nullptr);
      for (int64_t B : {1, 2}) {
        CAPTURE(B);
        const at::Tensor ids = random_ids(m.config.vocab_size, {B, 13}, s.seed * 10 + static_cast<uint64_t>(B));
        at::Tensor full;
        {
          at::NoGradGuard no_grad;
          qlora::DequantScratch scratch;
          full = qlora::llama_logits(m, {ids, {}}, scratch, l);
        }
        // Prefill 1 or 4 then one token per step; chunked prefills (4, 3, 2: a rectangular mask
        // over cached positions, with and without the window); the whole sequence at once; a cache
        // that starts with room for 2 positions and has to grow.
        CHECK(cached_vs_full(m, l, ids, full, {1}, 13) <= 1e-5);
        CHECK(cached_vs_full(m, l, ids, full, {4, 1}, 13) <= 1e-5);
        CHECK(cached_vs_full(m, l, ids, full, {4, 3, 2}, 13) <= 1e-5);
        CHECK(cached_vs_full(m, l, ids, full, {13}, 13) <= 1e-5);
        CHECK(cached_vs_full(m, l, ids, full, {2, 1}, 2) <= 1e-5);
      }
    }
  }
}

TEST_CASE("generate: the sliding window changes the cached logits as it changes the full ones", "[generate]") {
  // Guards the test above: with window 5 over 13 tokens the windowed model differs from the
  // unwindowed one, so equality there means the window was applied in the cache too.
  TempDir d("qlora_gen_test");
  Shape s = shapes()[2];
  write_model(d / "w", s);
  s.window = 0;
  write_model(d / "n", s);
  const qlora::LlamaWeights mw = load(d / "w", s), mn = load(d / "n", s);
  const at::Tensor ids = random_ids(mw.config.vocab_size, {1, 13}, 9);
  qlora::DequantScratch scratch;
  qlora::KVCache cw = qlora::make_kv_cache(mw, 1, 13), cn = qlora::make_kv_cache(mn, 1, 13);
  const at::Tensor a = qlora::llama_forward_cached(mw, ids, cw, scratch, nullptr, true);
  const at::Tensor b = qlora::llama_forward_cached(mn, ids, cn, scratch, nullptr, true);
  CHECK(rel_diff(a.narrow(1, 0, 5), b.narrow(1, 0, 5)) <= 1e-6);  // within the window: the same
  CHECK(rel_diff(a.narrow(1, 6, 7), b.narrow(1, 6, 7)) > 1e-3);    // beyond it: not
}

TEST_CASE("generate: cache limits and bad inputs", "[generate]") {
  TempDir d("qlora_gen_test");
  const Shape s = shapes()[0];
  write_model(d.path, s);
  const qlora::LlamaWeights m = load(d.path, s);
  qlora::DequantScratch scratch;
  CHECK_THROWS_AS(qlora::make_kv_cache(m, 1, 65), qlora::UserError);  // max_position_embeddings 64
  qlora::KVCache cache = qlora::make_kv_cache(m, 1, 4, 10);
  qlora::llama_forward_cached(m, random_ids(100, {1, 8}, 1), cache, scratch);
  CHECK(cache.capacity == 8);
  qlora::llama_forward_cached(m, random_ids(100, {1, 1}, 2), cache, scratch);
  CHECK(cache.capacity == 10);  // doubled, capped at max_length
  CHECK_THROWS_AS(qlora::llama_forward_cached(m, random_ids(100, {1, 2}, 3), cache, scratch), qlora::UserError);
  qlora::KVCache c2 = qlora::make_kv_cache(m, 1, 4);
  CHECK_THROWS_AS(qlora::llama_forward_cached(m, at::full({1, 1}, 100, at::kLong), c2, scratch), qlora::UserError);
  CHECK(c2.length == 0);
}

TEST_CASE("sampling: greedy, top-k, top-p, temperature edges, repetition penalty, seeds", "[generate]") {
  using qlora::SamplingOptions;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(3);
  const at::Tensor logits = at::randn({50}, gen, at::kFloat) * 3;
  const int32_t argmax = static_cast<int32_t>(logits.argmax().item<int64_t>());

  SECTION("greedy is the argmax, the first on ties") {
    qlora::Sampler greedy = qlora::make_sampler({});
    CHECK(qlora::sample_token(greedy, logits) == argmax);
    CHECK(qlora::sample_token(greedy, at::tensor({1.0f, 3.0f, 3.0f, 2.0f})) == 1);
  }
  SECTION("top-k 1 is greedy whatever the seed and temperature") {
    for (uint64_t seed = 0; seed < 20; ++seed) {
      qlora::Sampler s = qlora::make_sampler({.temperature = 1.5, .top_k = 1, .seed = seed});
      CHECK(qlora::sample_token(s, logits) == argmax);
    }
  }
  SECTION("a seed gives the same tokens; another seed other tokens") {
    auto draw = [&](uint64_t seed) {
      qlora::Sampler s = qlora::make_sampler({.temperature = 1.0, .top_p = 0.95, .seed = seed});
      std::vector<int32_t> out;
      for (int i = 0; i < 40; ++i) out.push_back(qlora::sample_token(s, logits));
      return out;
    };
    CHECK(draw(7) == draw(7));
    CHECK(draw(7) != draw(8));
  }
  SECTION("top-p keeps the smallest head reaching the mass, renormalized") {
    // p = 0.5, 0.3, 0.15, 0.05 in shuffled order.
    const std::vector<float> lg = {std::log(0.15f), std::log(0.5f), std::log(0.05f), std::log(0.3f)};
    auto dist = [&](double top_p, int64_t top_k = 0) {
      return qlora::sampling_distribution(lg, {.temperature = 1.0, .top_k = top_k, .top_p = top_p});
    };
    auto ids = [](const std::vector<std::pair<int32_t, double>>& d) {
      std::vector<int32_t> v;
      for (auto& [id, p] : d) v.push_back(id);
      return v;
    };
    CHECK(ids(dist(0.45)) == std::vector<int32_t>{1});
    CHECK(ids(dist(0.75)) == std::vector<int32_t>{1, 3});
    CHECK(std::abs(dist(0.75)[0].second - 0.625) < 1e-6);
    CHECK(std::abs(dist(0.75)[1].second - 0.375) < 1e-6);
    CHECK(ids(dist(0.9)) == std::vector<int32_t>{1, 3, 0});
    CHECK(std::abs(dist(0.9)[2].second - 0.15 / 0.95) < 1e-6);
    CHECK(ids(dist(1.0)) == std::vector<int32_t>{1, 3, 0, 2});
    CHECK(ids(dist(1.0, 2)) == std::vector<int32_t>{1, 3});      // top-k first
    CHECK(ids(dist(0.9, 2)) == std::vector<int32_t>{1, 3});      // then top-p over the renormalized two
    CHECK(ids(dist(0.6, 2)) == std::vector<int32_t>{1});         // 0.625 of the two before token 3
    // Drawn frequencies follow the cut distribution.
    qlora::Sampler s = qlora::make_sampler({.temperature = 1.0, .top_p = 0.75, .seed = 1});
    std::map<int32_t, int> count;
    const at::Tensor t = at::tensor(lg);
    for (int i = 0; i < 20000; ++i) ++count[qlora::sample_token(s, t)];
    CHECK(count.size() == 2);
    CHECK(std::abs(count[3] / 20000.0 - 0.375) < 0.015);
  }
  SECTION("temperature near 0 is greedy without NaNs; a huge one is near uniform") {
    const std::vector<float> lg = {1.0f, 1.0001f, 0.9999f};
    const auto d = qlora::sampling_distribution(lg, {.temperature = 1e-8});
    REQUIRE(!d.empty());
    CHECK(d[0].first == 1);
    CHECK(d[0].second == 1.0);
    for (auto& [id, p] : d) CHECK(std::isfinite(p));
    qlora::Sampler s = qlora::make_sampler({.temperature = 1e-8, .seed = 4});
    for (int i = 0; i < 10; ++i) CHECK(qlora::sample_token(s, at::tensor(lg)) == 1);
    const auto u = qlora::sampling_distribution({5.0f, -5.0f}, {.temperature = 1e6});
    CHECK(std::abs(u[0].second - 0.5) < 1e-4);
  }
  SECTION("repetition penalty divides positive and multiplies negative logits of seen tokens") {
    qlora::Sampler s = qlora::make_sampler({.repetition_penalty = 2.0});
    CHECK(qlora::sample_token(s, at::tensor({2.0f, 1.5f})) == 0);
    CHECK(qlora::sample_token(s, at::tensor({2.0f, 1.5f}), {0}) == 1);   // 2 / 2 = 1 < 1.5
    CHECK(qlora::sample_token(s, at::tensor({-1.0f, -1.5f}), {0}) == 1);  // -1 * 2 = -2 < -1.5
  }
  SECTION("invalid options name the option") {
    auto err = [](const SamplingOptions& o) {
      try {
        qlora::validate_sampling_options(o);
      } catch (const qlora::UserError& e) {
        return std::string(e.what());
      }
      return std::string("no error");
    };
    CHECK_THAT(err({.top_p = 0.0}), ContainsSubstring("top_p"));
    CHECK_THAT(err({.top_p = 1.5}), ContainsSubstring("top_p"));
    CHECK_THAT(err({.temperature = -1}), ContainsSubstring("temperature"));
    CHECK_THAT(err({.top_k = -2}), ContainsSubstring("top_k"));
    CHECK_THAT(err({.repetition_penalty = 0}), ContainsSubstring("repetition_penalty"));
    CHECK(err({.temperature = 0.7, .top_k = 40, .top_p = 1.0}) == "no error");
  }
}

namespace {

// A byte-level tokenizer whose tokens are single bytes (id = byte value), so that every multi-byte
// character is split across tokens, plus one special token <|end|> = 256.
qlora::Tokenizer byte_tokenizer(const fs::path& dir) {
  json vocab = json::object();
  int n = 0;
  for (int b = 0; b < 256; ++b) {
    // GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the rest for 256 + n.
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    std::string ch;
    qlora::utf8_append(ch, printable ? static_cast<uint32_t>(b) : static_cast<uint32_t>(256 + n++));
    vocab[ch] = b;
  }
  const json j = {{"version", "1.0"},
                  {"added_tokens", {{{"id", 256}, {"content", "<|end|>"}, {"special", true}}}},
                  {"normalizer", nullptr},
                  {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
                  {"post_processor", nullptr},
                  {"decoder", {{"type", "ByteLevel"}}},
                  {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", json::array()}}}};
  qlora::test::write_file(dir / "tokenizer.json", j.dump());
  return qlora::load_tokenizer(dir / "tokenizer.json");
}

bool valid_utf8(const std::string& s) {
  size_t pos = 0;
  while (pos < s.size()) {
    const size_t start = pos;
    if (qlora::utf8_next(s, pos) == 0xFFFD && s.compare(start, 3, "\xEF\xBF\xBD") != 0) return false;
  }
  return true;
}

}  // namespace

TEST_CASE("streaming: pieces are whole code points, stop strings cut, special tokens skipped", "[generate]") {
  TempDir d("qlora_gen_test");
  const qlora::Tokenizer tok = byte_tokenizer(d.path);
  const std::string text = "h\xC3\xA9llo \xE4\xB8\x96\xE7\x95\x8C \xF0\x9F\x99\x82!";  // héllo 世界 🙂!
  const std::vector<int32_t> ids = tok.encode(text);
  REQUIRE(ids.size() == text.size());  // one token per byte

  SECTION("no partial code point is ever emitted; the pieces add up to the text") {
    qlora::TextStream s{.tokenizer = &tok};
    std::string out;
    for (size_t i = 0; i < ids.size(); ++i) {
      const std::string piece = qlora::text_stream_push(s, ids[i]);
      CAPTURE(i, piece);
      CHECK(valid_utf8(piece));
      if (i == 1 || i == 8 || i == 14) CHECK(piece.empty());  // first byte of é, 世, 🙂
      out += piece;
    }
    out += qlora::text_stream_finish(s);
    CHECK(out == text);
  }
  SECTION("special tokens are skipped") {
    qlora::TextStream s{.tokenizer = &tok};
    std::string out;
    for (int32_t id : {104, 256, 105}) out += qlora::text_stream_push(s, id);
    CHECK(out == "hi");
  }
  SECTION("invalid bytes become U+FFFD; a truncated code point at the end too") {
    qlora::TextStream s{.tokenizer = &tok};
    std::string out;
    for (int32_t id : {97, 0xFF, 98, 0xE4, 0xB8}) out += qlora::text_stream_push(s, id);
    CHECK(out == "a\xEF\xBF\xBD" "b");
    out += qlora::text_stream_finish(s);
    CHECK(valid_utf8(out));
    CHECK(out == "a\xEF\xBF\xBD" "b\xEF\xBF\xBD\xEF\xBF\xBD");
  }
  SECTION("a stop string ends the text before it; a partial match is held back, then released") {
    qlora::TextStream s{.tokenizer = &tok, .stop_strings = {"wor", "!!"}};
    std::string out;
    for (char c : std::string("hello w")) out += qlora::text_stream_push(s, static_cast<unsigned char>(c));
    CHECK(out == "hello ");  // "w" may start "wor"
    out += qlora::text_stream_push(s, 'a');
    CHECK(out == "hello wa");
    out += qlora::text_stream_push(s, '!');
    CHECK(out == "hello wa");
    CHECK(!s.stopped);
    out += qlora::text_stream_push(s, '!');
    CHECK(s.stopped);
    CHECK(out == "hello wa");
    CHECK(qlora::text_stream_push(s, 'x').empty());
    CHECK(qlora::text_stream_finish(s).empty());
  }
}

TEST_CASE("generate: greedy tokens equal the argmax of the full forward; EOS stops; prefixes are reused", "[generate]") {
  TempDir d("qlora_gen_test");
  const Shape s = shapes()[2];  // sliding window 5, GQA 4:1
  write_model(d.path, s);
  const qlora::LlamaWeights m = load(d.path, s);
  const qlora::LoraModel lora = random_lora(m, 11);
  const std::vector<int32_t> prompt = {3, 17, 42, 8, 60, 21};
  qlora::DequantScratch scratch;

  qlora::KVCache cache = qlora::make_kv_cache(m, 1, 8);
  qlora::Sampler greedy = qlora::make_sampler({});
  const qlora::GenerateResult r = qlora::generate(m, &lora, nullptr, cache, scratch, prompt, {.max_new_tokens = 12}, greedy);
  CHECK(r.stop == qlora::StopReason::max_new_tokens);
  REQUIRE(r.tokens.size() == 12);
  CHECK(r.prompt_tokens == 6);
  CHECK(r.prefill_tokens == 6);
  CHECK(cache.length == 6 + 11);
  // The reference: the whole sequence through llama_logits, one token at a time.
  std::vector<int32_t> seq = prompt;
  for (int i = 0; i < 12; ++i) {
    at::NoGradGuard no_grad;
    at::Tensor ids = at::tensor(std::vector<int64_t>(seq.begin(), seq.end()), at::kLong).unsqueeze(0);
    const at::Tensor lg = qlora::llama_logits(m, {ids, {}}, scratch, &lora);
    seq.push_back(static_cast<int32_t>(lg[0][-1].argmax().item<int64_t>()));
  }
  CHECK(std::vector<int32_t>(seq.begin() + 6, seq.end()) == r.tokens);

  SECTION("a stop id ends generation with that token") {
    qlora::KVCache c = qlora::make_kv_cache(m, 1, 8);
    const qlora::GenerateResult e =
        qlora::generate(m, &lora, nullptr, c, scratch, prompt, {.max_new_tokens = 12, .stop_ids = {r.tokens[3]}}, greedy);
    CHECK(e.stop == qlora::StopReason::eos);
    CHECK(e.tokens == std::vector<int32_t>(r.tokens.begin(), r.tokens.begin() + 4));
  }
  SECTION("a second call extending the context prefills only the new part and continues identically") {
    std::vector<int32_t> ctx = prompt;
    ctx.insert(ctx.end(), r.tokens.begin(), r.tokens.begin() + 5);
    const qlora::GenerateResult r2 = qlora::generate(m, &lora, nullptr, cache, scratch, ctx, {.max_new_tokens = 7}, greedy);
    CHECK(r2.prefill_tokens == 1);  // everything but the last token was in the cache
    CHECK(r2.tokens == std::vector<int32_t>(r.tokens.begin() + 5, r.tokens.end()));
    // A context that diverges early drops the cached rest.
    std::vector<int32_t> other = {3, 17, 99 % 90, 1};
    const qlora::GenerateResult r3 = qlora::generate(m, &lora, nullptr, cache, scratch, other, {.max_new_tokens = 2}, greedy);
    CHECK(r3.prefill_tokens == 2);
    qlora::KVCache fresh = qlora::make_kv_cache(m, 1, 4);
    CHECK(qlora::generate(m, &lora, nullptr, fresh, scratch, other, {.max_new_tokens = 2}, greedy).tokens == r3.tokens);
  }
  SECTION("the context limit stops generation") {
    qlora::KVCache c = qlora::make_kv_cache(m, 1, 8, 9);
    const qlora::GenerateResult f = qlora::generate(m, &lora, nullptr, c, scratch, prompt, {.max_new_tokens = 12}, greedy);
    CHECK(f.stop == qlora::StopReason::context_full);
    CHECK(f.tokens.size() == 4);  // positions 6, 7, 8 fed: the cache is full after the third
  }
}

TEST_CASE("generate command: argument errors are one line and exit 2", "[generate]") {
  using qlora::test::run_qlora;
  TempDir d("qlora_gen_test");
  write_model(d / "model", shapes()[0]);
  const std::string model = (d / "model").string();
  auto one_line_error = [](const std::string& args, const std::string& needle) {
    const qlora::test::Run r = qlora::test::expect_user_error(args, needle);
    CHECK(std::count(r.output.begin(), r.output.end(), '\n') == 1);
  };
  one_line_error("generate " + (d / "missing").string() + " --prompt hi", "does not exist");
  one_line_error("generate " + model + " --prompt-ids 1,2 --top-p 1.5", "--top-p");
  one_line_error("generate " + model + " --prompt-ids 1,2 --top-p 0", "--top-p");
  one_line_error("generate " + model + " --prompt-ids 1,2 --max-new-tokens=-1", "--max-new-tokens");
  one_line_error("generate " + model + " --prompt-ids 1,x", "--prompt-ids");
  one_line_error("generate " + model, "--prompt");
  one_line_error("generate " + model + " --prompt-ids 1,2 --temperature=-0.5", "--temperature");
  one_line_error("generate " + model + " --prompt-ids 1,2 --dtype int8", "--dtype");

  // An adapter made for another shape (hidden 96) is refused when loaded onto this model.
  write_model(d / "other", shapes()[1]);
  const qlora::LlamaWeights other = load(d / "other", shapes()[1]);
  qlora::save_peft_adapter(d / "adapter", random_lora(other, 3), other.config, "other");
  const qlora::test::Run r = run_qlora("generate " + model + " --prompt-ids 1,2 --device cpu --adapter " + (d / "adapter").string());
  CAPTURE(r.output);
  CHECK(r.status == 2);
  CHECK_THAT(r.output, ContainsSubstring("adapter"));

  // And a working run: token ids in, JSON out (no tokenizer in the folder: ids only).
  const qlora::test::Run ok = run_qlora("generate " + model + " --prompt-ids 5,6,7 --max-new-tokens 4 --device cpu --json");
  CAPTURE(ok.output);
  CHECK(ok.status == 0);
  const size_t brace = ok.output.find("{\"");
  REQUIRE(brace != std::string::npos);
  const json j = json::parse(ok.output.substr(brace, ok.output.find('\n', brace) - brace));
  CHECK(j["prompt_tokens"] == 3);
  CHECK(j["tokens"].size() == 4);
  CHECK(j["stop"] == "max_new_tokens");
}
