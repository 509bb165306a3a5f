// prepare_data: every dataset file read whole, split into records (JSONL lines, or the non-empty
// lines of a .txt file), tokenized on dataset_num_proc threads (each record's result lands in its
// own slot, so the output never depends on the thread count), bad records reported by file:line
// (or skipped and counted), then concatenated, shuffled by seed, split for validation, checked for
// masks and cached. Also format_example for `qlora preprocess --show`.
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <fstream>
#include <mutex>
#include <random>
#include <sstream>
#include <thread>

#include "qlora/dataset.h"
#include "qlora/error.h"
#include "qlora/log.h"

namespace qlora {

namespace fs = std::filesystem;
using json = nlohmann::ordered_json;  // the user's key order (see dataset_format.cpp)

namespace {

std::string read_data_file(const std::string& path, size_t index) {
  std::error_code ec;
  if (!fs::exists(path, ec))
    throw UserError("datasets[" + std::to_string(index) + "].path '" + path + "': no such file");
  if (fs::is_directory(path, ec))
    throw UserError("datasets[" + std::to_string(index) + "].path '" + path + "': is a directory (expected a .jsonl or .txt file)");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw UserError("datasets[" + std::to_string(index) + "].path '" + path + "': cannot open for reading");
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

bool is_text_file(const std::string& path) { return path.size() >= 4 && path.compare(path.size() - 4, 4, ".txt") == 0; }

// One record: a line of a data file (without its newline).
struct Record {
  uint32_t dataset = 0;
  int64_t line = 0;       // 1-based
  std::string_view text;
};

bool blank(std::string_view s) {
  return std::all_of(s.begin(), s.end(), [](char ch) { return ch == ' ' || ch == '\t' || ch == '\r' || ch == '\n'; });
}

void split_records(const std::string& bytes, uint32_t dataset, std::vector<Record>& out) {
  size_t start = 0;
  int64_t line = 0;
  // A UTF-8 byte order mark at the start of a file is not part of the first record.
  if (bytes.size() >= 3 && bytes.compare(0, 3, "\xEF\xBB\xBF") == 0) start = 3;
  while (start < bytes.size()) {
    size_t end = bytes.find('\n', start);
    if (end == std::string::npos) end = bytes.size();
    ++line;
    std::string_view text(bytes.data() + start, end - start);
    if (!text.empty() && text.back() == '\r') text.remove_suffix(1);
    if (!blank(text)) out.push_back({dataset, line, text});
    start = end + 1;
  }
}

struct Slot {
  TokenizedExample example;
  std::string error;   // non-empty: this record is bad
  bool truncated = false;
};

void tokenize_slot(const Record& r, const TrainConfig& config, const DataContext& context, Slot& slot) {
  const DatasetConfig& d = config.datasets[r.dataset];
  const std::string where = d.path + ":" + std::to_string(r.line);
  try {
    if (is_text_file(d.path)) {
      json record = json::object();
      record[d.field] = std::string(r.text);
      slot.example = tokenize_json(record, d, context, where, &slot.truncated);
    } else {
      json record = json::parse(r.text, nullptr, /*allow_exceptions=*/false);
      if (record.is_discarded()) {
        try {
          record = json::parse(r.text);
        } catch (const json::exception& e) {  // parse_error, or out_of_range for a number like 1e999
          std::string msg = e.what();
          if (auto p = msg.find("parse error"); p != std::string::npos) msg = msg.substr(p);
          throw UserError(where + ": invalid JSON: " + msg);
        }
      }
      slot.example = tokenize_json(record, d, context, where, &slot.truncated);
    }
  } catch (const UserError& e) {
    slot.error = e.what();
  }
}

int resolve_threads(int requested, size_t records) {
  int n = requested > 0 ? requested : static_cast<int>(std::thread::hardware_concurrency());
  n = std::max(1, n);
  return static_cast<int>(std::min<size_t>(static_cast<size_t>(n), std::max<size_t>(1, records / 16)));
}

void tokenize_all(const std::vector<Record>& records, const TrainConfig& config, const DataContext& context,
                  std::vector<Slot>& slots, int threads) {
  std::atomic<size_t> next{0};
  constexpr size_t kChunk = 32;
  std::exception_ptr failure;
  std::mutex failure_mutex;
  auto work = [&] {
    try {
      for (;;) {
        const size_t begin = next.fetch_add(kChunk);
        if (begin >= records.size()) return;
        const size_t end = std::min(records.size(), begin + kChunk);
        for (size_t i = begin; i < end; ++i) tokenize_slot(records[i], config, context, slots[i]);
      }
    } catch (...) {  // not a UserError: a bug; rethrown on the calling thread
      std::lock_guard<std::mutex> lock(failure_mutex);
      if (!failure) failure = std::current_exception();
      next.store(records.size());
    }
  };
  if (threads <= 1) {
    work();
  } else {
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) pool.emplace_back(work);
    for (auto& t : pool) t.join();
  }
  if (failure) std::rethrow_exception(failure);
}

// Fisher-Yates with mt19937_64: the same permutation on every platform (std::shuffle and the
// standard distributions are implementation-defined).
void shuffle_by_seed(std::vector<TokenizedExample>& v, uint64_t seed) {
  std::mt19937_64 rng(seed);
  for (size_t i = v.size(); i > 1; --i) {
    const size_t j = static_cast<size_t>(rng() % i);
    std::swap(v[i - 1], v[j]);
  }
}

// Has at least one target once labels are shifted (a label at position 0 is never predicted).
bool has_target(const TokenizedExample& ex) {
  for (size_t i = 1; i < ex.labels.size(); ++i)
    if (ex.labels[i] != kIgnoreLabel) return true;
  return false;
}

void count_tokens(const std::vector<TokenizedExample>& v, DatasetStats& s) {
  for (const auto& ex : v) {
    s.tokens += static_cast<int64_t>(ex.input_ids.size());
    for (int32_t l : ex.labels) s.trainable_tokens += l != kIgnoreLabel;
  }
}

}  // namespace

fs::path prepared_data_dir(const TrainConfig& config) {
  if (!config.dataset_prepared_path.empty()) return config.dataset_prepared_path;
  return fs::path(config.output_dir) / "prepared";
}

PreparedData prepare_data(const TrainConfig& config, const Tokenizer& tokenizer, const fs::path& cache_dir) {
  if (config.datasets.empty()) throw UserError("datasets: expected at least one dataset");
  const DataContext context = make_data_context(config, tokenizer);

  std::vector<std::string> files;
  int64_t bytes = 0;
  for (size_t i = 0; i < config.datasets.size(); ++i) {
    files.push_back(read_data_file(config.datasets[i].path, i));
    bytes += static_cast<int64_t>(files.back().size());
  }

  PreparedData out;
  out.cache_key = data_cache_key(config, tokenizer, context, files);
  if (!cache_dir.empty()) {
    out.cache_path = data_cache_file(cache_dir, out.cache_key);
    std::string why;
    std::error_code ec;
    if (fs::exists(out.cache_path, ec)) {
      if (read_data_cache(out.cache_path, out.cache_key, out, why)) {
        out.from_cache = true;
        out.stats.tokenize_seconds = 0.0;
        return out;
      }
      log_warn(cat("prepared data cache ", out.cache_path.string(), " is unusable (", why, "); rebuilding it"));
    }
  }

  const auto t0 = std::chrono::steady_clock::now();
  std::vector<Record> records;
  for (size_t i = 0; i < files.size(); ++i) {
    const size_t before = records.size();
    split_records(files[i], static_cast<uint32_t>(i), records);
    if (records.size() == before)
      throw UserError("datasets[" + std::to_string(i) + "].path '" + config.datasets[i].path +
                      "': no records (the file is empty or blank)");
  }

  DatasetStats& stats = out.stats;
  stats.bytes = bytes;
  stats.threads = resolve_threads(config.dataset_num_proc, records.size());
  std::vector<Slot> slots(records.size());
  tokenize_all(records, config, context, slots, stats.threads);
  stats.tokenize_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  // In record order, so that which error is reported never depends on the threads.
  std::vector<TokenizedExample> all;
  all.reserve(slots.size());
  std::string first_error;
  for (Slot& s : slots) {
    if (!s.error.empty()) {
      if (!config.skip_bad_lines)
        throw UserError(s.error + " (set skip_bad_lines: true to skip malformed records)");
      if (first_error.empty()) first_error = s.error;
      ++stats.skipped_lines;
      continue;
    }
    stats.truncated += s.truncated;
    if (!has_target(s.example)) {
      ++stats.dropped;
      continue;
    }
    all.push_back(std::move(s.example));
  }
  slots.clear();
  if (stats.skipped_lines > 0)
    log_warn(cat("skipped ", stats.skipped_lines, " malformed record", stats.skipped_lines == 1 ? "" : "s",
                 " (skip_bad_lines: true); the first: ", first_error));
  if (all.empty()) {
    if (stats.dropped > 0)
      throw UserError(cat("datasets: every label of all ", stats.dropped, " examples is masked, so nothing would be "
                          "trained (train_on_inputs: false and no output / assistant tokens?)"));
    throw UserError(cat("datasets: no usable examples (", stats.skipped_lines, " malformed records skipped)"));
  }
  if (stats.dropped > 0)
    log_warn(cat(stats.dropped, " example", stats.dropped == 1 ? " has" : "s have",
                 " no trained token (every label masked) and ", stats.dropped == 1 ? "is" : "are", " left out"));

  if (config.shuffle_merged_datasets) shuffle_by_seed(all, static_cast<uint64_t>(config.seed));

  // The validation examples are the last ones of the (shuffled) order.
  int64_t n_val = 0;
  const int64_t n = static_cast<int64_t>(all.size());
  if (config.val_set_size > 0) {
    n_val = config.val_set_size < 1 ? static_cast<int64_t>(std::llround(config.val_set_size * static_cast<double>(n)))
                                    : static_cast<int64_t>(config.val_set_size);
    if (n_val >= n)
      throw UserError(cat("val_set_size: ", config.val_set_size, " takes ", n_val, " of the ", n,
                          " examples and leaves none to train on"));
    if (n_val == 0) log_warn(cat("val_set_size: ", config.val_set_size, " of ", n, " examples rounds to 0: no validation set"));
  }
  out.val.assign(std::make_move_iterator(all.end() - n_val), std::make_move_iterator(all.end()));
  all.resize(static_cast<size_t>(n - n_val));
  out.train = std::move(all);

  stats.records = static_cast<int64_t>(out.train.size() + out.val.size());
  count_tokens(out.train, stats);
  count_tokens(out.val, stats);
  const double masked = 1.0 - static_cast<double>(stats.trainable_tokens) / static_cast<double>(std::max<int64_t>(1, stats.tokens));
  if (masked > 0.95)
    log_warn(cat("datasets: ", std::round(masked * 1000) / 10, " % of all labels are masked; only ", stats.trainable_tokens,
                 " of ", stats.tokens, " tokens are trained on"));

  if (!cache_dir.empty()) {
    std::error_code ec;
    fs::create_directories(cache_dir, ec);
    try {
      write_data_cache(out.cache_path, out);
    } catch (const std::exception& e) {  // a read-only place is no reason to stop training
      log_warn(cat("could not write the prepared data cache ", out.cache_path.string(), ": ", e.what()));
      out.cache_path.clear();
    }
  }
  return out;
}

std::string format_example(const TokenizedExample& example, const Tokenizer& tokenizer) {
  std::string out;
  size_t i = 0;
  const size_t n = std::min(example.input_ids.size(), example.labels.size());
  while (i < n) {
    const bool masked = example.labels[i] == kIgnoreLabel;
    size_t j = i;
    while (j < n && (example.labels[j] == kIgnoreLabel) == masked) ++j;
    const std::vector<int32_t> run(example.input_ids.begin() + static_cast<std::ptrdiff_t>(i),
                                   example.input_ids.begin() + static_cast<std::ptrdiff_t>(j));
    const std::string text = tokenizer.decode(run, /*skip_special=*/false);
    out += masked ? "\u27E6" + text + "\u27E7" : text;
    i = j;
  }
  return out;
}

}  // namespace qlora
