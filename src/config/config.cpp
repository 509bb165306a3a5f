// YAML -> TrainConfig: the key table (name, type, range, doc, member), strict parsing, cross-key
// validation and the resolved-config printer. Overrides are applied to the YAML tree first
// (overrides.cpp), so they go through exactly the same checks as the file.
#include "qlora/config.h"

#include <algorithm>
#include <climits>
#include <fstream>
#include <functional>
#include <set>
#include <sstream>

#include "config/overrides.h"
#include "config/yaml_values.h"
#include "qlora/error.h"

namespace qlora {

using namespace config_detail;

const std::vector<std::string>& all_lora_target_modules() {
  static const std::vector<std::string> names = {"q_proj", "k_proj", "v_proj", "o_proj",
                                                 "gate_proj", "up_proj", "down_proj"};
  return names;
}

namespace {

const EnumNames<AdapterType> kAdapterNames = {{"qlora", AdapterType::qlora}, {"lora", AdapterType::lora}};
const EnumNames<LrScheduler> kSchedulerNames = {{"cosine", LrScheduler::cosine},
                                                {"linear", LrScheduler::linear},
                                                {"constant", LrScheduler::constant},
                                                {"constant_with_warmup", LrScheduler::constant_with_warmup}};
const EnumNames<AttentionBackend> kAttentionBackendNames = {{"auto", AttentionBackend::auto_},
                                                            {"flash", AttentionBackend::flash},
                                                            {"cudnn", AttentionBackend::cudnn},
                                                            {"efficient", AttentionBackend::efficient},
                                                            {"math", AttentionBackend::math}};
const EnumNames<OptimizerType> kOptimizerNames = {{"adamw_torch", OptimizerType::adamw_torch},
                                                  {"adamw", OptimizerType::adamw_torch}};
// Canonical names first (the resolved config prints those), then the aliases users bring.
const EnumNames<DatasetType> kDatasetTypeNames = {{"completion", DatasetType::completion},
                                                  {"alpaca", DatasetType::alpaca},
                                                  {"chat_template", DatasetType::chat_template},
                                                  {"pretokenized", DatasetType::pretokenized},
                                                  {"text", DatasetType::completion},
                                                  {"chat", DatasetType::chat_template},
                                                  {"input_ids", DatasetType::pretokenized}};

// One config key: how to read it into a TrainConfig and how to print it back.
struct KeySpec {
  std::string name;
  std::string type;  // for describe_config_keys
  std::string doc;
  std::function<void(TrainConfig&, const ParseContext&, const std::string& path, const YAML::Node&)> read;
  std::function<void(YAML::Emitter&, const TrainConfig&)> emit;
};

template <typename T>
KeySpec int_key(const char* name, T TrainConfig::*member, int64_t lo, int64_t hi, const char* doc) {
  std::string type = "integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
  return {name, type, doc,
          [=](TrainConfig& c, const ParseContext& ctx, const std::string& p, const YAML::Node& n) {
            c.*member = static_cast<T>(read_int(ctx, p, n, lo, hi));
          },
          [=](YAML::Emitter& e, const TrainConfig& c) { e << static_cast<long long>(c.*member); }};
}

KeySpec float_key(const char* name, double TrainConfig::*member, double lo, double hi, bool lo_open, bool hi_open,
                  const char* doc) {
  std::ostringstream type;
  type << "number in " << (lo_open ? "(" : "[") << lo << ", " << hi << (hi_open ? ")" : "]");
  return {name, type.str(), doc,
          [=](TrainConfig& c, const ParseContext& ctx, const std::string& p, const YAML::Node& n) {
            c.*member = read_float(ctx, p, n, lo, hi, lo_open, hi_open);
          },
          [=](YAML::Emitter& e, const TrainConfig& c) { e << c.*member; }};
}

KeySpec bool_key(const char* name, bool TrainConfig::*member, const char* doc) {
  return {name, "true | false", doc,
          [=](TrainConfig& c, const ParseContext& ctx, const std::string& p, const YAML::Node& n) {
            c.*member = read_bool(ctx, p, n);
          },
          [=](YAML::Emitter& e, const TrainConfig& c) { e << c.*member; }};
}

// A null value means "not set" (empty) for optional strings.
KeySpec string_key(const char* name, std::string TrainConfig::*member, const char* doc) {
  return {name, "string", doc,
          [=](TrainConfig& c, const ParseContext& ctx, const std::string& p, const YAML::Node& n) {
            c.*member = n.IsNull() ? std::string() : read_string(ctx, p, n);
          },
          [=](YAML::Emitter& e, const TrainConfig& c) {
            if ((c.*member).empty()) e << YAML::Null; else e << c.*member;
          }};
}

template <typename E>
KeySpec enum_key(const char* name, E TrainConfig::*member, const EnumNames<E>& names, const char* doc) {
  std::string type;
  for (const auto& [n, v] : names) type += (type.empty() ? "" : " | ") + std::string(n);
  return {name, type, doc,
          [=, &names](TrainConfig& c, const ParseContext& ctx, const std::string& p, const YAML::Node& n) {
            c.*member = read_enum(ctx, p, n, names);
          },
          [=, &names](YAML::Emitter& e, const TrainConfig& c) { e << enum_name(c.*member, names); }};
}

// A key read as `auto | true | false` (bf16's spelling).
KeySpec auto_bool_key(const char* name, AutoBool TrainConfig::*member, const char* doc) {
  return {name, "auto | true | false", doc,
          [=](TrainConfig& c, const ParseContext& ctx, const std::string& p, const YAML::Node& n) {
            bool b = false;
            if (n.IsScalar() && n.Scalar() == "auto") c.*member = AutoBool::auto_;
            else if (n.IsScalar() && YAML::convert<bool>::decode(n, b)) c.*member = b ? AutoBool::on : AutoBool::off;
            else ctx.fail(p, n, "expected auto, true or false, found " + describe_found(n));
          },
          [=](YAML::Emitter& e, const TrainConfig& c) {
            if (c.*member == AutoBool::auto_) e << "auto"; else e << (c.*member == AutoBool::on);
          }};
}

void read_target_modules(TrainConfig& c, const ParseContext& ctx, const std::string& path, const YAML::Node& n) {
  const auto& valid = all_lora_target_modules();
  if (n.IsScalar() && n.Scalar() == "all-linear") {  // PEFT's spelling for "every projection"
    c.lora_target_modules = valid;
    return;
  }
  if (!n.IsSequence() || n.size() == 0)
    ctx.fail(path, n, "expected a non-empty list of module names (or all-linear), found " + describe_found(n));
  std::vector<std::string> modules;
  for (size_t i = 0; i < n.size(); ++i) {
    const std::string item_path = path + "[" + std::to_string(i) + "]";
    std::string m = read_string(ctx, item_path, n[i]);
    if (std::find(valid.begin(), valid.end(), m) == valid.end()) {
      std::string hint = nearest_name(m, valid);
      ctx.fail(item_path, n[i], "unknown module '" + m + "'" +
                                    (hint.empty() ? "" : " (did you mean '" + hint + "'?)") +
                                    "; expected q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj or down_proj");
    }
    if (std::find(modules.begin(), modules.end(), m) != modules.end()) ctx.fail(item_path, n[i], "'" + m + "' listed twice");
    modules.push_back(m);
  }
  c.lora_target_modules = modules;
}

void read_datasets(TrainConfig& c, const ParseContext& ctx, const std::string& path, const YAML::Node& n) {
  if (!n.IsSequence() || n.size() == 0)
    ctx.fail(path, n, "expected a non-empty list of {path, type} entries, found " + describe_found(n));
  static const std::vector<std::string> keys = {"path", "type", "field", "field_messages", "field_tools"};
  c.datasets.clear();
  for (size_t i = 0; i < n.size(); ++i) {
    const std::string entry_path = path + "[" + std::to_string(i) + "]";
    const YAML::Node entry = n[i];
    check_mapping_keys(ctx, entry_path, entry, keys);
    DatasetConfig d;
    if (!entry["path"]) ctx.fail(entry_path + ".path", entry, "required key missing (a jsonl file)");
    d.path = read_string(ctx, entry_path + ".path", entry["path"]);
    if (d.path.empty()) ctx.fail(entry_path + ".path", entry["path"], "expected a file path, found an empty string");
    if (entry["type"]) d.type = read_enum(ctx, entry_path + ".type", entry["type"], kDatasetTypeNames);
    auto read_field = [&](const char* key, std::string& out) {
      if (!entry[key]) return;
      out = read_string(ctx, entry_path + "." + key, entry[key]);
      if (out.empty()) ctx.fail(entry_path + "." + key, entry[key], "expected a JSON field name, found an empty string");
    };
    read_field("field", d.field);
    read_field("field_messages", d.field_messages);
    read_field("field_tools", d.field_tools);
    const bool txt = d.path.size() >= 4 && d.path.compare(d.path.size() - 4, 4, ".txt") == 0;
    if (txt && d.type != DatasetType::completion)
      ctx.fail(entry_path + ".type", entry["type"],
               "a .txt file holds one completion example per line; type " +
                   std::string(enum_name(d.type, kDatasetTypeNames)) + " needs a .jsonl file");
    c.datasets.push_back(d);
  }
}

void emit_datasets(YAML::Emitter& e, const TrainConfig& c) {
  e << YAML::BeginSeq;
  for (const auto& d : c.datasets) {
    e << YAML::Flow << YAML::BeginMap << YAML::Key << "path" << YAML::Value << d.path << YAML::Key << "type"
      << YAML::Value << enum_name(d.type, kDatasetTypeNames);
    if (d.type == DatasetType::completion) e << YAML::Key << "field" << YAML::Value << d.field;
    if (d.type == DatasetType::chat_template)
      e << YAML::Key << "field_messages" << YAML::Value << d.field_messages << YAML::Key << "field_tools" << YAML::Value
        << d.field_tools;
    e << YAML::EndMap;
  }
  e << YAML::EndSeq;
}

const std::vector<KeySpec>& key_table() {
  static const std::vector<KeySpec> table = {
      string_key("base_model", &TrainConfig::base_model, "HF checkpoint directory: 16-bit or bnb-4bit safetensors (required)"),
      string_key("tokenizer_config", &TrainConfig::tokenizer_config, "tokenizer directory; null: base_model"),
      enum_key("adapter", &TrainConfig::adapter, kAdapterNames, "qlora: NF4 base + LoRA; lora: 16-bit base + LoRA"),
      bool_key("load_in_4bit", &TrainConfig::load_in_4bit, "base linear weights in NF4 (must agree with adapter)"),
      bool_key("bnb_4bit_use_double_quant", &TrainConfig::bnb_4bit_use_double_quant, "double-quantize the NF4 absmax (bitsandbytes nested)"),
      int_key("lora_r", &TrainConfig::lora_r, 1, 4096, "LoRA rank"),
      float_key("lora_alpha", &TrainConfig::lora_alpha, 0, 1e6, true, false, "LoRA scale numerator: scale = lora_alpha / lora_r"),
      float_key("lora_dropout", &TrainConfig::lora_dropout, 0, 1, false, true, "dropout on the LoRA input"),
      {"lora_target_modules", "list of q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj, or all-linear",
       "projections that get LoRA adapters", read_target_modules,
       [](YAML::Emitter& e, const TrainConfig& c) { e << YAML::Flow << c.lora_target_modules; }},
      bool_key("lora_target_linear", &TrainConfig::lora_target_linear, "true: LoRA on all seven projections"),
      bool_key("use_rslora", &TrainConfig::use_rslora, "rank-stabilized LoRA: scale = lora_alpha / sqrt(lora_r) (PEFT's use_rslora)"),
      {"datasets", "list of {path, type: completion|alpaca|chat_template|pretokenized, field, field_messages, field_tools}",
       "training data (required), one JSON object per line (.jsonl). type completion (alias text): {field} "
       "(default \"text\"), all trainable; a .txt file is read as completion data, one example per non-empty line. "
       "alpaca: instruction, input (optional), output; only output is trainable. chat_template (alias chat): "
       "{field_messages} (default \"messages\": [{role, content, tool_calls?}]) and optional {field_tools} (default "
       "\"tools\"), rendered by chat_template; assistant turns are trainable. pretokenized (alias input_ids): "
       "input_ids (list of token ids) and optional labels (same length, -100 = not trained)",
       read_datasets, emit_datasets},
      int_key("sequence_len", &TrainConfig::sequence_len, 2, 1 << 20, "tokens per sequence (packed row length)"),
      bool_key("sample_packing", &TrainConfig::sample_packing, "pack several documents per row (no attention across them)"),
      float_key("val_set_size", &TrainConfig::val_set_size, 0, 1e9, false, false, "held-out data: < 1 a fraction, >= 1 a count"),
      string_key("chat_template", &TrainConfig::chat_template, "chat template name or .jinja file; null: the tokenizer's"),
      bool_key("train_on_inputs", &TrainConfig::train_on_inputs, "false: loss only on outputs / assistant turns"),
      int_key("dataset_num_proc", &TrainConfig::dataset_num_proc, 0, 4096, "threads that tokenize the datasets; 0: all cores"),
      bool_key("shuffle_merged_datasets", &TrainConfig::shuffle_merged_datasets,
               "shuffle the concatenated datasets by seed (before the validation split)"),
      bool_key("skip_bad_lines", &TrainConfig::skip_bad_lines,
               "false: a malformed record is an error naming file:line; true: skipped, counted, and warned about once"),
      string_key("dataset_prepared_path", &TrainConfig::dataset_prepared_path,
                 "where tokenized data is cached (reused while data, tokenizer and options are unchanged); null: "
                 "output_dir/prepared"),
      int_key("micro_batch_size", &TrainConfig::micro_batch_size, 1, 1 << 16, "rows per forward/backward"),
      int_key("gradient_accumulation_steps", &TrainConfig::gradient_accumulation_steps, 1, 1 << 16, "micro-batches per optimizer step"),
      float_key("num_epochs", &TrainConfig::num_epochs, 0, 1e6, true, false, "passes over the training data"),
      int_key("max_steps", &TrainConfig::max_steps, 0, INT64_MAX, "> 0: stop after this many optimizer steps"),
      float_key("learning_rate", &TrainConfig::learning_rate, 0, 10, true, false, "peak learning rate"),
      enum_key("lr_scheduler", &TrainConfig::lr_scheduler, kSchedulerNames, "learning-rate schedule after warmup"),
      int_key("warmup_steps", &TrainConfig::warmup_steps, 0, INT_MAX, "linear warmup steps"),
      float_key("warmup_ratio", &TrainConfig::warmup_ratio, 0, 1, false, true, "warmup as a fraction of all steps (not with warmup_steps)"),
      enum_key("optimizer", &TrainConfig::optimizer, kOptimizerNames, "optimizer (fp32 state on the LoRA parameters)"),
      float_key("weight_decay", &TrainConfig::weight_decay, 0, 10, false, false, "decoupled weight decay (AdamW)"),
      float_key("adam_beta1", &TrainConfig::adam_beta1, 0, 1, false, true, "AdamW beta1"),
      float_key("adam_beta2", &TrainConfig::adam_beta2, 0, 1, false, true, "AdamW beta2"),
      float_key("adam_epsilon", &TrainConfig::adam_epsilon, 0, 1, true, false, "AdamW epsilon"),
      float_key("max_grad_norm", &TrainConfig::max_grad_norm, 0, 1e9, false, false, "clip the global gradient norm; 0: no clipping"),
      bool_key("gradient_checkpointing", &TrainConfig::gradient_checkpointing, "recompute each layer in backward instead of keeping activations"),
      bool_key("activation_offloading", &TrainConfig::activation_offloading,
               "with gradient_checkpointing: keep each layer's input in pinned CPU memory, not on the GPU (axolotl's name); "
               "a run whose inputs would take over 90 % of the host's available memory is refused before it starts"),
      bool_key("embedding_offloading", &TrainConfig::embedding_offloading,
               "CUDA: keep the (frozen) input embedding table in pinned CPU memory and send only the rows a batch "
               "looks up (1 GB less GPU memory at Llama-3-8B); ignored with a warning when lm_head shares the table"),
      bool_key("lm_head_offloading", &TrainConfig::lm_head_offloading,
               "CUDA: keep the (frozen) lm_head in pinned CPU memory; it is copied to the GPU during the forward "
               "(overlapping the layers) and dropped after the loss, so the backward runs without it (1 GB less at "
               "Llama-3-8B); a tied input embedding goes with it"),
      int_key("mlp_tile_tokens", &TrainConfig::mlp_tile_tokens, 0, INT64_MAX,
              "run each layer's MLP over tiles of N tokens, so only one tile's gate/up/activation exist at once (for "
              "long sequences: 3 x 7.5 GB per layer at Llama-3-8B, 262,144 tokens); the backward recomputes each "
              "tile's MLP forward; 0: off"),
      int_key("gradient_checkpointing_layers", &TrainConfig::gradient_checkpointing_layers, -1, 1 << 20,
              "with gradient_checkpointing: only the first N layers recompute in backward, the others keep their "
              "activations (faster, more memory); -1: every layer"),
      bool_key("gradient_checkpointing_reuse_weights", &TrainConfig::gradient_checkpointing_reuse_weights,
               "with gradient_checkpointing: a recomputed layer keeps the NF4 weights it dequantizes for its own "
               "backward instead of dequantizing them again (faster; the layer's 16-bit weights, 0.3 GB at "
               "Llama-3-8B, are held meanwhile)"),
      auto_bool_key("gradient_checkpointing_split_layers", &TrainConfig::gradient_checkpointing_split_layers,
                    "with gradient_checkpointing: a recomputed layer also keeps the residual between its attention "
                    "and its MLP (one more [tokens x hidden] tensor a layer), so that its recompute runs in two halves "
                    "and skips o_proj's forward (2 % faster at Llama-3-8B); auto: with activation_offloading on CUDA, "
                    "where it waits in host memory, if host memory holds it (true: on the GPU otherwise, 0.8 GB at "
                    "Llama-3-8B, batch 2 x 2048)"),
      bool_key("fused_kernels", &TrainConfig::fused_kernels,
               "CUDA: fused RMSNorm, SwiGLU and RoPE kernels in the layer loop (false: the same math as separate ATen ops)"),
      enum_key("attention_backend", &TrainConfig::attention_backend, kAttentionBackendNames,
               "CUDA: the scaled-dot-product attention kernel tried first (auto: libtorch's order, flash first); "
               "one that cannot take the inputs falls back to the next"),
      int_key("nonfinite_skip_limit", &TrainConfig::nonfinite_skip_limit, 0, INT64_MAX,
              "bf16/fp32: how many steps with a non-finite loss or gradients are skipped (no update) before training "
              "stops with exit status 4 naming the last good checkpoint (fp16 skips them and lowers the loss scale)"),
      float_key("gpu_memory_limit", &TrainConfig::gpu_memory_limit, 0, 1e6, false, false,
                "GiB of GPU memory this run may use (the caching allocator's cap; 0: no cap), e.g. 15 to rehearse a 16 GB T4"),
      bool_key("fsdp_reshard_after_forward", &TrainConfig::fsdp_reshard_after_forward,
               "multi-GPU: free each layer's gathered weights after its forward and gather again in backward (FSDP2's default)"),
      bool_key("fsdp_reduce_in_compute_dtype", &TrainConfig::fsdp_reduce_in_compute_dtype,
               "multi-GPU: reduce-scatter LoRA gradients in the compute dtype (fp16: scaled by 1/sqrt(world) around the sum) instead of fp32"),
      auto_bool_key("bf16", &TrainConfig::bf16, "bf16 compute; auto: where the GPU supports it"),
      bool_key("fp16", &TrainConfig::fp16, "fp16 compute with dynamic loss scaling (GPUs without bf16, e.g. T4)"),
      {"device", "auto | cpu | cuda | cuda:N", "where to train; auto: the first GPU, else the CPU",
       [](TrainConfig& c, const ParseContext& ctx, const std::string& p, const YAML::Node& n) {
         std::string d = read_string(ctx, p, n);
         bool ok = d == "auto" || d == "cpu" || d == "cuda";
         if (!ok && d.rfind("cuda:", 0) == 0 && d.size() > 5)
           ok = std::all_of(d.begin() + 5, d.end(), [](char ch) { return ch >= '0' && ch <= '9'; });
         if (!ok) ctx.fail(p, n, "expected auto, cpu, cuda or cuda:N, found '" + d + "'");
         c.device = d;
       },
       [](YAML::Emitter& e, const TrainConfig& c) { e << c.device; }},
      int_key("seed", &TrainConfig::seed, 0, INT64_MAX, "random seed (data order, LoRA init, dropout)"),
      string_key("output_dir", &TrainConfig::output_dir, "where adapters, checkpoints and metrics go"),
      int_key("save_steps", &TrainConfig::save_steps, 0, INT_MAX, "checkpoint every N steps; 0: at the end only"),
      int_key("save_total_limit", &TrainConfig::save_total_limit, 0, INT_MAX, "keep the newest N checkpoints; 0: all"),
      int_key("eval_steps", &TrainConfig::eval_steps, 0, INT_MAX, "evaluate every N steps; 0: never"),
      int_key("logging_steps", &TrainConfig::logging_steps, 1, INT_MAX, "a progress line every N steps"),
      string_key("resume_from_checkpoint", &TrainConfig::resume_from_checkpoint, "checkpoint directory to resume from"),
  };
  return table;
}

std::vector<std::string> key_names() {
  std::vector<std::string> names;
  for (const auto& k : key_table()) names.push_back(k.name);
  return names;
}

// Rules that involve more than one key, checked after every key was read.
void validate_across_keys(const TrainConfig& c, const YAML::Node& root, const ParseContext& ctx) {
  auto fail_at = [&](const char* key, const std::string& what) { ctx.fail(key, root[key] ? root[key] : root, what); };
  if (c.base_model.empty()) fail_at("base_model", "required key missing (an HF checkpoint directory)");
  if (c.datasets.empty()) fail_at("datasets", "required key missing (a list of {path, type})");
  if (root["load_in_4bit"]) {
    if (c.adapter == AdapterType::qlora && !c.load_in_4bit)
      fail_at("load_in_4bit", "adapter: qlora needs load_in_4bit: true (use adapter: lora for a 16-bit base)");
    if (c.adapter == AdapterType::lora && c.load_in_4bit)
      fail_at("load_in_4bit", "adapter: lora keeps a 16-bit base; use adapter: qlora for a 4-bit base");
  }
  if (c.bf16 == Bf16Mode::on && c.fp16) fail_at("fp16", "bf16: true and fp16: true exclude each other");
  if (c.warmup_steps > 0 && c.warmup_ratio > 0) fail_at("warmup_ratio", "set warmup_steps or warmup_ratio, not both");
  if (c.activation_offloading && !c.gradient_checkpointing)
    fail_at("activation_offloading", "needs gradient_checkpointing: true (only the checkpointed layer inputs are offloaded)");
}

}  // namespace

TrainConfig parse_config(const std::string& yaml_text, const std::string& source_name,
                         const std::vector<std::string>& overrides) {
  ParseContext ctx;
  ctx.source = source_name;
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::ParserException& e) {
    throw UserError(source_name + ":" + std::to_string(e.mark.line + 1) + ":" + std::to_string(e.mark.column + 1) +
                    ": YAML syntax error: " + e.msg);
  }
  if (root.IsNull()) root = YAML::Node(YAML::NodeType::Map);  // an empty file: only overrides
  if (!root.IsMap()) throw UserError(source_name + ": expected a mapping of config keys at the top level, found " + describe_found(root));
  apply_overrides(root, overrides, ctx);

