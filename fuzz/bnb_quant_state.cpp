// libFuzzer target: the bitsandbytes quant-state JSON (<w>.quant_state.bitsandbytes__nf4) and the
// entry checks around it (src/io/bnb4bit.cpp, bnb4bit_from_entries).
// Input: byte 0 picks the tensors the JSON is checked against: bit 0 = double-quantized (nested)
// entries, bit 1 = a [64, 32] weight instead of [128, 64]; bit 2 drops the packed weight's unit
// second dimension; bits 3-4 pick the blocksize (64, 128, 32, 256). The rest is the JSON text. A
// weight that loads must dequantize (nf4_check passed, so the buffers are consistent).
#include <cstdint>
#include <cstring>

#include "fuzz_util.h"
#include "qlora/bnb4bit.h"

namespace {

namespace fs = std::filesystem;
using namespace qlora;

const char* const kWeight = "model.layers.0.mlp.down_proj.weight";

// The entries bitsandbytes would write for a real quantized weight, except the quant state.
std::map<std::string, at::Tensor> entries_for(uint8_t selector) {
  static std::map<uint8_t, std::map<std::string, at::Tensor>> cache;
  const uint8_t key = selector & 0x1F;
  if (auto it = cache.find(key); it != cache.end()) return it->second;
  const bool nested = key & 1;
  const at::Tensor w = (key & 2) ? at::randn({64, 32}, at::TensorOptions().dtype(at::kBFloat16))
                                 : at::randn({128, 64}, at::TensorOptions().dtype(at::kHalf));
  static const int64_t kBlocks[] = {64, 128, 32, 256};
  const NF4Tensor t = nf4_quantize(w, kBlocks[(key >> 3) & 3], nested);
  std::map<std::string, at::Tensor> out;
  for (auto& [name, tensor] : bnb4bit_entries(kWeight, t)) out[name] = tensor;
  if (key & 4) out[kWeight] = out[kWeight].reshape({-1});
  out.erase(std::string(kWeight) + kBnbQuantStateSuffix);
  return cache[key] = out;
}

at::Tensor bytes_tensor(std::string_view s) {
  at::Tensor t = at::empty({static_cast<int64_t>(s.size())}, at::TensorOptions().dtype(at::kByte));
  if (!s.empty()) std::memcpy(t.data_ptr<uint8_t>(), s.data(), s.size());
  return t;
}

void write_seeds(const fs::path& dir) {
  int n = 0;
  for (uint8_t selector : {0, 1, 2, 3, 5, 9, 17, 26}) {
    static const int64_t kBlocks[] = {64, 128, 32, 256};
    const bool nested = selector & 1;
    const at::Tensor w = (selector & 2) ? at::randn({64, 32}, at::TensorOptions().dtype(at::kBFloat16))
                                        : at::randn({128, 64}, at::TensorOptions().dtype(at::kHalf));
    const std::string js = bnb4bit_quant_state_json(nf4_quantize(w, kBlocks[(selector >> 3) & 3], nested));
    fuzz::write_bytes(dir / ("state-" + std::to_string(n++)), std::string(1, static_cast<char>(selector)) + js);
  }
  // The example of bnb4bit.h and a few near misses.
  fuzz::write_bytes(dir / "state-doc",
                    std::string(1, '\3') + R"({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [64, 32], )"
                                           R"("nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.0123})");
  fuzz::write_bytes(dir / "state-fp4", std::string(1, '\0') + R"({"quant_type": "fp4", "blocksize": 64, "dtype": "float16", "shape": [128, 64]})");
  fuzz::write_bytes(dir / "state-big-shape",
                    std::string(1, '\0') + R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float16", "shape": [4294967296, 4294967296]})");
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  at::manual_seed(0);
  if (const fs::path seeds = fuzz::seed_output_dir(); !seeds.empty()) {
    write_seeds(seeds);
    std::exit(0);
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  std::map<std::string, at::Tensor> entries = entries_for(data[0]);
  entries[std::string(kWeight) + kBnbQuantStateSuffix] = bytes_tensor({reinterpret_cast<const char*>(data + 1), size - 1});
  fuzz::expect_user_error([&] {
    const NF4Tensor t = bnb4bit_from_entries(kWeight, entries, "fuzz.safetensors");
    const at::Tensor w = nf4_dequantize(t, at::kFloat);
    if (w.numel() != t.numel()) fuzz::invariant_failed("dequantized weight has the wrong size");
  });
  return 0;
}
