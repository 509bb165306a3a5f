// `qlora export --format gguf`: a Llama-family model, plus an optional LoRA adapter merged as
// qlora/merge.h merges it, written as the GGUF file llama.cpp's convert_hf_to_gguf.py writes for
// it, so that llama-cli / llama-server run it as is. Facts from convert_hf_to_gguf.py and gguf-py
// (read, not copied):
//  - architecture "llama" for LlamaForCausalLM and MistralForCausalLM, "qwen2" for Qwen2;
//  - keys general.{architecture,type,name,file_type,quantization_version = 2} and
//    <arch>.{context_length, embedding_length, block_count, feed_forward_length,
//    attention.head_count, attention.head_count_kv, attention.layer_norm_rms_epsilon,
//    rope.freq_base} (+ attention.key_length/value_length when config.json sets head_dim;
//    llama: + vocab_size, rope.dimension_count; linear rope scaling: rope.scaling.type "linear" and
//    rope.scaling.factor; llama3 rope scaling: a rope_freqs.weight tensor of per-frequency factors);
//  - tensor names token_embd, blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm,
//    ffn_gate, ffn_up, ffn_down}, output_norm, output (absent when the embeddings are tied);
//  - llama: q/k weights and biases row-permuted from HF's rotate-half to rotate-pairs order;
//  - 1-D tensors (norms, biases, rope_freqs) in f32; 2-D ones in the chosen type, f16 when a row's
//    length is not a multiple of the type's block (as the converter falls back on QuantError);
//  - the tokenizer as tokenizer.ggml.* (src/io/gguf_export_tokenizer.cpp).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "qlora/gguf.h"
#include "qlora/hf_config.h"
#include "qlora/lora.h"
#include "qlora/model.h"

namespace qlora {

// --type f32, f16, bf16, q8_0, q4_0 -> the ggml type; anything else is a UserError.
GgmlType gguf_export_type_from_name(const std::string& name);
// general.file_type (llama.cpp's LlamaFileType) for a --type: f32 0, f16 1, q4_0 2, q8_0 7, bf16 32.
uint32_t gguf_file_type(GgmlType t);
// "llama" (model_type llama, mistral) or "qwen2"; other model types are UserErrors naming them.
std::string gguf_architecture(const HFConfig& config);

// HF tensor name -> llama.cpp's (model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight);
// the inverse of gguf_tensor_name_to_hf (qlora/model.h); "" for names outside a llama decoder.
std::string hf_tensor_name_to_gguf(const std::string& hf_name);

// HF q/k rows -> llama.cpp's order (convert_hf_to_gguf.py LlamaModel.permute): rows viewed as
// [n_head, 2, D/2, ...], the middle two axes swapped, so row h*D + s*D/2 + i goes to h*D + 2i + s.
// w: [rows, in] or a bias [rows]; rows must split into n_head heads of an even size (UserError).
at::Tensor gguf_permute_qk(const at::Tensor& w, int64_t n_head);

// The type a tensor of this HF shape is written in: 1-D -> f32; 2-D -> `requested`, or f16 when
// shape[1] is not a multiple of its block size.
GgmlType gguf_tensor_type(const std::vector<int64_t>& shape, GgmlType requested);

// Llama 3.1-style rope scaling as the per-frequency factors llama.cpp divides the inverse
// frequencies by (fp32 [head_dim / 2], computed in fp32 as the converter does, with the
// original_max_position_embeddings of rope_scaling); undefined for other rope types.
at::Tensor gguf_llama3_rope_factors(const HFConfig& config);

// The general.* and <arch>.* keys for this config, `name` and weight type (see the top comment).
void add_gguf_model_metadata(GgufWriter& writer, const HFConfig& config, const std::string& name, GgmlType type);

// tokenizer.ggml.* (and tokenizer.chat_template): copied from BASE when it is a GGUF file; built
// from BASE/tokenizer.json (+ tokenizer_config.json) otherwise: model "gpt2" (byte-level BPE: pre,
// tokens, token_type, merges) or "llama" (sentencepiece BPE: tokens, scores, token_type,
// add_space_prefix), the bos/eos/unknown/padding ids, add_bos_token, add_eos_token, the chat
// template. Ids below vocab_size without a token become "[PAD<id>]" (type unused), as the
// converter pads. UserError when BASE has no tokenizer.json or its ids do not fit vocab_size.
void add_gguf_tokenizer(GgufWriter& writer, const std::filesystem::path& base, int64_t vocab_size);

struct GgufExportOptions {
  GgmlType type = GgmlType::f16;   // of the 2-D weights
  std::string name;                // general.name; "" = BASE's name (and the adapter's)
};

struct GgufExportSummary {
  std::string architecture;
  int64_t tensors = 0;
  int64_t fallback_f16 = 0;        // 2-D tensors written f16 because their rows do not fit the blocks
  uint64_t bytes = 0;              // the file's size
};

// Writes `model` (+ `lora` merged, nullptr for none) to `out` atomically; `base` is what the model
// was loaded from (for the tokenizer and the default name).
GgufExportSummary export_gguf(const LlamaWeights& model, const LoraModel* lora, const std::filesystem::path& base,
                              const std::filesystem::path& out, const GgufExportOptions& options);

}  // namespace qlora
