// GGUF reader/writer: round trips of every value type and of tensors (byte for byte), the
// writer's layout checked against bytes laid out by hand, llama.cpp's own vocab files, and every
// malformed-input path of the reader (each with its own message; truncation at every byte).
#include "qlora/error.h"
#include "qlora/gguf.h"

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "test_util.h"

using Catch::Matchers::ContainsSubstring;
namespace fs = std::filesystem;
using qlora::GgmlType;
using qlora::GgufType;
using qlora::GgufValue;
using qlora::test::read_file;
using qlora::test::TempDir;
using qlora::test::write_file;

namespace {

// Little-endian bytes, for laying out files by hand.
struct Bytes {
  std::string b;
  Bytes& u8(uint8_t v) { b.push_back(static_cast<char>(v)); return *this; }
  Bytes& u32(uint32_t v) { for (int i = 0; i < 4; ++i) u8(static_cast<uint8_t>(v >> (8 * i))); return *this; }
  Bytes& u64(uint64_t v) { for (int i = 0; i < 8; ++i) u8(static_cast<uint8_t>(v >> (8 * i))); return *this; }
  Bytes& str(const std::string& s) { u64(s.size()); b += s; return *this; }
  Bytes& pad(size_t a) { b.resize((b.size() + a - 1) / a * a, '\0'); return *this; }
};

// A key/value of a scalar uint32.
std::string kv_u32(const std::string& key, uint32_t v) { return Bytes().str(key).u32(4).u32(v).b; }
std::string kv_str(const std::string& key, const std::string& v) { return Bytes().str(key).u32(8).str(v).b; }
std::string tensor_info(const std::string& name, std::vector<uint64_t> dims, uint32_t type, uint64_t offset) {
  Bytes t;
  t.str(name).u32(static_cast<uint32_t>(dims.size()));
  for (uint64_t d : dims) t.u64(d);
  return t.u32(type).u64(offset).b;
}

// A whole v3 file: header, the given kv and tensor-info bytes, padding, `data_len` zero bytes.
std::string gguf_file(uint64_t n_kv, const std::string& kvs, uint64_t n_tensors, const std::string& infos, size_t data_len,
                      size_t alignment = 32, uint32_t version = 3) {
  Bytes f;
  f.b = "GGUF";
  f.u32(version).u64(n_tensors).u64(n_kv);
  f.b += kvs + infos;
  if (n_tensors) f.pad(alignment);
  f.b += std::string(data_len, '\0');
  return f.b;
}

std::string open_error(const std::string& bytes) {
  TempDir d("qlora_gguf_test");
  write_file(d / "model.gguf", bytes);
  try {
    qlora::GgufFile f(d / "model.gguf");
  } catch (const qlora::UserError& e) {
    return e.what();
  }
  return "no error";
}

GgufValue scalar(GgufType t, int64_t v) {
  GgufValue x;
  x.type = t;
  x.integer = v;
  if (t == GgufType::uint64) x.uinteger = static_cast<uint64_t>(v);
  return x;
}

GgufValue real(GgufType t, double v) {
  GgufValue x;
  x.type = t;
  x.real = v;
  return x;
}

std::string pattern(size_t n, int seed) {
  std::string s(n, '\0');
  for (size_t i = 0; i < n; ++i) s[i] = static_cast<char>((i * 131 + seed * 17 + (i >> 8)) & 0xff);
  return s;
}

}  // namespace

TEST_CASE("gguf block sizes are ggml's", "[gguf]") {
  struct Row { GgmlType t; int64_t block; uint64_t bytes; const char* name; };
  const std::vector<Row> rows = {
      {GgmlType::f32, 1, 4, "f32"},        {GgmlType::f16, 1, 2, "f16"},        {GgmlType::bf16, 1, 2, "bf16"},
      {GgmlType::q4_0, 32, 18, "q4_0"},    {GgmlType::q4_1, 32, 20, "q4_1"},    {GgmlType::q5_0, 32, 22, "q5_0"},
      {GgmlType::q5_1, 32, 24, "q5_1"},    {GgmlType::q8_0, 32, 34, "q8_0"},    {GgmlType::q8_1, 32, 36, "q8_1"},
      {GgmlType::q2_k, 256, 84, "q2_K"},   {GgmlType::q3_k, 256, 110, "q3_K"},  {GgmlType::q4_k, 256, 144, "q4_K"},
      {GgmlType::q5_k, 256, 176, "q5_K"},  {GgmlType::q6_k, 256, 210, "q6_K"},  {GgmlType::q8_k, 256, 292, "q8_K"}};
  for (const auto& r : rows) {
    CAPTURE(r.name);
    CHECK(qlora::ggml_block_size(r.t) == r.block);
    CHECK(qlora::ggml_type_name(r.t) == r.name);
    CHECK(qlora::ggml_row_bytes(r.t, r.block * 3, "w") == r.bytes * 3);
    if (r.block > 1) CHECK_THROWS_WITH(qlora::ggml_row_bytes(r.t, r.block + 1, "w"), ContainsSubstring("not a multiple of the"));
  }
  CHECK(qlora::ggml_type_name(static_cast<GgmlType>(4)) == "type4");
  CHECK_THROWS_WITH(qlora::ggml_row_bytes(static_cast<GgmlType>(4), 32, "x.gguf: tensor 'w'"),
                    ContainsSubstring("x.gguf: tensor 'w': ggml type 4 is not one qlora knows"));
}

