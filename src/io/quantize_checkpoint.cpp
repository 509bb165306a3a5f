// quantize_checkpoint: a 16-bit Hugging Face checkpoint -> a bitsandbytes 4-bit (NF4) one, the
// core of `qlora quantize`. Linear weights of the decoder layers become bnb-4bit entries; every
// other tensor (embeddings, norms, lm_head, biases) is copied byte for byte.
#include <regex>
#include <set>
#include <fstream>
#include <sstream>

#include "qlora/bnb4bit.h"
#include "qlora/error.h"
#include "qlora/hf_config.h"
#include "qlora/log.h"

namespace qlora {
namespace fs = std::filesystem;

namespace {

const std::regex& linear_re() {
  // model.layers.<i>.self_attn.q_proj.weight etc.; the prefix varies between model classes
  // ("model." for *ForCausalLM, none for the bare model).
  static const std::regex re(R"(^(.*\.)?layers\.(\d+)\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$)");
  return re;
}

int64_t layer_of(const std::string& name) {
  std::smatch m;
  return std::regex_match(name, m, linear_re()) ? std::stoll(m[2].str()) : -1;
}

// Files that travel with a model besides its weights and config.json.
bool is_companion_file(const std::string& f) {
  static const std::set<std::string> names = {"generation_config.json", "special_tokens_map.json", "added_tokens.json",
                                              "vocab.json", "merges.txt", "chat_template.json", "chat_template.jinja"};
  return names.count(f) || f.rfind("tokenizer", 0) == 0;
}

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) throw UserError(p.string() + ": cannot open");
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

bool dir_is_empty(const fs::path& p) { return fs::directory_iterator(p) == fs::directory_iterator(); }


}  // namespace

bool is_quantizable_linear_weight(const std::string& name) { return std::regex_match(name, linear_re()); }

