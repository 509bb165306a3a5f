// Loading the model `qlora generate` and `qlora eval` run (model_setup.h): paths checked first,
// then device, compute dtype, weights and the optional PEFT adapter.
#include "cli/model_setup.h"

#ifdef QLORA_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>
#endif

#include <filesystem>

#include "qlora/config.h"
#include "qlora/error.h"
#include "qlora/hf_config.h"
#include "qlora/log.h"
#include "qlora/trainer.h"

namespace qlora::cli {

namespace {

namespace fs = std::filesystem;

at::ScalarType compute_dtype(const std::string& name, const at::Device& device) {
  if (name == "auto") return resolve_compute_dtype(TrainConfig{}, device);
  if (name == "float32" || name == "fp32") return at::kFloat;
  if (name == "bfloat16" || name == "bf16") return at::kBFloat16;
  if (name == "float16" || name == "fp16") return at::kHalf;
  throw UserError("--dtype: expected auto, float32, bfloat16 or float16, found '" + name + "'");
}

}  // namespace

void add_model_setup_options(CLI::App* sub, ModelSetupOptions& o) {
  sub->add_option("model", o.model, "HF checkpoint directory (16-bit or bnb-4bit) or a llama .gguf file")->required();
  sub->add_option("--adapter", o.adapter, "PEFT LoRA adapter directory (applied unmerged)");
  sub->add_option("--tokenizer", o.tokenizer, "tokenizer.json, its folder, or a .gguf (default: MODEL)");
  sub->add_option("--device", o.device, "auto, cpu, cuda or cuda:N")->capture_default_str();
  sub->add_option("--dtype", o.dtype, "compute dtype: auto (bf16 on GPUs that have it, fp32 on CPU), float32, bfloat16, float16")
      ->capture_default_str();
  sub->add_flag("--load-in-4bit", o.load_in_4bit, "quantize 16-bit linear weights to NF4 at load (bnb-4bit checkpoints stay NF4)");
}

ModelSetup load_model_setup(const ModelSetupOptions& o, const std::string& command) {
  std::error_code ec;
  if (!fs::exists(o.model, ec)) throw UserError("qlora " + command + ": model '" + o.model + "' does not exist");
  if (!o.adapter.empty() && !fs::is_directory(o.adapter, ec))
    throw UserError("qlora " + command + ": adapter '" + o.adapter + "' is not a directory");
  ModelSetup s;
  s.device = resolve_train_device(o.device);
#ifdef QLORA_WITH_CUDA
  if (s.device.is_cuda()) c10::cuda::set_device(s.device.index());
#endif
  ModelLoadOptions mo;
  mo.compute_dtype = compute_dtype(o.dtype, s.device);
  // bnb-4bit checkpoints stay NF4; 16-bit ones (and GGUF) are quantized only when asked.
  bool bnb = false;
  if (fs::is_directory(o.model, ec)) {
    const HFConfig c = load_hf_config(o.model);
    bnb = c.quantization_config && c.quantization_config->load_in_4bit;
  }
  mo.load_in_4bit = o.load_in_4bit || bnb;
  mo.device = s.device;
  s.model = load_llama(o.model, mo);
  if (!o.adapter.empty()) s.lora = load_peft_adapter(o.adapter, s.model, s.device);
  log_info(cat("model ", o.model, o.adapter.empty() ? std::string() : " + adapter " + o.adapter, ": ",
               s.model.layers.size(), " layers, ", mo.load_in_4bit ? "NF4" : "16-bit", " linears, compute ",
               torch_dtype_name(mo.compute_dtype), ", ", s.device.str()));
  return s;
}

}  // namespace qlora::cli