TEST_CASE("gguf round trip of every value type, arrays and tensors", "[gguf]") {
  TempDir d("qlora_gguf_test");
  qlora::GgufWriter w;
  w.set("general.architecture", GgufValue::make_string("llama"));
  w.set("t.uint8", scalar(GgufType::uint8, 255));
  w.set("t.int8", scalar(GgufType::int8, -128));
  w.set("t.uint16", scalar(GgufType::uint16, 65535));
  w.set("t.int16", scalar(GgufType::int16, -32768));
  w.set("t.uint32", GgufValue::make_uint32(4294967295u));
  w.set("t.int32", GgufValue::make_int32(-2147483647 - 1));
  w.set("t.float32", GgufValue::make_float32(1e-5f));
  w.set("t.bool", GgufValue::make_bool(true));
  w.set("t.false", GgufValue::make_bool(false));
  w.set("t.string", GgufValue::make_string(std::string("h\xc3\xa9llo\0x", 8)));  // UTF-8 and an embedded NUL
  w.set("t.empty_string", GgufValue::make_string(""));
  w.set("t.uint64", GgufValue::make_uint64(18446744073709551615ull));
  w.set("t.int64", scalar(GgufType::int64, std::numeric_limits<int64_t>::min()));
  w.set("t.float64", real(GgufType::float64, 0.1));
  w.set("a.strings", GgufValue::make_string_array({"a", "", "\xe2\x96\x81the", std::string(300, 'x')}));
  const std::vector<std::pair<GgufType, std::vector<int64_t>>> int_arrays = {
      {GgufType::uint8, {0, 255}},       {GgufType::int8, {-128, 127}},   {GgufType::uint16, {0, 65535}},
      {GgufType::int16, {-32768, 7}},    {GgufType::uint32, {4294967295LL, 1}}, {GgufType::int32, {-5, 2147483647}},
      {GgufType::uint64, {-1, 3}},       {GgufType::int64, {std::numeric_limits<int64_t>::max(), -9}},
      {GgufType::boolean, {1, 0, 1}},    {GgufType::int32, {}}};
  for (size_t i = 0; i < int_arrays.size(); ++i)
    w.set("a.int" + std::to_string(i), GgufValue::make_int_array(int_arrays[i].first, int_arrays[i].second));
  w.set("a.float32", GgufValue::make_float_array({0.5, -2.0, 3.25}));
  GgufValue f64 = GgufValue::make_float_array({0.1, -1e300});
  f64.array_type = GgufType::float64;
  w.set("a.float64", f64);
  w.set("t.replaced", GgufValue::make_uint32(1));
  w.set("t.replaced", GgufValue::make_string("second"));  // replaces in place, keeps the position

  const std::string f32 = pattern(5 * 3 * 4, 1), f16 = pattern(7 * 2, 2), q8 = pattern(2 * 2 * 34, 3), q4k = pattern(144, 4),
                    bf = pattern(2 * 3 * 4 * 5 * 2, 5);
  w.add_tensor("blk.0.f32", GgmlType::f32, {5, 3}, f32.data(), f32.size());
  w.add_tensor("blk.0.f16", GgmlType::f16, {7}, f16.data(), f16.size());
  w.add_tensor("blk.0.q8_0", GgmlType::q8_0, {64, 2}, q8.data(), q8.size());
  w.add_tensor("blk.0.q4_k", GgmlType::q4_k, {256}, q4k.data(), q4k.size());
  w.add_tensor("blk.0.bf16", GgmlType::bf16, {2, 3, 4, 5}, bf.data(), bf.size());
  w.write(d / "m.gguf");
  CHECK(read_file(d / "m.gguf") == w.serialize());
  int files = 0;
  for (const auto& e : fs::directory_iterator(d.path)) { ++files; (void)e; }
  CHECK(files == 1);  // no temp file left behind

  qlora::GgufFile g(d / "m.gguf");
  CHECK(g.version() == 3);
  CHECK(g.alignment() == 32);
  CHECK_FALSE(g.contains("general.alignment"));  // default alignment: not written, as llama.cpp does
  REQUIRE(g.metadata().size() == 15 + 1 + int_arrays.size() + 3);
  CHECK(g.metadata()[0].first == "general.architecture");
  CHECK(g.metadata()[13].first == "t.int64");
  CHECK(g.metadata().back().first == "t.replaced");
  CHECK(g.get_string("t.replaced") == "second");
  CHECK(g.get_string("general.architecture") == "llama");
  CHECK(g.get_int("t.uint8") == 255);
  CHECK(g.get_int("t.int8") == -128);
  CHECK(g.get_int("t.uint16") == 65535);
  CHECK(g.get_int("t.int16") == -32768);
  CHECK(g.get_int("t.uint32") == 4294967295LL);
  CHECK(g.get_int("t.int32") == std::numeric_limits<int32_t>::min());
  CHECK(g.get_float("t.float32") == 1e-5f);
  CHECK(g.at("t.float32").type == GgufType::float32);
  CHECK(g.get_bool("t.bool"));
  CHECK_FALSE(g.get_bool("t.false"));
  CHECK(g.get_int("t.bool") == 1);
  CHECK(g.get_string("t.string") == std::string("h\xc3\xa9llo\0x", 8));
  CHECK(g.get_string("t.empty_string").empty());
  CHECK(g.at("t.uint64").uinteger == 18446744073709551615ull);
  CHECK_THROWS_WITH(g.get_int("t.uint64"), ContainsSubstring("does not fit in int64"));
  CHECK(g.get_int("t.int64") == std::numeric_limits<int64_t>::min());
  CHECK(g.get_float("t.float64") == 0.1);
  CHECK(g.get_float("t.uint32") == 4294967295.0);
  CHECK(g.get_string_array("a.strings") == std::vector<std::string>{"a", "", "\xe2\x96\x81the", std::string(300, 'x')});
  for (size_t i = 0; i < int_arrays.size(); ++i) {
    CAPTURE(i);
    const std::string k = "a.int" + std::to_string(i);
    CHECK(g.at(k).array_type == int_arrays[i].first);
    CHECK(g.get_int_array(k) == int_arrays[i].second);
  }
  CHECK(g.get_float_array("a.float32") == std::vector<double>{0.5, -2.0, 3.25});
  CHECK(g.at("a.float64").array_type == GgufType::float64);
  CHECK(g.get_float_array("a.float64") == std::vector<double>{0.1, -1e300});

  REQUIRE(g.tensors().size() == 5);
  const std::vector<std::pair<std::string, const std::string*>> want = {
      {"blk.0.f32", &f32}, {"blk.0.f16", &f16}, {"blk.0.q8_0", &q8}, {"blk.0.q4_k", &q4k}, {"blk.0.bf16", &bf}};
  for (size_t i = 0; i < want.size(); ++i) {
    CAPTURE(want[i].first);
    const qlora::GgufTensorInfo* t = g.find_tensor(want[i].first);
    REQUIRE(t != nullptr);
    CHECK(&g.tensors()[i] == t);  // file order
    CHECK(t->offset % 32 == 0);
    CHECK(t->nbytes == want[i].second->size());
    CHECK(std::memcmp(g.tensor_data(*t), want[i].second->data(), t->nbytes) == 0);
    CHECK(reinterpret_cast<uintptr_t>(g.tensor_data(*t)) % 32 == 0);
  }
  CHECK(g.find_tensor("blk.0.q8_0")->dims == std::vector<int64_t>{64, 2});
  CHECK(g.find_tensor("blk.0.q8_0")->type == GgmlType::q8_0);
  CHECK(g.find_tensor("blk.0.bf16")->numel() == 120);
  CHECK(g.find_tensor("nope") == nullptr);
  CHECK(g.find("nope") == nullptr);

  // Typed getters name the file, the key and both types.
  CHECK_THROWS_WITH(g.at("nope"), ContainsSubstring("m.gguf: no metadata key 'nope'"));
  CHECK_THROWS_WITH(g.get_string("t.uint32"), ContainsSubstring("metadata 't.uint32' is uint32, expected string"));
  CHECK_THROWS_WITH(g.get_int("t.string"), ContainsSubstring("is string, expected an integer"));
  CHECK_THROWS_WITH(g.get_float("a.float32"), ContainsSubstring("is array of float32, expected a number"));
  CHECK_THROWS_WITH(g.get_bool("t.uint8"), ContainsSubstring("expected bool"));
  CHECK_THROWS_WITH(g.get_string_array("a.int0"), ContainsSubstring("is array of uint8, expected array of string"));
  CHECK_THROWS_WITH(g.get_int_array("a.strings"), ContainsSubstring("expected array of integers"));
  CHECK_THROWS_WITH(g.get_float_array("a.int1"), ContainsSubstring("expected array of float32 or float64"));
}

