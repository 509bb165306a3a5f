// LoRA adapters on the projections of a Llama-family model, with PEFT's semantics (LoraLayer with
// init_lora_weights=True): y = base(x) + lora_B(lora_A(dropout(x))) * scale, A ~ kaiming_uniform
// (a = sqrt(5)), B = 0, scale = alpha / r (alpha / sqrt(r) with rsLoRA). A and B are fp32 masters;
// the GEMMs run in the compute dtype. The NF4 LoRA linear is one autograd function whose backward
// dequantizes the base weight again into the shared scratch (never keeps it). Adapters are read and
// written as PEFT's adapter_config.json + adapter_model.safetensors (src/io/peft_adapter.cpp).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "qlora/hf_config.h"
#include "qlora/model.h"

namespace qlora {

struct TrainConfig;

struct LoraOptions {
  int r = 16;
  double alpha = 32.0;
  double dropout = 0.0;                     // PEFT lora_dropout, in [0, 1)
  bool use_rslora = false;                  // scale alpha / sqrt(r) instead of alpha / r
  std::vector<std::string> target_modules;  // projection names: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj
};

// lora_r, lora_alpha, lora_dropout, use_rslora, lora_target_modules (all seven with lora_target_linear).
LoraOptions lora_options_from_config(const TrainConfig& config);

// UserError naming the option when r < 1, alpha <= 0 or not finite, dropout outside [0, 1), the
// target list empty, or a target that is not one of the seven projections.
void validate_lora_options(const LoraOptions& options);

// alpha / r, or alpha / sqrt(r) with use_rslora (PEFT's LoraLayer.update_layer).
double lora_scale(const LoraOptions& options);

// One adapted projection: y += (dropout(x) A^T) B^T * scale.
struct LoraLinear {
  at::Tensor A;        // fp32 [r, in], the master weight (requires_grad)
  at::Tensor B;        // fp32 [out, r], the master weight (requires_grad)
  double scale = 1.0;
  double dropout = 0.0;
};

struct LoraLayer {
  std::optional<LoraLinear> q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj;
};

struct LoraModel {
  LoraOptions options;
  std::vector<LoraLayer> layers;  // one per decoder layer
};

// The projections in their fixed order (q, k, v, o, gate, up, down) and access by name (a name
// outside the seven is a UserError).
const std::vector<std::string>& lora_projection_names();
std::optional<LoraLinear>& lora_projection(LoraLayer& layer, const std::string& name);
const std::optional<LoraLinear>& lora_projection(const LoraLayer& layer, const std::string& name);
const LinearWeight& base_projection(const DecoderLayerWeights& layer, const std::string& name);
LinearWeight& base_projection(DecoderLayerWeights& layer, const std::string& name);

// PEFT's initialization, deterministic from `seed`: one CPU generator (at::CPUGeneratorImpl) seeded
// once; layers in order, and in each layer the targeted projections in the fixed order above, each
// drawing its A (fp32 [r, in]) as A.uniform_(-bound, bound, gen) with torch's kaiming_uniform_
// bound for a = sqrt(5): sqrt(3) * sqrt(2 / (1 + a^2)) / sqrt(in) = 1 / sqrt(in). B = 0. The
// tensors are then moved to the model's device and require grad. So the same seed gives the same
// adapter on every device; untargeted projections draw nothing.
LoraModel make_lora(const LlamaWeights& model, const LoraOptions& options, uint64_t seed);

// PEFT's state-dict names (what get_peft_model_state_dict and adapter_model.safetensors use,
// without the ".default" adapter name that PeftModel.named_parameters shows), in the order layer,
// projection, A then B: base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight, ...
// The tensors are the masters themselves (not copies): their .grad() is the gradient.
std::vector<std::pair<std::string, at::Tensor>> named_lora_parameters(const LoraModel& lora);
// "base_model.model.model.layers.N.self_attn.q_proj" / "...mlp.down_proj".
std::string peft_module_name(int64_t layer, const std::string& projection);
// Number of trainable parameters (all A and B elements).
int64_t lora_parameter_count(const LoraModel& lora);

// y = x W^T (+ b) + (dropout(x) A^T) B^T * scale for x [..., in] in the compute dtype; W dense or
// NF4. A custom autograd function: differentiable in x, A and B (the base is frozen); A and B are
// cast to x's dtype for the GEMMs and their gradients come back in fp32. Dropout (when training and
// lora->dropout > 0) applies to the LoRA branch's input only, with the default generator of x's
// device (a trainer that recomputes layers in the backward must restore that generator's state
// first, as torch.utils.checkpoint's preserve_rng_state, or the recompute draws another mask). Saved for the backward: x (the graph keeps it anyway: it is the output of the norm or
// the attention), the bool dropout mask (1 byte per element instead of a dropped copy of x in the
// compute dtype), X A^T ([..., r]) and the masters; not W. The backward dequantizes an NF4 W again
// into `scratch`, which must therefore outlive the backward (the trainer's one scratch per device).
// lora == nullptr: the base alone (NF4 through the same scratch-reusing backward).
// output_read = false (with grad on, NF4 or LoRA): the caller only runs the backward through the
// result and never reads it (a checkpointed layer's recompute of its last projection), so the
// forward skips the dequant and the base GEMM; the result has y's shape and zero strides, its
// values unspecified. The gradients are the same as with output_read = true.
at::Tensor lora_linear_forward(const at::Tensor& x, const LinearWeight& base, const LoraLinear* lora,
                               DequantScratch& scratch, bool training, bool output_read = true);

// ---- PEFT adapter files (src/io/peft_adapter.cpp) ----

// Writes `dir`/adapter_model.safetensors (fp32, PEFT's key names) and then adapter_config.json
// (every key PEFT 0.21 writes, values ours: peft_type LORA, task_type CAUSAL_LM, r, lora_alpha,
// lora_dropout, target_modules, use_rslora, bias "none", base_model_name_or_path, ...), each file
// atomically; `dir` is created. `config` is the base model's: the adapter must have one layer per
// decoder layer of it.
void save_peft_adapter(const std::filesystem::path& dir, const LoraModel& lora, const HFConfig& config,
                       const std::string& base_model_name);

// The adapter_config.json PEFT would write for these options.
nlohmann::json peft_adapter_config(const LoraOptions& options, const std::string& base_model_name);

// Reads a PEFT LoRA adapter for `model` and puts its tensors on `device` as fp32 masters that
// require grad. UserErrors (naming the file and the key): missing adapter_config.json or
// adapter_model.safetensors, a peft_type other than LORA, options we do not run (DoRA, lora bias,
// bias other than "none", fan_in_fan_out, rank/alpha patterns, layers_to_transform, layer
// replication, modules_to_save, target_parameters, trainable tokens, regex target strings other
// than "all-linear"), targets outside the seven projections, missing, unexpected or misshapen
// tensors (checked against the model's projections).
LoraModel load_peft_adapter(const std::filesystem::path& dir, const LlamaWeights& model, at::Device device);

}  // namespace qlora
