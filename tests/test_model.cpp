// Llama-family model: tiny random HF checkpoints written here (config.json + safetensors, 16-bit
// and bnb-4bit) for llama (llama3 rope, tied embeddings), mistral, qwen2 (biases) and an odd shape;
// loading, every malformed case, packed rows == documents alone, causality, sliding window, NF4 ==
// dequantized 16-bit, bnb-4bit == quantize-at-load, RoPE frequencies, scratch reuse, GQA.
// torch headers before Catch: c10 defines a CHECK macro that Catch must override.
#include "qlora/bnb4bit.h"
#include "qlora/error.h"
#include "qlora/hf_config.h"
#include "qlora/model.h"
#include "qlora/safetensors.h"
#include "test_util.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/autograd.h>

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <unistd.h>

#include <atomic>
#include <cmath>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>

using Catch::Matchers::ContainsSubstring;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

using qlora::test::TempDir;

struct Spec {
  std::string model_type = "llama";
  std::string arch = "LlamaForCausalLM";
  int64_t hidden = 64, inter = 128, layers = 2, heads = 4, kv_heads = 2, head_dim = 16, vocab = 100;
  bool tie = false;
  bool bias = false;  // llama attention_bias (qwen2 always has q/k/v biases)
  json rope_scaling = nullptr;
  double rope_theta = 10000.0;
  json sliding_window = nullptr;  // mistral
  uint64_t seed = 1;
};

// head_dim 16 with llama3 rope: wavelengths 6.3 (kept), 32.4 (blended: between 128/4 and 128/1),
// 167.. (divided by factor).
Spec llama_spec() {
  return Spec{.tie = true,
              .rope_scaling = {{"rope_type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 1.0}, {"high_freq_factor", 4.0},
                               {"original_max_position_embeddings", 128}},
              .rope_theta = 500000.0};
}
Spec mistral_spec() {
  return Spec{.model_type = "mistral", .arch = "MistralForCausalLM", .inter = 96, .kv_heads = 1, .vocab = 90, .rope_theta = 1e6, .seed = 2};
}
Spec qwen2_spec() { return Spec{.model_type = "qwen2", .arch = "Qwen2ForCausalLM", .inter = 112, .vocab = 80, .seed = 3}; }
Spec odd_spec() {
  return Spec{.hidden = 96, .inter = 200, .heads = 3, .kv_heads = 1, .head_dim = 32, .vocab = 77, .seed = 4};
}

json make_config(const Spec& s) {
  json j = {{"model_type", s.model_type},
            {"architectures", {s.arch}},
            {"hidden_size", s.hidden},
            {"intermediate_size", s.inter},
            {"num_hidden_layers", s.layers},
            {"num_attention_heads", s.heads},
            {"num_key_value_heads", s.kv_heads},
            {"head_dim", s.head_dim},
            {"vocab_size", s.vocab},
            {"max_position_embeddings", 256},
            {"rms_norm_eps", 1e-5},
            {"rope_theta", s.rope_theta},
            {"rope_scaling", s.rope_scaling},
            {"tie_word_embeddings", s.tie},
            {"hidden_act", "silu"},
            {"torch_dtype", "float32"}};
  if (s.model_type == "llama") j["attention_bias"] = s.bias;
  if (s.model_type == "mistral") j["sliding_window"] = s.sliding_window;
  if (s.model_type == "qwen2") j["use_sliding_window"] = false;
  return j;
}

qlora::NamedTensors make_weights(const Spec& s, at::ScalarType dtype = at::kFloat) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(s.seed);
  auto randn = [&](std::vector<int64_t> shape, double scale) {
    return (at::randn(shape, gen, at::TensorOptions().dtype(at::kFloat)) * scale).to(dtype);
  };
  const bool qkv_bias = s.model_type == "qwen2" || s.bias, o_bias = s.model_type == "llama" && s.bias;
  const int64_t q_out = s.heads * s.head_dim, kv_out = s.kv_heads * s.head_dim;
  qlora::NamedTensors t;
  t.emplace_back("model.embed_tokens.weight", randn({s.vocab, s.hidden}, 1.0));
  for (int64_t i = 0; i < s.layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    const double w = 1.0 / std::sqrt(static_cast<double>(s.hidden));
    t.emplace_back(p + "input_layernorm.weight", (randn({s.hidden}, 0.1) + 1.0).to(dtype));
    t.emplace_back(p + "post_attention_layernorm.weight", (randn({s.hidden}, 0.1) + 1.0).to(dtype));
    t.emplace_back(p + "self_attn.q_proj.weight", randn({q_out, s.hidden}, w));
    t.emplace_back(p + "self_attn.k_proj.weight", randn({kv_out, s.hidden}, w));
    t.emplace_back(p + "self_attn.v_proj.weight", randn({kv_out, s.hidden}, w));
    t.emplace_back(p + "self_attn.o_proj.weight", randn({s.hidden, q_out}, w));
    if (qkv_bias) {
      t.emplace_back(p + "self_attn.q_proj.bias", randn({q_out}, 0.1));
      t.emplace_back(p + "self_attn.k_proj.bias", randn({kv_out}, 0.1));
      t.emplace_back(p + "self_attn.v_proj.bias", randn({kv_out}, 0.1));
    }
    if (o_bias) t.emplace_back(p + "self_attn.o_proj.bias", randn({s.hidden}, 0.1));
    t.emplace_back(p + "mlp.gate_proj.weight", randn({s.inter, s.hidden}, w));
    t.emplace_back(p + "mlp.up_proj.weight", randn({s.inter, s.hidden}, w));
    t.emplace_back(p + "mlp.down_proj.weight", randn({s.hidden, s.inter}, 1.0 / std::sqrt(static_cast<double>(s.inter))));
  }
  t.emplace_back("model.norm.weight", (randn({s.hidden}, 0.1) + 1.0).to(dtype));
  if (!s.tie) t.emplace_back("lm_head.weight", randn({s.vocab, s.hidden}, 1.0 / std::sqrt(static_cast<double>(s.hidden))));
  return t;
}

