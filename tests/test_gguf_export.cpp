// GGUF export (`qlora export --format gguf`, src/io/gguf_export*.cpp, src/quant/ggml_quantize.cpp):
// the quantizers on hand-computed blocks and rounding ties, names and the q/k permutation, the
// exported file read back by our GgufFile and load_llama (tensors equal the merged weights: f32
// exactly, f16/bf16 exactly as rounded, q8_0/q4_0 within their quantization error; metadata; the
// logits), odd sizes (f16 fallback), llama3 rope factors, qwen2, tied embeddings, a GGUF base, the
// tokenizer (our reader encodes as the tokenizer.json did), and the binary's user errors.
// torch headers before Catch: c10 defines a CHECK macro that Catch must override.
#include "qlora/error.h"
#include "qlora/ggml_quants.h"
#include "qlora/gguf.h"
#include "qlora/gguf_export.h"
#include "qlora/merge.h"
#include "qlora/model.h"
#include "qlora/tokenizer.h"

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <cstring>
#include <filesystem>

#include "merge_fixture.h"
#include "test_util.h"

using Catch::Matchers::ContainsSubstring;
namespace fs = std::filesystem;
using qlora::GgmlType;
using qlora::test::TempDir;

namespace {

const std::vector<std::string> kAll = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};

std::vector<uint8_t> quantize(GgmlType t, const std::vector<float>& x) {
  std::vector<uint8_t> out(qlora::ggml_row_bytes(t, static_cast<int64_t>(x.size()), "test"));
  qlora::ggml_quantize_row(t, x.data(), static_cast<int64_t>(x.size()), out.data());
  return out;
}

uint16_t u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

at::Tensor logits_of(const qlora::LlamaWeights& m) {
  qlora::DequantScratch scratch;
  at::NoGradGuard g;
  const at::Tensor ids = at::tensor({1, 4, 9, 16, 25, 36, 49, 64, 81, 95, 0, 3}, at::kLong).reshape({2, 6});
  return qlora::llama_logits(m, {ids, at::Tensor()}, scratch);
}

// Exports the tiny model in `dir` (+ adapter when given) to `out` with `type`; returns the merged
// fp32 tensors (HF names) that went in.
qlora::NamedTensors export_tiny(const fs::path& dir, const fs::path& adapter, const fs::path& out, GgmlType type) {
  const qlora::LlamaWeights m =
      qlora::load_merge_base(dir, adapter.empty() ? qlora::MergeBase::as_stored : qlora::MergeBase::nf4);
  std::optional<qlora::LoraModel> lora;
  if (!adapter.empty()) lora = qlora::load_peft_adapter(adapter, m, at::kCPU);
  qlora::GgufExportOptions opt;
  opt.type = type;
  qlora::export_gguf(m, lora ? &*lora : nullptr, dir, out, opt);
  return qlora::merge_lora(m, lora ? &*lora : nullptr, at::kFloat);
}

}  // namespace

