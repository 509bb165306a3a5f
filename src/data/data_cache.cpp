// The prepared-data cache: tokenized train/val examples and their stats in one binary file named
// by a hash of everything they depend on. Layout (little-endian, as written by the host):
//   "QLDATA\r\n" | u32 version | u32 key length | key | stats | u64 n_train | u64 n_val |
//   per example: u32 n, i32 input_ids[n], i32 labels[n] | u64 FNV-1a-64 of every byte before it
// A file that fails any check (magic, version, key, lengths, checksum) is never trusted: the caller
// rebuilds it. Written atomically so that a killed run leaves the old file or none.
#include <cstring>
#include <fstream>
#include <iomanip>
#include <sstream>

#include "qlora/dataset.h"
#include "qlora/error.h"
#include "qlora/safetensors.h"

namespace qlora {

namespace fs = std::filesystem;

namespace {

constexpr char kMagic[8] = {'Q', 'L', 'D', 'A', 'T', 'A', '\r', '\n'};
// Bump when the file layout or the way examples are built changes (then old caches miss).
constexpr uint32_t kCacheVersion = 1;

struct Writer {
  std::string bytes;
  template <typename T>
  void put(T v) {
    bytes.append(reinterpret_cast<const char*>(&v), sizeof v);
  }
  void put_ids(const std::vector<int32_t>& v) {
    bytes.append(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(int32_t));
  }
};

struct Reader {
  const std::string& bytes;
  size_t pos = 0;
  size_t end = 0;
  bool ok = true;
  template <typename T>
  T get() {
    T v{};
    if (!ok || end - pos < sizeof v) {
      ok = false;
      return v;
    }
    std::memcpy(&v, bytes.data() + pos, sizeof v);
    pos += sizeof v;
    return v;
  }
  bool get_ids(std::vector<int32_t>& v, size_t n) {
    if (!ok || (end - pos) / sizeof(int32_t) < n) return ok = false;
    v.resize(n);
    std::memcpy(v.data(), bytes.data() + pos, n * sizeof(int32_t));
    pos += n * sizeof(int32_t);
    return true;
  }
};

// Hashes a sequence of fields, each length-prefixed so that ("ab","c") != ("a","bc").
struct KeyHasher {
  uint64_t h = kFnv1a64Offset;
  void add(const std::string& s) {
    const uint64_t n = s.size();
    h = fnv1a64(&n, sizeof n, h);
    h = fnv1a64(s.data(), s.size(), h);
  }
  template <typename T>
  void add_value(T v) {
    add(std::to_string(v));
  }
};

// Everything of the tokenizer that changes token ids: the vocabulary, the special ids, and the
// encodings of probe strings (they catch a change of merges, pre-tokenizer or normalizer).
void hash_tokenizer(KeyHasher& k, const Tokenizer& tok) {
  k.add_value(static_cast<int>(tok.kind()));
  k.add_value(static_cast<int>(tok.pre_tokenizer()));
  k.add_value(tok.vocab_size());
  for (int64_t id = 0; id < tok.vocab_size(); ++id) {
    std::string t;
    try {
      t = tok.id_to_token(static_cast<int32_t>(id));
    } catch (const std::exception&) {
      t = "\x01<none>";
    }
    k.add(t);
    k.add_value(tok.is_special(static_cast<int32_t>(id)));
  }
  k.add_value(tok.bos_id());
  k.add_value(tok.eos_id());
  k.add_value(tok.pad_id());
  k.add_value(tok.adds_bos());
  k.add(tok.chat_template());
  static const char* const kProbes[] = {
      "Hello world! The quick brown fox jumps over the lazy dog 1234567890.",
      "  leading spaces,\ttabs\nand newlines\r\n\n   trailing   ",
      "def f(x):\n    return x ** 2  # comment\n",
      "I'm you're we'll they've HELLO wOrLd don't",
      "Ünïcödé: café naïve 日本語のテキスト 한국어 русский текст 😀🎉",
      "<|begin_of_text|><s></s><|im_start|>user<|eot_id|>[INST]",
  };
  for (const char* p : kProbes) {
    const std::vector<int32_t> ids = tok.encode(p, EncodeOptions{});
    k.add(std::string(reinterpret_cast<const char*>(ids.data()), ids.size() * sizeof(int32_t)));
  }
}

}  // namespace

uint64_t fnv1a64(const void* data, size_t size, uint64_t hash) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < size; ++i) {
    hash ^= p[i];
    hash *= 0x100000001b3ull;
  }
  return hash;
}

