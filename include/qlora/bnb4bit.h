// bitsandbytes 4-bit checkpoint entries (what Linear4bit._save_to_state_dict writes through
// QuantState.as_dict(packed=True)) <-> NF4Tensor, and `qlora quantize`: a 16-bit HF checkpoint
// turned into a bnb-4bit one.
#pragma once
#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "qlora/nf4.h"
#include "qlora/safetensors.h"

namespace qlora {

// Per quantized weight `<w>` (e.g. model.layers.0.self_attn.q_proj.weight) the entries are
//   <w>                                     uint8 [(n+1)/2, 1]   packed nibbles
//   <w>.absmax                              uint8 [nblocks] (nested) or fp32 [nblocks]
//   <w>.quant_map                           fp32 [16]            the NF4 codebook
//   <w>.nested_absmax                       fp32 [ceil(nblocks/256)]   (nested only)
//   <w>.nested_quant_map                    fp32 [256]           (nested only)
//   <w>.quant_state.bitsandbytes__nf4       uint8 [len]          UTF-8 JSON, see below
inline constexpr const char* kBnbQuantStateSuffix = ".quant_state.bitsandbytes__nf4";

// The quant_state JSON exactly as bitsandbytes writes it (json.dumps of the non-tensor part of
// QuantState.as_dict, Python's ", " / ": " separators and float repr), e.g.
// {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [64, 32],
//  "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.0123}
std::string bnb4bit_quant_state_json(const NF4Tensor& t);

// The entries to write for `t` under `weight_name` (CPU or device tensors, as t holds them).
NamedTensors bnb4bit_entries(const std::string& weight_name, const NF4Tensor& t);

// Builds an NF4Tensor from a weight's entries (`entries` maps full names, `weight_name` and
// `weight_name.*`, to tensors), validating names, dtypes, lengths and the quant_state JSON, then
// nf4_check. Errors are UserErrors naming `source`, the entry, what was expected and found.
NF4Tensor bnb4bit_from_entries(const std::string& weight_name, const std::map<std::string, at::Tensor>& entries,
                               const std::string& source);

// Whether the checkpoint stores `weight_name` bnb-4bit quantized (it has <w>.quant_state.*).
bool is_bnb4bit_weight(const SafetensorsCheckpoint& ckpt, const std::string& weight_name);
// Reads one quantized weight from a checkpoint (the entries may sit in any shard).
NF4Tensor read_bnb4bit_weight(const SafetensorsCheckpoint& ckpt, const std::string& weight_name);

// Python's repr() of a float (shortest round-trip digits, exponent form below 1e-4 and from 1e16).
std::string python_float_repr(double x);

// Whether a checkpoint tensor is one of the linear weights that `qlora quantize` turns into NF4:
// <prefix>layers.<i>.self_attn.{q,k,v,o}_proj.weight and <prefix>layers.<i>.mlp.{gate,up,down}_proj.weight.
bool is_quantizable_linear_weight(const std::string& name);

struct QuantizeOptions {
  int64_t blocksize = 64;     // 32..4096, a power of two
  bool double_quant = true;   // bnb_4bit_use_double_quant
  bool force = false;         // write into a non-empty output directory
};

struct QuantizeSummary {
  int64_t quantized = 0;      // weights turned into NF4
  int64_t kept = 0;           // tensors copied as they were
  int64_t bytes_in = 0;       // tensor data read
  int64_t bytes_out = 0;      // tensor data written
  std::vector<std::string> files_written;  // relative to the output directory
};

// qlora quantize IN_DIR OUT_DIR: reads the 16-bit (or fp32) checkpoint in `in_dir` one tensor at a
// time, writes a bnb-4bit checkpoint (one output shard per input shard, plus an index when
// sharded), config.json with the quantization_config transformers writes for load_in_4bit nf4,
// and copies the tokenizer files and generation_config.json. Every file is written atomically.
QuantizeSummary quantize_checkpoint(const std::filesystem::path& in_dir, const std::filesystem::path& out_dir,
                                    const QuantizeOptions& options);

// Copies, each atomically, the files that travel with a Hugging Face model besides its weights and
// config.json (tokenizer*, special_tokens_map.json, added_tokens.json, vocab.json, merges.txt,
// chat_template.json/.jinja, generation_config.json) from `from_dir` into `to_dir`; returns their
// names. Used by qlora quantize and qlora merge, whose outputs transformers loads with the tokenizer.
std::vector<std::string> copy_companion_files(const std::filesystem::path& from_dir,
                                              const std::filesystem::path& to_dir);

}  // namespace qlora