TEST_CASE("gguf writer layout equals bytes laid out by hand (ggml's gguf_write_out)", "[gguf]") {
  qlora::GgufWriter w;
  w.set("general.name", GgufValue::make_string("ab"));
  const std::string a = pattern(3 * 4, 7), b = pattern(34, 8);
  w.add_tensor("a", GgmlType::f32, {3}, a.data(), a.size());
  w.add_tensor("b", GgmlType::q8_0, {32}, b.data(), b.size());
  // "a" takes 12 bytes padded to 32: "b" is at 32; the file ends padded after "b" too.
  Bytes want;
  want.b = "GGUF";
  want.u32(3).u64(2).u64(1).str("general.name").u32(8).str("ab");
  want.b += tensor_info("a", {3}, 0, 0) + tensor_info("b", {32}, 8, 32);
  want.pad(32);
  want.b += a;
  want.pad(32);
  want.b += b;
  want.pad(32);
  CHECK(w.serialize() == want.b);

  // Alignment 64: general.alignment (uint32) written first, every offset a multiple of 64.
  w.alignment = 64;
  const std::string s = w.serialize();
  CHECK(s.size() % 64 == 0);
  TempDir d("qlora_gguf_test");
  write_file(d / "a64.gguf", s);
  qlora::GgufFile g(d / "a64.gguf");
  CHECK(g.alignment() == 64);
  CHECK(g.metadata()[0].first == "general.alignment");
  CHECK(g.at("general.alignment").type == GgufType::uint32);
  CHECK(g.get_int("general.alignment") == 64);
  CHECK(g.find_tensor("b")->offset == 64);
  CHECK(reinterpret_cast<uintptr_t>(g.tensor_data(*g.find_tensor("b"))) % 64 == 0);
  CHECK(std::memcmp(g.tensor_data(*g.find_tensor("b")), b.data(), b.size()) == 0);

  // No tensors: header and metadata only.
  qlora::GgufWriter empty;
  write_file(d / "e.gguf", empty.serialize());
  qlora::GgufFile e(d / "e.gguf");
  CHECK(e.metadata().empty());
  CHECK(e.tensors().empty());
}