TEST_CASE("gguf export: q8_0 and q4_0 blocks, rounding ties, zero blocks", "[gguf_export]") {
  std::vector<float> x(32, 0.0f);
  x[0] = 127.0f;    // d = 1
  x[1] = -63.5f;    // half away from zero: -64
  x[2] = 0.5f;      // 1
  x[3] = -0.5f;     // -1
  x[4] = 2.5f;      // 3 (not banker's 2)
  x[5] = -127.0f;
  auto q8 = quantize(GgmlType::q8_0, x);
  REQUIRE(q8.size() == 34);
  CHECK(u16(q8.data()) == 0x3C00);  // fp16 1.0
  const auto* qs = reinterpret_cast<const int8_t*>(q8.data() + 2);
  CHECK(qs[0] == 127);
  CHECK(qs[1] == -64);
  CHECK(qs[2] == 1);
  CHECK(qs[3] == -1);
  CHECK(qs[4] == 3);
  CHECK(qs[5] == -127);
  CHECK(qs[6] == 0);

  std::vector<float> y(32, 0.0f);
  y[3] = -8.0f;  // the first element of largest |y|: d = -8 / -8 = 1
  y[5] = 8.0f;   // 8 + 8.5 = 16.5 -> 16, clipped to 15
  y[7] = 7.0f;   // 15
  y[8] = 0.4f;   // 8.9 -> 8
  y[9] = -0.6f;  // 7.9 -> 7
  y[19] = -3.0f; // 5.5 -> 5, in the high nibble of byte 3
  auto q4 = quantize(GgmlType::q4_0, y);
  REQUIRE(q4.size() == 18);
  CHECK(u16(q4.data()) == 0x3C00);
  const uint8_t* b = q4.data() + 2;
  CHECK((b[3] & 15) == 0);
  CHECK((b[3] >> 4) == 5);
  CHECK((b[5] & 15) == 15);
  CHECK((b[7] & 15) == 15);
  CHECK((b[8] & 15) == 8);
  CHECK((b[9] & 15) == 7);
  CHECK(b[0] == 0x88);

  const std::vector<float> zeros(32, 0.0f);
  auto z8 = quantize(GgmlType::q8_0, zeros);
  for (uint8_t v : z8) CHECK(v == 0);
  auto z4 = quantize(GgmlType::q4_0, zeros);
  CHECK(u16(z4.data()) == 0x8000);  // d = 0 / -8 = -0.0, as numpy computes it
  for (int j = 2; j < 18; ++j) CHECK(z4[j] == 0x88);

  CHECK_THROWS_AS(quantize(GgmlType::q8_0, std::vector<float>(33, 1.0f)), qlora::UserError);
  CHECK_THROWS_AS(quantize(GgmlType::q4_1, std::vector<float>(32, 1.0f)), qlora::UserError);
}

TEST_CASE("gguf export: f16 and bf16 round to nearest even", "[gguf_export]") {
  const float one_half_ulp16 = 1.0f + std::ldexp(1.0f, -11), three_half_ulp16 = 1.0f + 3 * std::ldexp(1.0f, -11);
  auto h = quantize(GgmlType::f16, {one_half_ulp16, three_half_ulp16, 65520.0f, -0.0f});
  CHECK(u16(h.data()) == 0x3C00);
  CHECK(u16(h.data() + 2) == 0x3C02);
  CHECK(u16(h.data() + 4) == 0x7C00);  // rounds to inf, as numpy
  CHECK(u16(h.data() + 6) == 0x8000);
  const float one_half_ulpb = 1.0f + std::ldexp(1.0f, -8), three_half_ulpb = 1.0f + 3 * std::ldexp(1.0f, -8);
  auto bf = quantize(GgmlType::bf16, {one_half_ulpb, three_half_ulpb, std::nanf(""), -2.0f});
  CHECK(u16(bf.data()) == 0x3F80);
  CHECK(u16(bf.data() + 2) == 0x3F82);
  CHECK((u16(bf.data() + 4) & 0x7FC0) == 0x7FC0);  // NaN stays a (quiet) NaN
  CHECK(u16(bf.data() + 6) == 0xC000);
}

