// safetensors reader/writer: round trips of every dtype, the writer's layout (order, padding,
// metadata), sharded checkpoints, and every malformed-input path of the reader and the index.
// torch headers before Catch: c10 defines a CHECK macro that Catch must override.
#include "qlora/error.h"
#include "qlora/safetensors.h"

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "test_util.h"


using Catch::Matchers::ContainsSubstring;
namespace fs = std::filesystem;

using qlora::test::TempDir;

namespace {


using qlora::test::read_file;
using qlora::test::write_file;

// A file with the given header text and `data_len` zero bytes of data.
std::string raw_file(const std::string& header, size_t data_len, int64_t claimed_len = -1) {
  const uint64_t n = claimed_len < 0 ? header.size() : static_cast<uint64_t>(claimed_len);
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + header + std::string(data_len, '\0');
}

std::string open_error(const std::string& bytes) {
  TempDir d("qlora_st_test");
  write_file(d / "bad.safetensors", bytes);
  try {
    qlora::SafetensorsFile f(d / "bad.safetensors");
  } catch (const qlora::UserError& e) {
    return e.what();
  }
  FAIL("expected a UserError");
  return "";
}

at::Tensor sample(at::ScalarType t, std::vector<int64_t> shape) {
  at::Tensor x = at::randn(shape, at::kDouble) * 50;
  if (t == at::kBool) return x > 0;
  if (t == at::kByte || t == at::kUInt16 || t == at::kUInt32 || t == at::kUInt64) return x.abs().to(at::kLong).to(t);
  if (t == at::kFloat8_e4m3fn || t == at::kFloat8_e5m2) return (x / 50).to(t);
  return x.to(t);
}

bool same(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  return a.numel() == 0 || std::memcmp(ac.data_ptr(), bc.data_ptr(), a.numel() * a.element_size()) == 0;
}

}  // namespace

TEST_CASE("safetensors round trip of every dtype, odd shapes included", "[safetensors]") {
  TempDir d("qlora_st_test");
  const std::vector<std::pair<std::string, at::ScalarType>> types = {
      {"F64", at::kDouble}, {"F32", at::kFloat}, {"F16", at::kHalf},   {"BF16", at::kBFloat16}, {"I64", at::kLong},
      {"I32", at::kInt},    {"I16", at::kShort}, {"I8", at::kChar},    {"U8", at::kByte},       {"BOOL", at::kBool},
      {"U16", at::kUInt16}, {"U32", at::kUInt32}, {"U64", at::kUInt64}, {"F8_E4M3", at::kFloat8_e4m3fn}, {"F8_E5M2", at::kFloat8_e5m2}};
  qlora::NamedTensors ts;
  for (const auto& [name, t] : types) {
    ts.emplace_back("t." + name, sample(t, {3, 5}));
    ts.emplace_back("t." + name + ".odd", sample(t, {7}));
  }
  ts.emplace_back("scalar", at::scalar_tensor(3.5, at::kFloat));      // 0-d
  ts.emplace_back("empty", at::empty({0, 4}, at::kBFloat16));   // zero bytes
  ts.emplace_back("strided", at::arange(12, at::kFloat).reshape({3, 4}).t());  // non-contiguous
  qlora::save_safetensors(d / "m.safetensors", ts, {{"format", "pt"}, {"note", "hello"}});

  qlora::SafetensorsFile f(d / "m.safetensors");
  CHECK(f.entries().size() == ts.size());
  CHECK(f.metadata().at("format") == "pt");
  CHECK(f.metadata().at("note") == "hello");
  for (const auto& [name, t] : ts) {
    CAPTURE(name);
    REQUIRE(f.contains(name));
    CHECK(same(f.view(name), t.contiguous()));
    CHECK(same(f.tensor(name), t.contiguous()));
  }
  for (const auto& [name, t] : types) CHECK(f.entry("t." + name).dtype == name);
  CHECK(f.entry("scalar").shape.empty());
  // no temp file left behind by the atomic write
  int files = 0;
  for (const auto& e : fs::directory_iterator(d.path)) { ++files; (void)e; }
  CHECK(files == 1);
}