TEST_CASE("gguf writer rejects what it cannot write", "[gguf]") {
  qlora::GgufWriter w;
  const std::string data = pattern(64, 1);
  w.add_tensor("x", GgmlType::f32, {4}, data.data(), 16);
  CHECK_THROWS_WITH(w.add_tensor("x", GgmlType::f32, {4}, data.data(), 16), ContainsSubstring("tensor 'x' added twice"));
  CHECK_THROWS_WITH(w.add_tensor("y", GgmlType::f32, {4}, data.data(), 12), ContainsSubstring("needs 16 bytes, given 12"));
  CHECK_THROWS_WITH(w.add_tensor("y", GgmlType::q8_0, {33}, data.data(), 34), ContainsSubstring("not a multiple of the q8_0 block size 32"));
  CHECK_THROWS_WITH(w.add_tensor("y", static_cast<GgmlType>(4), {32}, data.data(), 18), ContainsSubstring("ggml type 4"));
  CHECK_THROWS_WITH(w.add_tensor("y", GgmlType::f32, {1, 1, 1, 1, 1}, data.data(), 4), ContainsSubstring("expected 1 to 4"));
  CHECK_THROWS_WITH(w.add_tensor("y", GgmlType::f32, {4, 0}, data.data(), 0), ContainsSubstring("every dimension > 0"));
  CHECK_THROWS_WITH(w.set("", GgufValue::make_bool(true)), ContainsSubstring("key is empty"));
  CHECK_THROWS_WITH(GgufValue::make_int_array(GgufType::float32, {1}), ContainsSubstring("not an integer type"));

  qlora::GgufWriter r;
  r.set("k", scalar(GgufType::uint8, 256));
  CHECK_THROWS_WITH(r.serialize(), ContainsSubstring("metadata 'k' = 256 does not fit in uint8"));
  r.set("k", GgufValue::make_int_array(GgufType::int16, {1, 40000}));
  CHECK_THROWS_WITH(r.serialize(), ContainsSubstring("does not fit in int16"));
  r.set("k", GgufValue::make_uint32(1));
  r.alignment = 48;
  CHECK_THROWS_WITH(r.serialize(), ContainsSubstring("alignment 48 is not a power of two"));
  r.alignment = 64;
  r.set("general.alignment", GgufValue::make_uint32(32));
  CHECK_THROWS_WITH(r.serialize(), ContainsSubstring("disagrees with the writer's alignment 64"));
  r.set("general.alignment", GgufValue::make_uint32(64));
  CHECK_NOTHROW(r.serialize());
}