TEST_CASE("gguf export: quantize then dequantize stays within the quantization error", "[gguf_export]") {
  const at::Tensor x = at::randn({8, 256}) * 3;
  for (const GgmlType t : {GgmlType::q8_0, GgmlType::q4_0, GgmlType::f16, GgmlType::bf16, GgmlType::f32}) {
    CAPTURE(qlora::ggml_type_name(t));
    const std::string bytes = qlora::ggml_quantize_tensor(x, t);
    at::Tensor back = at::empty({8, 256});
    qlora::ggml_dequantize_row(t, bytes.data(), x.numel(), back.data_ptr<float>());
    const at::Tensor amax = x.reshape({-1, 32}).abs().amax(1, true);
    const at::Tensor err = (back - x).reshape({-1, 32}).abs();
    // q8_0: half a step d = amax / 127, plus 127 times d's fp16 rounding (2^-11 d); q4_0: a full
    // step d = amax / 8 (the clipped 16 of -max) plus 7 times d's rounding; 16-bit: the dtype's
    // relative precision.
    const double bound = t == GgmlType::q8_0 ? (0.5 + 127.0 / 2048) / 127 : t == GgmlType::q4_0 ? (1.0 + 8.0 / 2048) / 8
                         : t == GgmlType::f32 ? 0.0 : 1.0 / 128;
    CHECK((err <= amax * bound * 1.0001 + 1e-7).all().item<bool>());
  }
}

TEST_CASE("gguf export: names and the q/k permutation invert the reader's", "[gguf_export]") {
  for (const std::string hf : {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                               "model.layers.0.input_layernorm.weight", "model.layers.12.post_attention_layernorm.weight",
                               "model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.bias",
                               "model.layers.7.self_attn.o_proj.weight", "model.layers.7.mlp.down_proj.weight"})
    CHECK(qlora::gguf_tensor_name_to_hf(qlora::hf_tensor_name_to_gguf(hf)) == hf);
  CHECK(qlora::hf_tensor_name_to_gguf("model.layers.0.self_attn.rotary_emb.inv_freq") == "");
  const at::Tensor w = at::arange(12 * 5, at::kFloat).reshape({12, 5});
  const at::Tensor p = qlora::gguf_permute_qk(w, 2);  // heads of 6 rows: 0..2 / 3..5 become pairs
  CHECK(at::equal(p.index({at::indexing::Slice(0, 6), 0}), at::tensor({0.f, 15.f, 5.f, 20.f, 10.f, 25.f})));
  CHECK_THROWS_AS(qlora::gguf_permute_qk(w, 5), qlora::UserError);
}

