// What the GGUF reader (gguf.cpp) and writer (gguf_writer.cpp) share: format constants, ggml's
// block table, and the checks and messages both give for types, dims and sizes.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "qlora/gguf.h"

namespace qlora::gguf_detail {

constexpr uint64_t kDefaultAlignment = 32;  // GGUF_DEFAULT_ALIGNMENT
constexpr uint32_t kMaxDims = 4;            // GGML_MAX_DIMS

struct BlockInfo {
  GgmlType type;
  const char* name;  // ggml_type_name spelling
  int64_t block;     // elements per block
  int64_t bytes;     // bytes per block
};

const std::vector<BlockInfo>& block_table();
const BlockInfo* block_info(GgmlType t);  // nullptr for a type qlora does not know
std::string known_types();                // the known type names, space-separated

bool is_float_type(GgufType t);
bool is_known_type(uint32_t t);
uint64_t pad_to(uint64_t n, uint64_t alignment);
std::string dims_str(const std::vector<int64_t>& d);
// Bytes of a tensor of these dims and type; UserError naming `where` on any inconsistency.
uint64_t tensor_nbytes(GgmlType type, const std::vector<int64_t>& dims, const std::string& where);
std::string type_desc(const GgufValue& v);  // "uint32", "array of string", ...

}  // namespace qlora::gguf_detail