TEST_CASE("gguf reads llama.cpp's vocab files", "[gguf]") {
  const fs::path dir = fs::path(QLORA_SOURCE_DIR "/../shared/assets/vocab");
  if (!fs::exists(dir)) SKIP("no ../shared/assets/vocab next to the source tree (llama.cpp's ggml-vocab-*.gguf files)");
  struct Want { const char* file; const char* model; size_t n_tokens; bool bpe; };
  for (const Want& want : {Want{"ggml-vocab-llama-bpe.gguf", "gpt2", 128256, true}, Want{"ggml-vocab-gpt-2.gguf", "gpt2", 50257, true},
                           Want{"ggml-vocab-llama-spm.gguf", "llama", 32000, false}}) {
    CAPTURE(want.file);
    qlora::GgufFile g(dir / want.file);
    CHECK((g.version() == 2 || g.version() == 3));
    CHECK(g.get_string("tokenizer.ggml.model") == want.model);
    const auto& tokens = g.get_string_array("tokenizer.ggml.tokens");
    CHECK(tokens.size() == want.n_tokens);
    if (g.contains("tokenizer.ggml.token_type")) CHECK(g.get_int_array("tokenizer.ggml.token_type").size() == want.n_tokens);
    if (want.bpe) {
      const auto& merges = g.get_string_array("tokenizer.ggml.merges");
      CHECK(merges.size() > 1000);
      CHECK(merges[0].find(' ') != std::string::npos);  // "a b" pairs
    } else {
      CHECK(g.get_float_array("tokenizer.ggml.scores").size() == want.n_tokens);
      CHECK(tokens[1] == "<s>");
      CHECK(g.get_int("tokenizer.ggml.bos_token_id") == 1);
    }
  }
}

TEST_CASE("gguf reader: bad magic, version, counts", "[gguf]") {
  CHECK_THAT(open_error(""), ContainsSubstring("model.gguf: file is 0 bytes, too short for the 24-byte GGUF header"));
  std::string ggml = gguf_file(0, "", 0, "", 0);
  ggml[3] = 'L';
  CHECK_THAT(open_error(ggml), ContainsSubstring("not a GGUF file: magic is 'GGUL', expected 'GGUF'"));
  CHECK_THAT(open_error(gguf_file(0, "", 0, "", 0, 32, 1)), ContainsSubstring("GGUF version 1 is not supported (expected 2 or 3"));
  CHECK_THAT(open_error(gguf_file(0, "", 0, "", 0, 32, 4)), ContainsSubstring("GGUF version 4 is not supported"));
  CHECK_THAT(open_error(gguf_file(0, "", 0, "", 0, 32, 0x03000000)), ContainsSubstring("big-endian"));
  CHECK(open_error(gguf_file(0, "", 0, "", 0, 32, 2)) == "no error");
  CHECK_THAT(open_error(gguf_file(1ull << 60, "", 0, "", 0)), ContainsSubstring("metadata count 1152921504606846976 cannot fit"));
  CHECK_THAT(open_error(gguf_file(0, "", 1ull << 60, "", 0)), ContainsSubstring("tensor count 1152921504606846976 cannot fit"));
  TempDir d("qlora_gguf_test");
  CHECK_THROWS_WITH(qlora::GgufFile(d / "missing.gguf"), ContainsSubstring("missing.gguf: cannot open"));
  CHECK_THROWS_WITH(qlora::GgufFile(d.path), ContainsSubstring("is a directory"));
}

TEST_CASE("gguf reader: truncation at every byte is an error, never a crash", "[gguf]") {
  qlora::GgufWriter w;
  w.set("general.architecture", GgufValue::make_string("llama"));
  w.set("a.tokens", GgufValue::make_string_array({"x", "yz", ""}));
  w.set("a.ids", GgufValue::make_int_array(GgufType::int32, {1, 2, 3}));
  w.set("a.f", GgufValue::make_float32(2.5f));
  const std::string t0 = pattern(34 * 2, 1), t1 = pattern(4 * 5, 2);
  w.add_tensor("q", GgmlType::q8_0, {32, 2}, t0.data(), t0.size());
  w.add_tensor("f", GgmlType::f32, {5}, t1.data(), t1.size());
  const std::string full = w.serialize();
  REQUIRE(open_error(full) == "no error");
  // the header ends at the last tensor info; the data of 'f' is the last byte that matters
  const size_t header_end = full.find(std::string("\x01\x00\x00\x00\x05", 5)) + 4 + 8 + 4 + 8;
  const size_t data_end = full.size() - 32 + t1.size();
  for (size_t cut = 0; cut < full.size(); ++cut) {
    CAPTURE(cut);
    const std::string err = open_error(full.substr(0, cut));
    if (cut >= data_end) {
      CHECK(err == "no error");  // only trailing padding is missing
    } else if (cut < 24) {
      CHECK_THAT(err, ContainsSubstring("too short for the 24-byte GGUF header"));
    } else if (cut < header_end) {
      CHECK_THAT(err, ContainsSubstring("truncated"));
    } else {
      CHECK_THAT(err, ContainsSubstring("lies past the end of the file"));
    }
  }
}

