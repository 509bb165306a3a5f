// GGUF: validating mmap reader (llama.cpp's model file format, v3; v2 read too); the writer is gguf_writer.cpp.
// Format facts are from ggml-org/ggml, docs/gguf.md and src/gguf.cpp (gguf_init_from_reader,
// gguf_write_out):
//  - little-endian; "GGUF", u32 version, u64 tensor count, u64 kv count; strings are u64 length +
//    bytes (no NUL); a value is a u32 type then its payload; an array is u32 element type + u64
//    count + elements; bool is one byte; v2 and v3 share this layout (v1 had u32 lengths);
//  - a tensor info is name, u32 n_dims, u64 dims[n_dims], u32 ggml type, u64 offset relative to
//    the data section; the data section starts at the first multiple of general.alignment (u32,
//    a power of two, default 32) after the last tensor info;
//  - the writer pads with zeros after the tensor infos and after every tensor's data (the last
//    one included), so each tensor's offset is the running sum of padded sizes.
// Block sizes (elements, bytes) are ggml's type_traits (ggml.c) over the block structs of
// ggml-common.h: q4_0 = fp16 d + 16 B; q4_1 = d, m + 16 B; q5_0 = d + 4 B qh + 16 B; q5_1 = d, m +
// 4 + 16; q8_0 = d + 32 B; q8_1 = d, s + 32 B; k-quants are 256-element super-blocks.
#include "qlora/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <limits>
#include <set>

#include "io/gguf_internal.h"
#include "qlora/error.h"

static_assert(std::endian::native == std::endian::little, "GGUF data is little-endian; big-endian hosts are not supported");

namespace qlora {
namespace fs = std::filesystem;

namespace gguf_detail {

const std::vector<BlockInfo>& block_table() {
  static const std::vector<BlockInfo> table = {
      {GgmlType::f32, "f32", 1, 4},       {GgmlType::f16, "f16", 1, 2},         {GgmlType::bf16, "bf16", 1, 2},
      {GgmlType::q4_0, "q4_0", 32, 18},   {GgmlType::q4_1, "q4_1", 32, 20},     {GgmlType::q5_0, "q5_0", 32, 22},
      {GgmlType::q5_1, "q5_1", 32, 24},   {GgmlType::q8_0, "q8_0", 32, 34},     {GgmlType::q8_1, "q8_1", 32, 36},
      {GgmlType::q2_k, "q2_K", 256, 84},  {GgmlType::q3_k, "q3_K", 256, 110},   {GgmlType::q4_k, "q4_K", 256, 144},
      {GgmlType::q5_k, "q5_K", 256, 176}, {GgmlType::q6_k, "q6_K", 256, 210},   {GgmlType::q8_k, "q8_K", 256, 292},
  };
  return table;
}

const BlockInfo* block_info(GgmlType t) {
  for (const auto& b : block_table())
    if (b.type == t) return &b;
  return nullptr;
}

std::string known_types() {
  std::string s;
  for (const auto& b : block_table()) {
    if (!s.empty()) s += ' ';
    s += b.name;
  }
  return s;
}

bool is_float_type(GgufType t) { return t == GgufType::float32 || t == GgufType::float64; }

bool is_known_type(uint32_t t) { return t <= static_cast<uint32_t>(GgufType::float64); }

uint64_t pad_to(uint64_t n, uint64_t alignment) { return (n + alignment - 1) / alignment * alignment; }

std::string dims_str(const std::vector<int64_t>& d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(d[i]);
  }
  return s + "]";
}

// Bytes of a tensor of these dims and type; UserError naming `where` on any inconsistency.
uint64_t tensor_nbytes(GgmlType type, const std::vector<int64_t>& dims, const std::string& where) {
  const uint64_t row = ggml_row_bytes(type, dims[0], where);
  uint64_t rows = 1;
  for (size_t i = 1; i < dims.size(); ++i)
    if (__builtin_mul_overflow(rows, static_cast<uint64_t>(dims[i]), &rows))
      throw UserError(where + ": dims " + dims_str(dims) + " overflow");
  uint64_t total = 0;
  if (__builtin_mul_overflow(row, rows, &total) || total > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
    throw UserError(where + ": dims " + dims_str(dims) + " of " + ggml_type_name(type) + " overflow");
  return total;
}

std::string type_desc(const GgufValue& v) {
  return v.type == GgufType::array ? "array of " + gguf_type_name(v.array_type) : gguf_type_name(v.type);
}

}  // namespace gguf_detail

using namespace gguf_detail;

namespace {

constexpr uint64_t kHeaderBytes = 24;       // magic, version, tensor count, kv count
constexpr uint64_t kMinKvBytes = 8 + 4 + 1;             // empty key length, type, one-byte value
constexpr uint64_t kMinTensorInfoBytes = 8 + 4 + 8 + 4 + 8;  // name length, n_dims, one dim, type, offset

// Payload size of a fixed-size value type; 0 for string/array/unknown.
uint64_t scalar_size(GgufType t) {
  switch (t) {
    case GgufType::uint8: case GgufType::int8: case GgufType::boolean: return 1;
    case GgufType::uint16: case GgufType::int16: return 2;
    case GgufType::uint32: case GgufType::int32: case GgufType::float32: return 4;
    case GgufType::uint64: case GgufType::int64: case GgufType::float64: return 8;
    default: return 0;
  }
}

bool is_integer_type(GgufType t) {
  return scalar_size(t) != 0 && t != GgufType::float32 && t != GgufType::float64;  // bool included
}


std::string errno_text() { return std::strerror(errno); }

// Sequential little-endian reads over the mapping; every read is bounds-checked first.
struct Cursor {
  const uint8_t* base;
  uint64_t size;
  uint64_t pos;
  const std::string& where;

