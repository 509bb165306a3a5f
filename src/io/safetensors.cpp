// safetensors: validating mmap reader, atomic writer (single file and sharded), index.json.
// Format facts are from huggingface/safetensors, safetensors/src/tensor.rs (commit 24b0b28):
//  - 8-byte little-endian header length N (at most 100,000,000), then N bytes of JSON, then the
//    data buffer; data_offsets are relative to the buffer start (MAX_HEADER_SIZE, read_metadata);
//  - sorted by offset, every entry must begin where the previous one ended, and the last one must
//    end at the end of the file: no holes, no overlaps, no trailing bytes (Metadata::validate,
//    MetadataIncompleteBuffer);
//  - the writer orders entries by descending dtype (the Dtype enum order) then by name, writes
//    "__metadata__" first, and pads the header with spaces to a multiple of 8 (prepare()).
#include "qlora/shape_str.h"
#include "qlora/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "qlora/error.h"

static_assert(std::endian::native == std::endian::little, "safetensors data is little-endian; big-endian hosts are not supported");

namespace qlora {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr int64_t kMaxHeaderSize = 100'000'000;  // MAX_HEADER_SIZE in safetensors/src/tensor.rs

struct DtypeInfo {
  const char* name;
  at::ScalarType type;
  int rank;        // position in safetensors' Dtype enum: the writer sorts by it, descending
  bool supported;  // whether torch here can hold it
};

// Rank = the Dtype enum order of safetensors/src/tensor.rs ("MUST be in increasing alignment order").
const std::vector<DtypeInfo>& dtype_table() {
  static const std::vector<DtypeInfo> table = {
      {"BOOL", at::kBool, 0, true},
      {"F4", at::kByte, 1, false},
      {"F6_E2M3", at::kByte, 2, false},
      {"F6_E3M2", at::kByte, 3, false},
      {"U8", at::kByte, 4, true},
      {"I8", at::kChar, 5, true},
      {"F8_E5M2", at::kFloat8_e5m2, 6, true},
      {"F8_E4M3", at::kFloat8_e4m3fn, 7, true},  // torch.float8_e4m3fn
      {"F8_E8M0", at::kByte, 8, false},
      {"F8_E4M3FNUZ", at::kByte, 9, false},
      {"F8_E5M2FNUZ", at::kByte, 10, false},
      {"I16", at::kShort, 11, true},
      {"U16", at::kUInt16, 12, true},
      {"F16", at::kHalf, 13, true},
      {"BF16", at::kBFloat16, 14, true},
      {"I32", at::kInt, 15, true},
      {"U32", at::kUInt32, 16, true},
      {"F32", at::kFloat, 17, true},
      {"C64", at::kComplexFloat, 18, false},
      {"F64", at::kDouble, 19, true},
      {"I64", at::kLong, 20, true},
      {"U64", at::kUInt64, 21, true},
  };
  return table;
}

int dtype_rank(at::ScalarType t) {
  for (const auto& d : dtype_table())
    if (d.supported && d.type == t) return d.rank;
  return -1;
}

std::string errno_text() { return std::strerror(errno); }

// Rejects repeated keys anywhere in the header: nlohmann keeps the last one silently, and a
// header with two entries of one name is ambiguous.
json parse_json_strict(const std::string& text, const std::string& where, const std::string& what) {
  std::vector<std::set<std::string>> keys_stack;
  std::string duplicate;
  auto cb = [&](int /*depth*/, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::object_start) keys_stack.emplace_back();
    else if (event == json::parse_event_t::object_end) { if (!keys_stack.empty()) keys_stack.pop_back(); }
    else if (event == json::parse_event_t::key && !keys_stack.empty()) {
      const std::string k = parsed.get<std::string>();
      if (!keys_stack.back().insert(k).second && duplicate.empty()) duplicate = k;
    }
    return true;
  };
  json j;
  try {
    j = json::parse(text, cb);
  } catch (const json::exception& e) {
    throw UserError(where + ": " + what + " is not valid JSON: " + e.what());
  }
  if (!duplicate.empty()) throw UserError(where + ": " + what + " has the key '" + duplicate + "' more than once");
  return j;
}

