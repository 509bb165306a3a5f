// GGUF export of a Llama-family model (+ merged LoRA): the metadata, tensor names, rotary row
// permutation and tensor types llama.cpp's convert_hf_to_gguf.py writes (facts listed in
// include/qlora/gguf_export.h); the bytes come from qlora/ggml_quants.h's quantizers and the file
// from GgufWriter (atomic).
#include "qlora/gguf_export.h"

#include <ATen/core/grad_mode.h>

#include <chrono>
#include <cmath>
#include <map>

#include "qlora/error.h"
#include "qlora/ggml_quants.h"
#include "qlora/log.h"
#include "qlora/merge.h"

namespace qlora {

namespace fs = std::filesystem;

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The model's name for general.name: a GGUF base's own general.name, else the folder's name.
std::string base_name(const fs::path& base) {
  if (is_gguf_path(base)) {
    const GgufFile g(base);
    if (g.contains("general.name") && g.at("general.name").type == GgufType::string) return g.get_string("general.name");
    return base.stem().string();
  }
  fs::path p = fs::absolute(base).lexically_normal();
  if (p.filename().empty()) p = p.parent_path();
  return p.filename().string();
}

}  // namespace

GgmlType gguf_export_type_from_name(const std::string& name) {
  if (name == "f32") return GgmlType::f32;
  if (name == "f16") return GgmlType::f16;
  if (name == "bf16") return GgmlType::bf16;
  if (name == "q8_0") return GgmlType::q8_0;
  if (name == "q4_0") return GgmlType::q4_0;
  throw UserError("--type: expected f16, bf16, q8_0, q4_0 or f32, found '" + name + "'");
}

uint32_t gguf_file_type(GgmlType t) {
  switch (t) {
    case GgmlType::f32: return 0;
    case GgmlType::f16: return 1;
    case GgmlType::q4_0: return 2;
    case GgmlType::q8_0: return 7;
    case GgmlType::bf16: return 32;
    default: throw UserError("gguf export: no llama.cpp file type for ggml type " + ggml_type_name(t));
  }
}

std::string gguf_architecture(const HFConfig& c) {
  // llama.cpp runs Mistral (7B and later, without a sliding window in its llama graph) as "llama".
  if (c.model_type == "llama" || c.model_type == "mistral") return "llama";
  if (c.model_type == "qwen2") return "qwen2";
  throw UserError("gguf export: model_type '" + c.model_type + "' is not supported (supported: llama, mistral, qwen2)");
}

at::Tensor gguf_permute_qk(const at::Tensor& w, int64_t n_head) {
  const int64_t rows = w.size(0);
  if (n_head <= 0 || rows % (2 * n_head) != 0)
    throw UserError("gguf export: " + std::to_string(rows) + " q/k rows cannot be split into " + std::to_string(n_head) +
                    " heads of rotary pairs");
  std::vector<int64_t> split = {n_head, 2, rows / n_head / 2};
  for (int64_t d = 1; d < w.dim(); ++d) split.push_back(w.size(d));
  return w.reshape(split).transpose(1, 2).contiguous().reshape(w.sizes());
}

GgmlType gguf_tensor_type(const std::vector<int64_t>& shape, GgmlType requested) {
  if (shape.size() <= 1) return GgmlType::f32;
  if (shape.back() % ggml_block_size(requested) != 0) return GgmlType::f16;
  return requested;
}

at::Tensor gguf_llama3_rope_factors(const HFConfig& c) {
  const RopeScaling& rs = c.rope_scaling;
  if (rs.rope_type != "llama3") return at::Tensor();
  const int64_t dim = c.head_dim;
  // The converter: freqs = 1 / base ** (arange(0, dim, 2) / dim) in fp32; per frequency, by its
  // wavelength 2 pi / freq: 1 above the high-frequency bound, `factor` below the low one, and a
  // smooth blend between, 1 / ((1 - smooth) / factor + smooth), every step an fp32 operation.
  const at::Tensor freqs = at::pow(c.rope_theta, at::arange(0, dim, 2, at::kFloat) / static_cast<double>(dim)).reciprocal();
  const float old_ctx = static_cast<float>(rs.original_max_position_embeddings);
  const double low_wavelen = static_cast<double>(rs.original_max_position_embeddings) / rs.low_freq_factor;
  const double high_wavelen = static_cast<double>(rs.original_max_position_embeddings) / rs.high_freq_factor;
  at::Tensor out = at::empty({freqs.numel()}, at::kFloat);
  const float* f = freqs.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < freqs.numel(); ++i) {
    const float wavelen = (1.0f / f[i]) * static_cast<float>(2.0 * M_PI);
    if (wavelen < static_cast<float>(high_wavelen)) {
      o[i] = 1.0f;
    } else if (wavelen > static_cast<float>(low_wavelen)) {
      o[i] = static_cast<float>(rs.factor);
    } else {
      const float smooth = ((1.0f / wavelen) * old_ctx - static_cast<float>(rs.low_freq_factor)) /
                           static_cast<float>(rs.high_freq_factor - rs.low_freq_factor);
      o[i] = 1.0f / ((1.0f - smooth) / static_cast<float>(rs.factor) + smooth);
    }
  }
  return out;
}

