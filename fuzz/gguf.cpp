// libFuzzer target: the GGUF reader (src/io/gguf.cpp) and the tensor dequantizers behind it.
// Input: a whole .gguf file. A file that opens must answer every typed getter with a value or a
// UserError, and every tensor's bytes must lie inside the mapping (each small tensor is
// dequantized to float, which reads all of them).
#include <cstdint>
#include <cstring>

#include "fuzz_util.h"
#include "qlora/ggml_quants.h"
#include "qlora/gguf.h"

namespace {

namespace fs = std::filesystem;
using namespace qlora;

// A GGUF with every metadata value type and a few tensor types, written by the project's writer.
std::string sample_file(uint64_t alignment, bool with_tensors) {
  GgufWriter w;
  w.alignment = alignment;
  w.set("general.architecture", GgufValue::make_string("llama"));
  w.set("general.name", GgufValue::make_string("fuzz seed"));
  w.set("llama.block_count", GgufValue::make_uint32(2));
  w.set("llama.context_length", GgufValue::make_uint64(4096));
  w.set("llama.rope.freq_base", GgufValue::make_float32(10000.0f));
  w.set("llama.attention.head_count", GgufValue::make_int32(4));
  w.set("tokenizer.ggml.add_bos_token", GgufValue::make_bool(true));
  w.set("tokenizer.ggml.tokens", GgufValue::make_string_array({"<s>", "</s>", "a", "b", "ab"}));
  w.set("tokenizer.ggml.scores", GgufValue::make_float_array({0.0, 0.0, -1.0, -2.0, -0.5}));
  w.set("tokenizer.ggml.token_type", GgufValue::make_int_array(GgufType::int32, {3, 3, 1, 1, 1}));
  w.set("u8s", GgufValue::make_int_array(GgufType::uint8, {1, 2, 255}));
  w.set("i64s", GgufValue::make_int_array(GgufType::int64, {-1, 1LL << 40}));
  w.set("u64", GgufValue::make_uint64(~uint64_t{0}));
  if (with_tensors) {
    std::string bytes(4096, '\0');
    for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<char>((i * 37) & 0x7F);  // finite fp16/bf16 values
    w.add_tensor("f32", GgmlType::f32, {4, 2}, bytes.data(), 32);
    w.add_tensor("f16", GgmlType::f16, {8}, bytes.data(), 16);
    w.add_tensor("bf16", GgmlType::bf16, {2, 2, 2}, bytes.data(), 16);
    w.add_tensor("q8_0", GgmlType::q8_0, {32, 2}, bytes.data(), 68);
    w.add_tensor("q4_0", GgmlType::q4_0, {64}, bytes.data(), 36);
    w.add_tensor("q4_1", GgmlType::q4_1, {32}, bytes.data(), 20);
    w.add_tensor("q6_k", GgmlType::q6_k, {256}, bytes.data(), 210);
    w.add_tensor("q4_k", GgmlType::q4_k, {256, 1, 1, 1}, bytes.data(), 144);
  }
  return w.serialize();
}

void write_seeds(const fs::path& dir) {
  fuzz::write_bytes(dir / "sample", sample_file(32, true));
  fuzz::write_bytes(dir / "sample-align64", sample_file(64, true));
  fuzz::write_bytes(dir / "metadata-only", sample_file(32, false));
  GgufWriter empty;
  fuzz::write_bytes(dir / "empty", empty.serialize());
  std::string v2 = sample_file(32, true);
  v2[4] = 2;  // version 2 shares v3's layout
  fuzz::write_bytes(dir / "sample-v2", v2);
}

void exercise(const GgufFile& g) {
  for (const auto& kv : g.metadata()) {
    const std::string& key = kv.first;  // (clang 14 cannot capture structured bindings)
    fuzz::expect_user_error([&] { (void)g.get_string(key); });
    fuzz::expect_user_error([&] { (void)g.get_int(key); });
    fuzz::expect_user_error([&] { (void)g.get_float(key); });
    fuzz::expect_user_error([&] { (void)g.get_bool(key); });
    fuzz::expect_user_error([&] { (void)g.get_string_array(key); });
    fuzz::expect_user_error([&] { (void)g.get_int_array(key); });
    fuzz::expect_user_error([&] { (void)g.get_float_array(key); });
    if (g.find(key) != &kv.second) fuzz::invariant_failed("find('" + key + "') is not the listed value");
  }
  for (const GgufTensorInfo& t : g.tensors()) {
    if (g.find_tensor(t.name) != &t) fuzz::invariant_failed("find_tensor('" + t.name + "') is not the listed tensor");
    const uint8_t* p = g.tensor_data(t);
    uint8_t sum = 0;
    if (t.nbytes) sum = static_cast<uint8_t>(p[0] + p[t.nbytes - 1]);  // ASan checks both ends
    (void)sum;
    if (t.nbytes <= (1u << 16) && ggml_can_dequantize(t.type)) {
      fuzz::expect_user_error([&] {
        const at::Tensor f = gguf_tensor_to_float(g, t);
        if (f.numel() != t.numel()) fuzz::invariant_failed("tensor '" + t.name + "' dequantized to the wrong size");
      });
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::initialize(write_seeds);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const fs::path file = fuzz::write_scratch("input.gguf", {reinterpret_cast<const char*>(data), size});
  fuzz::expect_user_error([&] {
    const GgufFile g(file);
    exercise(g);
  });
  return 0;
}
