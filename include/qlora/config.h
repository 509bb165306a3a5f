// TrainConfig: the YAML recipe as plain typed structs. This header is the one place where every
// key and its default is written down; keys follow axolotl's names so users' configs carry over.
// Parsing is strict (src/config/): unknown keys, wrong types and out-of-range values are
// UserErrors that name the key path and the YAML line:column (or the key=value override).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace qlora {

enum class AdapterType { qlora, lora };                 // qlora: NF4 base + LoRA; lora: 16-bit base + LoRA
enum class LrScheduler { cosine, linear, constant, constant_with_warmup };
enum class OptimizerType { adamw_torch };               // "adamw" is accepted as an alias
enum class DatasetType { completion, alpaca, chat_template, pretokenized };
enum class AutoBool { auto_, on, off };                 // a key that reads `auto | true | false`
using Bf16Mode = AutoBool;                              // axolotl's `bf16: auto|true|false`
enum class AttentionBackend { auto_, flash, cudnn, efficient, math };  // which SDPA kernel is tried first

struct DatasetConfig {
  std::string path;                       // jsonl file (required)
  DatasetType type = DatasetType::completion;
  std::string field = "text";             // completion: the text field
  std::string field_messages = "messages";  // chat_template: the list of {role, content}
  std::string field_tools = "tools";      // chat_template: optional OpenAI-style tools list
};

// The seven projections of a Llama-family decoder layer that LoRA can target.
const std::vector<std::string>& all_lora_target_modules();

struct TrainConfig {
  // --- model ---
  std::string base_model;                 // HF checkpoint directory (required)
  std::string tokenizer_config;           // tokenizer directory; empty: base_model
  AdapterType adapter = AdapterType::qlora;
  bool load_in_4bit = true;               // base linear weights in NF4 (adapter: qlora)
  bool bnb_4bit_use_double_quant = true;  // double-quantized absmax, as bitsandbytes
  // --- LoRA ---
  int lora_r = 16;
  double lora_alpha = 32.0;
  double lora_dropout = 0.05;
  std::vector<std::string> lora_target_modules = all_lora_target_modules();
  bool lora_target_linear = false;        // true: all seven projections, whatever the list says
  bool use_rslora = false;                // scale = lora_alpha / sqrt(lora_r) instead of / lora_r
  // --- data ---
  std::vector<DatasetConfig> datasets;    // at least one (required)
  int sequence_len = 2048;
  bool sample_packing = true;
  double val_set_size = 0.0;              // < 1: fraction of the data; >= 1: number of examples
  std::string chat_template;              // empty: the tokenizer's own template
  bool train_on_inputs = false;           // false: loss only on outputs / assistant turns
  int dataset_num_proc = 0;               // tokenizer threads; 0: all cores
  bool shuffle_merged_datasets = true;    // shuffle the concatenated datasets by seed
  bool skip_bad_lines = false;            // false: a broken record is an error naming file:line;
                                          // true: skipped, counted, one warning with the count
  std::string dataset_prepared_path;      // tokenized-data cache; empty: output_dir/prepared
  // --- training ---
  int micro_batch_size = 1;
  int gradient_accumulation_steps = 1;
  double num_epochs = 1.0;
  int64_t max_steps = 0;                  // > 0: stop after this many optimizer steps
  double learning_rate = 2e-4;
  LrScheduler lr_scheduler = LrScheduler::cosine;
  int warmup_steps = 0;
  double warmup_ratio = 0.0;              // fraction of total steps; exclusive with warmup_steps
  OptimizerType optimizer = OptimizerType::adamw_torch;
  double weight_decay = 0.0;
  double adam_beta1 = 0.9;
  double adam_beta2 = 0.999;
  double adam_epsilon = 1e-8;
  double max_grad_norm = 1.0;             // 0: no clipping
  bool gradient_checkpointing = true;
  bool activation_offloading = false;      // checkpointing: keep the layer inputs in pinned CPU memory
  bool embedding_offloading = false;       // CUDA: the input embedding table in pinned CPU memory
  bool lm_head_offloading = false;         // CUDA: lm_head in pinned CPU memory, on the GPU for the loss only
  int64_t mlp_tile_tokens = 0;            // the layers' MLP over tiles of N tokens (0: off); long sequences
  int64_t gradient_checkpointing_layers = -1;  // checkpointing: the first N layers recompute, the others
                                               // keep their activations (-1: every layer recomputes)
  bool gradient_checkpointing_reuse_weights = true;  // a recompute's dequantized NF4 weights kept for its
                                                     // backward (one dequant less each; the layer's bf16
                                                     // weights held meanwhile)
  AutoBool gradient_checkpointing_split_layers = AutoBool::auto_;  // a recomputed layer also keeps h +
                                                     // attention (its mid residual): its recompute skips
                                                     // o_proj; auto: with activation_offloading on CUDA
                                                     // (Trainer::split_layers)
  bool fused_kernels = true;              // CUDA: fused RMSNorm / SwiGLU / RoPE kernels (false: ATen ops)
  AttentionBackend attention_backend = AttentionBackend::auto_;  // CUDA: the SDPA kernel tried first
  int64_t nonfinite_skip_limit = 0;       // bf16/fp32: steps with a non-finite loss/gradients skipped
                                          // before training stops (fp16 always skips and lowers the scale)
  bool fsdp_reshard_after_forward = true;  // multi-GPU: free each gathered layer after its forward
  bool fsdp_reduce_in_compute_dtype = false;  // multi-GPU: reduce-scatter LoRA grads in fp16/bf16, not fp32
  Bf16Mode bf16 = Bf16Mode::auto_;        // auto: bf16 where the GPU has it
  bool fp16 = false;                      // fp16 compute with dynamic loss scaling (T4)
  std::string device = "auto";            // auto | cpu | cuda | cuda:N
  double gpu_memory_limit = 0;            // GiB the CUDA caching allocator may hold (0: no cap)
  int64_t seed = 42;
  // --- output ---
  std::string output_dir = "./outputs/qlora-out";
  int save_steps = 0;                     // 0: save at the end only
  int save_total_limit = 0;               // 0: keep every checkpoint
  int eval_steps = 0;                     // 0: no periodic eval
  int logging_steps = 1;
  std::string resume_from_checkpoint;     // checkpoint directory; empty: start fresh
};

// Reads `path`, applies `overrides` ("key=value": dotted paths such as datasets.0.path or
// datasets[0].path; the value is YAML, so lora_target_modules=[q_proj,v_proj] is a list), and
// validates. Throws UserError on any problem.
TrainConfig load_config(const std::string& path, const std::vector<std::string>& overrides = {});

// The same on YAML text; `source_name` is what error messages call the text.
TrainConfig parse_config(const std::string& yaml_text, const std::string& source_name,
                         const std::vector<std::string>& overrides = {});

// The resolved config as YAML, every key in documented order (defaults included).
std::string config_to_yaml(const TrainConfig& config);

// One line per key: name, type, default and what it does.
std::string describe_config_keys();

// Levenshtein-nearest candidate, or "" when none is close enough to be a plausible typo.
std::string nearest_name(const std::string& name, const std::vector<std::string>& candidates);

}  // namespace qlora