void write_model(const fs::path& dir, const json& config, const qlora::NamedTensors& tensors) {
  fs::create_directories(dir);
  qlora::write_file_atomic(dir / "config.json", config.dump(2));
  qlora::save_safetensors(dir / "model.safetensors", tensors);
}

// The same weights as a bnb-4bit checkpoint (what `qlora quantize` / transformers write).
void write_bnb_model(const fs::path& dir, json config, const qlora::NamedTensors& tensors) {
  qlora::NamedTensors out;
  for (const auto& [name, t] : tensors) {
    if (!qlora::is_quantizable_linear_weight(name)) {
      out.emplace_back(name, t);
      continue;
    }
    for (auto& e : qlora::bnb4bit_entries(name, qlora::nf4_quantize(t, 64, true))) out.push_back(e);
  }
  config["quantization_config"] = qlora::bnb_quantization_config_to_json(qlora::bnb_nf4_quantization_config(true, "float32"));
  write_model(dir, config, out);
}

qlora::ModelLoadOptions fp32(bool in_4bit = false) { return {.load_in_4bit = in_4bit, .compute_dtype = at::kFloat}; }

at::Tensor random_ids(int64_t vocab, std::vector<int64_t> shape, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randint(0, vocab, shape, gen, at::TensorOptions().dtype(at::kLong));
}

at::Tensor logits(const qlora::LlamaWeights& m, const at::Tensor& ids, const at::Tensor& pos = {}) {
  at::NoGradGuard no_grad;
  qlora::DequantScratch scratch;
  return qlora::llama_logits(m, {ids, pos}, scratch);
}

double max_rel_diff(const at::Tensor& a, const at::Tensor& b) {
  return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item<double>();
}

std::string load_error(const fs::path& dir, const qlora::ModelLoadOptions& o = fp32()) {
  try {
    qlora::load_llama(dir, o);
  } catch (const qlora::UserError& e) {
    return e.what();
  }
  return "no error";
}

std::vector<Spec> all_specs() { return {llama_spec(), mistral_spec(), qwen2_spec(), odd_spec()}; }

}  // namespace

