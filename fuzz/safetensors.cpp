// libFuzzer target: safetensors files and model.safetensors.index.json (src/io/safetensors.cpp).
// Input: byte 0 picks what the rest is. Even: a whole .safetensors file (8-byte header length,
// JSON header, data), opened with SafetensorsFile and as a one-file SafetensorsCheckpoint, every
// tensor read. Odd: a model.safetensors.index.json, opened as a SafetensorsCheckpoint in a
// directory that also holds two small valid shards (tensors a, b in shard 1; c in shard 2).
#include <cstdint>
#include <cstring>

#include "fuzz_util.h"
#include "qlora/safetensors.h"

namespace {

namespace fs = std::filesystem;
using namespace qlora;

fs::path g_sharded_dir;

NamedTensors shard_tensors(int which) {
  if (which == 1)
    return {{"a", at::arange(6, at::kFloat).reshape({2, 3})}, {"b", at::ones({4}, at::kBFloat16)}};
  return {{"c", at::arange(3, at::kLong)}};
}

void write_seeds(const fs::path& dir) {
  const std::string one = serialize_safetensors(
      {{"model.embed_tokens.weight", at::arange(12, at::kFloat).reshape({3, 4})},
       {"model.norm.weight", at::ones({4}, at::kHalf)},
       {"lm_head.bias", at::zeros({3}, at::kBFloat16)},
       {"flags", at::ones({2}, at::kBool)},
       {"ids", at::arange(2, at::kLong)}});
  fuzz::write_bytes(dir / "file-mixed", std::string(1, '\0') + one);
  fuzz::write_bytes(dir / "file-empty", std::string(1, '\0') + serialize_safetensors({}, {}));
  fuzz::write_bytes(dir / "file-scalar", std::string(1, '\0') + serialize_safetensors({{"s", at::ones({}, at::kDouble)}}));
  fuzz::write_bytes(dir / "file-truncated", std::string(1, '\0') + one.substr(0, one.size() - 5));
  fuzz::write_bytes(dir / "index-good",
                    std::string(1, '\1') + R"({"metadata": {"total_size": 52}, "weight_map": {"a": "model-00001-of-00002.safetensors", )"
                                           R"("b": "model-00001-of-00002.safetensors", "c": "model-00002-of-00002.safetensors"}})");
  fuzz::write_bytes(dir / "index-missing-shard",
                    std::string(1, '\1') + R"({"weight_map": {"a": "model-00003-of-00003.safetensors"}})");
}

// Reads every byte of every tensor, so that ASan sees any entry that points outside the mapping.
uint64_t touch_all(const SafetensorsFile& f) {
  uint64_t sum = 0;
  for (const auto& e : f.entries()) {
    const at::Tensor t = f.tensor(e.name);
    const auto* p = static_cast<const uint8_t*>(t.data_ptr());
    for (int64_t i = 0; i < t.numel() * static_cast<int64_t>(t.element_size()); ++i) sum += p[i];
  }
  return sum;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::initialize(write_seeds);
  g_sharded_dir = fuzz::scratch_dir() / "sharded";
  fs::create_directories(g_sharded_dir);
  save_safetensors(g_sharded_dir / "model-00001-of-00002.safetensors", shard_tensors(1));
  save_safetensors(g_sharded_dir / "model-00002-of-00002.safetensors", shard_tensors(2));
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const std::string_view body(reinterpret_cast<const char*>(data + 1), size - 1);
  if ((data[0] & 1) == 0) {
    const fs::path file = fuzz::write_scratch("input.safetensors", body);
    fuzz::expect_user_error([&] {
      const SafetensorsFile f(file);
      touch_all(f);
      for (const auto& [k, v] : f.metadata()) (void)(k.size() + v.size());
    });
    fuzz::expect_user_error([&] {
      const SafetensorsCheckpoint ckpt(file);
      for (const auto& name : ckpt.names()) (void)ckpt.entry(name);
    });
  } else {
    fuzz::write_bytes(g_sharded_dir / "model.safetensors.index.json", body);
    fuzz::expect_user_error([&] {
      const SafetensorsCheckpoint ckpt(g_sharded_dir);
      for (const auto& name : ckpt.names()) {
        const at::Tensor t = ckpt.tensor(name);
        if (t.numel() != static_cast<int64_t>(ckpt.entry(name).end - ckpt.entry(name).begin) / static_cast<int64_t>(t.element_size()))
          fuzz::invariant_failed("tensor '" + name + "' disagrees with its entry");
      }
    });
  }
  return 0;
}
