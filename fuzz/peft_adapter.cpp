// libFuzzer target: a PEFT LoRA adapter directory (src/io/peft_adapter.cpp, load_peft_adapter:
// adapter_config.json + adapter_model.safetensors), read for a tiny random Llama (2 layers,
// hidden 64) on the CPU.
// Input: byte 0 picks the fuzzed file. Even: the rest is adapter_config.json, next to the
// adapter_model.safetensors of a real r-4 adapter on all seven projections. Odd: the rest is
// adapter_model.safetensors, next to that adapter's adapter_config.json. An adapter that loads must
// have, for every targeted projection, A [r, in] and B [out, r] matching the model.
#include <cmath>
#include <cstdint>

#include "fuzz_util.h"
#include "qlora/lora.h"
#include "qlora/model.h"
#include "qlora/safetensors.h"

namespace {

namespace fs = std::filesystem;
using namespace qlora;

struct Fixture {
  HFConfig config;
  LlamaWeights model;
  std::string adapter_config;    // the real adapter's adapter_config.json
  std::string adapter_tensors;   // and its adapter_model.safetensors
};

std::string read_all(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

const Fixture& fixture() {
  static const Fixture f = [] {
    Fixture x;
    x.config = model_shape_config("tiny");
    ModelLoadOptions mo;
    mo.load_in_4bit = false;
    mo.compute_dtype = at::kFloat;
    mo.device = at::Device(at::kCPU);
    x.model = random_llama(x.config, mo, 7);
    LoraOptions lo;
    lo.r = 4;
    lo.alpha = 8;
    lo.target_modules = lora_projection_names();
    const LoraModel lora = make_lora(x.model, lo, 7);
    const fs::path dir = fuzz::scratch_dir() / "real-adapter";
    save_peft_adapter(dir, lora, x.config, "random:tiny");
    x.adapter_config = read_all(dir / "adapter_config.json");
    x.adapter_tensors = read_all(dir / "adapter_model.safetensors");
    return x;
  }();
  return f;
}

void write_seeds(const fs::path& dir) {
  const Fixture& f = fixture();
  fuzz::write_bytes(dir / "config-real", std::string(1, '\0') + f.adapter_config);
  fuzz::write_bytes(dir / "tensors-real", std::string(1, '\1') + f.adapter_tensors);
  fuzz::write_bytes(dir / "config-qv",
                    std::string(1, '\0') + R"({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
 "target_modules": ["q_proj", "v_proj"], "bias": "none", "use_dora": false, "fan_in_fan_out": false})");
  fuzz::write_bytes(dir / "config-all-linear",
                    std::string(1, '\0') + R"({"peft_type": "LORA", "r": 4, "lora_alpha": 16, "use_rslora": true,
 "target_modules": "all-linear", "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": null})");
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::initialize(write_seeds);
  (void)fixture();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const Fixture& f = fixture();
  const fs::path dir = fuzz::scratch_dir() / "adapter";
  fs::create_directories(dir);
  const std::string_view rest(reinterpret_cast<const char*>(data) + 1, size - 1);
  const bool fuzz_tensors = data[0] & 1;
  fuzz::write_bytes(dir / "adapter_config.json", fuzz_tensors ? std::string_view(f.adapter_config) : rest);
  fuzz::write_bytes(dir / "adapter_model.safetensors", fuzz_tensors ? rest : std::string_view(f.adapter_tensors));
  LoraModel lora;
  if (!fuzz::expect_user_error([&] { lora = load_peft_adapter(dir, f.model, at::Device(at::kCPU)); })) return 0;
  if (lora.layers.size() != f.model.layers.size()) fuzz::invariant_failed("adapter layer count differs from the model's");
  for (size_t i = 0; i < lora.layers.size(); ++i)
    for (const std::string& name : lora_projection_names()) {
      const auto& p = lora_projection(lora.layers[i], name);
      if (!p) continue;
      const LinearWeight& w = base_projection(f.model.layers[i], name);
      const int64_t r = p->A.size(0);
      if (p->A.dim() != 2 || p->B.dim() != 2 || r < 1 || p->A.size(1) != w.in_features ||
          p->B.size(0) != w.out_features || p->B.size(1) != r || p->A.scalar_type() != at::kFloat ||
          p->B.scalar_type() != at::kFloat || !std::isfinite(p->scale))
        fuzz::invariant_failed("loaded adapter tensors do not fit layer " + std::to_string(i) + " " + name + ": A " +
                               std::to_string(p->A.dim()) + "-d, B " + std::to_string(p->B.dim()) + "-d");
    }
  return 0;
}