QuantizeSummary quantize_checkpoint(const fs::path& in_dir, const fs::path& out_dir, const QuantizeOptions& opt) {
  if (!(opt.blocksize >= 32 && opt.blocksize <= 4096 && (opt.blocksize & (opt.blocksize - 1)) == 0))
    throw UserError("qlora quantize: --blocksize: expected a power of two in 32..4096, found " + std::to_string(opt.blocksize));
  if (!fs::exists(in_dir)) throw UserError(in_dir.string() + ": input directory does not exist");
  if (!fs::is_directory(in_dir)) throw UserError(in_dir.string() + ": expected a checkpoint directory, found a file");

  const HFConfig config = load_hf_config(in_dir);
  if (config.quantization_config)
    throw UserError((in_dir / "config.json").string() + ": quantization_config: expected none (a 16-bit checkpoint), found quant_method " +
                    config.quantization_config->quant_method + " (already quantized)");
  const SafetensorsCheckpoint ckpt(in_dir);

  // Plan before writing anything: what is quantized, in which dtype.
  std::map<int64_t, int64_t> layers;  // layer -> number of linear weights in it
  at::ScalarType weight_dtype = at::ScalarType::Undefined;
  for (const auto& name : ckpt.names()) {
    if (name.find(".quant_state.") != std::string::npos)
      throw UserError(ckpt.file_of(name).path().string() + ": tensor '" + name + "': expected a 16-bit checkpoint, found bnb quantization state (already quantized)");
    if (!is_quantizable_linear_weight(name)) continue;
    const SafetensorsEntry& e = ckpt.entry(name);
    const std::string where = ckpt.file_of(name).path().string() + ": tensor '" + name + "'";
    if (e.shape.size() != 2) throw UserError(where + ": expected a 2-D linear weight, found " + std::to_string(e.shape.size()) + " dimensions");
    if (e.scalar_type != at::kBFloat16 && e.scalar_type != at::kHalf && e.scalar_type != at::kFloat)
      throw UserError(where + ": expected dtype BF16, F16 or F32, found " + e.dtype);
    if (weight_dtype == at::ScalarType::Undefined) weight_dtype = e.scalar_type;
    ++layers[layer_of(name)];
  }
  if (layers.empty())
    throw UserError(in_dir.string() + ": found no linear layer weights to quantize (expected names like model.layers.0.self_attn.q_proj.weight)");
  const std::string compute_dtype = torch_dtype_name(weight_dtype);

  // Output directory: never write over something the user did not ask us to.
  if (out_dir.empty()) throw UserError("qlora quantize: expected an OUT_DIR argument");
  if (fs::exists(out_dir) && fs::equivalent(in_dir, out_dir))
    throw UserError(out_dir.string() + ": the output directory is the input directory");
  if (fs::exists(out_dir)) {
    if (!fs::is_directory(out_dir)) throw UserError(out_dir.string() + ": expected an output directory, found a file");
    if (!dir_is_empty(out_dir) && !opt.force)
      throw UserError(out_dir.string() + ": output directory is not empty (pass --force to write into it)");
  } else {
    fs::create_directories(out_dir);
  }

  QuantizeSummary sum;
  std::map<std::string, std::string> weight_map;
  int64_t total_size = 0;
  const int64_t nlayers = static_cast<int64_t>(layers.size());
  int64_t layers_done = 0;
  std::map<int64_t, int64_t> layer_done;
  for (const auto& file : ckpt.files()) {
    const std::string out_name = ckpt.sharded() ? file->path().filename().string() : "model.safetensors";
    // Layer by layer within the file, so the progress log reads in model order.
    std::vector<std::string> names;
    for (const auto& n : file->names())
      if (ckpt.contains(n) && &ckpt.file_of(n) == file.get()) names.push_back(n);
    std::stable_sort(names.begin(), names.end(), [](const std::string& a, const std::string& b) { return layer_of(a) < layer_of(b); });
    NamedTensors out;  // views into the input map, plus this file's NF4 entries (~1/4 of its 16-bit bytes)
    for (const auto& name : names) {
      const at::Tensor v = file->view(name);
      sum.bytes_in += v.numel() * static_cast<int64_t>(v.element_size());
      if (!is_quantizable_linear_weight(name)) {
        out.emplace_back(name, v);
        ++sum.kept;
        continue;
      }
      // One weight at a time: nf4_quantize reads the 16-bit view straight from the mapping.
      const NF4Tensor q = nf4_quantize(v, opt.blocksize, opt.double_quant);
      for (auto& entry : bnb4bit_entries(name, q)) out.push_back(std::move(entry));
      ++sum.quantized;
      const int64_t layer = layer_of(name);
      // A layer is reported once all its linear weights are done (they may span shards).
      if (++layer_done[layer] == layers[layer])
        log_info(cat("quantize: layer ", layer, " (", ++layers_done, "/", nlayers, "): ", layers[layer],
                     " linear weights -> NF4 (blocksize ", opt.blocksize, opt.double_quant ? ", double quant)" : ", no double quant)"));
    }
    for (const auto& [n, t] : out) {
      weight_map[n] = out_name;
      const int64_t b = t.numel() * static_cast<int64_t>(t.element_size());
      total_size += b;
      sum.bytes_out += b;
    }
    save_safetensors(out_dir / out_name, out);
    sum.files_written.push_back(out_name);
    log_info(cat("quantize: wrote ", (out_dir / out_name).string(), " (", out.size(), " tensors)"));
  }
  if (ckpt.sharded()) {
    save_safetensors_index(out_dir / "model.safetensors.index.json", total_size, weight_map);
    sum.files_written.push_back("model.safetensors.index.json");
  }

  // config.json: the original keys as they were, plus transformers' quantization_config.
  nlohmann::json cj = config.raw;
  cj["quantization_config"] = bnb_quantization_config_to_json(bnb_nf4_quantization_config(opt.double_quant, compute_dtype));
  write_file_atomic(out_dir / "config.json", cj.dump(2) + "\n");
  sum.files_written.push_back("config.json");

  for (const std::string& f : copy_companion_files(in_dir, out_dir)) sum.files_written.push_back(f);

  // With --force, weight files of an earlier run that this run did not write would contradict
  // the new index (or shadow model.safetensors): remove those, and only those.
  if (opt.force) {
    const std::set<std::string> written(sum.files_written.begin(), sum.files_written.end());
    for (const auto& de : fs::directory_iterator(out_dir)) {
      const std::string f = de.path().filename().string();
      // Only our own weight-file names: other .safetensors (an adapter, say) are the user's.
      static const std::regex ours(R"(^model(-\d{5}-of-\d{5})?\.safetensors$|^model\.safetensors\.index\.json$)");
      const bool weights = std::regex_match(f, ours);
      if (de.is_regular_file() && weights && !written.count(f)) {
        log_warn(cat("quantize: removing stale ", de.path().string(), " from an earlier run (--force)"));
        fs::remove(de.path());
      }
    }
  }
  log_info(cat("quantize: ", sum.quantized, " weights quantized, ", sum.kept, " tensors kept; ", fixed(static_cast<double>(sum.bytes_in) / 1e6, 1), " MB", " -> ", fixed(static_cast<double>(sum.bytes_out) / 1e6, 1), " MB"));
  return sum;
}

std::vector<std::string> copy_companion_files(const fs::path& from_dir, const fs::path& to_dir) {
  std::vector<std::string> copied;
  for (const auto& de : fs::directory_iterator(from_dir)) {
    const std::string f = de.path().filename().string();
    if (!de.is_regular_file() || !is_companion_file(f)) continue;
    write_file_atomic(to_dir / f, read_file(de.path()));
    copied.push_back(f);
  }
  return copied;
}

}  // namespace qlora
