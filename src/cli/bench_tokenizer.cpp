// qlora bench tokenizer: encode throughput (MB of UTF-8 input per second) with one thread and with
// --threads threads, on a tokenizer.json / tokenizer directory / GGUF file.
//
// Method (why): the text is --text FILE, or ~8 MB of English-like prose generated deterministically
// (common words plus made-up syllable words, so the per-thread pre-token caches see a realistic
// mix of hits and misses rather than a handful of repeated words). It is cut at line ends into
// 64 KB chunks that the threads take from a shared counter, as a data loader would. Each sample
// starts fresh threads, so the caches start cold each time; the figure is the median of --iters
// samples (default 3).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli/bench_util.h"
#include "cli/commands.h"
#include "qlora/error.h"
#include "qlora/gguf.h"
#include "qlora/tokenizer.h"

namespace qlora::cli {
namespace {

struct TokenizerBenchOptions {
  std::string tokenizer = "../shared/assets/tokenizers/llama3";
  std::string text_path;
  int threads = 0;
};

std::string generated_text(size_t bytes) {
  static const char* const kWords[] = {
      "the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not",
      "he", "I", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "had", "they", "you",
      "were", "their", "one", "all", "we", "can", "her", "has", "there", "been", "if", "more", "when", "will",
      "would", "who", "so", "no", "model", "training", "memory", "weights", "gradient", "language", "people",
      "government", "however", "because", "through", "between", "important", "different", "something",
      "understand", "information", "development", "experience", "together", "children", "question", "system",
      "don't", "it's", "we've", "they're", "she'll"};
  static const char* const kSyllables[] = {"ba", "ter", "lo", "min", "quo", "ra", "sen", "tu", "vel", "dri",
                                           "on", "ex", "pla", "gor", "fi", "nes", "ka", "tho", "ul", "spe"};
  uint64_t state = 0x9E3779B97F4A7C15ull;
  auto next = [&] {
    state ^= state << 13, state ^= state >> 7, state ^= state << 17;
    return state;
  };
  std::string out;
  out.reserve(bytes + 256);
  bool sentence_start = true;
  while (out.size() < bytes) {
    std::string w;
    const uint64_t r = next() % 100;
    if (r < 70) {
      w = kWords[next() % (sizeof kWords / sizeof *kWords)];
    } else if (r < 95) {
      const int n = 2 + static_cast<int>(next() % 3);
      for (int i = 0; i < n; ++i) w += kSyllables[next() % (sizeof kSyllables / sizeof *kSyllables)];
    } else {
      w = std::to_string(next() % 100000);
    }
    if (sentence_start && w[0] >= 'a' && w[0] <= 'z') w[0] = static_cast<char>(w[0] - 32);
    out += w;
    sentence_start = false;
    const uint64_t p = next() % 100;
    if (p < 6) {
      out += ". ";
      sentence_start = true;
    } else if (p < 7) {
      out += ".\n\n";
      sentence_start = true;
    } else if (p < 11) {
      out += ", ";
    } else if (p < 12) {
      out += "? ";
      sentence_start = true;
    } else {
      out += ' ';
    }
  }
  return out;
}

std::vector<std::string_view> chunks(const std::string& text, size_t size) {
  std::vector<std::string_view> out;
  for (size_t pos = 0; pos < text.size();) {
    size_t end = std::min(text.size(), pos + size);
    const size_t nl = text.find('\n', end);
    end = nl == std::string::npos ? text.size() : nl + 1;
    out.emplace_back(text.data() + pos, end - pos);
    pos = end;
  }
  return out;
}


struct Sample {
  double seconds;
  size_t tokens;
};

Sample run_once(const Tokenizer& tok, const std::vector<std::string_view>& parts, int threads) {
  std::atomic<size_t> next{0}, tokens{0};
  auto work = [&] {
    size_t n = 0;
    for (size_t i; (i = next.fetch_add(1)) < parts.size();) n += tok.encode(parts[i]).size();
    tokens += n;
  };
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> pool;
  for (int i = 0; i < threads; ++i) pool.emplace_back(work);
  for (std::thread& t : pool) t.join();
  const auto t1 = std::chrono::steady_clock::now();
  return {std::chrono::duration<double>(t1 - t0).count(), tokens.load()};
}

int run_bench_tokenizer(const TokenizerBenchOptions& o, int iters, const std::string& json_path) {
  if (iters <= 0) iters = 3;
  const int all = o.threads > 0 ? o.threads : std::max(1u, std::thread::hardware_concurrency());
  const std::filesystem::path path(o.tokenizer);
  if (!std::filesystem::exists(path))
    throw UserError("qlora bench tokenizer: --tokenizer " + o.tokenizer +
                    " does not exist (expected a tokenizer.json, a directory holding one, or a .gguf)");
  const Tokenizer tok = path.extension() == ".gguf" ? tokenizer_from_gguf(GgufFile(path)) : load_tokenizer(path);
  std::string text;
  if (!o.text_path.empty()) {
    std::ifstream in(o.text_path, std::ios::binary);
    if (!in) throw UserError("qlora bench tokenizer: cannot read --text " + o.text_path);
    text.assign(std::istreambuf_iterator<char>(in), {});
  } else {
    text = generated_text(8u << 20);
  }
  const std::vector<std::string_view> parts = chunks(text, 64 << 10);
  const double mb = static_cast<double>(text.size()) / 1e6;
  std::printf("qlora bench tokenizer: %s (%s, pre-tokenizer %s, vocab %lld)\n", o.tokenizer.c_str(),
              tok.kind() == TokenizerKind::byte_level_bpe ? "byte-level BPE" : "sentencepiece BPE",
              pre_tokenizer_name(tok.pre_tokenizer()), static_cast<long long>(tok.vocab_size()));
  std::printf("text: %s, %.2f MB in %zu chunks; median of %d samples, threads started cold each sample\n",
              o.text_path.empty() ? "generated English" : o.text_path.c_str(), mb, parts.size(), iters);
  std::printf("%8s %10s %14s %12s\n", "threads", "MB/s", "tokens/s", "tokens");
  nlohmann::json results = nlohmann::json::array();
  std::vector<int> counts = {1};
  if (all != 1) counts.push_back(all);
  for (int threads : counts) {
    std::vector<Sample> samples;
    for (int i = 0; i < iters; ++i) samples.push_back(run_once(tok, parts, threads));
    std::sort(samples.begin(), samples.end(), [](const Sample& a, const Sample& b) { return a.seconds < b.seconds; });
    const Sample s = samples[samples.size() / 2];
    std::printf("%8d %10.2f %14.0f %12zu\n", threads, mb / s.seconds, static_cast<double>(s.tokens) / s.seconds,
                s.tokens);
    results.push_back({{"threads", threads}, {"mb_per_s", mb / s.seconds}, {"tokens", s.tokens},
                       {"seconds", s.seconds}});
  }
  if (!json_path.empty()) {
    write_bench_json("tokenizer", json_path,
                     {{"bench", "tokenizer"}, {"tokenizer", o.tokenizer}, {"text_bytes", text.size()},
                      {"iters", iters}, {"results", results}});
  }
  return kExitOk;
}

}  // namespace

BenchTokenizerFn add_bench_tokenizer_options(CLI::App& bench) {
  auto st = std::make_shared<TokenizerBenchOptions>();
  bench.add_option("--tokenizer", st->tokenizer, "tokenizer: a tokenizer.json, its directory, or a .gguf")
      ->capture_default_str();
  bench.add_option("--text", st->text_path, "tokenizer: encode this file instead of generated English text");
  bench.add_option("--threads", st->threads, "tokenizer: threads for the multi-threaded figure (0: all cores)")
      ->capture_default_str();
  return [st](int iters, const std::string& json_path) { return run_bench_tokenizer(*st, iters, json_path); };
}

}  // namespace qlora::cli