int64_t checked_nbytes(const std::vector<int64_t>& shape, int64_t itemsize, bool& overflow) {
  overflow = false;
  int64_t n = itemsize;
  for (int64_t d : shape) {
    if (d != 0 && n > std::numeric_limits<int64_t>::max() / d) { overflow = true; return 0; }
    n *= d;
  }
  return n;
}

// One write target: a file descriptor, or a string (serialize_safetensors).
using Sink = std::function<void(const void*, size_t)>;

struct PlannedEntry {
  std::string name;
  const at::Tensor* tensor;
  int64_t nbytes;
};

// The header bytes (padded) and the data order, as safetensors' prepare() lays them out.
std::string plan_file(const NamedTensors& tensors, const std::map<std::string, std::string>& metadata,
                      std::vector<PlannedEntry>& order) {
  order.clear();
  std::set<std::string> seen;
  for (const auto& [name, t] : tensors) {
    if (!seen.insert(name).second) throw UserError("safetensors writer: tensor name '" + name + "' given twice");
    if (name == "__metadata__") throw UserError("safetensors writer: '__metadata__' cannot be a tensor name");
    if (!t.defined()) throw UserError("safetensors writer: tensor '" + name + "' is undefined");
    if (dtype_rank(t.scalar_type()) < 0)
      throw UserError("safetensors writer: tensor '" + name + "' has dtype " + std::string(c10::toString(t.scalar_type())) +
                      ", which safetensors cannot store here");
    order.push_back({name, &t, static_cast<int64_t>(t.numel()) * static_cast<int64_t>(t.element_size())});
  }
  std::stable_sort(order.begin(), order.end(), [](const PlannedEntry& a, const PlannedEntry& b) {
    const int ra = dtype_rank(a.tensor->scalar_type()), rb = dtype_rank(b.tensor->scalar_type());
    if (ra != rb) return ra > rb;
    return a.name < b.name;
  });
  // ordered_json keeps the file order in the header, as the reference writer does.
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json m = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata) m[k] = v;
    header["__metadata__"] = m;
  }
  int64_t offset = 0;
  for (const auto& e : order) {
    nlohmann::ordered_json info = nlohmann::ordered_json::object();
    info["dtype"] = scalar_to_safetensors_dtype(e.tensor->scalar_type());
    info["shape"] = e.tensor->sizes().vec();
    info["data_offsets"] = {offset, offset + e.nbytes};
    header[e.name] = info;
    offset += e.nbytes;
  }
  std::string text = header.dump();
  text.resize((text.size() + 7) / 8 * 8, ' ');
  if (static_cast<int64_t>(text.size()) > kMaxHeaderSize)
    throw UserError("safetensors writer: header of " + std::to_string(text.size()) + " bytes exceeds the 100 MB limit");
  return text;
}

void write_planned(const std::string& header, const std::vector<PlannedEntry>& order, const Sink& sink) {
  const uint64_t n = header.size();
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(n >> (8 * i));
  sink(len, 8);
  sink(header.data(), header.size());
  for (const auto& e : order) {
    // One tensor at a time on the CPU: a sharded model never needs to be materialized at once.
    const at::Tensor c = e.tensor->to(at::kCPU).contiguous();
    if (e.nbytes) sink(c.data_ptr(), static_cast<size_t>(e.nbytes));
  }
}

fs::path temp_name_for(const fs::path& path) {
  static std::atomic<uint64_t> counter{0};
  return path.parent_path() / ("." + path.filename().string() + ".tmp-" + std::to_string(::getpid()) + "-" +
                               std::to_string(counter++));
}

