// Text generation (issue 10): incremental decoding of a Llama-family model (plus an unmerged LoRA)
// with a per-layer key/value cache, token sampling (greedy, temperature, top-k, top-p, repetition
// penalty; deterministic per seed), and the generation loop with stop tokens and stop strings and
// a UTF-8-safe streaming callback. src/model/kv_cache.cpp (cache + cached forward),
// src/model/sampling.cpp (sampling, streaming, the loop).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "qlora/chat_template.h"
#include "qlora/lora.h"
#include "qlora/model.h"
#include "qlora/tokenizer.h"

namespace qlora {

// ---- the cache (kv_cache.cpp) ----

// Keys (RoPE applied) and values of every layer for the positions seen so far. Every row of the
// batch holds the same number of positions (no padding): position p of every row is cache slot p.
// Slots [length, capacity) are free; setting `length` back to n < length drops the positions from
// n on (the next forward overwrites them), which is how a chat reuses a common prefix.
struct KVCache {
  std::vector<at::Tensor> k, v;   // per layer [batch, kv_heads, capacity, head_dim], compute dtype
  int64_t length = 0;             // positions filled; the next token's position (RoPE) is `length`
  int64_t capacity = 0;
  int64_t max_length = 0;         // the capacity never grows past this
  int64_t batch = 0;
  std::vector<int32_t> ids;       // row 0's tokens of the filled positions; kept by generate()
                                  // (llama_forward_cached leaves it alone)
};

// An empty cache for `batch` rows with room for `capacity` positions (grown on demand up to
// max_length; 0: the model's max_position_embeddings). UserError when capacity > max_length.
KVCache make_kv_cache(const LlamaWeights& model, int64_t batch, int64_t capacity, int64_t max_length = 0);

// Makes room for `length` positions: a new buffer of max(length, 2 * capacity) positions (at most
// max_length) and the filled ones copied over. UserError naming both numbers past max_length.
void reserve_kv_cache(KVCache& cache, int64_t length);

// One incremental forward: input_ids int64 [batch, T] are the tokens at positions
// [cache.length, cache.length + T) of every row (T > 1: a prefill, T = 1: a decode step). Their
// keys and values go into the cache, each token attends to every cached position up to its own
// (within the layer's sliding window, as the full forward), and cache.length grows by T. LoRA is
// applied unmerged (lora_linear_forward, no dropout). Returns fp32 logits [batch, vocab] of the
// last new position, or [batch, T, vocab] of every new position with all_logits. Equals
// llama_logits on the whole sequence at those positions (up to floating-point summation order).
// Runs without autograd. UserError for token ids outside the vocabulary or a LoRA of another depth.
at::Tensor llama_forward_cached(const LlamaWeights& model, const at::Tensor& input_ids, KVCache& cache,
                                DequantScratch& scratch, const LoraModel* lora = nullptr, bool all_logits = false);

// ---- sampling (sampling.cpp) ----

struct SamplingOptions {
  double temperature = 0.0;        // 0: greedy (argmax); > 0: softmax(logits / temperature)
  int64_t top_k = 0;               // > 0: only the k most likely tokens
  double top_p = 1.0;              // (0, 1]: the smallest set of most likely tokens whose mass reaches top_p
  double repetition_penalty = 1.0; // > 0; != 1: logits of tokens already in the sequence divided by it
                                   // (multiplied when negative), as transformers' RepetitionPenalty
  uint64_t seed = 0;               // the sampler's generator (std::mt19937_64): same seed, same tokens
};

// UserError naming the option: temperature < 0 or not finite, top_k < 0, top_p outside (0, 1],
// repetition_penalty <= 0 or not finite.
void validate_sampling_options(const SamplingOptions& options);

struct Sampler {
  SamplingOptions options;
  std::mt19937_64 rng;
};
Sampler make_sampler(const SamplingOptions& options);

// The distribution a token is drawn from, in transformers' processor order: repetition penalty
// (over `previous`), temperature, top-k, top-p. Pairs (token, probability), most likely first,
// probabilities summing to 1 (ties: lower id first). Greedy (temperature 0): the argmax alone.
std::vector<std::pair<int32_t, double>> sampling_distribution(const std::vector<float>& logits,
                                                              const SamplingOptions& options,
                                                              const std::vector<int32_t>& previous = {});

// The next token for fp32 logits [vocab] (any device; copied to the host): the argmax when greedy
// (the first on ties, as torch.argmax), else a draw from sampling_distribution with the sampler's
// generator (one 53-bit uniform per token).
int32_t sample_token(Sampler& sampler, const at::Tensor& logits, const std::vector<int32_t>& previous = {});

// ---- streaming text (sampling.cpp) ----

// Turns generated ids into text pieces for a streaming callback: each piece holds whole UTF-8
// code points only (bytes of a code point that byte-level BPE split across tokens wait for the
// rest), invalid bytes become U+FFFD, special tokens are skipped, and text that may be the start
// of a stop string is held back until it is known not to be one.
struct TextStream {
  const Tokenizer* tokenizer = nullptr;
  std::vector<std::string> stop_strings{};
  std::vector<int32_t> ids{};     // pushed so far
  size_t emitted = 0;             // bytes of decode(ids) already returned (or swallowed by a stop)
  bool stopped = false;           // a stop string appeared: the text up to it was returned
};
// Adds one token; returns the text that became safe to show ("" when everything is held back).
std::string text_stream_push(TextStream& stream, int32_t id);
// The held-back rest at the end of generation (a truncated code point becomes U+FFFD; a partial
// stop string is text after all). "" once stopped.
std::string text_stream_finish(TextStream& stream);

// ---- the generation loop (sampling.cpp) ----

// The ids that end a generation: the tokenizer's EOS, the model config's eos_token_id list, and,
// for a chat template family, its end-of-turn tokens (llama3 <|eot_id|> and <|eom_id|>, chatml and
// hermes <|im_end|>, mistral </s>) when the vocabulary has them. Sorted, unique.
std::vector<int32_t> stop_token_ids(const Tokenizer* tokenizer, const HFConfig& config,
                                    std::optional<ChatTemplateKind> chat_template = std::nullopt);

struct GenerateOptions {
  int64_t max_new_tokens = 256;
  std::vector<int32_t> stop_ids{};          // stop_token_ids(...)
  std::vector<std::string> stop_strings{};  // the text stops before the first one (needs a tokenizer)
};

enum class StopReason { eos, stop_string, max_new_tokens, context_full };
const char* stop_reason_name(StopReason reason);  // "eos", "stop_string", "max_new_tokens", "context_full"

struct GenerateResult {
  std::vector<int32_t> tokens;   // generated, the stop token (if any) last
  std::string text;              // everything passed to the callback
  StopReason stop = StopReason::max_new_tokens;
  int64_t prompt_tokens = 0;     // the context given
  int64_t prefill_tokens = 0;    // of it, run through the model (the rest came from the cache)
  double prefill_seconds = 0.0;  // the prefill forward and the first token
  double decode_seconds = 0.0;   // every later token
};

using TextCallback = std::function<void(const std::string& piece)>;

// Generates after `context` (row 0 of a batch-1 cache): the longest prefix of `context` that
// cache.ids already holds is reused, the rest prefilled in one forward, then one token per forward
// until a stop id, a stop string, max_new_tokens or the cache's max_length. Text pieces go to
// on_text as they become safe (tokenizer may be nullptr: ids only, no text). On return cache.ids
// (and cache.length) hold the context and every generated token but the last, which was never fed.
GenerateResult generate(const LlamaWeights& model, const LoraModel* lora, const Tokenizer* tokenizer, KVCache& cache,
                        DequantScratch& scratch, const std::vector<int32_t>& context, const GenerateOptions& options,
                        Sampler& sampler, const TextCallback& on_text = nullptr);

}  // namespace qlora