TEST_CASE("gguf reader: malformed metadata", "[gguf]") {
  // a key whose length runs past the file: no allocation of that size
  CHECK_THAT(open_error(gguf_file(1, Bytes().u64(1ull << 62).b + std::string(16, 'k'), 0, "", 0)),
             ContainsSubstring("metadata key #0 at offset 24 claims 4611686018427387904 bytes, the file has 16 left"));
  CHECK_THAT(open_error(gguf_file(1, Bytes().str("k").u32(8).u64(~0ull).b + "abcdefghijklm", 0, "", 0)),
             ContainsSubstring("metadata 'k' string at offset 37 claims 18446744073709551615 bytes"));
  // an array count larger than the file could hold
  CHECK_THAT(open_error(gguf_file(1, Bytes().str("k").u32(9).u32(5).u64(1ull << 40).u32(1).b, 0, "", 0)),
             ContainsSubstring("metadata 'k' array count 1099511627776 at offset 41 needs at least 4 bytes per int32 element"));
  CHECK_THAT(open_error(gguf_file(1, Bytes().str("k").u32(9).u32(8).u64(1000).str("a").b, 0, "", 0)),
             ContainsSubstring("array count 1000 at offset 41 needs at least 8 bytes per string element"));
  CHECK_THAT(open_error(gguf_file(1, Bytes().str("k").u32(13).u32(0).u8(0).b, 0, "", 0)),
             ContainsSubstring("metadata 'k' has unknown value type 13 (expected 0 to 12)"));
  CHECK_THAT(open_error(gguf_file(1, Bytes().str("k").u32(9).u32(77).u64(0).b, 0, "", 0)),
             ContainsSubstring("metadata 'k' is an array of unknown value type 77"));
  CHECK_THAT(open_error(gguf_file(1, Bytes().str("k").u32(9).u32(9).u64(1).u32(4).u64(0).b, 0, "", 0)),
             ContainsSubstring("metadata 'k' is an array of arrays"));
  CHECK_THAT(open_error(gguf_file(2, kv_u32("a.b", 1) + kv_str("a.b", "x"), 0, "", 0)),
             ContainsSubstring("metadata key 'a.b' appears more than once"));
  CHECK_THAT(open_error(gguf_file(1, Bytes().str("").u32(4).u32(1).b, 0, "", 0)), ContainsSubstring("metadata key #0 is empty"));
  CHECK_THAT(open_error(gguf_file(1, Bytes().str("k").u32(7).u8(2).b, 0, "", 0)),
             ContainsSubstring("metadata 'k' value is a bool of value 2 (expected 0 or 1)"));
  // general.alignment: a power of two, a uint32
  CHECK_THAT(open_error(gguf_file(1, kv_u32("general.alignment", 48), 0, "", 0)),
             ContainsSubstring("general.alignment is 48, expected a power of two"));
  CHECK_THAT(open_error(gguf_file(1, kv_u32("general.alignment", 0), 0, "", 0)), ContainsSubstring("expected a power of two"));
  CHECK_THAT(open_error(gguf_file(1, Bytes().str("general.alignment").u32(5).u32(64).b, 0, "", 0)),
             ContainsSubstring("general.alignment is int32, expected uint32"));
  // a good alignment of 64 moves the data section
  const std::string a64 = gguf_file(1, kv_u32("general.alignment", 64), 1, tensor_info("w", {16}, 0, 0), 64, 64);
  CHECK(open_error(a64) == "no error");
  CHECK(a64.size() % 64 == 0);
}