// Writes through `fill` into a temp file next to `path`, fsyncs, renames over `path`. On any
// failure the temp file is removed and `path` is left as it was.
void write_atomic_with(const fs::path& path, const std::function<void(const Sink&)>& fill) {
  const fs::path tmp = temp_name_for(path);
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) throw UserError(path.string() + ": cannot create " + tmp.string() + ": " + errno_text());
  try {
    Sink sink = [&](const void* p, size_t size) {
      const char* c = static_cast<const char*>(p);
      while (size > 0) {
        const ssize_t w = ::write(fd, c, size);
        if (w < 0) {
          if (errno == EINTR) continue;
          throw UserError(path.string() + ": write failed: " + errno_text());
        }
        c += w;
        size -= static_cast<size_t>(w);
      }
    };
    fill(sink);
    if (::fsync(fd) != 0) throw UserError(path.string() + ": fsync failed: " + errno_text());
    if (::close(fd) != 0) { ::unlink(tmp.c_str()); throw UserError(path.string() + ": close failed: " + errno_text()); }
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string err = errno_text();
    ::unlink(tmp.c_str());
    throw UserError(path.string() + ": cannot rename " + tmp.string() + " into place: " + err);
  }
}

}  // namespace

at::ScalarType safetensors_dtype_to_scalar(const std::string& dtype, const std::string& where) {
  for (const auto& d : dtype_table()) {
    if (dtype != d.name) continue;
    if (!d.supported) throw UserError(where + ": dtype " + dtype + " is not supported by qlora (expected one of F64 F32 F16 BF16 I64 I32 I16 I8 U64 U32 U16 U8 BOOL F8_E4M3 F8_E5M2)");
    return d.type;
  }
  throw UserError(where + ": unknown dtype '" + dtype + "' (expected one of F64 F32 F16 BF16 I64 I32 I16 I8 U64 U32 U16 U8 BOOL F8_E4M3 F8_E5M2)");
}

std::string scalar_to_safetensors_dtype(at::ScalarType t) {
  for (const auto& d : dtype_table())
    if (d.supported && d.type == t) return d.name;
  throw UserError(std::string("safetensors: no safetensors dtype for torch type ") + c10::toString(t));
}

// ---- reader ------------------------------------------------------------------------------------