TEST_CASE("model: every family loads with the right shapes and runs", "[model]") {
  for (const Spec& s : all_specs()) {
    INFO(s.model_type << " hidden " << s.hidden);
    TempDir d;
    write_model(d.path, make_config(s), make_weights(s));
    for (bool in_4bit : {false, true}) {
      const qlora::LlamaWeights m = qlora::load_llama(d.path, fp32(in_4bit));
      REQUIRE(m.layers.size() == static_cast<size_t>(s.layers));
      CHECK(m.embed_tokens.sizes() == at::IntArrayRef{s.vocab, s.hidden});
      CHECK(m.lm_head.sizes() == at::IntArrayRef{s.vocab, s.hidden});
      CHECK(m.lm_head.is_same(m.embed_tokens) == s.tie);
      CHECK(m.inv_freq.sizes() == at::IntArrayRef{s.head_dim / 2});
      const auto& l = m.layers[1];
      CHECK(l.k_proj.out_features == s.kv_heads * s.head_dim);
      CHECK(l.o_proj.in_features == s.heads * s.head_dim);
      CHECK(l.down_proj.in_features == s.inter);
      CHECK((l.q_proj.bias.defined() == (s.model_type == "qwen2") && !l.o_proj.bias.defined()));
      CHECK((l.gate_proj.nf4.has_value() == in_4bit && l.gate_proj.dense.defined() == !in_4bit));
      if (in_4bit) CHECK(l.gate_proj.nf4->shape == std::vector<int64_t>{s.inter, s.hidden});
      CHECK(m.embed_tokens.scalar_type() == at::kFloat);

      const at::Tensor out = logits(m, random_ids(s.vocab, {2, 7}, 5));
      CHECK(out.sizes() == at::IntArrayRef{2, 7, s.vocab});
      CHECK(out.scalar_type() == at::kFloat);
      CHECK(out.isfinite().all().item<bool>());

      const qlora::ModelFootprint f = qlora::model_footprint(m);
      const int64_t lin = s.layers * (s.hidden * (s.heads + 2 * s.kv_heads) * s.head_dim + s.heads * s.head_dim * s.hidden +
                                      3 * s.hidden * s.inter);
      const int64_t biases = s.model_type == "qwen2" ? s.layers * (s.heads + 2 * s.kv_heads) * s.head_dim : 0;
      const int64_t params = lin + biases + s.vocab * s.hidden * (s.tie ? 1 : 2) + s.hidden * (2 * s.layers + 1);
      CHECK(f.linear_parameters == lin);
      CHECK(f.parameters == params);
      CHECK(f.bytes_16bit == 2 * params);
      if (!in_4bit) CHECK(f.bytes_as_loaded == 4 * params);
      else CHECK(f.bytes_as_loaded < 4 * (params - lin) + lin);  // NF4 is about half a byte per weight
    }
  }
}

TEST_CASE("model: bf16 compute runs and keeps norms/embeddings in bf16", "[model]") {
  const Spec s = qwen2_spec();
  TempDir d;
  write_model(d.path, make_config(s), make_weights(s, at::kBFloat16));
  qlora::ModelLoadOptions o;  // defaults: NF4, bf16
  const qlora::LlamaWeights m = qlora::load_llama(d.path, o);
  CHECK(m.embed_tokens.scalar_type() == at::kBFloat16);
  CHECK(m.layers[0].q_proj.bias.scalar_type() == at::kBFloat16);
  const at::Tensor out = logits(m, random_ids(s.vocab, {1, 9}, 6));
  CHECK(out.scalar_type() == at::kFloat);
  CHECK(out.isfinite().all().item<bool>());
}

