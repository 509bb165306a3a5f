// Merging a PEFT LoRA adapter into the weights of its base model: `qlora merge`, and the tensors
// `qlora export --format safetensors|gguf` writes. Each adapted projection becomes
//   W' = deq(W) + scale * (B A)          computed in fp32 on the CPU, as PEFT's merge_and_unload
// where deq(W) is what the adapter was trained against: by default the base linear weights are
// quantized to NF4 exactly as training's load_in_4bit does and dequantized to fp32 (a bnb-4bit base
// is dequantized as it is); `base_16bit` merges into the original 16-bit weights instead. Output:
// a Hugging Face checkpoint in a chosen dtype (or NF4 again, through bnb4bit.h) that transformers
// loads without PEFT.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "qlora/hf_config.h"
#include "qlora/lora.h"
#include "qlora/model.h"
#include "qlora/safetensors.h"

namespace qlora {

// Whether `path` names a llama.cpp GGUF file (a regular file ending in ".gguf"), as load_llama tells.
bool is_gguf_path(const std::filesystem::path& path);

// Which base weights a merge adds the LoRA product to.
enum class MergeBase {
  nf4,         // deq(NF4(W)): 16-bit linear weights quantized as training's load_in_4bit does
               // (blocksize 64, double quant); a bnb-4bit base's NF4 as stored
  base_16bit,  // the 16-bit weights themselves (a UserError for a bnb-4bit base: they are gone)
  as_stored,   // no adapter to match: 16-bit stays 16-bit, bnb-4bit stays NF4 (exact conversion)
};

// Loads BASE (HF folder, 16-bit or bnb-4bit, or a llama .gguf file) on the CPU for merging, with
// its linear weights as `mode` says. Everything is held in the checkpoint's own dtype (config
// torch_dtype: bfloat16, float16 or float32; float32 when absent and for GGUF files, whose tensors
// are dequantized to fp32), so no value is rounded on the way in.
LlamaWeights load_merge_base(const std::filesystem::path& base, MergeBase mode);

// deq(W) + scale * (B A) for one projection, fp32 [out, in] on the CPU: W dequantized to fp32
// (NF4) or upcast (dense), (B A) as one fp32 matmul, scaled, then added (PEFT's order:
// weight += (B @ A) * scaling). lora == nullptr: deq(W) alone.
at::Tensor merged_linear_weight(const LinearWeight& base, const LoraLinear* lora);

// One tensor of the merged model: its HF name, its shape, and how to make it (fp32, CPU, HF layout;
// made on demand so that a writer holds one tensor at a time, not the whole fp32 model).
struct MergedTensor {
  std::string name;
  std::vector<int64_t> shape;
  bool linear_weight = false;     // one of the seven projections' weights (what NF4 would quantize)
  std::function<at::Tensor()> make;
};

// Every tensor of the merged model in transformers' state_dict order: model.embed_tokens.weight;
// per layer self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj (weight, then bias when present),
// input_layernorm, post_attention_layernorm; model.norm.weight; lm_head.weight unless the
// embeddings are tied. lora: adapters for every layer, or nullptr (the base as it was loaded).
std::vector<MergedTensor> merged_tensors(const LlamaWeights& model, const LoraModel* lora);

// All of merged_tensors at once, each cast to `dtype` (tests and small models).
NamedTensors merge_lora(const LlamaWeights& model, const LoraModel* lora, at::ScalarType dtype);

// "bf16"/"bfloat16", "fp16"/"float16", "fp32"/"float32" -> the dtype; anything else is a UserError
// naming `option`.
at::ScalarType merge_dtype_from_name(const std::string& name, const std::string& option = "--dtype");

struct MergeOptions {
  at::ScalarType dtype = at::kBFloat16;       // of the written tensors (and the NF4 quant state)
  bool base_16bit = false;                    // merge into the 16-bit base, not deq(NF4(W))
  bool requantize_nf4 = false;                // write a bnb-4bit checkpoint (blocksize 64, double quant)
  bool force = false;                         // write into a non-empty output directory
  int64_t max_shard_bytes = 5'000'000'000;    // transformers' default max_shard_size "5GB"
};

struct MergeSummary {
  int64_t merged = 0;                         // projections that had an adapter
  int64_t tensors = 0;                        // tensors written (an NF4 weight counts once)
  int64_t bytes = 0;                          // tensor data written
  std::vector<std::string> files_written;     // relative to the output directory
};

// The merged checkpoint's config.json: the base's keys, torch_dtype = dtype, and either no
// quantization_config or (requantized) the one transformers writes for load_in_4bit nf4.
HFConfig merged_config(const HFConfig& base, at::ScalarType dtype, bool requantized);

// Refuses an output directory that is a file, or is not empty without `force` (UserError naming it
// and the option); nothing is created.
void check_output_dir(const std::filesystem::path& out_dir, bool force, const std::string& command);

// Writes the merged checkpoint into `out_dir`: safetensors in options.dtype (model.safetensors, or
// model-0000k-of-0000n.safetensors + model.safetensors.index.json above max_shard_bytes), or NF4
// entries for the projections with requantize_nf4; config.json; the tokenizer files and
// generation_config.json of `base` when it is a folder. Everything is written into a staging
// folder next to out_dir first and moved in only when complete, so an error leaves out_dir as it
// was; with `force`, model*.safetensors files of an earlier run that this one did not write are
// removed (they would contradict the new index).
MergeSummary save_merged_checkpoint(const LlamaWeights& model, const LoraModel* lora, const std::filesystem::path& base,
                                    const std::filesystem::path& out_dir, const MergeOptions& options);

// UserError unless `adapter` is a folder holding adapter_config.json (checked before the base is
// loaded, so a typo costs no loading time); load_peft_adapter checks the rest.
void check_adapter_dir(const std::filesystem::path& adapter);

// `qlora merge BASE --adapter DIR --out OUT`: load_merge_base (nf4, or base_16bit),
// load_peft_adapter, save_merged_checkpoint. The output directory is checked before any loading.
MergeSummary merge_checkpoint(const std::filesystem::path& base, const std::filesystem::path& adapter,
                              const std::filesystem::path& out_dir, const MergeOptions& options);

}  // namespace qlora
