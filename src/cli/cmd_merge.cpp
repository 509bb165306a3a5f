// qlora merge BASE --adapter DIR --out DIR: a PEFT LoRA adapter folded into its base model's weights
// (src/io/merge.cpp), written as a Hugging Face checkpoint transformers loads without PEFT. Also
// the gguf and safetensors formats of `qlora export` (its --type, --base-16bit and --force
// options), which share the loading and the merge.
#include <filesystem>
#include <optional>

#include "cli/commands.h"
#include "qlora/error.h"
#include "qlora/gguf_export.h"
#include "qlora/log.h"
#include "qlora/lora.h"
#include "qlora/merge.h"

namespace qlora::cli {

namespace fs = std::filesystem;

CommandFn add_merge_command(CLI::App& app) {
  struct State {
    std::string base, adapter, out, dtype = "bf16", requantize;
    bool base_16bit = false;
    bool force = false;
  };
  auto st = std::make_shared<State>();
  auto* sub = app.add_subcommand("merge", "merge a LoRA adapter into the base weights (-> a Hugging Face checkpoint)");
  sub->add_option("base", st->base, "base model: HF checkpoint directory (16-bit or bnb-4bit) or a llama .gguf file")->required();
  sub->add_option("--adapter", st->adapter, "PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)");
  sub->add_option("--out", st->out, "output directory (must be empty or absent unless --force)");
  sub->add_option("--dtype", st->dtype, "dtype of the written weights: bf16, fp16 or fp32")->capture_default_str();
  sub->add_option("--requantize", st->requantize, "nf4: write a bitsandbytes 4-bit checkpoint (blocksize 64, double quant)");
  sub->add_flag("--base-16bit", st->base_16bit,
                "merge into the original 16-bit weights (default: into NF4-dequantized weights, what the adapter was trained on)");
  sub->add_flag("--force", st->force, "write into a non-empty output directory (files of the same name are replaced)");
  return [st] {
    MergeOptions opt;
    opt.dtype = merge_dtype_from_name(st->dtype, "qlora merge: --dtype");
    if (!st->requantize.empty() && st->requantize != "nf4")
      throw UserError("qlora merge: --requantize: expected nf4, found '" + st->requantize + "'");
    opt.requantize_nf4 = !st->requantize.empty();
    opt.base_16bit = st->base_16bit;
    opt.force = st->force;
    if (st->adapter.empty()) throw UserError("qlora merge: expected --adapter DIR (a PEFT LoRA adapter)");
    if (st->out.empty()) throw UserError("qlora merge: expected --out DIR");
    merge_checkpoint(st->base, st->adapter, st->out, opt);
    return kExitOk;
  };
}

ExportMergedFn add_export_merged_options(CLI::App& sub) {
  struct State {
    std::string type = "f16";
    bool base_16bit = false;
    bool force = false;
  };
  auto st = std::make_shared<State>();
  CLI::App* cmd = &sub;
  sub.add_option("--type", st->type, "gguf: weight type f16, bf16, q8_0, q4_0 or f32 (norms and biases stay f32)")
      ->capture_default_str();
  sub.add_flag("--base-16bit", st->base_16bit,
               "gguf/safetensors with --adapter: merge into the 16-bit base weights (default: NF4-dequantized, as trained)");
  sub.add_flag("--force", st->force, "safetensors: write into a non-empty output directory");
  return [st, cmd](const std::string& format, const std::string& model, const std::string& adapter, const std::string& out,
                   const std::string& dtype) {
    const std::string what = "qlora export --format " + format;
    if (model.empty()) throw UserError(what + ": expected a MODEL argument (HF checkpoint directory or .gguf file)");
    if (out.empty()) throw UserError(what + (format == "gguf" ? ": expected --out FILE.gguf" : ": expected --out DIR"));
    // With an adapter the base is what training saw (NF4, dequantized); without one there is
    // nothing to match, so a 16-bit base is converted exactly (a bnb-4bit base is always NF4).
    const MergeBase mode = st->base_16bit ? MergeBase::base_16bit : adapter.empty() ? MergeBase::as_stored : MergeBase::nf4;
    if (format == "gguf") {
      if (!dtype.empty()) throw UserError(what + ": --dtype does not apply (use --type f16|bf16|q8_0|q4_0|f32)");
      GgufExportOptions opt;
      opt.type = gguf_export_type_from_name(st->type);
      if (!adapter.empty()) check_adapter_dir(adapter);
      if (fs::is_directory(out)) throw UserError(out + ": expected an output file (e.g. model.gguf), found a directory");
      const LlamaWeights m = load_merge_base(model, mode);
      std::optional<LoraModel> lora;
      if (!adapter.empty()) lora = load_peft_adapter(adapter, m, at::kCPU);
      export_gguf(m, lora ? &*lora : nullptr, model, out, opt);
      return kExitOk;
    }
    if (cmd->count("--type")) throw UserError(what + ": --type applies to --format gguf (use --dtype bf16|fp16|fp32)");
    MergeOptions opt;
    opt.dtype = dtype.empty() ? at::kBFloat16 : merge_dtype_from_name(dtype, what + ": --dtype");
    opt.base_16bit = st->base_16bit;
    opt.force = st->force;
    if (!adapter.empty()) {
      merge_checkpoint(model, adapter, out, opt);
    } else {
      check_output_dir(out, opt.force, what);
      const LlamaWeights m = load_merge_base(model, mode);
      save_merged_checkpoint(m, nullptr, model, out, opt);
    }
    return kExitOk;
  };
}

}  // namespace qlora::cli
