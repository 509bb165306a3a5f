// safetensors files: a validating, memory-mapped reader; an atomic writer in the layout the
// reference implementation (huggingface/safetensors) writes; multi-file checkpoints through
// model.safetensors.index.json.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace qlora {

// One entry of a safetensors header.
struct SafetensorsEntry {
  std::string name;
  std::string dtype;                // the file's dtype string, e.g. "BF16"
  at::ScalarType scalar_type;       // its torch type
  std::vector<int64_t> shape;
  int64_t begin = 0;                // data_offsets, relative to the data buffer
  int64_t end = 0;
};

// The safetensors dtype string <-> torch type. Unknown strings and types torch cannot hold here
// (F4, F6_*, F8_E8M0, *FNUZ, C64) are UserErrors naming `where`.
at::ScalarType safetensors_dtype_to_scalar(const std::string& dtype, const std::string& where);
std::string scalar_to_safetensors_dtype(at::ScalarType t);

// An open safetensors file. The whole header is validated on open (see safetensors.cpp), so a
// file that opens is safe to read from: every entry lies inside the file, entries cover the data
// buffer exactly, sizes agree with shapes. The mapping is shared by every view handed out and
// lives as long as the longest-lived of them.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::filesystem::path& path);

  const std::filesystem::path& path() const { return path_; }
  // Names in file order (increasing data offset).
  std::vector<std::string> names() const;
  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  const SafetensorsEntry& entry(const std::string& name) const;  // UserError when absent
  const std::vector<SafetensorsEntry>& entries() const { return entries_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // A zero-copy CPU tensor over the mapped bytes (private copy-on-write mapping: writing to it
  // never touches the file). Falls back to a copy when the bytes are not aligned for the dtype.
  at::Tensor view(const std::string& name) const;
  // An owned, contiguous CPU copy.
  at::Tensor tensor(const std::string& name) const { return view(name).clone(); }
  // The raw bytes of an entry.
  const uint8_t* data(const std::string& name) const;

 private:
  std::filesystem::path path_;
  std::shared_ptr<void> map_;  // the mapping; unmapped when the last view is gone
  const uint8_t* base_ = nullptr;
  int64_t file_size_ = 0;
  int64_t data_start_ = 0;     // 8 + header length
  std::vector<SafetensorsEntry> entries_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// Writes `tensors` (any device, any layout: each is made contiguous on the CPU one at a time)
// to `path` atomically: a temp file in the same directory, fsync, rename. Entries are ordered as
// safetensors orders them (descending dtype alignment, then name), the header is padded with
// spaces to a multiple of 8 bytes. Duplicate names are a UserError.
using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;
void save_safetensors(const std::filesystem::path& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

// The whole file image save_safetensors would write (for tests and small files).
std::string serialize_safetensors(const NamedTensors& tensors,
                                  const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

// A checkpoint directory: model.safetensors, or model.safetensors.index.json with its shards,
// or a single *.safetensors file. Names resolve to the shard that holds them.
class SafetensorsCheckpoint {
 public:
  // `path` is a directory or a single .safetensors file.
  explicit SafetensorsCheckpoint(const std::filesystem::path& path);

  std::vector<std::string> names() const;  // sorted
  bool contains(const std::string& name) const { return where_.count(name) != 0; }
  const SafetensorsFile& file_of(const std::string& name) const;
  const SafetensorsEntry& entry(const std::string& name) const { return file_of(name).entry(name); }
  at::Tensor view(const std::string& name) const { return file_of(name).view(name); }
  at::Tensor tensor(const std::string& name) const { return file_of(name).tensor(name); }
  const std::vector<std::unique_ptr<SafetensorsFile>>& files() const { return files_; }
  bool sharded() const { return sharded_; }

 private:
  std::filesystem::path root_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, size_t> where_;
  bool sharded_ = false;
};

// Writes model.safetensors.index.json ({"metadata": {"total_size": N}, "weight_map": {...}})
// atomically.
void save_safetensors_index(const std::filesystem::path& path, int64_t total_size,
                            const std::map<std::string, std::string>& weight_map);

// Writes `tensors` into `dir` as model.safetensors when their data fits in `max_shard_bytes`,
// else as model-0000k-of-0000n.safetensors shards (in safetensors order, a new shard when the
// next tensor would overflow the current one) plus model.safetensors.index.json. Returns the
// file names written.
std::vector<std::string> save_safetensors_sharded(const std::filesystem::path& dir, const NamedTensors& tensors,
                                                  int64_t max_shard_bytes);

// Atomic small-file write: temp name in the same directory, fsync, rename.
void write_file_atomic(const std::filesystem::path& path, const std::string& bytes);

}  // namespace qlora