TEST_CASE("gguf export: write -> read back gives the merged tensors, metadata and logits", "[gguf_export]") {
  TempDir d("qlora_gguf_export");
  qlora::test::write_tiny_model(d / "base", {}, 21);
  qlora::test::write_tiny_adapter(d / "adapter", d / "base", 4, 8.0, kAll, 22);
  const qlora::HFConfig config = qlora::load_hf_config(d / "base");

  for (const GgmlType type : {GgmlType::f32, GgmlType::f16, GgmlType::bf16, GgmlType::q8_0, GgmlType::q4_0}) {
    CAPTURE(qlora::ggml_type_name(type));
    const fs::path out = d / ("m_" + qlora::ggml_type_name(type) + ".gguf");
    const qlora::NamedTensors merged = export_tiny(d / "base", d / "adapter", out, type);
    const qlora::GgufFile g(out);
    CHECK(g.get_string("general.architecture") == "llama");
    CHECK(g.get_int("general.file_type") == qlora::gguf_file_type(type));
    CHECK(g.get_int("general.quantization_version") == 2);
    CHECK(g.get_int("llama.block_count") == 2);
    CHECK(g.get_int("llama.embedding_length") == 64);
    CHECK(g.get_int("llama.feed_forward_length") == 96);
    CHECK(g.get_int("llama.attention.head_count") == 4);
    CHECK(g.get_int("llama.attention.head_count_kv") == 2);
    CHECK(g.get_int("llama.context_length") == 256);
    CHECK(g.get_int("llama.rope.dimension_count") == 16);
    CHECK(g.get_int("llama.vocab_size") == 100);
    CHECK(g.get_float("llama.attention.layer_norm_rms_epsilon") == static_cast<double>(1e-5f));
    CHECK(g.get_string("tokenizer.ggml.model") == "gpt2");
    CHECK(g.tensors().size() == merged.size());
    const qlora::HFConfig back = qlora::hf_config_from_gguf(g);
    CHECK(back.hidden_size == config.hidden_size);
    CHECK(back.num_key_value_heads == config.num_key_value_heads);
    CHECK(!back.tie_word_embeddings);

    for (const auto& [name, t] : merged) {
      CAPTURE(name);
      const at::Tensor got = qlora::gguf_llama_tensor(g, back, name);  // the permutation undone
      REQUIRE(got.sizes() == t.sizes());
      const qlora::GgufTensorInfo* info = g.find_tensor(qlora::hf_tensor_name_to_gguf(name));
      REQUIRE(info);
      if (t.dim() == 1 || type == GgmlType::f32) {
        CHECK(info->type == GgmlType::f32);
        CHECK(at::equal(got, t));
      } else if (type == GgmlType::f16 || type == GgmlType::bf16) {
        CHECK(at::equal(got, t.to(type == GgmlType::f16 ? at::kHalf : at::kBFloat16).to(at::kFloat)));
      } else {
        CHECK(info->type == type);
        const double bound = type == GgmlType::q8_0 ? (0.5 + 127.0 / 2048) / 127 : (1.0 + 8.0 / 2048) / 8;
        const at::Tensor amax = t.reshape({-1, 32}).abs().amax(1, true);
        CHECK(((got - t).reshape({-1, 32}).abs() <= amax * bound * 1.0001 + 1e-7).all().item<bool>());
      }
    }
    if (type == GgmlType::f32) {
      // llama.cpp-side view through our own loader: same logits as the merged safetensors.
      qlora::ModelLoadOptions o;
      o.load_in_4bit = false;
      o.compute_dtype = at::kFloat;
      qlora::MergeOptions mo;
      mo.dtype = at::kFloat;
      qlora::merge_checkpoint(d / "base", d / "adapter", d / "merged", mo);
      const at::Tensor a = logits_of(qlora::load_llama(out, o)), b = logits_of(qlora::load_llama(d / "merged", o));
      CHECK(at::allclose(a, b, 1e-6, 1e-6));
      const qlora::Tokenizer from_gguf = qlora::tokenizer_from_gguf(g), from_json = qlora::load_tokenizer(d / "base");
      CHECK(from_gguf.encode("abcab<|end|>cba") == from_json.encode("abcab<|end|>cba"));
      CHECK(from_gguf.bos_id() == 5);
      CHECK(g.get_string("tokenizer.chat_template") == "{{ x }}");
      CHECK(g.get_string_array("tokenizer.ggml.tokens")[99] == "[PAD99]");
    }
  }
}