TEST_CASE("safetensors writer layout: dtype-then-name order, padded header, __metadata__ first", "[safetensors]") {
  // Same bytes as huggingface/safetensors' serialize(): {"test": I32 [2,2]} gives a 60-byte
  // header, padded with spaces to 64.
  qlora::NamedTensors one = {{"test", at::zeros({2, 2}, at::kInt)}};
  const std::string bytes = qlora::serialize_safetensors(one, {});
  const std::string header = R"({"test":{"dtype":"I32","shape":[2,2],"data_offsets":[0,16]}})";
  REQUIRE(header.size() == 60);
  CHECK(bytes == raw_file(header + "    ", 16));

  qlora::NamedTensors ts = {{"b", at::zeros({2}, at::kByte)}, {"a", at::zeros({1}, at::kFloat)}, {"z", at::zeros({1}, at::kDouble)},
                            {"c", at::zeros({1}, at::kFloat)}, {"y", at::zeros({1}, at::kBFloat16)}};
  const std::string all = qlora::serialize_safetensors(ts);
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(static_cast<uint8_t>(all[i])) << (8 * i);
  CHECK(n % 8 == 0);
  const std::string h = all.substr(8, n);
  CHECK(h.rfind("{\"__metadata__\":{\"format\":\"pt\"},\"z\":", 0) == 0);
  TempDir d("qlora_st_test");
  write_file(d / "o.safetensors", all);
  qlora::SafetensorsFile f(d / "o.safetensors");
  CHECK(f.names() == std::vector<std::string>{"z", "a", "c", "y", "b"});  // F64, F32 (a, c), BF16, U8

  SECTION("duplicate names are refused") {
    qlora::NamedTensors dup = {{"x", at::zeros({1})}, {"x", at::zeros({1})}};
    CHECK_THROWS_WITH(qlora::save_safetensors(d / "dup.safetensors", dup), ContainsSubstring("'x' given twice"));
    CHECK(!fs::exists(d / "dup.safetensors"));
  }
  SECTION("overwriting an existing file replaces it whole") {
    qlora::save_safetensors(d / "o.safetensors", one);
    qlora::SafetensorsFile g(d / "o.safetensors");
    CHECK(g.names() == std::vector<std::string>{"test"});
  }
}

TEST_CASE("safetensors views are copy-on-write and outlive the file object", "[safetensors]") {
  TempDir d("qlora_st_test");
  qlora::save_safetensors(d / "m.safetensors", {{"w", at::arange(6, at::kFloat)}});
  at::Tensor v;
  {
    qlora::SafetensorsFile f(d / "m.safetensors");
    v = f.view("w");
  }
  v.mul_(2);  // the mapping is private: the file keeps its bytes
  CHECK(v[5].item<float>() == 10.0f);
  qlora::SafetensorsFile g(d / "m.safetensors");
  CHECK(g.view("w")[5].item<float>() == 5.0f);
  CHECK_THROWS_WITH(g.view("nope"), ContainsSubstring("no tensor named 'nope'"));
}

