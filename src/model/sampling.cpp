// Sampling, streaming text and the generation loop (generate.h).
//
// Sampling follows transformers' logits processors in their order: RepetitionPenaltyLogitsProcessor
// (score < 0 ? score * penalty : score / penalty over the tokens in the sequence), then the
// warpers Temperature, TopK and TopP (sort ascending, drop tokens whose cumulative probability is
// <= 1 - top_p, keep at least one; i.e. in descending order keep a token while the mass before it
// is < top_p). It runs on the host in double precision with our own generator (std::mt19937_64 is
// specified bit for bit by the standard), so a seed gives the same tokens on every device; only
// the logits row of the last position is copied over (vocab floats per token).
#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>

#include "qlora/error.h"
#include "qlora/generate.h"

namespace qlora {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// A uniform double in [0, 1) from 53 random bits (std::generate_canonical's algorithm is not the
// same in every standard library).
double uniform01(std::mt19937_64& rng) { return static_cast<double>(rng() >> 11) * 0x1.0p-53; }

int32_t argmax(const std::vector<float>& x) {
  return static_cast<int32_t>(std::max_element(x.begin(), x.end()) - x.begin());  // first of equal maxima
}

std::vector<float> penalized(const std::vector<float>& logits, double penalty, const std::vector<int32_t>& previous) {
  std::vector<float> out = logits;
  if (penalty == 1.0) return out;
  std::vector<bool> seen(out.size(), false);
  for (int32_t id : previous)
    if (id >= 0 && static_cast<size_t>(id) < out.size()) seen[static_cast<size_t>(id)] = true;
  for (size_t i = 0; i < out.size(); ++i)
    if (seen[i]) out[i] = static_cast<float>(out[i] < 0 ? out[i] * penalty : out[i] / penalty);
  return out;
}

// Bytes at the end of `s` that start a UTF-8 sequence whose continuation bytes have not arrived.
size_t incomplete_utf8_tail(const std::string& s) {
  const size_t n = s.size();
  for (size_t back = 1; back <= std::min<size_t>(4, n); ++back) {
    const auto b = static_cast<unsigned char>(s[n - back]);
    if ((b & 0xC0) == 0x80) continue;  // a continuation byte: look further back for its lead
    const size_t need = (b & 0xE0) == 0xC0 ? 2 : (b & 0xF0) == 0xE0 ? 3 : (b & 0xF8) == 0xF0 ? 4 : 1;
    return need > back ? back : 0;
  }
  return 0;
}

// Valid code points as they are, every invalid byte as U+FFFD (Python's errors="replace" per byte).
std::string sanitize_utf8(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  size_t pos = 0;
  while (pos < s.size()) {
    const size_t start = pos;
    const uint32_t cp = utf8_next(s, pos);
    if (cp == 0xFFFD && !(pos - start == 3 && s.compare(start, 3, "\xEF\xBF\xBD") == 0)) utf8_append(out, cp);
    else out.append(s.substr(start, pos - start));
  }
  return out;
}

// Longest suffix of `text` (from `from` on) that is a proper prefix of some stop string.
size_t partial_stop_suffix(std::string_view text, size_t from, const std::vector<std::string>& stops) {
  size_t best = 0;
  if (from >= text.size()) return 0;
  for (const std::string& stop : stops)
    if (!stop.empty())
      for (size_t len = std::min(stop.size() - 1, text.size() - from); len > best; --len)
        if (text.compare(text.size() - len, len, stop, 0, len) == 0) {
          best = len;
          break;
        }
  return best;
}

}  // namespace

void validate_sampling_options(const SamplingOptions& o) {
  if (!std::isfinite(o.temperature) || o.temperature < 0)
    throw UserError("temperature: expected a number >= 0 (0 = greedy), found " + std::to_string(o.temperature));
  if (o.top_k < 0) throw UserError("top_k: expected an integer >= 0 (0 = off), found " + std::to_string(o.top_k));
  if (!(o.top_p > 0.0 && o.top_p <= 1.0))
    throw UserError("top_p: expected a number in (0, 1], found " + std::to_string(o.top_p));
  if (!std::isfinite(o.repetition_penalty) || o.repetition_penalty <= 0)
    throw UserError("repetition_penalty: expected a number > 0 (1 = off), found " + std::to_string(o.repetition_penalty));
}

Sampler make_sampler(const SamplingOptions& options) {
  validate_sampling_options(options);
  return Sampler{options, std::mt19937_64(options.seed)};
}

