// GGUF writer (see gguf.cpp for the format facts and their sources): metadata and tensor infos,
// zero padding to the alignment after the infos and after every tensor's data, one atomic write.
#include <cstring>
#include <limits>

#include "io/gguf_internal.h"
#include "qlora/error.h"
#include "qlora/gguf.h"
#include "qlora/safetensors.h"  // write_file_atomic

namespace qlora {
namespace fs = std::filesystem;
using namespace gguf_detail;

namespace {

// Appends little-endian values to a byte string.
struct Out {
  std::string bytes;
  template <typename T>
  void put(T v) {
    char b[sizeof(T)];
    std::memcpy(b, &v, sizeof(T));
    bytes.append(b, sizeof(T));
  }
  void put_string(const std::string& s) {
    put<uint64_t>(s.size());
    bytes += s;
  }
  void pad(uint64_t alignment) { bytes.resize(pad_to(bytes.size(), alignment), '\0'); }
};

// One integer of type t; UserError naming `what` when it does not fit.
void put_integer(Out& o, GgufType t, int64_t v, const std::string& what) {
  auto fits = [&](int64_t lo, int64_t hi) {
    if (v < lo || v > hi)
      throw UserError("gguf writer: " + what + " = " + std::to_string(v) + " does not fit in " + gguf_type_name(t) + " [" +
                      std::to_string(lo) + ", " + std::to_string(hi) + "]");
  };
  switch (t) {
    case GgufType::uint8: fits(0, 255); o.put<uint8_t>(static_cast<uint8_t>(v)); return;
    case GgufType::int8: fits(-128, 127); o.put<int8_t>(static_cast<int8_t>(v)); return;
    case GgufType::uint16: fits(0, 65535); o.put<uint16_t>(static_cast<uint16_t>(v)); return;
    case GgufType::int16: fits(-32768, 32767); o.put<int16_t>(static_cast<int16_t>(v)); return;
    case GgufType::uint32: fits(0, 4294967295LL); o.put<uint32_t>(static_cast<uint32_t>(v)); return;
    case GgufType::int32: fits(INT32_MIN, INT32_MAX); o.put<int32_t>(static_cast<int32_t>(v)); return;
    case GgufType::uint64: o.put<uint64_t>(static_cast<uint64_t>(v)); return;  // integer holds the bits
    case GgufType::int64: o.put<int64_t>(v); return;
    case GgufType::boolean: fits(0, 1); o.put<uint8_t>(static_cast<uint8_t>(v)); return;
    default: throw UserError("gguf writer: " + what + ": " + gguf_type_name(t) + " is not an integer type");
  }
}

void put_value(Out& o, const std::string& key, const GgufValue& v) {
  const std::string w = "metadata '" + key + "'";
  if (!is_known_type(static_cast<uint32_t>(v.type)))
    throw UserError("gguf writer: " + w + " has unknown value type " + std::to_string(static_cast<uint32_t>(v.type)));
  o.put<uint32_t>(static_cast<uint32_t>(v.type));
  if (v.type == GgufType::string) return o.put_string(v.str);
  if (v.type == GgufType::float32) return o.put<float>(static_cast<float>(v.real));
  if (v.type == GgufType::float64) return o.put<double>(v.real);
  if (v.type != GgufType::array) return put_integer(o, v.type, v.integer, w);
  const GgufType et = v.array_type;
  if (!is_known_type(static_cast<uint32_t>(et)) || et == GgufType::array)
    throw UserError("gguf writer: " + w + " is an array of " + gguf_type_name(et) + " (expected an array of scalars or strings)");
  o.put<uint32_t>(static_cast<uint32_t>(et));
  if (et == GgufType::string) {
    o.put<uint64_t>(v.strings.size());
    for (const auto& s : v.strings) o.put_string(s);
  } else if (is_float_type(et)) {
    o.put<uint64_t>(v.reals.size());
    for (double r : v.reals) et == GgufType::float32 ? o.put<float>(static_cast<float>(r)) : o.put<double>(r);
  } else {
    o.put<uint64_t>(v.integers.size());
    for (int64_t i : v.integers) put_integer(o, et, i, w + " element");
  }
}

}  // namespace

void GgufWriter::set(const std::string& key, GgufValue value) {
  if (key.empty()) throw UserError("gguf writer: metadata key is empty");
  for (auto& [k, v] : metadata_)
    if (k == key) { v = std::move(value); return; }
  metadata_.emplace_back(key, std::move(value));
}

void GgufWriter::add_tensor(const std::string& name, GgmlType type, std::vector<int64_t> dims, const void* data, uint64_t nbytes) {
  const std::string w = "gguf writer: tensor '" + name + "'";
  if (name.empty()) throw UserError("gguf writer: tensor name is empty");
  for (const auto& t : tensors_)
    if (t.name == name) throw UserError(w + " added twice");
  if (dims.empty() || dims.size() > kMaxDims)
    throw UserError(w + " has " + std::to_string(dims.size()) + " dims (expected 1 to 4)");
  for (int64_t d : dims)
    if (d <= 0) throw UserError(w + " dims " + dims_str(dims) + " (expected every dimension > 0)");
  if (!block_info(type))
    throw UserError(w + " has ggml type " + std::to_string(static_cast<uint32_t>(type)) + ", which qlora does not know (expected one of " +
                    known_types() + ")");
  const uint64_t expected = tensor_nbytes(type, dims, w + " " + dims_str(dims));
  if (nbytes != expected)
    throw UserError(w + " " + dims_str(dims) + " of " + ggml_type_name(type) + " needs " + std::to_string(expected) + " bytes, given " +
                    std::to_string(nbytes));
  tensors_.push_back({name, type, std::move(dims), std::string(static_cast<const char*>(data), nbytes)});
}

std::string GgufWriter::serialize() const {
  if (alignment == 0 || (alignment & (alignment - 1)) != 0 || alignment > std::numeric_limits<uint32_t>::max())
    throw UserError("gguf writer: alignment " + std::to_string(alignment) + " is not a power of two that fits in uint32");
  // general.alignment is what readers use: written only when not the default (as llama.cpp
  // does), and a value set by hand must agree with `alignment`.
  auto meta = metadata_;
  bool has_alignment = false;
  for (const auto& [k, v] : meta) {
    if (k != "general.alignment") continue;
    if (v.type != GgufType::uint32 || static_cast<uint64_t>(v.integer) != alignment)
      throw UserError("gguf writer: metadata general.alignment (" + type_desc(v) + " " + std::to_string(v.integer) +
                      ") disagrees with the writer's alignment " + std::to_string(alignment) + " (expected uint32 " +
                      std::to_string(alignment) + ")");
    has_alignment = true;
  }
  if (!has_alignment && alignment != kDefaultAlignment)
    meta.insert(meta.begin(), {"general.alignment", GgufValue::make_uint32(static_cast<uint32_t>(alignment))});

  Out o;
  o.bytes = "GGUF";
  o.put<uint32_t>(3);
  o.put<uint64_t>(tensors_.size());
  o.put<uint64_t>(meta.size());
  for (const auto& [k, v] : meta) {
    o.put_string(k);
    put_value(o, k, v);
  }
  uint64_t offset = 0;
  for (const auto& t : tensors_) {
    o.put_string(t.name);
    o.put<uint32_t>(static_cast<uint32_t>(t.dims.size()));
    for (int64_t d : t.dims) o.put<uint64_t>(static_cast<uint64_t>(d));
    o.put<uint32_t>(static_cast<uint32_t>(t.type));
    o.put<uint64_t>(offset);
    offset += pad_to(t.bytes.size(), alignment);
  }
  o.pad(alignment);
  for (const auto& t : tensors_) {
    o.bytes += t.bytes;
    o.pad(alignment);
  }
  return std::move(o.bytes);
}

void GgufWriter::write(const fs::path& path) const { write_file_atomic(path, serialize()); }

}  // namespace qlora