  uint64_t left() const { return size - pos; }
  void need(uint64_t n, const std::string& what) const {
    if (n > left())
      throw UserError(where + ": truncated: " + what + " at offset " + std::to_string(pos) + " needs " + std::to_string(n) +
                      " bytes, the file has " + std::to_string(left()) + " left");
  }
  template <typename T>
  T read(const std::string& what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, base + pos, sizeof(T));
    pos += sizeof(T);
    return v;
  }
  std::string read_string(const std::string& what) {
    const uint64_t at = pos;
    const uint64_t n = read<uint64_t>(what + " length");
    if (n > left())
      throw UserError(where + ": " + what + " at offset " + std::to_string(at) + " claims " + std::to_string(n) +
                      " bytes, the file has " + std::to_string(left()) + " left (corrupt or truncated?)");
    std::string s(reinterpret_cast<const char*>(base + pos), static_cast<size_t>(n));
    pos += n;
    return s;
  }
};

// One scalar of type t (not string, not array) as integer bits / real.
void read_scalar(Cursor& c, GgufType t, const std::string& what, int64_t& integer, uint64_t& uinteger, double& real) {
  switch (t) {
    case GgufType::uint8: integer = c.read<uint8_t>(what); uinteger = static_cast<uint64_t>(integer); return;
    case GgufType::int8: integer = c.read<int8_t>(what); return;
    case GgufType::uint16: integer = c.read<uint16_t>(what); uinteger = static_cast<uint64_t>(integer); return;
    case GgufType::int16: integer = c.read<int16_t>(what); return;
    case GgufType::uint32: integer = c.read<uint32_t>(what); uinteger = static_cast<uint64_t>(integer); return;
    case GgufType::int32: integer = c.read<int32_t>(what); return;
    case GgufType::uint64: uinteger = c.read<uint64_t>(what); integer = static_cast<int64_t>(uinteger); return;
    case GgufType::int64: integer = c.read<int64_t>(what); return;
    case GgufType::float32: real = c.read<float>(what); return;
    case GgufType::float64: real = c.read<double>(what); return;
    case GgufType::boolean: {
      const uint8_t b = c.read<uint8_t>(what);
      // docs/gguf.md: "Anything else is invalid".
      if (b > 1) throw UserError(c.where + ": " + what + " is a bool of value " + std::to_string(b) + " (expected 0 or 1)");
      integer = b;
      return;
    }
    default: throw UserError(c.where + ": " + what + ": internal: not a scalar type");
  }
}

GgufValue read_value(Cursor& c, const std::string& key) {
  const std::string w = "metadata '" + key + "'";
  GgufValue v;
  const uint32_t type = c.read<uint32_t>(w + " value type");
  if (!is_known_type(type))
    throw UserError(c.where + ": " + w + " has unknown value type " + std::to_string(type) + " (expected 0 to 12)");
  v.type = static_cast<GgufType>(type);
  if (v.type == GgufType::string) {
    v.str = c.read_string(w + " string");
    return v;
  }
  if (v.type != GgufType::array) {
    read_scalar(c, v.type, w + " value", v.integer, v.uinteger, v.real);
    return v;
  }
  const uint32_t et = c.read<uint32_t>(w + " array element type");
  if (!is_known_type(et))
    throw UserError(c.where + ": " + w + " is an array of unknown value type " + std::to_string(et) + " (expected 0 to 12)");
  v.array_type = static_cast<GgufType>(et);
  if (v.array_type == GgufType::array)
    throw UserError(c.where + ": " + w + " is an array of arrays, which qlora does not read (llama.cpp files have none)");
  const uint64_t count_at = c.pos;
  const uint64_t n = c.read<uint64_t>(w + " array count");
  // Each element takes at least this many bytes, so a corrupt count fails here, before any
  // allocation proportional to it.
  const uint64_t min_size = v.array_type == GgufType::string ? 8 : scalar_size(v.array_type);
  if (n > c.left() / min_size)
    throw UserError(c.where + ": " + w + " array count " + std::to_string(n) + " at offset " + std::to_string(count_at) + " needs at least " +
                    std::to_string(min_size) + " bytes per " + gguf_type_name(v.array_type) + " element, the file has " +
                    std::to_string(c.left()) + " bytes left (corrupt or truncated?)");
  const std::string ew = w + " array element";
  if (v.array_type == GgufType::string) {
    v.strings.reserve(n);
    for (uint64_t i = 0; i < n; ++i) v.strings.push_back(c.read_string(ew + " " + std::to_string(i)));
  } else if (is_float_type(v.array_type)) {
    v.reals.resize(n);
    int64_t ig = 0;
    uint64_t ug = 0;
    for (uint64_t i = 0; i < n; ++i) read_scalar(c, v.array_type, ew, ig, ug, v.reals[i]);
  } else {
    v.integers.resize(n);
    uint64_t ug = 0;
    double rg = 0;
    for (uint64_t i = 0; i < n; ++i) read_scalar(c, v.array_type, ew, v.integers[i], ug, rg);
  }
  return v;
}



}  // namespace