SafetensorsFile::SafetensorsFile(const fs::path& path) : path_(path) {
  const std::string where = path.string();
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw UserError(where + ": cannot open: " + errno_text());
  struct stat st {};
  if (::fstat(fd, &st) != 0) { ::close(fd); throw UserError(where + ": cannot stat: " + errno_text()); }
  if (S_ISDIR(st.st_mode)) { ::close(fd); throw UserError(where + ": is a directory, expected a .safetensors file"); }
  file_size_ = st.st_size;
  if (file_size_ < 8) {
    ::close(fd);
    throw UserError(where + ": file is " + std::to_string(file_size_) + " bytes, too short for the 8-byte header length (truncated?)");
  }
  // MAP_PRIVATE + PROT_WRITE: views may be written to without ever changing the file.
  void* addr = ::mmap(nullptr, static_cast<size_t>(file_size_), PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (addr == MAP_FAILED) throw UserError(where + ": cannot mmap: " + errno_text());
  const size_t map_size = static_cast<size_t>(file_size_);
  map_ = std::shared_ptr<void>(addr, [map_size](void* p) { ::munmap(p, map_size); });
  base_ = static_cast<const uint8_t*>(addr);

  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(base_[i]) << (8 * i);
  if (n > static_cast<uint64_t>(kMaxHeaderSize))
    throw UserError(where + ": header length " + std::to_string(n) + " exceeds the 100 MB limit (not a safetensors file?)");
  if (static_cast<int64_t>(n) > file_size_ - 8)
    throw UserError(where + ": header length " + std::to_string(n) + " exceeds the file size " + std::to_string(file_size_) +
                    " (truncated?)");
  data_start_ = 8 + static_cast<int64_t>(n);
  const int64_t buffer_size = file_size_ - data_start_;

  const json header = parse_json_strict(std::string(reinterpret_cast<const char*>(base_ + 8), n), where, "header");
  if (!header.is_object()) throw UserError(where + ": header is not a JSON object");

  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) throw UserError(where + ": __metadata__ must be an object of strings, found " + v.type_name());
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string())
          throw UserError(where + ": __metadata__['" + m.key() + "'] must be a string, found " + m.value().type_name());
        metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string w = where + ": tensor '" + name + "'";
    if (!v.is_object()) throw UserError(w + ": expected an object {dtype, shape, data_offsets}, found " + v.type_name());
    if (!v.contains("dtype")) throw UserError(w + ": missing 'dtype'");
    if (!v.contains("shape")) throw UserError(w + ": missing 'shape'");
    if (!v.contains("data_offsets")) throw UserError(w + ": missing 'data_offsets'");
    if (!v["dtype"].is_string()) throw UserError(w + ": 'dtype' must be a string, found " + v["dtype"].dump());
    SafetensorsEntry e;
    e.name = name;
    e.dtype = v["dtype"].get<std::string>();
    e.scalar_type = safetensors_dtype_to_scalar(e.dtype, w);
    const json& shape = v["shape"];
    if (!shape.is_array()) throw UserError(w + ": 'shape' must be a list of non-negative integers, found " + shape.dump());
    for (const auto& d : shape) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0)
        throw UserError(w + ": 'shape' must be a list of non-negative integers, found " + shape.dump());
      e.shape.push_back(d.get<int64_t>());
    }
    const json& off = v["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_integer() || !off[1].is_number_integer() ||
        off[0].get<int64_t>() < 0 || off[1].get<int64_t>() < 0)
      throw UserError(w + ": 'data_offsets' must be [begin, end] of non-negative integers, found " + off.dump());
    e.begin = off[0].get<int64_t>();
    e.end = off[1].get<int64_t>();
    if (e.end < e.begin)
      throw UserError(w + ": data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) + "] end before they begin");
    if (e.end > buffer_size)
      throw UserError(w + ": data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) + "] run past the end of the " +
                      std::to_string(buffer_size) + "-byte data buffer (truncated?)");
    bool overflow = false;
    const int64_t expected = checked_nbytes(e.shape, c10::elementSize(e.scalar_type), overflow);
    if (overflow) throw UserError(w + ": shape " + shape_str(e.shape) + " overflows");
    if (expected != e.end - e.begin)
      throw UserError(w + ": shape " + shape_str(e.shape) + " of " + e.dtype + " needs " + std::to_string(expected) +
                      " bytes, data_offsets give " + std::to_string(e.end - e.begin));
    entries_.push_back(std::move(e));
  }

  // Offsets must tile the buffer exactly, as the reference reader requires.
  std::sort(entries_.begin(), entries_.end(), [](const SafetensorsEntry& a, const SafetensorsEntry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  int64_t pos = 0;
  for (size_t i = 0; i < entries_.size(); ++i) {
    const auto& e = entries_[i];
    if (e.begin < pos)
      throw UserError(where + ": tensor '" + e.name + "' data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) +
                      "] overlap tensor '" + entries_[i - 1].name + "' (which ends at " + std::to_string(pos) + ")");
    if (e.begin > pos)
      throw UserError(where + ": bytes [" + std::to_string(pos) + ", " + std::to_string(e.begin) + ") of the data buffer belong to no tensor (hole before '" +
                      e.name + "')");
    pos = e.end;
  }
  if (pos != buffer_size)
    throw UserError(where + ": the data buffer has " + std::to_string(buffer_size - pos) + " bytes after the last tensor (expected " +
                    std::to_string(pos) + " bytes of data, found " + std::to_string(buffer_size) + ")");
  for (size_t i = 0; i < entries_.size(); ++i) index_[entries_[i].name] = i;
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  out.reserve(entries_.size());
  for (const auto& e : entries_) out.push_back(e.name);
  return out;
}

const SafetensorsEntry& SafetensorsFile::entry(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) throw UserError(path_.string() + ": no tensor named '" + name + "'");
  return entries_[it->second];
}