TEST_CASE("gguf export: odd sizes fall back to f16; llama3 rope; tied; qwen2; a GGUF base", "[gguf_export]") {
  TempDir d("qlora_gguf_export");
  SECTION("rows not a multiple of 32, three heads, vocab 97") {
    qlora::test::TinyModel tm;
    tm.hidden = 96, tm.heads = 3, tm.kv_heads = 1, tm.intermediate = 100, tm.vocab = 97, tm.qkv_bias = true;
    qlora::test::write_tiny_model(d / "odd", tm, 31);
    const auto merged = export_tiny(d / "odd", {}, d / "odd.gguf", GgmlType::q8_0);
    const qlora::GgufFile g(d / "odd.gguf");
    CHECK(g.find_tensor("blk.0.ffn_down.weight")->type == GgmlType::f16);  // rows of 100
    CHECK(g.find_tensor("blk.0.ffn_up.weight")->type == GgmlType::q8_0);   // rows of 96
    CHECK(g.find_tensor("blk.0.attn_q.bias")->type == GgmlType::f32);
    CHECK(g.find_tensor("blk.0.attn_output.bias")->type == GgmlType::f32);
    const qlora::HFConfig c = qlora::hf_config_from_gguf(g);
    for (const auto& [name, t] : merged)
      if (t.dim() == 1) CHECK(at::equal(qlora::gguf_llama_tensor(g, c, name), t));
    qlora::ModelLoadOptions o;
    o.load_in_4bit = false;
    o.compute_dtype = at::kFloat;
    CHECK(qlora::load_llama(d / "odd.gguf", o).layers.size() == 2);
  }
  SECTION("llama3 rope scaling becomes rope_freqs.weight") {
    qlora::test::TinyModel tm;
    tm.rope_scaling = {{"rope_type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 1.0}, {"high_freq_factor", 4.0},
                       {"original_max_position_embeddings", 64}};
    qlora::test::write_tiny_model(d / "l3", tm, 32);
    export_tiny(d / "l3", {}, d / "l3.gguf", GgmlType::f16);
    const qlora::GgufFile g(d / "l3.gguf");
    REQUIRE(g.find_tensor("rope_freqs.weight"));
    CHECK(g.find_tensor("rope_freqs.weight")->type == GgmlType::f32);
    qlora::ModelLoadOptions o;
    o.load_in_4bit = false;
    o.compute_dtype = at::kFloat;
    const at::Tensor want = qlora::rope_params(qlora::load_hf_config(d / "l3")).inv_freq;
    const at::Tensor got = qlora::load_llama(d / "l3.gguf", o).inv_freq;
    CHECK(at::allclose(got, want, 1e-6, 0));
    const at::Tensor unscaled = at::pow(10000.0, at::arange(0, 16, 2, at::kFloat) / 16.0).reciprocal();
    CHECK(!at::allclose(got, unscaled, 1e-3, 0));  // the factors did scale the low frequencies
  }
  SECTION("tied embeddings: no output.weight") {
    qlora::test::TinyModel tm;
    tm.tied = true;
    qlora::test::write_tiny_model(d / "tied", tm, 33);
    export_tiny(d / "tied", {}, d / "tied.gguf", GgmlType::f32);
    const qlora::GgufFile g(d / "tied.gguf");
    CHECK(!g.find_tensor("output.weight"));
    CHECK(qlora::hf_config_from_gguf(g).tie_word_embeddings);
  }
  SECTION("qwen2: its own architecture, no permutation") {
    qlora::test::TinyModel tm;
    tm.model_type = "qwen2";
    tm.qkv_bias = true;
    const auto ts = qlora::test::write_tiny_model(d / "qw", tm, 34);
    export_tiny(d / "qw", {}, d / "qw.gguf", GgmlType::f32);
    const qlora::GgufFile g(d / "qw.gguf");
    CHECK(g.get_string("general.architecture") == "qwen2");
    CHECK(g.get_int("qwen2.block_count") == 2);
    CHECK(!g.contains("llama.block_count"));
    for (const auto& [name, t] : ts)
      if (name == "model.layers.1.self_attn.q_proj.weight" || name == "model.layers.0.self_attn.k_proj.bias")
        CHECK(at::equal(qlora::gguf_tensor_to_float(g, *g.find_tensor(qlora::hf_tensor_name_to_gguf(name))), t.to(at::kFloat)));
  }
  SECTION("a GGUF base: tokenizer keys carried through, tensors unchanged") {
    qlora::test::write_tiny_model(d / "b", {}, 35);
    export_tiny(d / "b", {}, d / "first.gguf", GgmlType::f32);
    export_tiny(d / "first.gguf", {}, d / "second.gguf", GgmlType::f32);
    const qlora::GgufFile a(d / "first.gguf"), b(d / "second.gguf");
    for (const auto& [k, v] : a.metadata())
      if (k.rfind("tokenizer.", 0) == 0) CHECK(b.contains(k));
    CHECK(b.get_string_array("tokenizer.ggml.tokens") == a.get_string_array("tokenizer.ggml.tokens"));
    CHECK(b.get_string("general.name") == a.get_string("general.name"));
    for (const auto& t : a.tensors()) {
      CAPTURE(t.name);
      REQUIRE(b.find_tensor(t.name));
      CHECK(at::equal(qlora::gguf_tensor_to_float(a, t), qlora::gguf_tensor_to_float(b, *b.find_tensor(t.name))));
    }
  }
}

TEST_CASE("gguf export: tokenizers from tokenizer.json encode the same after the round trip", "[gguf_export]") {
  const fs::path assets = fs::path(QLORA_SOURCE_DIR) / ".." / "shared" / "assets" / "tokenizers";
  if (!fs::exists(assets)) SKIP("tokenizer assets not present: " << assets.string());
  const std::vector<std::string> texts = {"Hello world", "  leading spaces and\ttabs\n\nnew lines", "3333 numbers 12,345.67",
                                          "naïve café — 日本語のテキスト 🦙", "<|begin_of_text|>special</s><s>", "don't won't I'm"};
  TempDir d("qlora_gguf_tok");
  for (const std::string name : {"gpt2", "llama3", "llama2"}) {
    CAPTURE(name);
    const qlora::Tokenizer ref = qlora::load_tokenizer(assets / name);
    qlora::GgufWriter w;
    qlora::add_gguf_tokenizer(w, assets / name, ref.vocab_size());
    w.write(d / (name + ".gguf"));
    const qlora::Tokenizer got = qlora::tokenizer_from_gguf(qlora::GgufFile(d / (name + ".gguf")));
    CHECK(got.vocab_size() == ref.vocab_size());
    CHECK(got.bos_id() == ref.bos_id());
    CHECK(got.eos_id() == ref.eos_id());
    CHECK(got.adds_bos() == ref.adds_bos());
    for (const auto& s : texts) {
      CAPTURE(s);
      CHECK(got.encode(s) == ref.encode(s));
    }
  }
}

TEST_CASE("gguf export: the qlora binary (gguf, safetensors, and user errors with exit status 2)", "[gguf_export]") {
  TempDir d("qlora_gguf_cli");
  qlora::test::write_tiny_model(d / "base", {}, 41);
  qlora::test::write_tiny_adapter(d / "adapter", d / "base", 4, 8.0, kAll, 42);
  const std::string base = (d / "base").string(), adapter = (d / "adapter").string();
  auto r = qlora::test::run_qlora("export --format gguf " + base + " --adapter " + adapter + " --out " +
                                  (d / "m.gguf").string() + " --type q4_0");
  INFO(r.output);
  CHECK(r.status == 0);
  CHECK(qlora::GgufFile(d / "m.gguf").get_int("general.file_type") == 2);
  r = qlora::test::run_qlora("export --format safetensors " + base + " --adapter " + adapter + " --out " + (d / "st").string() +
                             " --dtype fp16");
  CHECK(r.status == 0);
  CHECK(qlora::load_hf_config(d / "st").torch_dtype == "float16");

  qlora::test::expect_user_error("export --format gguf " + base + " --out " + (d / "x.gguf").string() + " --type q5_k",
                    "--type: expected f16, bf16, q8_0, q4_0 or f32, found 'q5_k'");
  qlora::test::expect_user_error("export --format gguf " + base + " --adapter " + (d / "none").string() + " --out " + (d / "x.gguf").string(),
                    "adapter directory does not exist");
  qlora::test::expect_user_error("export --format gguf " + base + " --out " + (d / "x.gguf").string() + " --dtype bf16", "--dtype does not apply");
  qlora::test::expect_user_error("export --format safetensors " + base + " --out " + (d / "st").string(), "not empty");
  qlora::test::expect_user_error("export --format safetensors " + base + " --out " + (d / "y").string() + " --dtype int4",
                    "expected bf16, fp16 or fp32, found 'int4'");
  qlora::test::expect_user_error("export --format onnx " + base + " --out " + (d / "y").string(), "--format");
  CHECK(!fs::exists(d / "x.gguf"));
}