// ---- types ---------------------------------------------------------------------------------------

std::string ggml_type_name(GgmlType t) {
  const BlockInfo* b = block_info(t);
  return b ? b->name : "type" + std::to_string(static_cast<uint32_t>(t));
}

int64_t ggml_block_size(GgmlType t) {
  const BlockInfo* b = block_info(t);
  return b ? b->block : 0;
}

uint64_t ggml_row_bytes(GgmlType t, int64_t n_elements, const std::string& where) {
  const BlockInfo* b = block_info(t);
  if (!b)
    throw UserError(where + ": ggml type " + std::to_string(static_cast<uint32_t>(t)) + " is not one qlora knows (expected one of " +
                    known_types() + ")");
  if (n_elements < 0 || n_elements % b->block != 0)
    throw UserError(where + ": a row of " + std::to_string(n_elements) + " elements is not a multiple of the " + b->name +
                    " block size " + std::to_string(b->block));
  uint64_t bytes = 0;
  if (__builtin_mul_overflow(static_cast<uint64_t>(n_elements / b->block), static_cast<uint64_t>(b->bytes), &bytes))
    throw UserError(where + ": a row of " + std::to_string(n_elements) + " " + b->name + " elements overflows");
  return bytes;
}

std::string gguf_type_name(GgufType t) {
  static const char* names[] = {"uint8", "int8",  "uint16", "int16",  "uint32", "int32",  "float32",
                                "bool",  "string", "array", "uint64", "int64", "float64"};
  const auto i = static_cast<uint32_t>(t);
  return i < 13 ? names[i] : "type" + std::to_string(i);
}