TEST_CASE("model: malformed checkpoints and unsupported configs are UserErrors naming the problem", "[model]") {
  const Spec s = mistral_spec();
  const json config = make_config(s);
  const qlora::NamedTensors weights = make_weights(s);

  auto with_config = [&](const std::function<void(json&)>& edit) {
    auto d = std::make_unique<TempDir>();
    json c = config;
    edit(c);
    write_model(d->path, c, weights);
    return d;
  };
  auto with_weights = [&](const std::function<void(qlora::NamedTensors&)>& edit) {
    auto d = std::make_unique<TempDir>();
    qlora::NamedTensors w = weights;
    edit(w);
    write_model(d->path, config, w);
    return d;
  };
  auto drop = [](qlora::NamedTensors& w, const std::string& n) { std::erase_if(w, [&](const auto& e) { return e.first == n; }); };

  SECTION("missing tensor") {
    auto d = with_weights([&](auto& w) { drop(w, "model.layers.1.mlp.up_proj.weight"); });
    CHECK_THAT(load_error(d->path), ContainsSubstring("model.layers.1.mlp.up_proj.weight") && ContainsSubstring("missing"));
  }
  SECTION("missing lm_head when not tied") {
    auto d = with_weights([&](auto& w) { drop(w, "lm_head.weight"); });
    CHECK_THAT(load_error(d->path), ContainsSubstring("lm_head.weight") && ContainsSubstring("missing"));
  }
  SECTION("missing norm") {
    auto d = with_weights([&](auto& w) { drop(w, "model.norm.weight"); });
    CHECK_THAT(load_error(d->path), ContainsSubstring("model.norm.weight"));
  }
  SECTION("wrong shape of a linear weight") {
    auto d = with_weights([&](auto& w) {
      for (auto& [n, t] : w)
        if (n == "model.layers.0.self_attn.k_proj.weight") t = at::zeros({32, s.hidden});
    });
    const std::string e = load_error(d->path);
    CHECK_THAT(e, ContainsSubstring("model.layers.0.self_attn.k_proj.weight"));
    CHECK_THAT(e, ContainsSubstring("expected shape [16, 64]") && ContainsSubstring("found [32, 64]"));
  }
  SECTION("wrong shape of a norm and of the embedding") {
    auto d = with_weights([&](auto& w) {
      for (auto& [n, t] : w)
        if (n == "model.layers.1.post_attention_layernorm.weight") t = at::ones({s.hidden + 1});
    });
    CHECK_THAT(load_error(d->path), ContainsSubstring("post_attention_layernorm.weight") && ContainsSubstring("[65]"));
    auto d2 = with_config([&](json& c) { c["vocab_size"] = s.vocab + 1; });
    CHECK_THAT(load_error(d2->path), ContainsSubstring("model.embed_tokens.weight") && ContainsSubstring("expected shape [91, 64]"));
  }
  SECTION("unexpected and missing biases") {
    auto d = with_weights([&](auto& w) { w.emplace_back("model.layers.0.self_attn.q_proj.bias", at::zeros({s.heads * s.head_dim})); });
    CHECK_THAT(load_error(d->path), ContainsSubstring("model.layers.0.self_attn.q_proj.bias") && ContainsSubstring("unexpected"));
    TempDir q;
    qlora::NamedTensors w = make_weights(qwen2_spec());
    drop(w, "model.layers.1.self_attn.v_proj.bias");
    write_model(q.path, make_config(qwen2_spec()), w);
    CHECK_THAT(load_error(q.path), ContainsSubstring("model.layers.1.self_attn.v_proj.bias") && ContainsSubstring("missing"));
  }
  SECTION("unsupported model_type") {
    auto d = with_config([](json& c) { c["model_type"] = "gemma"; });
    CHECK_THAT(load_error(d->path), ContainsSubstring("model_type") && ContainsSubstring("gemma"));
  }
  SECTION("unsupported architecture") {
    auto d = with_config([](json& c) { c["architectures"] = {"GPT2LMHeadModel"}; });
    const std::string e = load_error(d->path);
    CHECK_THAT(e, ContainsSubstring("GPT2LMHeadModel") && ContainsSubstring("LlamaForCausalLM") &&
                      ContainsSubstring("MistralForCausalLM") && ContainsSubstring("Qwen2ForCausalLM"));
  }
  SECTION("unsupported rope type") {
    auto d = with_config([](json& c) { c["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}}; });
    const std::string e = load_error(d->path);
    CHECK_THAT(e, ContainsSubstring("yarn") && ContainsSubstring("default, linear, llama3"));
    auto d2 = with_config([](json& c) { c["rope_scaling"] = {{"type", "dynamic"}, {"factor", 2.0}}; });
    CHECK_THAT(load_error(d2->path), ContainsSubstring("dynamic"));
  }
  SECTION("unsupported activation, partial rotary, 8-bit, fp4") {
    auto d = with_config([](json& c) { c["hidden_act"] = "gelu"; });
    CHECK_THAT(load_error(d->path), ContainsSubstring("hidden_act") && ContainsSubstring("gelu"));
    auto d2 = with_config([](json& c) { c["partial_rotary_factor"] = 0.5; });
    CHECK_THAT(load_error(d2->path), ContainsSubstring("partial_rotary_factor"));
    auto d3 = with_config([](json& c) {
      c["quantization_config"] = qlora::bnb_quantization_config_to_json(qlora::bnb_nf4_quantization_config(true, "float32"));
      c["quantization_config"]["bnb_4bit_quant_type"] = "fp4";
    });
    CHECK_THAT(load_error(d3->path), ContainsSubstring("fp4"));
  }
  SECTION("bad sliding window") {
    auto d = with_config([](json& c) { c["sliding_window"] = -3; });
    CHECK_THAT(load_error(d->path), ContainsSubstring("sliding_window"));
  }
}

TEST_CASE("model: a packed row of documents gives each document's logits alone", "[model]") {
  for (const Spec& s : all_specs()) {
    INFO(s.model_type << " hidden " << s.hidden);
    TempDir d;
    write_model(d.path, make_config(s), make_weights(s));
    const qlora::LlamaWeights m = qlora::load_llama(d.path, fp32());
    const std::vector<int64_t> lens = {3, 5, 4};
    std::vector<at::Tensor> docs, alone;
    for (size_t i = 0; i < lens.size(); ++i) {
      docs.push_back(random_ids(s.vocab, {1, lens[i]}, 10 + i));
      alone.push_back(logits(m, docs.back()));
    }
    // Row 0 packs docs 0,1,2; row 1 packs docs 2,0,1 (positions restart at 0 for each).
    auto pack = [&](std::vector<int> order) {
      std::vector<at::Tensor> ids, pos;
      for (int i : order) {
        ids.push_back(docs[i]);
        pos.push_back(at::arange(lens[i], at::kLong).unsqueeze(0));
      }
      return std::make_pair(at::cat(ids, 1), at::cat(pos, 1));
    };
    const auto [ids0, pos0] = pack({0, 1, 2});
    const auto [ids1, pos1] = pack({2, 0, 1});
    const at::Tensor packed = logits(m, at::cat({ids0, ids1}, 0), at::cat({pos0, pos1}, 0));
    auto check_row = [&](int64_t row, std::vector<int> order) {
      int64_t off = 0;
      for (int i : order) {
        const at::Tensor got = packed.select(0, row).narrow(0, off, lens[i]);
        CHECK(max_rel_diff(got, alone[i].select(0, 0)) < 1e-5);
        off += lens[i];
      }
    };
    check_row(0, {0, 1, 2});
    check_row(1, {2, 0, 1});
  }
}

TEST_CASE("model: causal -- a later token never changes earlier logits; bad token ids are UserErrors", "[model]") {
  const Spec s = odd_spec();
  TempDir d;
  write_model(d.path, make_config(s), make_weights(s));
  const qlora::LlamaWeights m = qlora::load_llama(d.path, fp32(true));
  at::Tensor ids = random_ids(s.vocab, {1, 10}, 20);
  const at::Tensor a = logits(m, ids);
  ids.index_put_({0, 7}, (ids.index({0, 7}).item<int64_t>() + 1) % s.vocab);
  const at::Tensor b = logits(m, ids);
  CHECK(max_rel_diff(b.narrow(1, 0, 7), a.narrow(1, 0, 7)) < 1e-6);
  CHECK(max_rel_diff(b.narrow(1, 7, 3), a.narrow(1, 7, 3)) > 1e-3);
  ids.index_put_({0, 2}, s.vocab);  // out of the vocabulary: a data error
  CHECK_THROWS_AS(logits(m, ids), qlora::UserError);
}

TEST_CASE("model: Mistral sliding window matches the window-sized suffix; a large window changes nothing", "[model]") {
  Spec s = mistral_spec();
  s.layers = 1;  // one layer: the logits at t see exactly tokens t-W+1..t
  TempDir plain, windowed, wide;
  const qlora::NamedTensors w = make_weights(s);
  write_model(plain.path, make_config(s), w);
  s.sliding_window = 4;
  write_model(windowed.path, make_config(s), w);
  s.sliding_window = 10;
  write_model(wide.path, make_config(s), w);
  const qlora::LlamaWeights m0 = qlora::load_llama(plain.path, fp32());
  const qlora::LlamaWeights m4 = qlora::load_llama(windowed.path, fp32());
  const qlora::LlamaWeights m10 = qlora::load_llama(wide.path, fp32());
  CHECK(m0.layers[0].sliding_window == 0);
  CHECK(m4.layers[0].sliding_window == 4);

  const at::Tensor ids = random_ids(s.vocab, {1, 10}, 30);
  const at::Tensor full = logits(m0, ids);
  CHECK(at::equal(logits(m10, ids), full));  // window >= T: nothing masked
  const at::Tensor win = logits(m4, ids);
  CHECK(max_rel_diff(win.narrow(1, 0, 4), full.narrow(1, 0, 4)) < 1e-6);
  CHECK(max_rel_diff(win.narrow(1, 4, 6), full.narrow(1, 4, 6)) > 1e-3);
  for (int64_t t = 4; t < 10; ++t) {
    const at::Tensor sub = logits(m0, ids.narrow(1, t - 3, 4), at::arange(t - 3, t + 1, at::kLong).unsqueeze(0));
    CHECK(max_rel_diff(win.select(1, t), sub.select(1, 3)) < 1e-5);
  }
  // Packed rows and a window together: documents alone with the window.
  const at::Tensor pos = at::cat({at::arange(6, at::kLong), at::arange(4, at::kLong)}).unsqueeze(0);
  const at::Tensor packed = logits(m4, ids, pos);
  CHECK(max_rel_diff(packed.narrow(1, 0, 6), logits(m4, ids.narrow(1, 0, 6))) < 1e-5);
  CHECK(max_rel_diff(packed.narrow(1, 6, 4), logits(m4, ids.narrow(1, 6, 4))) < 1e-5);
}

TEST_CASE("model: Qwen2 sliding window only on layers >= max_window_layers when use_sliding_window", "[model]") {
  const Spec s = qwen2_spec();
  json c = make_config(s);
  c["use_sliding_window"] = true;
  c["sliding_window"] = 5;
  c["max_window_layers"] = 1;
  TempDir d;
  write_model(d.path, c, make_weights(s));
  const qlora::LlamaWeights m = qlora::load_llama(d.path, fp32());
  CHECK(m.layers[0].sliding_window == 0);
  CHECK(m.layers[1].sliding_window == 5);
  c["use_sliding_window"] = false;
  TempDir d2;
  write_model(d2.path, c, make_weights(s));
  CHECK(qlora::load_llama(d2.path, fp32()).layers[1].sliding_window == 0);
}

TEST_CASE("model: NF4 logits equal the 16-bit model holding our dequantized weights", "[model]") {
  for (const Spec& s : {llama_spec(), odd_spec()}) {
    TempDir d;
    write_model(d.path, make_config(s), make_weights(s));
    const qlora::LlamaWeights q = qlora::load_llama(d.path, fp32(true));
    qlora::LlamaWeights dense = q;
    for (auto& l : dense.layers)
      for (qlora::LinearWeight* w : {&l.q_proj, &l.k_proj, &l.v_proj, &l.o_proj, &l.gate_proj, &l.up_proj, &l.down_proj}) {
        w->dense = qlora::nf4_dequantize(*w->nf4, at::kFloat);
        w->nf4.reset();
      }
    const at::Tensor ids = random_ids(s.vocab, {2, 11}, 40);
    CHECK(at::equal(logits(q, ids), logits(dense, ids)));
    // ... and differ from the unquantized model by a quantization-sized amount, not more.
    const double rel = max_rel_diff(logits(q, ids), logits(qlora::load_llama(d.path, fp32()), ids));
    CHECK((rel > 1e-4 && rel < 0.5));
    // Gradients through the whole NF4 forward (to the embeddings, with a packed row so that the
    // masked attention path is in the graph) equal those of the dequantized dense model.
    const at::Tensor pos = at::cat({at::arange(5, at::kLong), at::arange(6, at::kLong)}).unsqueeze(0).expand({2, 11});
    auto embed_grad = [&](qlora::LlamaWeights m) {
      m.embed_tokens = m.embed_tokens.detach().clone().requires_grad_(true);
      if (s.tie) m.lm_head = m.embed_tokens;
      qlora::DequantScratch scratch;
      (qlora::llama_logits(m, {ids, pos}, scratch) * at::linspace(-1, 1, s.vocab)).sum().backward();
      return m.embed_tokens.grad();
    };
    const at::Tensor gq = embed_grad(q), gd = embed_grad(dense);
    CHECK(gq.abs().sum().item<double>() > 0);
    CHECK(max_rel_diff(gq, gd) < 1e-5);
  }
}

TEST_CASE("model: a bnb-4bit checkpoint loads as NF4 equal to quantize-at-load of the same weights", "[model]") {
  const Spec s = qwen2_spec();
  const qlora::NamedTensors w = make_weights(s, at::kBFloat16);
  TempDir plain, bnb;
  json c = make_config(s);
  c["torch_dtype"] = "bfloat16";
  write_model(plain.path, c, w);
  write_bnb_model(bnb.path, c, w);
  qlora::ModelLoadOptions o = fp32(true);
  const qlora::LlamaWeights a = qlora::load_llama(plain.path, o);
  const qlora::LlamaWeights b = qlora::load_llama(bnb.path, o);
  const auto& qa = *a.layers[1].down_proj.nf4;
  const auto& qb = *b.layers[1].down_proj.nf4;
  CHECK(qb.dtype == at::kBFloat16);
  CHECK(at::equal(qa.packed, qb.packed));
  CHECK(at::equal(qa.absmax, qb.absmax));
  const at::Tensor ids = random_ids(s.vocab, {2, 8}, 50);
  CHECK(at::equal(logits(a, ids), logits(b, ids)));

  // load_in_4bit=false: the bnb weights dequantized (in their stored dtype, then cast).
  const qlora::LlamaWeights dq = qlora::load_llama(bnb.path, fp32(false));
  CHECK(!dq.layers[0].q_proj.nf4);
  CHECK(at::equal(dq.layers[0].q_proj.dense, qlora::nf4_dequantize(*b.layers[0].q_proj.nf4, at::kBFloat16).to(at::kFloat)));
  CHECK(max_rel_diff(logits(dq, ids), logits(b, ids)) < 2e-2);

  // Sharded bnb checkpoint: the same model.
  TempDir sharded;
  qlora::NamedTensors out;
  for (const auto& [name, t] : w) {
    if (!qlora::is_quantizable_linear_weight(name)) out.emplace_back(name, t);
    else for (auto& e : qlora::bnb4bit_entries(name, qlora::nf4_quantize(t, 64, true))) out.push_back(e);
  }
  c["quantization_config"] = qlora::bnb_quantization_config_to_json(qlora::bnb_nf4_quantization_config(true, "float32"));
  qlora::write_file_atomic(sharded.path / "config.json", c.dump());
  CHECK(qlora::save_safetensors_sharded(sharded.path, out, 8000).size() > 2);
  CHECK(at::equal(logits(qlora::load_llama(sharded.path, o), ids), logits(b, ids)));
}

TEST_CASE("model: rope inverse frequencies (default, linear, llama3) follow the formulas", "[model]") {
  qlora::HFConfig c;
  c.model_type = "llama";
  c.head_dim = 16;
  c.rope_theta = 500000.0;
  const int64_t half = c.head_dim / 2;
  auto base = [&](int64_t i) { return 1.0 / std::pow(c.rope_theta, static_cast<double>(2 * i) / c.head_dim); };

  const at::Tensor def = qlora::rope_params(c).inv_freq;
  REQUIRE(def.sizes() == at::IntArrayRef{half});
  REQUIRE(def.scalar_type() == at::kFloat);
  for (int64_t i = 0; i < half; ++i) CHECK(std::abs(def[i].item<double>() / base(i) - 1) < 1e-6);

  c.rope_scaling.rope_type = "linear";
  c.rope_scaling.factor = 4.0;
  const at::Tensor lin = qlora::rope_params(c).inv_freq;
  for (int64_t i = 0; i < half; ++i) CHECK(std::abs(lin[i].item<double>() / (base(i) / 4.0) - 1) < 1e-6);

  c.rope_scaling.rope_type = "llama3";
  c.rope_scaling.factor = 8.0;
  c.rope_scaling.low_freq_factor = 1.0;
  c.rope_scaling.high_freq_factor = 4.0;
  c.rope_scaling.original_max_position_embeddings = 128;
  const qlora::RopeParams p = qlora::rope_params(c);
  CHECK(p.attention_scaling == 1.0);
  int kept = 0, divided = 0, blended = 0;
  for (int64_t i = 0; i < half; ++i) {
    const double f = base(i), wavelen = 2 * M_PI / f;
    double want;
    if (wavelen < 128.0 / 4.0) {
      want = f, ++kept;
    } else if (wavelen > 128.0 / 1.0) {
      want = f / 8.0, ++divided;
    } else {
      const double smooth = (128.0 / wavelen - 1.0) / (4.0 - 1.0);
      want = (1 - smooth) * f / 8.0 + smooth * f, ++blended;
    }
    CHECK(std::abs(p.inv_freq[i].item<double>() / want - 1) < 1e-5);
  }
  CHECK((kept >= 1 && blended >= 1 && divided >= 1));

  c.rope_scaling.rope_type = "longrope";
  CHECK_THROWS_AS(qlora::rope_params(c), qlora::UserError);
}

TEST_CASE("model: linear_forward reuses the dequant scratch and matches at::linear", "[model]") {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(7);
  auto make = [&](int64_t out, int64_t in, bool bias) {
    qlora::LinearWeight w;
    w.nf4 = qlora::nf4_quantize(at::randn({out, in}, gen), 64, true);
    w.out_features = out;
    w.in_features = in;
    if (bias) w.bias = at::randn({out}, gen);
    return w;
  };
  const qlora::LinearWeight big = make(48, 96, true), same = make(48, 96, false), small = make(20, 96, false);
  const at::Tensor x = at::randn({3, 5, 96}, gen);
  qlora::DequantScratch scratch;
  const at::Tensor y = qlora::linear_forward(x, big, scratch);
  CHECK(at::allclose(y, at::linear(x, qlora::nf4_dequantize(*big.nf4, at::kFloat), big.bias), 1e-6, 1e-6));
  const void* ptr = scratch.buffer.data_ptr();
  CHECK(scratch.buffer.numel() == 48 * 96);
  qlora::linear_forward(x, small, scratch);
  qlora::linear_forward(x, same, scratch);
  const at::Tensor y2 = qlora::linear_forward(x, small, scratch);
  CHECK(scratch.buffer.data_ptr() == ptr);
  CHECK(at::equal(y2, at::linear(x, qlora::nf4_dequantize(*small.nf4, at::kFloat))));
  const qlora::LinearWeight bigger = make(64, 96, false);
  qlora::linear_forward(x, bigger, scratch);
  CHECK(scratch.buffer.numel() == 64 * 96);

  // Gradients flow to x through the NF4 weight even though the scratch was overwritten since.
  const at::Tensor xg = x.clone().requires_grad_(true);
  const at::Tensor out = qlora::linear_forward(xg, big, scratch);
  qlora::linear_forward(x, bigger, scratch);  // clobbers the scratch
  const at::Tensor grad_out = at::randn(out.sizes(), gen);
  const auto g = torch::autograd::grad({out}, {xg}, {grad_out});
  const at::Tensor want = at::matmul(grad_out, qlora::nf4_dequantize(*big.nf4, at::kFloat));
  CHECK(at::allclose(g[0], want, 1e-5, 1e-5));
}

TEST_CASE("model: grouped-query attention equals the model with KV heads repeated", "[model]") {
  const Spec s = odd_spec();  // 3 query heads share 1 KV head
  const qlora::NamedTensors w = make_weights(s);
  Spec r = s;
  r.kv_heads = s.heads;
  qlora::NamedTensors wr;
  const int64_t rep = s.heads / s.kv_heads;
  for (const auto& [name, t] : w) {
    const bool kv = name.find("k_proj.weight") != std::string::npos || name.find("v_proj.weight") != std::string::npos;
    // KV head j serves query heads j*rep .. j*rep+rep-1: repeat each head's rows rep times.
    wr.emplace_back(name, kv ? t.view({s.kv_heads, 1, s.head_dim, s.hidden}).expand({s.kv_heads, rep, s.head_dim, s.hidden})
                                   .reshape({s.heads * s.head_dim, s.hidden})
                             : t);
  }
  TempDir a, b;
  write_model(a.path, make_config(s), w);
  write_model(b.path, make_config(r), wr);
  const qlora::LlamaWeights ma = qlora::load_llama(a.path, fp32()), mb = qlora::load_llama(b.path, fp32());
  const at::Tensor ids = random_ids(s.vocab, {2, 9}, 60);
  CHECK(max_rel_diff(logits(ma, ids), logits(mb, ids)) < 1e-5);  // is_causal + enable_gqa
  const at::Tensor pos = at::cat({at::arange(4, at::kLong), at::arange(5, at::kLong)}).unsqueeze(0).expand({2, 9});
  CHECK(max_rel_diff(logits(ma, ids, pos), logits(mb, ids, pos)) < 1e-5);  // mask + repeated heads
}