std::vector<std::pair<int32_t, double>> sampling_distribution(const std::vector<float>& logits_in,
                                                              const SamplingOptions& o,
                                                              const std::vector<int32_t>& previous) {
  TORCH_CHECK(!logits_in.empty(), "sampling_distribution: no logits");
  const std::vector<float> logits = penalized(logits_in, o.repetition_penalty, previous);
  if (o.temperature == 0.0) return {{argmax(logits), 1.0}};
  const size_t V = logits.size();
  // Descending by logit (ties: lower id first). Only as many as needed are sorted: the top k, and
  // for top-p a prefix that grows until it holds top_p of the mass.
  std::vector<int32_t> order(V);
  std::iota(order.begin(), order.end(), 0);
  auto before = [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  const double max_logit = logits[static_cast<size_t>(argmax(logits))];
  std::vector<double> weight(V);  // exp((z - max) / T): the unnormalized softmax
  double total = 0.0;
  for (size_t i = 0; i < V; ++i) total += weight[i] = std::exp((static_cast<double>(logits[i]) - max_logit) / o.temperature);
  size_t keep = V, sorted = 0;  // order[0, sorted) is final; the kept tokens are order[0, keep)
  if (o.top_k > 0 && static_cast<size_t>(o.top_k) < V) {
    keep = sorted = static_cast<size_t>(o.top_k);
    std::partial_sort(order.begin(), order.begin() + static_cast<ptrdiff_t>(keep), order.end(), before);
    total = 0.0;
    for (size_t i = 0; i < keep; ++i) total += weight[static_cast<size_t>(order[i])];
  }
  if (o.top_p < 1.0) {
    size_t n = 0;
    double mass = 0.0;  // of order[0, n)
    for (;;) {
      if (n == sorted) {
        if (sorted == keep) break;
        const size_t grow = std::min(keep, std::max<size_t>(64, 4 * sorted));
        std::partial_sort(order.begin() + static_cast<ptrdiff_t>(sorted), order.begin() + static_cast<ptrdiff_t>(grow),
                          order.begin() + static_cast<ptrdiff_t>(keep), before);
        sorted = grow;
      }
      if (mass / total >= o.top_p) break;  // the mass before order[n] reached top_p: drop the rest
      mass += weight[static_cast<size_t>(order[n++])];
    }
    keep = std::max<size_t>(n, 1);
  } else if (sorted < keep) {
    std::sort(order.begin(), order.begin() + static_cast<ptrdiff_t>(keep), before);
  }
  std::vector<std::pair<int32_t, double>> dist;
  dist.reserve(keep);
  double kept = 0.0;
  for (size_t i = 0; i < keep; ++i) kept += weight[static_cast<size_t>(order[i])];
  for (size_t i = 0; i < keep; ++i) dist.emplace_back(order[i], weight[static_cast<size_t>(order[i])] / kept);
  return dist;
}

int32_t sample_token(Sampler& sampler, const at::Tensor& logits, const std::vector<int32_t>& previous) {
  TORCH_CHECK(logits.dim() == 1, "sample_token: expected logits [vocab], found ", logits.sizes());
  const at::Tensor host = logits.to(at::kCPU, at::kFloat).contiguous();
  const std::vector<float> row(host.data_ptr<float>(), host.data_ptr<float>() + host.numel());
  const SamplingOptions& o = sampler.options;
  if (o.temperature == 0.0) return argmax(penalized(row, o.repetition_penalty, previous));
  const std::vector<std::pair<int32_t, double>> dist = sampling_distribution(row, o, previous);
  const double u = uniform01(sampler.rng);
  double cum = 0.0;
  for (const auto& [id, p] : dist)
    if (u < (cum += p)) return id;
  return dist.back().first;  // u within rounding of 1
}

std::string text_stream_push(TextStream& s, int32_t id) {
  s.ids.push_back(id);
  if (s.stopped || s.tokenizer == nullptr) return "";
  const std::string text = s.tokenizer->decode(s.ids, /*skip_special=*/true);
  if (text.size() <= s.emitted) return "";
  // A stop string anywhere in the new text (it may have started in bytes held back before).
  size_t stop_at = std::string::npos;
  for (const std::string& stop : s.stop_strings) {
    if (stop.empty()) continue;
    const size_t from = s.emitted >= stop.size() ? s.emitted - stop.size() + 1 : 0;
    const size_t at = text.find(stop, from);
    if (at != std::string::npos) stop_at = std::min(stop_at, at);
  }
  if (stop_at != std::string::npos) {
    s.stopped = true;
    const std::string piece = stop_at > s.emitted ? sanitize_utf8(std::string_view(text).substr(s.emitted, stop_at - s.emitted)) : "";
    s.emitted = text.size();
    return piece;
  }
  size_t end = text.size() - incomplete_utf8_tail(text);
  end -= partial_stop_suffix(std::string_view(text).substr(0, end), s.emitted, s.stop_strings);
  if (end <= s.emitted) return "";
  const std::string piece = sanitize_utf8(std::string_view(text).substr(s.emitted, end - s.emitted));
  s.emitted = end;
  return piece;
}

std::string text_stream_finish(TextStream& s) {
  if (s.stopped || s.tokenizer == nullptr) return "";
  const std::string text = s.tokenizer->decode(s.ids, /*skip_special=*/true);
  if (text.size() <= s.emitted) return "";
  const std::string piece = sanitize_utf8(std::string_view(text).substr(s.emitted));
  s.emitted = text.size();
  return piece;
}

std::vector<int32_t> stop_token_ids(const Tokenizer* tokenizer, const HFConfig& config,
                                    std::optional<ChatTemplateKind> chat_template) {
  std::vector<int32_t> ids;
  for (int64_t id : config.eos_token_id)
    if (id >= 0 && id < config.vocab_size) ids.push_back(static_cast<int32_t>(id));
  if (tokenizer != nullptr) {
    if (tokenizer->eos_id() >= 0) ids.push_back(tokenizer->eos_id());
    std::vector<std::string> turn_ends;
    if (chat_template) switch (*chat_template) {
        case ChatTemplateKind::llama3: turn_ends = {"<|eot_id|>", "<|eom_id|>"}; break;
        case ChatTemplateKind::chatml:
        case ChatTemplateKind::hermes: turn_ends = {"<|im_end|>"}; break;
        case ChatTemplateKind::mistral: turn_ends = {"</s>"}; break;
        case ChatTemplateKind::alpaca: break;  // ends with the tokenizer's EOS, already in
      }
    for (const std::string& t : turn_ends)
      if (const int32_t id = tokenizer->token_to_id(t); id >= 0) ids.push_back(id);
  }
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  return ids;
}

const char* stop_reason_name(StopReason reason) {
  switch (reason) {
    case StopReason::eos: return "eos";
    case StopReason::stop_string: return "stop_string";
    case StopReason::max_new_tokens: return "max_new_tokens";
    case StopReason::context_full: return "context_full";
  }
  return "?";
}

GenerateResult generate(const LlamaWeights& model, const LoraModel* lora, const Tokenizer* tokenizer, KVCache& cache,
                        DequantScratch& scratch, const std::vector<int32_t>& context, const GenerateOptions& options,
                        Sampler& sampler, const TextCallback& on_text) {
  if (context.empty()) throw UserError("generate: the prompt has no tokens");
  if (options.max_new_tokens < 0)
    throw UserError("max_new_tokens: expected an integer >= 0, found " + std::to_string(options.max_new_tokens));
  TORCH_CHECK(cache.batch == 1, "generate: expects a cache of batch 1, found ", cache.batch);
  if (static_cast<int64_t>(context.size()) > cache.max_length)
    throw UserError("the prompt has " + std::to_string(context.size()) + " tokens, the model's context is " +
                    std::to_string(cache.max_length));
  at::NoGradGuard no_grad;
  GenerateResult r;
  r.prompt_tokens = static_cast<int64_t>(context.size());
  if (options.max_new_tokens == 0) return r;

  // Reuse the cached prefix; at least the last context token is run again (its logits are needed).
  size_t reuse = 0;
  const size_t cached = std::min<size_t>(cache.ids.size(), static_cast<size_t>(cache.length));
  while (reuse < cached && reuse + 1 < context.size() && cache.ids[reuse] == context[reuse]) ++reuse;
  cache.length = static_cast<int64_t>(reuse);
  cache.ids.assign(context.begin(), context.begin() + static_cast<ptrdiff_t>(reuse));

  TextStream stream;
  stream.tokenizer = tokenizer;
  stream.stop_strings = options.stop_strings;
  std::vector<int32_t> sequence = context;  // for the repetition penalty
  auto feed = [&](const std::vector<int32_t>& ids) {
    at::Tensor t = at::empty({1, static_cast<int64_t>(ids.size())}, at::kLong);
    std::copy(ids.begin(), ids.end(), t.data_ptr<int64_t>());
    at::Tensor logits = llama_forward_cached(model, t, cache, scratch, lora);
    cache.ids.insert(cache.ids.end(), ids.begin(), ids.end());
    return logits.select(0, 0);
  };
  auto emit = [&](const std::string& piece) {
    if (piece.empty()) return;
    r.text += piece;
    if (on_text) on_text(piece);
  };

  const auto t0 = Clock::now();
  at::Tensor logits = feed(std::vector<int32_t>(context.begin() + static_cast<ptrdiff_t>(reuse), context.end()));
  r.prefill_tokens = static_cast<int64_t>(context.size() - reuse);
  auto t_decode = Clock::now();
  for (;;) {
    const int32_t next = sample_token(sampler, logits, sequence);
    if (r.tokens.empty()) {
      r.prefill_seconds = seconds_since(t0);
      t_decode = Clock::now();
    }
    r.tokens.push_back(next);
    sequence.push_back(next);
    if (std::find(options.stop_ids.begin(), options.stop_ids.end(), next) != options.stop_ids.end()) {
      r.stop = StopReason::eos;
      break;
    }
    emit(text_stream_push(stream, next));
    if (stream.stopped) {
      r.stop = StopReason::stop_string;
      break;
    }
    if (static_cast<int64_t>(r.tokens.size()) >= options.max_new_tokens) {
      r.stop = StopReason::max_new_tokens;
      break;
    }
    if (cache.length + 1 > cache.max_length) {
      r.stop = StopReason::context_full;
      break;
    }
    logits = feed({next});
  }
  emit(text_stream_finish(stream));
  r.decode_seconds = seconds_since(t_decode);
  return r;
}

}  // namespace qlora