GgufValue GgufValue::make_string(std::string s) { GgufValue v; v.type = GgufType::string; v.str = std::move(s); return v; }
GgufValue GgufValue::make_uint32(uint32_t x) { GgufValue v; v.type = GgufType::uint32; v.integer = x; v.uinteger = x; return v; }
GgufValue GgufValue::make_int32(int32_t x) { GgufValue v; v.type = GgufType::int32; v.integer = x; return v; }
GgufValue GgufValue::make_uint64(uint64_t x) {
  GgufValue v;
  v.type = GgufType::uint64;
  v.integer = static_cast<int64_t>(x);
  v.uinteger = x;
  return v;
}
GgufValue GgufValue::make_float32(float x) { GgufValue v; v.type = GgufType::float32; v.real = x; return v; }
GgufValue GgufValue::make_bool(bool x) { GgufValue v; v.type = GgufType::boolean; v.integer = x ? 1 : 0; return v; }
GgufValue GgufValue::make_string_array(std::vector<std::string> x) {
  GgufValue v;
  v.type = GgufType::array;
  v.array_type = GgufType::string;
  v.strings = std::move(x);
  return v;
}
GgufValue GgufValue::make_int_array(GgufType element_type, std::vector<int64_t> x) {
  if (!is_integer_type(element_type))
    throw UserError("gguf: make_int_array: element type " + gguf_type_name(element_type) + " is not an integer type");
  GgufValue v;
  v.type = GgufType::array;
  v.array_type = element_type;
  v.integers = std::move(x);
  return v;
}
GgufValue GgufValue::make_float_array(std::vector<double> x) {
  GgufValue v;
  v.type = GgufType::array;
  v.array_type = GgufType::float32;
  v.reals = std::move(x);
  return v;
}

int64_t GgufTensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : dims) n *= d;
  return n;
}

// ---- reader ------------------------------------------------------------------------------------

