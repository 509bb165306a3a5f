// LoRA merge: a base model plus a PEFT adapter -> one Hugging Face checkpoint with the adapter folded
// into the projection weights (W' = deq(W) + scale * B A in fp32), the core of `qlora merge` and of
// `qlora export --format safetensors`. The writer makes one tensor at a time and plans the shards
// from the shapes up front, so memory stays at the base model plus one shard.
#include "qlora/merge.h"

#include <unistd.h>

#include <ATen/core/grad_mode.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <sstream>

#include "qlora/bnb4bit.h"
#include "qlora/error.h"
#include "qlora/log.h"
#include "qlora/nf4.h"

namespace qlora {

namespace fs = std::filesystem;

namespace {


// An absolute path without a trailing separator, so that parent_path/filename name the folder.
fs::path clean_dir(const fs::path& p) {
  fs::path c = fs::absolute(p).lexically_normal();
  if (c.filename().empty()) c = c.parent_path();
  return c;
}

int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// Bytes a tensor will take in the output: 16/32-bit data, or the bnb-4bit entries of an NF4
// weight (packed nibbles, uint8 absmax, quant_map, nested absmax and map, the quant_state JSON).
int64_t planned_bytes(const MergedTensor& t, at::ScalarType dtype, bool nf4) {
  const int64_t n = numel_of(t.shape);
  if (!nf4 || !t.linear_weight) return n * static_cast<int64_t>(c10::elementSize(dtype));
  const int64_t nb = nf4_num_blocks(n, 64);
  return (n + 1) / 2 + nb + 16 * 4 + nf4_num_blocks(nb, 256) * 4 + 256 * 4 + 256;
}

// Moves the finished staging folder's files into out_dir (or the folder itself when out_dir does
// not exist yet: one rename).
void publish(const fs::path& staging, const fs::path& out_dir, const std::vector<std::string>& files, bool force) {
  if (!fs::exists(out_dir)) {
    fs::rename(staging, out_dir);
    return;
  }
  for (const auto& f : files) fs::rename(staging / f, out_dir / f);
  fs::remove_all(staging);
  if (!force) return;
  // Weight files of an earlier run that this one did not write would contradict the new index
  // (or shadow model.safetensors): remove those, and only our own names.
  static const std::regex ours(R"(^model(-\d{5}-of-\d{5})?\.safetensors$|^model\.safetensors\.index\.json$)");
  const std::set<std::string> written(files.begin(), files.end());
  for (const auto& de : fs::directory_iterator(out_dir)) {
    const std::string f = de.path().filename().string();
    if (de.is_regular_file() && std::regex_match(f, ours) && !written.count(f)) {
      log_warn(cat("merge: removing stale ", de.path().string(), " from an earlier run (--force)"));
      fs::remove(de.path());
    }
  }
}

}  // namespace

bool is_gguf_path(const fs::path& path) { return fs::is_regular_file(path) && path.extension() == ".gguf"; }

LlamaWeights load_merge_base(const fs::path& base, MergeBase mode) {
  if (!fs::exists(base))
    throw UserError(base.string() + ": base model does not exist (expected a Hugging Face model directory or a .gguf file)");
  ModelLoadOptions o;
  o.device = at::kCPU;
  o.load_in_4bit = mode == MergeBase::nf4;
  o.double_quant = true;   // training's defaults (bnb_4bit_use_double_quant, blocksize 64)
  o.blocksize = 64;
  o.compute_dtype = at::kFloat;
  if (!is_gguf_path(base)) {
    if (!fs::is_directory(base))
      throw UserError(base.string() + ": expected a Hugging Face model directory or a .gguf file");
    const HFConfig c = load_hf_config(base);
    const bool bnb = c.quantization_config.has_value();
    if (bnb && mode == MergeBase::base_16bit)
      throw UserError(base.string() + ": --base-16bit: the base is a bnb-4bit checkpoint, which has no 16-bit weights "
                                      "(without --base-16bit the adapter is merged into its dequantized NF4 weights)");
    if (bnb) o.load_in_4bit = true;  // keep its NF4 bytes as they are; dequantized in fp32 at merge
    if (c.torch_dtype == "bfloat16" || c.torch_dtype == "float16" || c.torch_dtype == "float32")
      o.compute_dtype = torch_dtype_from_name(c.torch_dtype, (base / "config.json").string());
  }
  return load_llama(base, o);
}

at::Tensor merged_linear_weight(const LinearWeight& base, const LoraLinear* lora) {
  at::NoGradGuard no_grad;
  const at::Tensor w = base.nf4 ? nf4_dequantize(*base.nf4, at::kFloat) : base.dense.to(at::kCPU).to(at::kFloat);
  if (!lora) return w.contiguous();
  const at::Tensor B = lora->B.detach().to(at::kCPU).to(at::kFloat);
  const at::Tensor A = lora->A.detach().to(at::kCPU).to(at::kFloat);
  if (B.dim() != 2 || A.dim() != 2 || B.size(0) != w.size(0) || A.size(1) != w.size(1) || B.size(1) != A.size(0))
    throw UserError("merge: LoRA B " + std::to_string(B.size(0)) + "x" + std::to_string(B.size(1)) + " and A " +
                    std::to_string(A.size(0)) + "x" + std::to_string(A.size(1)) + " do not fit a weight of " +
                    std::to_string(w.size(0)) + "x" + std::to_string(w.size(1)));
  // PEFT: delta = (B @ A) * scaling; weight += delta. Out of place: w may share the model's storage.
  const at::Tensor delta = at::matmul(B, A) * lora->scale;
  return (w + delta).contiguous();
}

std::vector<MergedTensor> merged_tensors(const LlamaWeights& model, const LoraModel* lora) {
  if (lora && lora->layers.size() != model.layers.size())
    throw UserError("merge: the adapter has " + std::to_string(lora->layers.size()) + " layers, the model " +
                    std::to_string(model.layers.size()));
  std::vector<MergedTensor> out;
  auto plain = [&](const std::string& name, const at::Tensor& t) {
    out.push_back({name, t.sizes().vec(), false, [t] { return t.detach().to(at::kCPU).to(at::kFloat).contiguous(); }});
  };
  plain("model.embed_tokens.weight", model.embed_tokens);
  for (size_t i = 0; i < model.layers.size(); ++i) {
    const DecoderLayerWeights& layer = model.layers[i];
    const std::string p = "model.layers." + std::to_string(i) + ".";
    for (const std::string& proj : lora_projection_names()) {
      const LinearWeight& w = base_projection(layer, proj);
      const LoraLinear* l = nullptr;
      if (lora) {
        const auto& opt = lora_projection(lora->layers[i], proj);
        if (opt) l = &*opt;
      }
      const std::string name = p + (proj == "gate_proj" || proj == "up_proj" || proj == "down_proj" ? "mlp." : "self_attn.") + proj;
      out.push_back({name + ".weight", {w.out_features, w.in_features}, true, [&w, l] { return merged_linear_weight(w, l); }});
      if (w.bias.defined()) plain(name + ".bias", w.bias);
    }
    plain(p + "input_layernorm.weight", layer.input_layernorm);
    plain(p + "post_attention_layernorm.weight", layer.post_attention_layernorm);
  }
  plain("model.norm.weight", model.norm);
  if (!model.config.tie_word_embeddings) plain("lm_head.weight", model.lm_head);
  return out;
}

NamedTensors merge_lora(const LlamaWeights& model, const LoraModel* lora, at::ScalarType dtype) {
  NamedTensors out;
  for (const MergedTensor& t : merged_tensors(model, lora)) out.emplace_back(t.name, t.make().to(dtype));
  return out;
}

at::ScalarType merge_dtype_from_name(const std::string& name, const std::string& option) {
  if (name == "bf16" || name == "bfloat16") return at::kBFloat16;
  if (name == "fp16" || name == "float16" || name == "f16") return at::kHalf;
  if (name == "fp32" || name == "float32" || name == "f32") return at::kFloat;
  throw UserError(option + ": expected bf16, fp16 or fp32, found '" + name + "'");
}

HFConfig merged_config(const HFConfig& base, at::ScalarType dtype, bool requantized) {
  HFConfig c = base;
  c.torch_dtype = torch_dtype_name(dtype);
  if (requantized) c.quantization_config = bnb_nf4_quantization_config(true, c.torch_dtype);
  else c.quantization_config.reset();
  return c;
}

void check_output_dir(const fs::path& out_dir, bool force, const std::string& command) {
  if (out_dir.empty()) throw UserError(command + ": expected --out DIR");
  if (!fs::exists(out_dir)) return;
  if (!fs::is_directory(out_dir)) throw UserError(out_dir.string() + ": expected an output directory, found a file");
  if (fs::directory_iterator(out_dir) != fs::directory_iterator() && !force)
    throw UserError(out_dir.string() + ": output directory is not empty (pass --force to write into it)");
}

MergeSummary save_merged_checkpoint(const LlamaWeights& model, const LoraModel* lora, const fs::path& base,
                                    const fs::path& out_dir_arg, const MergeOptions& opt) {
  at::NoGradGuard no_grad;
  const auto t0 = std::chrono::steady_clock::now();
  check_output_dir(out_dir_arg, opt.force, "qlora merge");
  if (opt.dtype != at::kBFloat16 && opt.dtype != at::kHalf && opt.dtype != at::kFloat)
    throw UserError(std::string("merge: output dtype must be bfloat16, float16 or float32, found ") + c10::toString(opt.dtype));
  if (opt.max_shard_bytes <= 0) throw UserError("merge: max_shard_bytes must be positive");
  const fs::path out_dir = clean_dir(out_dir_arg);
  if (fs::exists(out_dir) && fs::exists(base) && fs::equivalent(base, out_dir))
    throw UserError(out_dir.string() + ": the output directory is the base model's directory");

  const std::vector<MergedTensor> tensors = merged_tensors(model, lora);
  // Shards planned from the shapes, in safetensors' name order (what the writer sorts by), a new
  // shard when the next tensor would overflow this one (as transformers' shard_checkpoint).
  std::vector<size_t> order(tensors.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return tensors[a].name < tensors[b].name; });
  std::vector<std::vector<size_t>> shards(1);
  int64_t in_shard = 0;
  for (size_t i : order) {
    const int64_t b = planned_bytes(tensors[i], opt.dtype, opt.requantize_nf4);
    if (!shards.back().empty() && in_shard + b > opt.max_shard_bytes) {
      shards.emplace_back();
      in_shard = 0;
    }
    shards.back().push_back(i);
    in_shard += b;
  }
  const size_t n_shards = shards.size();
  auto shard_name = [&](size_t k) {
    if (n_shards == 1) return std::string("model.safetensors");
    char buf[64];
    std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", k + 1, n_shards);
    return std::string(buf);
  };