void add_gguf_model_metadata(GgufWriter& w, const HFConfig& c, const std::string& name, GgmlType type) {
  const std::string arch = gguf_architecture(c);
  auto u32 = [](int64_t v) { return GgufValue::make_uint32(static_cast<uint32_t>(v)); };
  w.set("general.architecture", GgufValue::make_string(arch));
  w.set("general.type", GgufValue::make_string("model"));
  w.set("general.name", GgufValue::make_string(name));
  w.set(arch + ".block_count", u32(c.num_hidden_layers));
  w.set(arch + ".context_length", u32(c.max_position_embeddings));
  w.set(arch + ".embedding_length", u32(c.hidden_size));
  w.set(arch + ".feed_forward_length", u32(c.intermediate_size));
  w.set(arch + ".attention.head_count", u32(c.num_attention_heads));
  w.set(arch + ".attention.head_count_kv", u32(c.num_key_value_heads));
  w.set(arch + ".rope.freq_base", GgufValue::make_float32(static_cast<float>(c.rope_theta)));
  w.set(arch + ".attention.layer_norm_rms_epsilon", GgufValue::make_float32(static_cast<float>(c.rms_norm_eps)));
  // The converter writes key/value_length when config.json has head_dim; a head_dim that differs
  // from hidden / heads needs them whatever the file said.
  if ((c.raw.is_object() && c.raw.contains("head_dim") && !c.raw["head_dim"].is_null()) ||
      c.head_dim != c.hidden_size / c.num_attention_heads) {
    w.set(arch + ".attention.key_length", u32(c.head_dim));
    w.set(arch + ".attention.value_length", u32(c.head_dim));
  }
  w.set("general.file_type", GgufValue::make_uint32(gguf_file_type(type)));
  if (arch == "llama") {
    w.set(arch + ".vocab_size", u32(c.vocab_size));
    w.set(arch + ".rope.dimension_count", u32(c.head_dim));
  }
  const std::string& rt = c.rope_scaling.rope_type;
  if (rt == "linear") {
    w.set(arch + ".rope.scaling.type", GgufValue::make_string("linear"));
    w.set(arch + ".rope.scaling.factor", GgufValue::make_float32(static_cast<float>(c.rope_scaling.factor)));
  } else if (rt == "llama3") {
    if (arch != "llama")
      throw UserError("gguf export: rope_scaling llama3 is only written for the llama architecture (found " + c.model_type + ")");
  } else if (rt != "default") {
    throw UserError("gguf export: rope_scaling type '" + rt + "' is not supported (supported: default, linear, llama3)");
  }
  w.set("general.quantization_version", GgufValue::make_uint32(2));
}

GgufExportSummary export_gguf(const LlamaWeights& model, const LoraModel* lora, const fs::path& base, const fs::path& out,
                              const GgufExportOptions& opt) {
  at::NoGradGuard no_grad;
  const auto t0 = std::chrono::steady_clock::now();
  const HFConfig& c = model.config;
  gguf_file_type(opt.type);  // rejects types there is no llama.cpp file type for
  if (out.empty()) throw UserError("qlora export --format gguf: expected --out FILE.gguf");
  if (fs::is_directory(out)) throw UserError(out.string() + ": expected an output file (e.g. model.gguf), found a directory");

  GgufExportSummary sum;
  sum.architecture = gguf_architecture(c);
  const std::string name = !opt.name.empty() ? opt.name : base_name(base) + (lora ? "-lora-merged" : "");
  GgufWriter w;
  add_gguf_model_metadata(w, c, name, opt.type);
  add_gguf_tokenizer(w, base, c.vocab_size);

  auto add = [&](const std::string& gname, GgmlType type, const at::Tensor& x) {
    const std::string bytes = ggml_quantize_tensor(x, type, "gguf export: " + gname);
    std::vector<int64_t> dims(x.sizes().rbegin(), x.sizes().rend());
    w.add_tensor(gname, type, std::move(dims), bytes.data(), bytes.size());
    ++sum.tensors;
  };
  // The converter yields rope_freqs before the model's tensors.
  if (const at::Tensor rf = gguf_llama3_rope_factors(c); rf.defined()) add("rope_freqs.weight", GgmlType::f32, rf);

  for (const MergedTensor& t : merged_tensors(model, lora)) {
    const std::string gname = hf_tensor_name_to_gguf(t.name);
    if (gname.empty()) throw std::logic_error("gguf export: no llama.cpp name for " + t.name);
    at::Tensor x = t.make();
    if (sum.architecture == "llama") {
      const bool q = ends_with(t.name, "self_attn.q_proj.weight") || ends_with(t.name, "self_attn.q_proj.bias");
      const bool k = ends_with(t.name, "self_attn.k_proj.weight") || ends_with(t.name, "self_attn.k_proj.bias");
      if (q) x = gguf_permute_qk(x, c.num_attention_heads);
      if (k) x = gguf_permute_qk(x, c.num_key_value_heads);
    }
    const GgmlType type = gguf_tensor_type(t.shape, opt.type);
    if (t.shape.size() == 2 && type != opt.type) {
      ++sum.fallback_f16;
      log_info(cat("gguf export: ", gname, ": rows of ", t.shape[1], " are not a multiple of the ", ggml_type_name(opt.type),
                   " block (", ggml_block_size(opt.type), "): written as f16, as llama.cpp's converter does"));
    }
    add(gname, type, x);
  }

  if (out.has_parent_path()) fs::create_directories(out.parent_path());
  w.write(out);
  std::error_code ec;
  sum.bytes = fs::file_size(out, ec);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  log_info(cat("gguf export: ", out.string(), ": ", sum.architecture, ", ", sum.tensors, " tensors, ", ggml_type_name(opt.type),
               lora ? " (LoRA merged)" : "", ", ", static_cast<double>(sum.bytes) / 1e6, " MB in ", secs,
               " s; run it with: llama-cli -m ", out.string(), " -cnv"));
  return sum;
}

}  // namespace qlora