GgufFile::GgufFile(const fs::path& path) : path_(path) {
  const std::string where = path.string();
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw UserError(where + ": cannot open: " + errno_text());
  struct stat st {};
  if (::fstat(fd, &st) != 0) { ::close(fd); throw UserError(where + ": cannot stat: " + errno_text()); }
  if (S_ISDIR(st.st_mode)) { ::close(fd); throw UserError(where + ": is a directory, expected a .gguf file"); }
  file_size_ = static_cast<uint64_t>(st.st_size);
  if (file_size_ < kHeaderBytes) {
    ::close(fd);
    throw UserError(where + ": file is " + std::to_string(file_size_) + " bytes, too short for the 24-byte GGUF header (truncated?)");
  }
  void* addr = ::mmap(nullptr, static_cast<size_t>(file_size_), PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (addr == MAP_FAILED) throw UserError(where + ": cannot mmap: " + errno_text());
  const size_t map_size = static_cast<size_t>(file_size_);
  map_ = std::shared_ptr<void>(addr, [map_size](void* p) { ::munmap(p, map_size); });
  base_ = static_cast<const uint8_t*>(addr);

  if (std::memcmp(base_, "GGUF", 4) != 0) {
    std::string shown;
    for (int i = 0; i < 4; ++i) shown += std::isprint(base_[i]) ? static_cast<char>(base_[i]) : '?';
    throw UserError(where + ": not a GGUF file: magic is '" + shown + "', expected 'GGUF'");
  }
  Cursor c{base_, file_size_, 4, where};
  version_ = c.read<uint32_t>("version");
  if (version_ == 1)
    throw UserError(where + ": GGUF version 1 is not supported (expected 2 or 3; v1 predates 64-bit lengths: re-convert the model "
                    "with a current llama.cpp)");
  if (version_ != 2 && version_ != 3) {
    const bool swapped = (version_ & 0xFFFF) == 0;  // a v2/v3 big-endian file read little-endian
    throw UserError(where + ": GGUF version " + std::to_string(version_) + " is not supported (expected 2 or 3)" +
                    (swapped ? "; a big-endian GGUF file?" : ""));
  }
  const uint64_t n_tensors = c.read<uint64_t>("tensor count");
  const uint64_t n_kv = c.read<uint64_t>("metadata count");
  if (n_kv > c.left() / kMinKvBytes)
    throw UserError(where + ": metadata count " + std::to_string(n_kv) + " cannot fit in the " + std::to_string(c.left()) +
                    " bytes after the header (corrupt or truncated?)");

  for (uint64_t i = 0; i < n_kv; ++i) {
    const std::string what = "metadata key #" + std::to_string(i);
    std::string key = c.read_string(what);
    if (key.empty()) throw UserError(where + ": " + what + " is empty");
    if (index_.count(key)) throw UserError(where + ": metadata key '" + key + "' appears more than once");
    GgufValue v = read_value(c, key);
    index_[key] = metadata_.size();
    metadata_.emplace_back(std::move(key), std::move(v));
  }
  if (const GgufValue* a = find("general.alignment")) {
    if (a->type != GgufType::uint32)
      throw UserError(where + ": general.alignment is " + gguf_type_name(a->type) + ", expected uint32");
    if (a->integer == 0 || (a->integer & (a->integer - 1)) != 0)
      throw UserError(where + ": general.alignment is " + std::to_string(a->integer) + ", expected a power of two");
    alignment_ = static_cast<uint64_t>(a->integer);
  }

  if (n_tensors > c.left() / kMinTensorInfoBytes)
    throw UserError(where + ": tensor count " + std::to_string(n_tensors) + " cannot fit in the " + std::to_string(c.left()) +
                    " bytes after the metadata (corrupt or truncated?)");
  tensors_.reserve(n_tensors);
  for (uint64_t i = 0; i < n_tensors; ++i) {
    GgufTensorInfo t;
    t.name = c.read_string("tensor name #" + std::to_string(i));
    const std::string w = "tensor '" + t.name + "'";
    if (tensor_index_.count(t.name)) throw UserError(where + ": " + w + " appears more than once");
    const uint32_t n_dims = c.read<uint32_t>(w + " n_dims");
    if (n_dims < 1 || n_dims > kMaxDims)
      throw UserError(where + ": " + w + " has n_dims " + std::to_string(n_dims) + " (expected 1 to 4)");
    for (uint32_t d = 0; d < n_dims; ++d) {
      const uint64_t dim = c.read<uint64_t>(w + " dims");
      if (dim == 0 || dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        throw UserError(where + ": " + w + " dimension " + std::to_string(d) + " is " + std::to_string(dim) + " (expected > 0)");
      t.dims.push_back(static_cast<int64_t>(dim));
    }
    const uint32_t type = c.read<uint32_t>(w + " type");
    t.type = static_cast<GgmlType>(type);
    if (!block_info(t.type))
      throw UserError(where + ": " + w + " has ggml type " + std::to_string(type) + ", which qlora does not know (expected one of " +
                      known_types() + ")");
    t.nbytes = tensor_nbytes(t.type, t.dims, where + ": " + w + " " + dims_str(t.dims));
    t.offset = c.read<uint64_t>(w + " offset");
    if (t.offset % alignment_ != 0)
      throw UserError(where + ": " + w + " data offset " + std::to_string(t.offset) + " is not a multiple of the alignment " +
                      std::to_string(alignment_));
    tensor_index_[t.name] = tensors_.size();
    tensors_.push_back(std::move(t));
  }
  data_start_ = pad_to(c.pos, alignment_);

  // Every tensor inside the file; no two sharing a byte (holes between them are allowed).
  std::vector<const GgufTensorInfo*> by_offset;
  for (const auto& t : tensors_) {
    uint64_t begin = 0, end = 0;
    if (__builtin_add_overflow(data_start_, t.offset, &begin) || __builtin_add_overflow(begin, t.nbytes, &end))
      throw UserError(where + ": tensor '" + t.name + "' data offset " + std::to_string(t.offset) +
                      " lies past the end of the file (size " + std::to_string(file_size_) + ")");
    if (end > file_size_)
      throw UserError(where + ": tensor '" + t.name + "' data [" + std::to_string(begin) + ".." + std::to_string(end) +
                      ") lies past the end of the file (size " + std::to_string(file_size_) + ")");
    by_offset.push_back(&t);
  }
  std::sort(by_offset.begin(), by_offset.end(), [](const GgufTensorInfo* a, const GgufTensorInfo* b) { return a->offset < b->offset; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const GgufTensorInfo& a = *by_offset[i - 1];
    const GgufTensorInfo& b = *by_offset[i];
    if (b.offset < a.offset + a.nbytes)
      throw UserError(where + ": tensor '" + b.name + "' data [" + std::to_string(b.offset) + ".." + std::to_string(b.offset + b.nbytes) +
                      ") overlaps tensor '" + a.name + "' [" + std::to_string(a.offset) + ".." + std::to_string(a.offset + a.nbytes) +
                      ") (offsets relative to the data section)");
  }
}

const GgufValue* GgufFile::find(const std::string& key) const {
  auto it = index_.find(key);
  return it == index_.end() ? nullptr : &metadata_[it->second].second;
}

const GgufValue& GgufFile::at(const std::string& key) const {
  const GgufValue* v = find(key);
  if (!v) throw UserError(path_.string() + ": no metadata key '" + key + "'");
  return *v;
}

namespace {
[[noreturn]] void wrong_type(const fs::path& p, const std::string& key, const GgufValue& v, const std::string& expected) {
  throw UserError(p.string() + ": metadata '" + key + "' is " + type_desc(v) + ", expected " + expected);
}
}  // namespace

std::string GgufFile::get_string(const std::string& key) const {
  const GgufValue& v = at(key);
  if (v.type != GgufType::string) wrong_type(path_, key, v, "string");
  return v.str;
}

int64_t GgufFile::get_int(const std::string& key) const {
  const GgufValue& v = at(key);
  if (!is_integer_type(v.type)) wrong_type(path_, key, v, "an integer");
  if (v.type == GgufType::uint64 && v.uinteger > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
    throw UserError(path_.string() + ": metadata '" + key + "' = " + std::to_string(v.uinteger) + " does not fit in int64");
  return v.integer;
}

double GgufFile::get_float(const std::string& key) const {
  const GgufValue& v = at(key);
  if (is_float_type(v.type)) return v.real;
  if (v.type == GgufType::uint64) return static_cast<double>(v.uinteger);
  if (is_integer_type(v.type) && v.type != GgufType::boolean) return static_cast<double>(v.integer);
  wrong_type(path_, key, v, "a number");
}

bool GgufFile::get_bool(const std::string& key) const {
  const GgufValue& v = at(key);
  if (v.type != GgufType::boolean) wrong_type(path_, key, v, "bool");
  return v.integer != 0;
}

const std::vector<std::string>& GgufFile::get_string_array(const std::string& key) const {
  const GgufValue& v = at(key);
  if (v.type != GgufType::array || v.array_type != GgufType::string) wrong_type(path_, key, v, "array of string");
  return v.strings;
}

const std::vector<int64_t>& GgufFile::get_int_array(const std::string& key) const {
  const GgufValue& v = at(key);
  if (v.type != GgufType::array || !is_integer_type(v.array_type)) wrong_type(path_, key, v, "array of integers");
  return v.integers;
}

const std::vector<double>& GgufFile::get_float_array(const std::string& key) const {
  const GgufValue& v = at(key);
  if (v.type != GgufType::array || !is_float_type(v.array_type)) wrong_type(path_, key, v, "array of float32 or float64");
  return v.reals;
}

const GgufTensorInfo* GgufFile::find_tensor(const std::string& name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

const uint8_t* GgufFile::tensor_data(const GgufTensorInfo& t) const { return base_ + data_start_ + t.offset; }

}  // namespace qlora