  fs::create_directories(out_dir.parent_path());
  const fs::path staging = out_dir.parent_path() / ("." + out_dir.filename().string() + ".qlora-partial-" + std::to_string(::getpid()));
  fs::remove_all(staging);
  fs::create_directories(staging);
  MergeSummary sum;
  try {
    std::map<std::string, std::string> weight_map;
    int64_t merged_layers = 0;
    if (lora)
      for (const LoraLayer& l : lora->layers)
        for (const std::string& proj : lora_projection_names()) merged_layers += lora_projection(l, proj).has_value();
    sum.merged = merged_layers;
    for (size_t k = 0; k < n_shards; ++k) {
      const std::string fname = shard_name(k);
      NamedTensors out;
      for (size_t i : shards[k]) {
        const MergedTensor& t = tensors[i];
        at::Tensor v = t.make().to(opt.dtype);
        ++sum.tensors;
        if (opt.requantize_nf4 && t.linear_weight) {
          for (auto& e : bnb4bit_entries(t.name, nf4_quantize(v, 64, true))) out.push_back(std::move(e));
        } else {
          out.emplace_back(t.name, std::move(v));
        }
      }
      for (const auto& [n, v] : out) {
        weight_map[n] = fname;
        sum.bytes += v.numel() * static_cast<int64_t>(v.element_size());
      }
      save_safetensors(staging / fname, out);
      sum.files_written.push_back(fname);
      log_info(cat("merge: wrote ", fname, " (", out.size(), " tensors)"));
    }
    if (n_shards > 1) {
      save_safetensors_index(staging / "model.safetensors.index.json", sum.bytes, weight_map);
      sum.files_written.push_back("model.safetensors.index.json");
    }
    save_hf_config(staging / "config.json", merged_config(model.config, opt.dtype, opt.requantize_nf4));
    sum.files_written.push_back("config.json");
    if (fs::is_directory(base)) {
      for (const std::string& f : copy_companion_files(base, staging)) sum.files_written.push_back(f);
    } else {
      log_warn(cat("merge: the base is a GGUF file: no tokenizer files are written to ", out_dir.string(),
                   " (transformers needs them next to the weights)"));
    }
    publish(staging, out_dir, sum.files_written, opt.force);
  } catch (...) {
    std::error_code ec;
    fs::remove_all(staging, ec);
    throw;
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  log_info(cat("merge: ", sum.merged, " adapted projections merged, ", sum.tensors, " tensors (",
               opt.requantize_nf4 ? "NF4 + " : "", torch_dtype_name(opt.dtype), ", ", fixed(static_cast<double>(sum.bytes) / 1e6, 1), " MB", ") in ", n_shards,
               n_shards == 1 ? " file" : " shards", " -> ", out_dir.string(), " in ", secs, " s"));
  return sum;
}

void check_adapter_dir(const fs::path& adapter) {
  if (adapter.empty()) throw UserError("expected --adapter DIR (a PEFT LoRA adapter)");
  if (!fs::is_directory(adapter))
    throw UserError(adapter.string() + ": adapter directory does not exist (expected adapter_config.json + adapter_model.safetensors)");
  if (!fs::exists(adapter / "adapter_config.json"))
    throw UserError(adapter.string() + ": adapter_config.json is missing (expected a PEFT LoRA adapter directory)");
}

MergeSummary merge_checkpoint(const fs::path& base, const fs::path& adapter, const fs::path& out_dir, const MergeOptions& opt) {
  check_output_dir(out_dir, opt.force, "qlora merge");
  check_adapter_dir(adapter);
  const LlamaWeights model = load_merge_base(base, opt.base_16bit ? MergeBase::base_16bit : MergeBase::nf4);
  const LoraModel lora = load_peft_adapter(adapter, model, at::kCPU);
  log_info(cat("merge: adapter ", adapter.string(), " (r ", lora.options.r, ", scale ", lora_scale(lora.options), ") into ",
               base.string(), opt.base_16bit ? " (16-bit base weights)" : " (NF4-dequantized base weights, as trained)"));
  return save_merged_checkpoint(model, &lora, base, out_dir, opt);
}

}  // namespace qlora