std::string data_cache_key(const TrainConfig& config, const Tokenizer& tokenizer, const DataContext& context,
                           const std::vector<std::string>& file_bytes) {
  KeyHasher k;
  k.add("qlora prepared data");
  k.add_value(kCacheVersion);
  for (size_t i = 0; i < config.datasets.size(); ++i) {
    const DatasetConfig& d = config.datasets[i];
    k.add(d.path);
    k.add_value(static_cast<int>(d.type));
    k.add(d.field);
    k.add(d.field_messages);
    k.add(d.field_tools);
    if (i < file_bytes.size()) k.add(file_bytes[i]);
  }
  hash_tokenizer(k, tokenizer);
  k.add_value(static_cast<int>(context.chat_template));
  k.add(context.chat_options.bos_token);
  k.add(context.chat_options.date_string);
  k.add(context.chat_options.default_system);
  k.add_value(context.add_bos);
  k.add_value(context.add_eos);
  k.add_value(config.sequence_len);
  k.add_value(config.train_on_inputs);
  std::ostringstream val;
  val << std::setprecision(17) << config.val_set_size;
  k.add(val.str());
  k.add_value(config.seed);
  k.add_value(config.shuffle_merged_datasets);
  k.add_value(config.skip_bad_lines);
  std::ostringstream hex;
  hex << std::hex << std::setw(16) << std::setfill('0') << k.h;
  return hex.str();
}

fs::path data_cache_file(const fs::path& cache_dir, const std::string& key) { return cache_dir / ("data-" + key + ".qdata"); }

void write_data_cache(const fs::path& path, const PreparedData& data) {
  Writer w;
  w.bytes.append(kMagic, sizeof kMagic);
  w.put<uint32_t>(kCacheVersion);
  w.put<uint32_t>(static_cast<uint32_t>(data.cache_key.size()));
  w.bytes += data.cache_key;
  const DatasetStats& s = data.stats;
  for (int64_t v : {s.records, s.skipped_lines, s.truncated, s.tokens, s.trainable_tokens, s.dropped, s.bytes}) w.put<int64_t>(v);
  w.put<double>(s.tokenize_seconds);
  w.put<int32_t>(s.threads);
  w.put<uint64_t>(data.train.size());
  w.put<uint64_t>(data.val.size());
  for (const auto* set : {&data.train, &data.val})
    for (const TokenizedExample& ex : *set) {
      if (ex.labels.size() != ex.input_ids.size()) throw std::logic_error("write_data_cache: labels and input_ids differ in length");
      w.put<uint32_t>(static_cast<uint32_t>(ex.input_ids.size()));
      w.put_ids(ex.input_ids);
      w.put_ids(ex.labels);
    }
  w.put<uint64_t>(fnv1a64(w.bytes.data(), w.bytes.size()));
  write_file_atomic(path, w.bytes);
}

bool read_data_cache(const fs::path& path, const std::string& key, PreparedData& data, std::string& why) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return why = "cannot open it", false;
  std::ostringstream s;
  s << in.rdbuf();
  const std::string bytes = s.str();
  if (bytes.size() < sizeof kMagic + 16 || std::memcmp(bytes.data(), kMagic, sizeof kMagic) != 0)
    return why = "not a qlora prepared-data file", false;
  uint64_t stored = 0;
  std::memcpy(&stored, bytes.data() + bytes.size() - 8, 8);
  if (stored != fnv1a64(bytes.data(), bytes.size() - 8)) return why = "checksum mismatch: truncated or corrupt", false;

  Reader r{bytes, sizeof kMagic, bytes.size() - 8};
  const uint32_t version = r.get<uint32_t>();
  if (version != kCacheVersion) return why = "format version " + std::to_string(version) + ", expected " + std::to_string(kCacheVersion), false;
  const uint32_t key_len = r.get<uint32_t>();
  if (!r.ok || key_len > r.end - r.pos) return why = "bad key length", false;
  if (bytes.compare(r.pos, key_len, key) != 0 || key_len != key.size()) return why = "written for other data or options", false;
  r.pos += key_len;
  PreparedData out;
  out.cache_key = key;
  DatasetStats& st = out.stats;
  for (int64_t* v : {&st.records, &st.skipped_lines, &st.truncated, &st.tokens, &st.trainable_tokens, &st.dropped, &st.bytes})
    *v = r.get<int64_t>();
  st.tokenize_seconds = r.get<double>();
  st.threads = r.get<int32_t>();
  const uint64_t n_train = r.get<uint64_t>(), n_val = r.get<uint64_t>();
  // Each example takes at least 4 bytes: counts beyond that are corrupt, not an allocation to try.
  if (!r.ok || n_train > (r.end - r.pos) / 4 || n_val > (r.end - r.pos) / 4 - n_train) return why = "bad example counts", false;
  out.train.resize(n_train);
  out.val.resize(n_val);
  for (auto* set : {&out.train, &out.val})
    for (TokenizedExample& ex : *set) {
      const uint32_t n = r.get<uint32_t>();
      if (!r.get_ids(ex.input_ids, n) || !r.get_ids(ex.labels, n)) return why = "an example runs past the end of the file", false;
    }
  if (r.pos != r.end) return why = "unexpected bytes after the last example", false;
  if (static_cast<uint64_t>(st.records) != n_train + n_val) return why = "stats disagree with the examples", false;
  out.cache_path = data.cache_path;
  data = std::move(out);
  data.cache_path = path;
  return true;
}

}  // namespace qlora
