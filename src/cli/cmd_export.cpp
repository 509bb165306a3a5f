// qlora export --format torchscript MODEL_DIR [--adapter DIR] --out FILE.pt [--seq N]: the logits
// forward (input_ids [1, N] -> fp32 logits [1, N, vocab]) of a base model plus an optional PEFT
// adapter, traced with the C++ JIT tracer and saved as a TorchScript module (the legacy format:
// TorchScript is deprecated as of PyTorch 2.11; torch.export / AOTInductor is the live path, see
// tests/compile/aoti_roundtrip.py). Weights are the module's buffers; NF4 weights stay NF4 and run
// as qlora::nf4_lora_linear, so a loader needs the qlora ops (Python: torch.ops.load_library(
// "libqlora_ops.so") before torch.jit.load). The trace is for one shape: [1, N].
// --format gguf and safetensors (the model with the adapter merged) are run by cmd_merge.cpp.
#include <ATen/ATen.h>
#include <torch/csrc/jit/api/module.h>
#ifdef QLORA_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>
#endif

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>

#include "cli/commands.h"
#include "qlora/error.h"
#include "qlora/export.h"
#include "qlora/hf_config.h"
#include "qlora/log.h"
#include "qlora/lora.h"
#include "qlora/model.h"
#include "qlora/trainer.h"

namespace qlora::cli {

namespace {

namespace fs = std::filesystem;

// Whether `model_dir` is a bitsandbytes 4-bit checkpoint (config.json's quantization_config).
bool is_bnb_4bit(const fs::path& model_dir) {
  std::error_code ec;
  if (!fs::is_directory(model_dir, ec)) return false;  // a .gguf file: never bnb
  const HFConfig c = load_hf_config(model_dir);
  return c.quantization_config && c.quantization_config->load_in_4bit;
}

at::ScalarType export_dtype(const std::string& name) {
  if (name == "float32" || name == "fp32") return at::kFloat;
  if (name == "bfloat16" || name == "bf16") return at::kBFloat16;
  if (name == "float16" || name == "fp16") return at::kHalf;
  throw UserError("qlora export: --dtype expected float32, bfloat16 or float16, found '" + name + "'");
}

}  // namespace

CommandFn add_export_command(CLI::App& app) {
  struct State {
    std::string format;
    std::string model_dir;
    std::string adapter;
    std::string out;
    std::string dtype = "float32";
    std::string device = "cpu";
    int64_t seq = 128;
    bool nf4 = false;
  };
  auto st = std::make_shared<State>();
  auto* sub = app.add_subcommand("export", "export a model: --format gguf, safetensors or torchscript");
  sub->add_option("--format", st->format, "gguf (llama.cpp), safetensors (merged HF checkpoint) or torchscript");
  sub->add_option("model", st->model_dir, "HF checkpoint directory (16-bit or bnb-4bit) or a .gguf file");
  sub->add_option("--adapter", st->adapter, "PEFT LoRA adapter directory to apply (kept as LoRA, not merged)");
  sub->add_option("--out", st->out, "output file, e.g. model.pt");
  sub->add_option("--seq", st->seq, "sequence length the module is traced for: input_ids [1, N]")->capture_default_str();
  sub->add_flag("--nf4", st->nf4,
                "quantize 16-bit linear weights to NF4 at load (bnb-4bit checkpoints always stay NF4)");
  sub->add_option("--dtype", st->dtype, "compute dtype: float32, bfloat16 or float16")->capture_default_str();
  sub->add_option("--device", st->device, "cpu, cuda or cuda:N: where the traced module runs")->capture_default_str();
  const ExportMergedFn export_merged = add_export_merged_options(*sub);  // gguf, safetensors: cmd_merge.cpp
  return [st, sub, export_merged] {
    if (st->format.empty()) throw UserError("qlora export: expected --format gguf, safetensors or torchscript");
    if (st->format == "gguf" || st->format == "safetensors")
      return export_merged(st->format, st->model_dir, st->adapter, st->out, sub->count("--dtype") ? st->dtype : "");
    if (st->format != "torchscript")
      throw UserError("qlora export: --format expected torchscript, gguf or safetensors, found '" + st->format + "'");
    if (st->model_dir.empty()) throw UserError("qlora export: expected a MODEL_DIR argument");
    if (st->out.empty()) throw UserError("qlora export: expected --out FILE.pt");
    if (st->seq < 1) throw UserError("qlora export: --seq must be at least 1, found " + std::to_string(st->seq));
    if (!fs::exists(st->model_dir)) throw UserError("qlora export: model '" + st->model_dir + "' does not exist");

    const at::Device device = resolve_train_device(st->device);
#ifdef QLORA_WITH_CUDA
    if (device.is_cuda()) c10::cuda::set_device(device.index());
#endif
    ModelLoadOptions mo;
    mo.load_in_4bit = st->nf4 || is_bnb_4bit(st->model_dir);
    mo.compute_dtype = export_dtype(st->dtype);
    mo.device = device;
    const auto t0 = std::chrono::steady_clock::now();
    const LlamaWeights model = load_llama(st->model_dir, mo);
    std::optional<LoraModel> lora;
    if (!st->adapter.empty()) lora = load_peft_adapter(st->adapter, model, device);
    const torch::jit::Module module = trace_logits_module(model, lora ? &*lora : nullptr, st->seq);
    const fs::path out(st->out);
    if (out.has_parent_path()) fs::create_directories(out.parent_path());
    // Module::save writes the file in place: write a temp name, then rename (no half-written .pt).
    const fs::path tmp = out.string() + ".part";
    module.save(tmp.string());
    fs::rename(tmp, out);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::error_code ec;
    const auto bytes = fs::file_size(out, ec);
    log_info(cat("exported ", st->model_dir, lora ? " + adapter " + st->adapter : std::string(), " (",
                 mo.load_in_4bit ? "NF4" : "16-bit", ", compute ", torch_dtype_name(mo.compute_dtype), ", ",
                 device.str(), ") as TorchScript: ", out.string(), ", input_ids [1, ", st->seq, "] -> logits, ",
                 fixed(static_cast<double>(bytes) / (1 << 20), 1), " MiB, ", fixed(secs, 1),
                 " s; load it with torch.jit.load after torch.ops.load_library(\"libqlora_ops.so\")"));
    return kExitOk;
  };
}

}  // namespace qlora::cli