TEST_CASE("gguf reader: malformed tensor infos", "[gguf]") {
  auto one = [](const std::string& info, size_t data_len = 64) { return open_error(gguf_file(0, "", 1, info, data_len)); };
  CHECK(one(tensor_info("blk.0.attn_q.weight", {16}, 0, 0)) == "no error");
  CHECK_THAT(one(tensor_info("blk.0.attn_q.weight", {16}, 0, 64)),
             ContainsSubstring("model.gguf: tensor 'blk.0.attn_q.weight' data [160..224) lies past the end of the file (size 160)"));
  CHECK_THAT(one(tensor_info("w", {32}, 0, 0)), ContainsSubstring("tensor 'w' data [64..192) lies past the end of the file (size 128)"));
  CHECK_THAT(one(tensor_info("w", {16}, 0, ~0ull - 31)), ContainsSubstring("tensor 'w' data offset 18446744073709551584 lies past the end"));
  CHECK_THAT(one(tensor_info("w", {16}, 0, 8)), ContainsSubstring("tensor 'w' data offset 8 is not a multiple of the alignment 32"));
  CHECK_THAT(one(tensor_info("blk.0.attn_q.weight", {32}, 4, 0)),
             ContainsSubstring("tensor 'blk.0.attn_q.weight' has ggml type 4, which qlora does not know"));
  CHECK_THAT(one(tensor_info("w", {32}, 1000, 0)), ContainsSubstring("tensor 'w' has ggml type 1000"));
  CHECK_THAT(one(tensor_info("w", {33, 2}, 8, 0)), ContainsSubstring("tensor 'w' [33, 2]: a row of 33 elements is not a multiple of the q8_0 block size 32"));
  CHECK_THAT(one(tensor_info("w", {}, 0, 0)), ContainsSubstring("tensor 'w' has n_dims 0 (expected 1 to 4)"));
  CHECK_THAT(one(tensor_info("w", {1, 1, 1, 1, 1}, 0, 0)), ContainsSubstring("tensor 'w' has n_dims 5 (expected 1 to 4)"));
  CHECK_THAT(one(tensor_info("w", {4, 0}, 0, 0)), ContainsSubstring("tensor 'w' dimension 1 is 0 (expected > 0)"));
  CHECK_THAT(one(tensor_info("w", {1ull << 40, 1ull << 40}, 0, 0)), ContainsSubstring("overflow"));
  // n_dims claiming more dims than there are bytes
  Bytes cut;
  cut.b = "GGUF";
  cut.u32(3).u64(1).u64(0).str("w").u32(4).u64(2).u64(3).b += "xyz";
  CHECK_THAT(open_error(cut.b), ContainsSubstring("truncated: tensor 'w' dims at offset 53 needs 8 bytes, the file has 3 left"));

  // two tensors: overlap, duplicate names, holes (allowed)
  auto two = [](const std::string& a, const std::string& b, size_t data_len = 128) {
    return open_error(gguf_file(0, "", 2, a + b, data_len));
  };
  CHECK(two(tensor_info("a", {8}, 0, 0), tensor_info("b", {8}, 0, 32)) == "no error");
  CHECK(two(tensor_info("a", {8}, 0, 96), tensor_info("b", {8}, 0, 0)) == "no error");  // any order, holes allowed
  CHECK_THAT(two(tensor_info("a", {16}, 0, 0), tensor_info("b", {8}, 0, 32)),
             ContainsSubstring("tensor 'b' data [32..64) overlaps tensor 'a' [0..64)"));
  CHECK_THAT(two(tensor_info("a", {8}, 0, 32), tensor_info("b", {8}, 0, 32)), ContainsSubstring("overlaps tensor"));
  CHECK_THAT(two(tensor_info("a", {8}, 0, 0), tensor_info("a", {8}, 0, 32)), ContainsSubstring("tensor 'a' appears more than once"));
}

// ---- oracle (tests/oracle/gguf_read.py) ----------------------------------------------------------

namespace {

nlohmann::json value_json(const GgufValue& v) {
  nlohmann::json j = {{"type", qlora::gguf_type_name(v.type)}};
  auto integer = [](GgufType t, int64_t i) {
    return t == GgufType::uint64 ? nlohmann::json(static_cast<uint64_t>(i)) : nlohmann::json(i);
  };
  if (v.type == GgufType::string) j["value"] = v.str;
  else if (v.type == GgufType::float32 || v.type == GgufType::float64) j["value"] = v.real;
  else if (v.type == GgufType::boolean) j["value"] = v.integer != 0;
  else if (v.type != GgufType::array) j["value"] = integer(v.type, v.integer);
  else {
    j["array_type"] = qlora::gguf_type_name(v.array_type);
    nlohmann::json a = nlohmann::json::array();
    if (v.array_type == GgufType::string) for (const auto& s : v.strings) a.push_back(s);
    else if (v.array_type == GgufType::float32 || v.array_type == GgufType::float64) for (double r : v.reals) a.push_back(r);
    else if (v.array_type == GgufType::boolean) for (int64_t i : v.integers) a.push_back(i != 0);
    else for (int64_t i : v.integers) a.push_back(integer(v.array_type, i));
    j["value"] = a;
  }
  return j;
}

std::string hex(const uint8_t* p, uint64_t n) {
  static const char* digits = "0123456789abcdef";
  std::string s;
  for (uint64_t i = 0; i < n; ++i) { s += digits[p[i] >> 4]; s += digits[p[i] & 15]; }
  return s;
}

// Everything a GgufFile holds, as JSON.
nlohmann::json file_json(const qlora::GgufFile& g) {
  nlohmann::json j = {{"alignment", g.alignment()}, {"metadata", nlohmann::json::array()}, {"tensors", nlohmann::json::array()}};
  for (const auto& [k, v] : g.metadata()) {
    nlohmann::json e = value_json(v);
    e["key"] = k;
    j["metadata"].push_back(e);
  }
  for (const auto& t : g.tensors())
    j["tensors"].push_back({{"name", t.name}, {"type", qlora::ggml_type_name(t.type)}, {"dims", t.dims}, {"nbytes", t.nbytes},
                            {"data_hex", hex(g.tensor_data(t), t.nbytes)}});
  return j;
}

}  // namespace