TEST_CASE("safetensors reader rejects malformed files with one clear line", "[safetensors]") {
  const std::string ok = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  SECTION("truncated below the length field") { CHECK_THAT(open_error("abc"), ContainsSubstring("too short for the 8-byte header length")); }
  SECTION("header length over 100 MB") {
    CHECK_THAT(open_error(raw_file(ok, 8, 200'000'000)), ContainsSubstring("exceeds the 100 MB limit"));
  }
  SECTION("header length past the end of the file") {
    CHECK_THAT(open_error(raw_file(ok, 0, 4096)), ContainsSubstring("exceeds the file size"));
  }
  SECTION("truncated data") {
    CHECK_THAT(open_error(raw_file(ok, 5)), ContainsSubstring("tensor 'a': data_offsets [0, 8] run past the end of the 5-byte data buffer"));
  }
  SECTION("bad JSON") { CHECK_THAT(open_error(raw_file(R"({"a": {"dtype": )", 0)), ContainsSubstring("header is not valid JSON")); }
  SECTION("header not an object") { CHECK_THAT(open_error(raw_file("[1, 2]", 0)), ContainsSubstring("header is not a JSON object")); }
  SECTION("entry not an object") { CHECK_THAT(open_error(raw_file(R"({"a": 3})", 0)), ContainsSubstring("tensor 'a': expected an object")); }
  SECTION("missing dtype") {
    CHECK_THAT(open_error(raw_file(R"({"a":{"shape":[2],"data_offsets":[0,8]}})", 8)), ContainsSubstring("tensor 'a': missing 'dtype'"));
  }
  SECTION("missing shape") {
    CHECK_THAT(open_error(raw_file(R"({"a":{"dtype":"F32","data_offsets":[0,8]}})", 8)), ContainsSubstring("tensor 'a': missing 'shape'"));
  }
  SECTION("missing data_offsets") {
    CHECK_THAT(open_error(raw_file(R"({"a":{"dtype":"F32","shape":[2]}})", 8)), ContainsSubstring("tensor 'a': missing 'data_offsets'"));
  }
  SECTION("bad shape") {
    CHECK_THAT(open_error(raw_file(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8)),
               ContainsSubstring("'shape' must be a list of non-negative integers"));
    CHECK_THAT(open_error(raw_file(R"({"a":{"dtype":"F32","shape":"2","data_offsets":[0,8]}})", 8)),
               ContainsSubstring("'shape' must be a list of non-negative integers"));
  }
  SECTION("bad data_offsets") {
    CHECK_THAT(open_error(raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", 8)),
               ContainsSubstring("'data_offsets' must be [begin, end]"));
    CHECK_THAT(open_error(raw_file(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", 8)), ContainsSubstring("end before they begin"));
  }
  SECTION("offsets past the end") {
    CHECK_THAT(open_error(raw_file(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8)), ContainsSubstring("run past the end"));
  }
  SECTION("overlapping ranges") {
    const std::string h = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})";
    CHECK_THAT(open_error(raw_file(h, 12)), ContainsSubstring("tensor 'b' data_offsets [4, 12] overlap tensor 'a'"));
  }
  SECTION("a hole between tensors") {
    const std::string h = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})";
    CHECK_THAT(open_error(raw_file(h, 20)), ContainsSubstring("bytes [8, 12) of the data buffer belong to no tensor"));
  }
  SECTION("trailing bytes after the last tensor") {
    CHECK_THAT(open_error(raw_file(ok, 12)), ContainsSubstring("4 bytes after the last tensor"));
  }
  SECTION("size mismatch") {
    CHECK_THAT(open_error(raw_file(R"({"a":{"dtype":"F16","shape":[2],"data_offsets":[0,8]}})", 8)),
               ContainsSubstring("tensor 'a': shape [2] of F16 needs 4 bytes, data_offsets give 8"));
  }
  SECTION("unknown and unsupported dtypes") {
    CHECK_THAT(open_error(raw_file(R"({"a":{"dtype":"F12","shape":[2],"data_offsets":[0,8]}})", 8)),
               ContainsSubstring("tensor 'a': unknown dtype 'F12'"));
    CHECK_THAT(open_error(raw_file(R"({"a":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}})", 8)),
               ContainsSubstring("dtype C64 is not supported"));
    CHECK_THAT(open_error(raw_file(R"({"a":{"dtype":7,"shape":[1],"data_offsets":[0,8]}})", 8)),
               ContainsSubstring("'dtype' must be a string"));
  }
  SECTION("duplicate name") {
    const std::string h = R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})";
    CHECK_THAT(open_error(raw_file(h, 8)), ContainsSubstring("header has the key 'a' more than once"));
  }
  SECTION("bad __metadata__") {
    CHECK_THAT(open_error(raw_file(R"({"__metadata__":{"format":1}})", 0)), ContainsSubstring("__metadata__['format'] must be a string"));
    CHECK_THAT(open_error(raw_file(R"({"__metadata__":[]})", 0)), ContainsSubstring("__metadata__ must be an object"));
  }
  SECTION("a missing file and a directory") {
    TempDir d("qlora_st_test");
    CHECK_THROWS_WITH(qlora::SafetensorsFile(d / "none.safetensors"), ContainsSubstring("cannot open"));
    CHECK_THROWS_WITH(qlora::SafetensorsFile(d.path), ContainsSubstring("is a directory"));
  }
  SECTION("an empty checkpoint is fine") {
    TempDir d("qlora_st_test");
    write_file(d / "e.safetensors", raw_file("{}      ", 0));
    qlora::SafetensorsFile f(d / "e.safetensors");
    CHECK(f.entries().empty());
  }
}

TEST_CASE("sharded checkpoints: writer, index and reader", "[safetensors]") {
  TempDir d("qlora_st_test");
  qlora::NamedTensors ts;
  for (int i = 0; i < 5; ++i) ts.emplace_back("layer." + std::to_string(i), at::randn({16, 16}));  // 1 KB each
  ts.emplace_back("bias", at::randn({16}, at::kBFloat16));
  const auto files = qlora::save_safetensors_sharded(d.path, ts, 2100);
  CHECK(files.size() == 4);  // 3 shards + index
  CHECK(files[0] == "model-00001-of-00003.safetensors");
  CHECK(files.back() == "model.safetensors.index.json");
  const auto index = nlohmann::json::parse(read_file(d / "model.safetensors.index.json"));
  CHECK(index["metadata"]["total_size"] == 5 * 1024 + 32);
  CHECK(index["weight_map"]["bias"] == "model-00003-of-00003.safetensors");

  qlora::SafetensorsCheckpoint ck(d.path);
  CHECK(ck.sharded());
  CHECK(ck.names().size() == ts.size());
  for (const auto& [n, t] : ts) CHECK(same(ck.tensor(n), t));

  SECTION("everything fits: one model.safetensors, no index") {
    TempDir d2;
    CHECK(qlora::save_safetensors_sharded(d2.path, ts, 1 << 20) == std::vector<std::string>{"model.safetensors"});
    qlora::SafetensorsCheckpoint one(d2.path);
    CHECK(!one.sharded());
    CHECK(one.names().size() == ts.size());
  }
  SECTION("a single file given by path") {
    qlora::SafetensorsCheckpoint one(d / "model-00002-of-00003.safetensors");
    CHECK(one.names().size() == 2);
  }
}

