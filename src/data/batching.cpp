// Micro-batches from tokenized examples. Packed: whole documents first-fit-decreasing into bins of
// sequence_len (over a shuffled window, so that order stays random but bins are full), then
// micro_batch_size bins concatenated into ONE row with position ids restarting per document (the
// model keeps documents apart by those). Not packed: one example per row, right-padded. Targets are
// next-token labels inside a document, -100 everywhere else, so no loss crosses a boundary.
#include <algorithm>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>

#include "qlora/dataset.h"

namespace qlora {

namespace {

constexpr size_t kPackingWindow = 2048;  // examples per first-fit-decreasing window

// Fisher-Yates with mt19937_64 (std::shuffle is implementation-defined).
template <typename T>
void shuffle_by_seed(std::vector<T>& v, std::mt19937_64& rng) {
  for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[static_cast<size_t>(rng() % i)]);
}

void check_options(const BatchingOptions& o) {
  if (o.sequence_len < 1 || o.micro_batch_size < 1)
    throw std::invalid_argument("batching: sequence_len and micro_batch_size must be >= 1");
}

}  // namespace

std::vector<std::vector<int64_t>> plan_micro_batches(const std::vector<TokenizedExample>& examples,
                                                     const BatchingOptions& options) {
  check_options(options);
  std::mt19937_64 rng(options.seed);
  std::vector<int64_t> order;
  order.reserve(examples.size());
  for (size_t i = 0; i < examples.size(); ++i)
    if (!examples[i].input_ids.empty()) order.push_back(static_cast<int64_t>(i));
  shuffle_by_seed(order, rng);
  std::vector<std::vector<int64_t>> batches;
  const size_t mbs = static_cast<size_t>(options.micro_batch_size);
  if (!options.sample_packing) {
    for (size_t i = 0; i < order.size(); i += mbs)
      batches.emplace_back(order.begin() + static_cast<std::ptrdiff_t>(i),
                           order.begin() + static_cast<std::ptrdiff_t>(std::min(order.size(), i + mbs)));
    return batches;
  }
  const auto len = [&](int64_t i) {
    return std::min<int64_t>(static_cast<int64_t>(examples[static_cast<size_t>(i)].input_ids.size()), options.sequence_len);
  };
  std::vector<std::vector<int64_t>> bins;
  for (size_t w = 0; w < order.size(); w += kPackingWindow) {
    std::vector<int64_t> window(order.begin() + static_cast<std::ptrdiff_t>(w),
                                order.begin() + static_cast<std::ptrdiff_t>(std::min(order.size(), w + kPackingWindow)));
    std::stable_sort(window.begin(), window.end(), [&](int64_t a, int64_t b) { return len(a) > len(b); });
    std::vector<int64_t> room;  // free tokens per bin of this window
    const size_t first_bin = bins.size();
    for (int64_t i : window) {
      size_t b = 0;
      while (b < room.size() && room[b] < len(i)) ++b;
      if (b == room.size()) {
        room.push_back(options.sequence_len);
        bins.emplace_back();
      }
      room[b] -= len(i);
      bins[first_bin + b].push_back(i);
    }
  }
  // Bins come out longest-first per window; shuffle them so batches are not ordered by fill.
  shuffle_by_seed(bins, rng);
  for (size_t i = 0; i < bins.size(); i += mbs) {
    std::vector<int64_t> batch;
    for (size_t b = i; b < std::min(bins.size(), i + mbs); ++b) batch.insert(batch.end(), bins[b].begin(), bins[b].end());
    batches.push_back(std::move(batch));
  }
  return batches;
}

Batch make_batch(const std::vector<TokenizedExample>& examples, const std::vector<int64_t>& indices,
                 const BatchingOptions& options) {
  check_options(options);
  if (indices.empty()) throw std::invalid_argument("make_batch: no examples");
  std::vector<const TokenizedExample*> docs;
  for (int64_t i : indices) {
    if (i < 0 || static_cast<size_t>(i) >= examples.size())
      throw std::out_of_range("make_batch: example index " + std::to_string(i) + " out of range");
    const TokenizedExample& ex = examples[static_cast<size_t>(i)];
    if (ex.labels.size() != ex.input_ids.size())
      throw std::invalid_argument("make_batch: example " + std::to_string(i) + " has labels and input_ids of different lengths");
    docs.push_back(&ex);
  }
  const int64_t seq = options.sequence_len;
  auto doc_len = [&](const TokenizedExample& ex) { return std::min<int64_t>(static_cast<int64_t>(ex.input_ids.size()), seq); };

  Batch batch;
  const bool packed = options.sample_packing;
  int64_t rows = 0, width = 0, total = 0;
  for (const auto* d : docs) {
    total += doc_len(*d);
    width = std::max(width, doc_len(*d));
  }
  if (packed) {
    rows = 1;
    width = total;
    if (total > seq * options.micro_batch_size)
      throw std::invalid_argument("make_batch: " + std::to_string(total) + " tokens do not fit one packed row of " +
                                  "micro_batch_size * sequence_len = " + std::to_string(seq * options.micro_batch_size));
  } else {
    rows = static_cast<int64_t>(docs.size());
  }
  if (width == 0) throw std::invalid_argument("make_batch: every example is empty");

  const auto opts = at::TensorOptions().dtype(at::kLong);
  batch.input_ids = at::full({rows, width}, static_cast<int64_t>(options.pad_id), opts);
  batch.target_ids = at::full({rows, width}, static_cast<int64_t>(kIgnoreLabel), opts);
  batch.position_ids = at::arange(width, opts).unsqueeze(0).repeat({rows, 1});
  int64_t* ids = batch.input_ids.data_ptr<int64_t>();
  int64_t* pos = batch.position_ids.data_ptr<int64_t>();
  int64_t* tgt = batch.target_ids.data_ptr<int64_t>();

  int64_t offset = 0;  // flat position of the next document's first token
  for (size_t d = 0; d < docs.size(); ++d) {
    const TokenizedExample& ex = *docs[d];
    const int64_t n = doc_len(ex);
    if (!packed) offset = static_cast<int64_t>(d) * width;
    for (int64_t t = 0; t < n; ++t) {
      ids[offset + t] = ex.input_ids[static_cast<size_t>(t)];
      pos[offset + t] = t;
      const int32_t next = t + 1 < n ? ex.labels[static_cast<size_t>(t + 1)] : kIgnoreLabel;
      tgt[offset + t] = next;
      batch.n_target_tokens += next != kIgnoreLabel;
    }
    offset += n;
  }
  batch.n_tokens = total;
  batch.n_padding = rows * width - total;
  return batch;
}

}  // namespace qlora