// Driven by tests/oracle/gguf_read.py: writes qlora.gguf and qlora_a64.gguf (every value type,
// every tensor type qlora knows) into QLORA_GGUF_ORACLE_DIR with <name>.json saying what they hold
// (as our reader reads them back), for the gguf package's GGUFReader to check; and reads every
// py*.gguf the script wrote there with gguf.GGUFWriter into <name>.read.json. Hidden tag.
TEST_CASE("gguf files for and from the gguf package", "[.gguf_oracle]") {
  const char* dir_env = std::getenv("QLORA_GGUF_ORACLE_DIR");
  if (!dir_env) SKIP("QLORA_GGUF_ORACLE_DIR not set");
  const fs::path dir(dir_env);
  qlora::GgufWriter w;
  w.set("general.architecture", GgufValue::make_string("llama"));
  w.set("general.name", GgufValue::make_string("qlora \xe2\x96\x81 oracle"));
  const std::vector<std::pair<GgufType, int64_t>> ints = {
      {GgufType::uint8, 200}, {GgufType::int8, -100}, {GgufType::uint16, 60000}, {GgufType::int16, -30000},
      {GgufType::uint32, 4000000000LL}, {GgufType::int32, -2000000000}, {GgufType::uint64, -2}, {GgufType::int64, -(1LL << 62)},
      {GgufType::boolean, 1}};
  for (const auto& [t, v] : ints) {
    w.set("s." + qlora::gguf_type_name(t), scalar(t, v));
    std::vector<int64_t> a = {v, t == GgufType::boolean ? 0 : v / 3, 0};
    w.set("a." + qlora::gguf_type_name(t), GgufValue::make_int_array(t, a));
  }
  w.set("s.float32", GgufValue::make_float32(-1.25e-6f));
  w.set("s.float64", real(GgufType::float64, 3.141592653589793));
  w.set("a.float32", GgufValue::make_float_array({0.1f, -7.5f, 1e30f}));
  GgufValue f64 = GgufValue::make_float_array({0.1, -1e300});
  f64.array_type = GgufType::float64;
  w.set("a.float64", f64);
  w.set("a.string", GgufValue::make_string_array({"<s>", "", "\xc4\xa0the", "a b"}));
  int seed = 0;
  for (const GgmlType t : {GgmlType::f32, GgmlType::f16, GgmlType::bf16, GgmlType::q4_0, GgmlType::q4_1, GgmlType::q5_0, GgmlType::q5_1,
                           GgmlType::q8_0, GgmlType::q8_1, GgmlType::q2_k, GgmlType::q3_k, GgmlType::q4_k, GgmlType::q5_k, GgmlType::q6_k,
                           GgmlType::q8_k}) {
    const int64_t b = qlora::ggml_block_size(t);
    const std::vector<int64_t> dims = b == 1 ? std::vector<int64_t>{5, 3} : std::vector<int64_t>{b * 2, 3};
    const uint64_t n = qlora::ggml_row_bytes(t, dims[0], "oracle") * 3;
    const std::string data = pattern(n, ++seed);
    w.add_tensor("blk.0." + qlora::ggml_type_name(t), t, dims, data.data(), n);
  }
  for (const uint64_t alignment : {32u, 64u}) {
    w.alignment = alignment;
    const std::string name = alignment == 32 ? "qlora" : "qlora_a64";
    w.write(dir / (name + ".gguf"));
    std::ofstream(dir / (name + ".json")) << file_json(qlora::GgufFile(dir / (name + ".gguf"))).dump(1);
  }
  int read = 0;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string f = e.path().filename().string();
    if (f.rfind("py", 0) != 0 || e.path().extension() != ".gguf") continue;
    std::ofstream(dir / (e.path().stem().string() + ".read.json")) << file_json(qlora::GgufFile(e.path())).dump(1);
    ++read;
  }
  std::printf("gguf oracle: wrote qlora.gguf and qlora_a64.gguf, read %d gguf-package files\n", read);
}