const uint8_t* SafetensorsFile::data(const std::string& name) const { return base_ + data_start_ + entry(name).begin; }

at::Tensor SafetensorsFile::view(const std::string& name) const {
  const SafetensorsEntry& e = entry(name);
  auto* p = const_cast<uint8_t*>(base_ + data_start_ + e.begin);
  const auto opts = at::TensorOptions().dtype(e.scalar_type).device(at::kCPU);
  const size_t itemsize = c10::elementSize(e.scalar_type);
  if (reinterpret_cast<uintptr_t>(p) % itemsize != 0) {
    at::Tensor t = at::empty(e.shape, opts);
    if (e.end > e.begin) std::memcpy(t.data_ptr(), p, static_cast<size_t>(e.end - e.begin));
    return t;
  }
  std::shared_ptr<void> keep = map_;
  return at::from_blob(p, e.shape, [keep](void*) mutable { keep.reset(); }, opts);
}

// ---- writer ------------------------------------------------------------------------------------

std::string serialize_safetensors(const NamedTensors& tensors, const std::map<std::string, std::string>& metadata) {
  std::vector<PlannedEntry> order;
  const std::string header = plan_file(tensors, metadata, order);
  std::string out;
  write_planned(header, order, [&](const void* p, size_t n) { out.append(static_cast<const char*>(p), n); });
  return out;
}

void save_safetensors(const fs::path& path, const NamedTensors& tensors, const std::map<std::string, std::string>& metadata) {
  std::vector<PlannedEntry> order;
  const std::string header = plan_file(tensors, metadata, order);
  write_atomic_with(path, [&](const Sink& sink) { write_planned(header, order, sink); });
}

void write_file_atomic(const fs::path& path, const std::string& bytes) {
  write_atomic_with(path, [&](const Sink& sink) { sink(bytes.data(), bytes.size()); });
}

void save_safetensors_index(const fs::path& path, int64_t total_size, const std::map<std::string, std::string>& weight_map) {
  json j;
  j["metadata"] = {{"total_size", total_size}};
  j["weight_map"] = weight_map;
  write_file_atomic(path, j.dump(2) + "\n");
}

std::vector<std::string> save_safetensors_sharded(const fs::path& dir, const NamedTensors& tensors, int64_t max_shard_bytes) {
  std::vector<PlannedEntry> order;
  plan_file(tensors, {}, order);  // validates and gives the safetensors order
  std::vector<std::vector<PlannedEntry>> shards(1);
  int64_t cur = 0, total = 0;
  for (const auto& e : order) {
    if (cur > 0 && cur + e.nbytes > max_shard_bytes) { shards.emplace_back(); cur = 0; }
    shards.back().push_back(e);
    cur += e.nbytes;
    total += e.nbytes;
  }
  std::vector<std::string> files;
  if (shards.size() == 1) {
    save_safetensors(dir / "model.safetensors", tensors);
    files.push_back("model.safetensors");
    return files;
  }
  std::map<std::string, std::string> weight_map;
  char buf[64];
  for (size_t i = 0; i < shards.size(); ++i) {
    // transformers' shard naming: model-00001-of-00003.safetensors
    std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", i + 1, shards.size());
    NamedTensors part;
    for (const auto& e : shards[i]) {
      part.emplace_back(e.name, *e.tensor);
      weight_map[e.name] = buf;
    }
    save_safetensors(dir / buf, part);
    files.push_back(buf);
  }
  save_safetensors_index(dir / "model.safetensors.index.json", total, weight_map);
  files.push_back("model.safetensors.index.json");
  return files;
}

