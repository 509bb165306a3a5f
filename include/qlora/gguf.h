// GGUF (llama.cpp's file format, version 3; 2 is read too): metadata key/values, tensor infos and
// tensor data. The reader memory-maps the file and validates the whole header on open, so a file
// that opens is safe to read from; the writer writes atomically (temp file, fsync, rename).
// Format facts from ggml/docs/gguf.md: little-endian; magic "GGUF"; u32 version; u64 tensor
// count; u64 metadata count; key = u64 length + bytes; value = u32 type + payload; arrays =
// u32 element type + u64 count + elements; tensor info = name, u32 n_dims, u64 dims[n] (ggml
// order: dims[0] varies fastest), u32 ggml type, u64 offset (relative to the data section, a
// multiple of the alignment); data section starts at the first multiple of `general.alignment`
// (default 32) after the header.
#pragma once
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace qlora {

enum class GgufType : uint32_t {
  uint8 = 0, int8 = 1, uint16 = 2, int16 = 3, uint32 = 4, int32 = 5, float32 = 6, boolean = 7,
  string = 8, array = 9, uint64 = 10, int64 = 11, float64 = 12,
};

// ggml tensor types this project reads or writes (values from ggml.h).
enum class GgmlType : uint32_t {
  f32 = 0, f16 = 1, q4_0 = 2, q4_1 = 3, q5_0 = 6, q5_1 = 7, q8_0 = 8, q8_1 = 9,
  q2_k = 10, q3_k = 11, q4_k = 12, q5_k = 13, q6_k = 14, q8_k = 15, bf16 = 30,
};
std::string ggml_type_name(GgmlType t);   // "f32", "q4_0", ...; "type<N>" for others
// Elements per block (1 for f32/f16/bf16, 32 for q4_0..q8_1, 256 for the k-quants); 0 for
// types this project does not know.
int64_t ggml_block_size(GgmlType t);
std::string gguf_type_name(GgufType t);   // "uint8", ..., "string", "array"; "type<N>" for others
// Bytes of `n_elements` of type t along dims[0] (n_elements must be a multiple of the block
// size). UserError naming `where` for types whose layout this project does not know.
uint64_t ggml_row_bytes(GgmlType t, int64_t n_elements, const std::string& where);

// One metadata value. Scalars fill the one member their type uses (all integer types and bool:
// `integer` (uint64 values above INT64_MAX are kept in `uinteger` too); float32/float64:
// `real`; string: `str`). Arrays set `array_type` and fill `strings`, `integers` or `reals`.
// Arrays of arrays are rejected by the reader (llama.cpp's files have none).
// For uint64 (scalar or array element) `integer` holds the value's bits: the writer writes those.
struct GgufValue {
  GgufType type = GgufType::uint32;
  GgufType array_type = GgufType::uint8;
  int64_t integer = 0;
  uint64_t uinteger = 0;
  double real = 0.0;
  std::string str;
  std::vector<std::string> strings;
  std::vector<int64_t> integers;
  std::vector<double> reals;

  static GgufValue make_string(std::string s);
  static GgufValue make_uint32(uint32_t v);
  static GgufValue make_int32(int32_t v);
  static GgufValue make_uint64(uint64_t v);
  static GgufValue make_float32(float v);
  static GgufValue make_bool(bool v);
  static GgufValue make_string_array(std::vector<std::string> v);
  static GgufValue make_int_array(GgufType element_type, std::vector<int64_t> v);   // any integer type
  static GgufValue make_float_array(std::vector<double> v);                        // float32 elements
};

struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> dims;   // ggml order: dims[0] is the fastest-varying (a row's length)
  GgmlType type = GgmlType::f32;
  uint64_t offset = 0;         // relative to the data section
  uint64_t nbytes = 0;         // computed from dims and type
  int64_t numel() const;
};

// An open GGUF file. Every key, string and tensor lies inside the file, tensor regions do not
// overlap, offsets are aligned, counts are sane (a corrupt count cannot make it allocate
// gigabytes): anything else is a UserError naming the file and what is wrong.
class GgufFile {
 public:
  explicit GgufFile(const std::filesystem::path& path);

  const std::filesystem::path& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }

  // Metadata in file order.
  const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return metadata_; }
  bool contains(const std::string& key) const { return index_.count(key) != 0; }
  const GgufValue* find(const std::string& key) const;   // nullptr when absent
  // Typed getters: UserError naming the file and key when absent or of another type.
  const GgufValue& at(const std::string& key) const;
  std::string get_string(const std::string& key) const;
  int64_t get_int(const std::string& key) const;          // any integer type or bool
  double get_float(const std::string& key) const;         // float32/float64 (integers accepted)
  bool get_bool(const std::string& key) const;
  const std::vector<std::string>& get_string_array(const std::string& key) const;
  const std::vector<int64_t>& get_int_array(const std::string& key) const;
  const std::vector<double>& get_float_array(const std::string& key) const;

  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const GgufTensorInfo* find_tensor(const std::string& name) const;   // nullptr when absent
  const uint8_t* tensor_data(const GgufTensorInfo& t) const;         // into the mapping

 private:
  std::filesystem::path path_;
  std::shared_ptr<void> map_;
  const uint8_t* base_ = nullptr;
  uint64_t file_size_ = 0;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t data_start_ = 0;
  std::vector<std::pair<std::string, GgufValue>> metadata_;
  std::map<std::string, size_t> index_;
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string, size_t> tensor_index_;
};

// Builds a GGUF v3 file: metadata in insertion order (setting a key twice replaces it), tensors
// in insertion order, each padded to `alignment`.
class GgufWriter {
 public:
  void set(const std::string& key, GgufValue value);
  // `data` holds exactly ggml_row_bytes(type, dims[0]) * (rows) bytes; copied.
  void add_tensor(const std::string& name, GgmlType type, std::vector<int64_t> dims, const void* data,
                  uint64_t nbytes);
  // The file image; `write` puts it on disk atomically.
  std::string serialize() const;
  void write(const std::filesystem::path& path) const;
  uint64_t alignment = 32;

 private:
  std::vector<std::pair<std::string, GgufValue>> metadata_;
  struct PendingTensor { std::string name; GgmlType type; std::vector<int64_t> dims; std::string bytes; };
  std::vector<PendingTensor> tensors_;
};

}  // namespace qlora
