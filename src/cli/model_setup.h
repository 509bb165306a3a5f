// What `qlora generate` and `qlora eval` share: the model they run (MODEL, --adapter, --tokenizer,
// --device, --dtype, --load-in-4bit) as CLI options, and loading it (src/cli/model_setup.cpp).
#pragma once
#include <CLI/CLI.hpp>

#include <optional>
#include <string>

#include "qlora/lora.h"
#include "qlora/model.h"

namespace qlora::cli {

struct ModelSetupOptions {
  std::string model;       // HF folder or .gguf
  std::string adapter;     // PEFT adapter folder, "" = none
  std::string tokenizer;   // "" = the model's
  std::string device = "auto";
  std::string dtype = "auto";
  bool load_in_4bit = false;
};

struct ModelSetup {
  LlamaWeights model;
  std::optional<LoraModel> lora;
  at::Device device = at::kCPU;
};

void add_model_setup_options(CLI::App* sub, ModelSetupOptions& options);

// Checks the paths (UserErrors naming `command` and the path), resolves device and compute dtype
// (auto: bf16 on GPUs that have it, else fp16; fp32 on the CPU), loads the model (bnb-4bit
// checkpoints stay NF4; 16-bit and GGUF ones are quantized only with --load-in-4bit) and the
// adapter (load_peft_adapter checks it against the model's shapes), and logs one line.
ModelSetup load_model_setup(const ModelSetupOptions& options, const std::string& command);

}  // namespace qlora::cli