// ---- checkpoints -------------------------------------------------------------------------------

SafetensorsCheckpoint::SafetensorsCheckpoint(const fs::path& path) : root_(path) {
  auto add_file = [&](const fs::path& p) {
    files_.push_back(std::make_unique<SafetensorsFile>(p));
    return files_.size() - 1;
  };
  if (!fs::exists(path)) throw UserError(path.string() + ": does not exist");
  if (!fs::is_directory(path)) {
    const size_t i = add_file(path);
    for (const auto& n : files_[i]->names()) where_[n] = i;
    return;
  }
  const fs::path index_path = path / "model.safetensors.index.json";
  if (fs::exists(index_path)) {
    sharded_ = true;
    const std::string where = index_path.string();
    std::ifstream in(index_path);
    if (!in) throw UserError(where + ": cannot open");
    std::stringstream ss;
    ss << in.rdbuf();
    const json j = parse_json_strict(ss.str(), where, "the index");
    if (!j.is_object()) throw UserError(where + ": expected a JSON object");
    if (!j.contains("weight_map")) throw UserError(where + ": missing 'weight_map'");
    const json& wm = j["weight_map"];
    if (!wm.is_object()) throw UserError(where + ": 'weight_map' must be an object {tensor name: file}, found " + wm.type_name());
    std::map<std::string, size_t> file_index;
    for (auto it = wm.begin(); it != wm.end(); ++it) {
      if (!it.value().is_string())
        throw UserError(where + ": weight_map['" + it.key() + "'] must be a file name string, found " + it.value().dump());
      const std::string file = it.value().get<std::string>();
      // Shards live next to the index: a path elsewhere is a broken (or hostile) index.
      if (file.empty() || file.find('/') != std::string::npos || file == "." || file == "..")
        throw UserError(where + ": weight_map['" + it.key() + "'] = '" + file + "' is not a file name in this directory");
      auto fi = file_index.find(file);
      if (fi == file_index.end()) {
        // The error_code form: a name the OS rejects (too long) is a missing shard, not an exception.
        std::error_code ec;
        if (!fs::exists(path / file, ec))
          throw UserError(where + ": weight_map['" + it.key() + "'] names " + file + ", which does not exist" +
                          (ec ? " (" + ec.message() + ")" : ""));
        fi = file_index.emplace(file, add_file(path / file)).first;
      }
      if (!files_[fi->second]->contains(it.key()))
        throw UserError(where + ": weight_map says '" + it.key() + "' is in " + file + ", but that file has no such tensor");
      where_[it.key()] = fi->second;
    }
    if (where_.empty()) throw UserError(where + ": 'weight_map' is empty");
    return;
  }
  fs::path single = path / "model.safetensors";
  if (!fs::exists(single)) {
    std::vector<fs::path> found;
    for (const auto& de : fs::directory_iterator(path))
      if (de.is_regular_file() && de.path().extension() == ".safetensors") found.push_back(de.path());
    if (found.empty()) throw UserError(path.string() + ": no model.safetensors, model.safetensors.index.json or other .safetensors file");
    if (found.size() > 1)
      throw UserError(path.string() + ": " + std::to_string(found.size()) +
                      " .safetensors files but no model.safetensors.index.json saying which tensor is where");
    single = found[0];
  }
  const size_t i = add_file(single);
  for (const auto& n : files_[i]->names()) where_[n] = i;
}

std::vector<std::string> SafetensorsCheckpoint::names() const {
  std::vector<std::string> out;
  out.reserve(where_.size());
  for (const auto& [n, i] : where_) out.push_back(n);
  return out;
}

const SafetensorsFile& SafetensorsCheckpoint::file_of(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) throw UserError(root_.string() + ": checkpoint has no tensor named '" + name + "'");
  return *files_[it->second];
}

}  // namespace qlora