  const auto& table = key_table();
  check_mapping_keys(ctx, "", root, key_names());
  TrainConfig config;
  for (const auto& key : table) {
    const YAML::Node value = root[key.name];
    if (value) key.read(config, ctx, key.name, value);
  }
  validate_across_keys(config, root, ctx);
  if (config.lora_target_linear) config.lora_target_modules = all_lora_target_modules();
  if (config.adapter == AdapterType::lora) config.load_in_4bit = false;
  return config;
}

TrainConfig load_config(const std::string& path, const std::vector<std::string>& overrides) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw UserError("config file '" + path + "': cannot open (expected a readable YAML file)");
  std::stringstream text;
  text << in.rdbuf();
  return parse_config(text.str(), path, overrides);
}

std::string config_to_yaml(const TrainConfig& config) {
  YAML::Emitter e;
  e.SetDoublePrecision(10);
  e << YAML::BeginMap;
  for (const auto& key : key_table()) {
    e << YAML::Key << key.name << YAML::Value;
    key.emit(e, config);
  }
  e << YAML::EndMap;
  return std::string(e.c_str()) + "\n";
}

std::string describe_config_keys() {
  const TrainConfig defaults;
  std::ostringstream out;
  for (const auto& key : key_table()) {
    YAML::Emitter e;
    e << YAML::Flow;
    e.SetDoublePrecision(10);
    key.emit(e, defaults);
    out << key.name << "  (" << key.type << ", default " << e.c_str() << ")\n    " << key.doc << "\n";
  }
  return out.str();
}

std::string nearest_name(const std::string& name, const std::vector<std::string>& candidates) {
  // Optimal-string-alignment distance: a transposition ("lroa_r") counts as one edit.
  auto distance = [](const std::string& a, const std::string& b) {
    std::vector<std::vector<size_t>> d(a.size() + 1, std::vector<size_t>(b.size() + 1));
    for (size_t i = 0; i <= a.size(); ++i) d[i][0] = i;
    for (size_t j = 0; j <= b.size(); ++j) d[0][j] = j;
    for (size_t i = 1; i <= a.size(); ++i)
      for (size_t j = 1; j <= b.size(); ++j) {
        size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
        d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
        if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1]) d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
      }
    return d[a.size()][b.size()];
  };
  std::string best;
  size_t best_d = SIZE_MAX;
  for (const auto& c : candidates) {
    size_t dist = distance(name, c);
    if (dist < best_d) best_d = dist, best = c;
  }
  const size_t limit = std::max<size_t>(2, name.size() / 3);
  return best_d <= limit ? best : std::string();
}

}  // namespace qlora