TEST_CASE("bad model.safetensors.index.json", "[safetensors]") {
  TempDir d("qlora_st_test");
  qlora::save_safetensors(d / "s1.safetensors", {{"a", at::zeros({2})}});
  auto err = [&](const std::string& index) {
    write_file(d / "model.safetensors.index.json", index);
    try {
      qlora::SafetensorsCheckpoint ck(d.path);
    } catch (const qlora::UserError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  CHECK_THAT(err("{\"weight_map\": "), ContainsSubstring("model.safetensors.index.json: the index is not valid JSON"));
  CHECK_THAT(err("[]"), ContainsSubstring("expected a JSON object"));
  CHECK_THAT(err("{\"metadata\": {}}"), ContainsSubstring("missing 'weight_map'"));
  CHECK_THAT(err("{\"weight_map\": []}"), ContainsSubstring("'weight_map' must be an object"));
  CHECK_THAT(err("{\"weight_map\": {}}"), ContainsSubstring("'weight_map' is empty"));
  CHECK_THAT(err("{\"weight_map\": {\"a\": 1}}"), ContainsSubstring("weight_map['a'] must be a file name string"));
  CHECK_THAT(err("{\"weight_map\": {\"a\": \"s2.safetensors\"}}"), ContainsSubstring("names s2.safetensors, which does not exist"));
  CHECK_THAT(err("{\"weight_map\": {\"b\": \"s1.safetensors\"}}"), ContainsSubstring("says 'b' is in s1.safetensors, but that file has no such tensor"));
  CHECK_THAT(err("{\"weight_map\": {\"a\": \"../s1.safetensors\"}}"), ContainsSubstring("is not a file name in this directory"));
  CHECK_THAT(err("{\"weight_map\": {\"a\": \"s1.safetensors\", \"a\": \"s1.safetensors\"}}"), ContainsSubstring("more than once"));
  CHECK(err("{\"metadata\": {\"total_size\": 8}, \"weight_map\": {\"a\": \"s1.safetensors\"}}") == "no error");

  SECTION("no safetensors at all, or several without an index") {
    TempDir e;
    CHECK_THROWS_WITH(qlora::SafetensorsCheckpoint(e.path), ContainsSubstring("no model.safetensors"));
    qlora::save_safetensors(e / "x.safetensors", {{"a", at::zeros({2})}});
    CHECK(qlora::SafetensorsCheckpoint(e.path).names() == std::vector<std::string>{"a"});
    qlora::save_safetensors(e / "y.safetensors", {{"b", at::zeros({2})}});
    CHECK_THROWS_WITH(qlora::SafetensorsCheckpoint(e.path), ContainsSubstring("2 .safetensors files but no model.safetensors.index.json"));
    CHECK_THROWS_WITH(qlora::SafetensorsCheckpoint(e / "missing"), ContainsSubstring("does not exist"));
  }
}

TEST_CASE("safetensors: unpadded headers (misaligned data) and failed writes", "[safetensors]") {
  TempDir d("qlora_st_test");
  // Other writers need not pad the header: F64 data then starts at an odd multiple of 4 and is
  // copied instead of viewed.
  const std::string h = R"({"a":{"dtype":"F64","shape":[2],"data_offsets":[0,16]}})";
  REQUIRE((8 + h.size()) % 8 != 0);
  std::string bytes = raw_file(h, 0);
  const double vals[2] = {1.5, -2.25};
  bytes.append(reinterpret_cast<const char*>(vals), sizeof vals);
  write_file(d / "u.safetensors", bytes);
  qlora::SafetensorsFile f(d / "u.safetensors");
  const at::Tensor v = f.view("a");
  CHECK(v[0].item<double>() == 1.5);
  CHECK(v[1].item<double>() == -2.25);

  CHECK_THROWS_WITH(qlora::save_safetensors(d / "no" / "such" / "dir.safetensors", {{"a", at::zeros({1})}}), ContainsSubstring("cannot create"));
  CHECK_THROWS_WITH(qlora::save_safetensors(d / "c.safetensors", {{"a", at::zeros({1}, at::kComplexFloat)}}),
                    ContainsSubstring("which safetensors cannot store here"));
  int files = 0;
  for (const auto& e : fs::directory_iterator(d.path)) { ++files; (void)e; }
  CHECK(files == 1);  // only u.safetensors: no temp file left by the failed writes
}
