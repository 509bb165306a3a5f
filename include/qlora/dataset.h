// Training data: JSONL / text files in the formats users bring from axolotl and Unsloth
// (text/completion, alpaca, chat messages with tools, pre-tokenized input_ids), tokenized in
// parallel with loss masks (train_on_inputs), mixed, shuffled by seed, split for validation,
// cached in output_dir; and the micro-batches the trainer consumes (packed or padded).
#pragma once
#include <ATen/ATen.h>

#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "qlora/chat_template.h"
#include "qlora/config.h"
#include "qlora/tokenizer.h"

namespace qlora {

inline constexpr int32_t kIgnoreLabel = -100;

// One training example. labels[i] is input_ids[i] where the loss counts that token and
// kIgnoreLabel where it does not (prompt, system, user and tool turns when !train_on_inputs).
// Labels are aligned with input_ids (HF convention); the shift to next-token targets happens
// when a batch is built.
struct TokenizedExample {
  std::vector<int32_t> input_ids;
  std::vector<int32_t> labels;
};

// What tokenizing one record needs besides the record.
struct DataContext {
  const Tokenizer* tokenizer = nullptr;
  ChatTemplateKind chat_template = ChatTemplateKind::llama3;
  ChatRenderOptions chat_options;     // bos_token etc.
  bool train_on_inputs = false;
  int sequence_len = 2048;            // longer examples are truncated to this (counted)
  bool add_bos = true;                // completion / alpaca: BOS first when the tokenizer has one
  bool add_eos = true;                // completion / alpaca: EOS last (trainable)
};

// One record (a parsed JSONL object, or {"text": line} for a plain text file) of the given
// dataset type -> an example. UserError prefixed by `where` ("file:line") for a missing or
// mistyped field.
TokenizedExample tokenize_record(const std::string& record_json, const DatasetConfig& dataset,
                                 const DataContext& context, const std::string& where);
// The same on an already parsed record; `truncated` (when given) says whether the example was cut
// to sequence_len.
TokenizedExample tokenize_json(const nlohmann::ordered_json& record, const DatasetConfig& dataset, const DataContext& context,
                               const std::string& where, bool* truncated = nullptr);

// The context prepare_data uses for `config`: the chat template is config.chat_template (a name
// or a .jinja file, recognised by its markers), else the one detected from the tokenizer's own
// template; a UserError asking for chat_template when a chat dataset needs one and neither
// works. bos_token from the tokenizer.
DataContext make_data_context(const TrainConfig& config, const Tokenizer& tokenizer);

struct DatasetStats {
  int64_t records = 0;              // examples kept, all datasets
  int64_t skipped_lines = 0;        // malformed lines skipped (skip_bad_lines: true)
  int64_t truncated = 0;            // examples cut to sequence_len
  int64_t tokens = 0;
  int64_t trainable_tokens = 0;     // labels != kIgnoreLabel
  int64_t dropped = 0;              // examples without a single trained target (left out)
  int64_t bytes = 0;                // bytes of data files read
  double tokenize_seconds = 0.0;    // splitting, parsing and tokenizing records (0 when read from the cache)
  int threads = 1;
};

struct PreparedData {
  std::vector<TokenizedExample> train;
  std::vector<TokenizedExample> val;
  DatasetStats stats;
  std::string cache_key;            // hex hash of files, tokenizer, template, options
  std::filesystem::path cache_path; // where it was read from or written to ("" when not cached)
  bool from_cache = false;
};

// Reads every dataset of the config, tokenizes (dataset_num_proc threads; 0 = all cores),
// applies masks, mixes and shuffles deterministically by seed, splits val_set_size off, checks
// masks (warning above 95 % masked, UserError when every label is masked or nothing is left),
// and caches the result under `cache_dir` (empty: no cache).
PreparedData prepare_data(const TrainConfig& config, const Tokenizer& tokenizer,
                          const std::filesystem::path& cache_dir);

// dataset_prepared_path, else output_dir/prepared.
std::filesystem::path prepared_data_dir(const TrainConfig& config);

// ---- the cache (src/data/data_cache.cpp): one binary file per key, prepared_data_dir/<key>.qdata
// FNV-1a 64-bit, chainable: fnv1a64(b, nb, fnv1a64(a, na)) hashes a then b.
inline constexpr uint64_t kFnv1a64Offset = 0xcbf29ce484222325ull;
uint64_t fnv1a64(const void* data, size_t size, uint64_t hash = kFnv1a64Offset);
// Hex key over everything the prepared data depends on: every data file's bytes (`file_bytes`,
// in config.datasets order), the tokenizer (vocab, special ids, encodings of probe strings), the
// chat template, sequence_len, train_on_inputs, the dataset entries, val_set_size, seed, the
// shuffle flag, skip_bad_lines and a format version.
std::string data_cache_key(const TrainConfig& config, const Tokenizer& tokenizer, const DataContext& context,
                           const std::vector<std::string>& file_bytes);
std::filesystem::path data_cache_file(const std::filesystem::path& cache_dir, const std::string& key);
// Atomic write (temp file + rename) of train, val and stats, with magic, version, key and checksum.
void write_data_cache(const std::filesystem::path& path, const PreparedData& data);
// false (and `why`) when the file is missing, truncated, corrupt or for another key: never trusted.
bool read_data_cache(const std::filesystem::path& path, const std::string& key, PreparedData& data, std::string& why);

// How examples become micro-batches.
struct BatchingOptions {
  int sequence_len = 2048;
  int micro_batch_size = 1;
  bool sample_packing = true;
  int32_t pad_id = 0;               // padding token (never attended to by real tokens, never a target)
  uint64_t seed = 42;               // packing order
};

// A micro-batch, ready for the model and the fused loss.
//  - packed: ONE row holding up to micro_batch_size * sequence_len tokens: whole documents
//    (each <= sequence_len) back to back, position_ids restarting at 0 for each, so that the
//    model's packed attention keeps documents apart; no padding at all.
//  - not packed: micro_batch_size rows, one example each, right-padded to the longest.
struct Batch {
  at::Tensor input_ids;       // int64 [B, L]
  at::Tensor position_ids;    // int64 [B, L]
  at::Tensor target_ids;      // int64 [B, L]: labels[t+1] within the same document, else -100
  int64_t n_target_tokens = 0;   // target_ids != -100 (the loss normalizer's share of this batch)
  int64_t n_tokens = 0;          // non-padding tokens
  int64_t n_padding = 0;
};

// Groups example indices into micro-batches (one epoch, deterministic for a seed). Packed:
// first-fit-decreasing into bins of sequence_len over a shuffled window, then
// micro_batch_size bins per micro-batch.
std::vector<std::vector<int64_t>> plan_micro_batches(const std::vector<TokenizedExample>& examples,
                                                     const BatchingOptions& options);
Batch make_batch(const std::vector<TokenizedExample>& examples, const std::vector<int64_t>& indices,
                 const BatchingOptions& options);

// The text of an example with masked spans marked, for `qlora preprocess --show N`.
std::string format_example(const TokenizedExample& example, const Tokenizer& tokenizer);

}  // namespace qlora
