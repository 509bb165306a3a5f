// libFuzzer target: the YAML training config and key=value overrides (src/config/config.cpp,
// overrides.cpp, yaml_values.cpp).
// Input: YAML text, then any number of overrides, each after a NUL byte ("lora_r: 8\0lora_r=16").
// A config that parses must print as YAML (config_to_yaml), and that text must parse again with
// nothing worse than a UserError.
#include <cstdint>

#include "fuzz_util.h"
#include "qlora/config.h"

namespace {

namespace fs = std::filesystem;
using namespace qlora;

void write_seeds(const fs::path& dir) {
  const std::string minimal = "base_model: /models/tiny\ndatasets:\n  - path: data.jsonl\n";
  fuzz::write_bytes(dir / "minimal", minimal);
  fuzz::write_bytes(dir / "minimal+overrides", minimal + '\0' + "lora_r=32" + '\0' + "datasets[0].type=alpaca" + '\0' +
                                                   "datasets.1.path=more.jsonl" + '\0' + "lora_target_modules=[q_proj,v_proj]" +
                                                   '\0' + "tokenizer_config=null");
  fuzz::write_bytes(dir / "overrides-only", std::string("\0base_model=/m\0datasets=[{path: a.txt}]", 39));
  fuzz::write_bytes(dir / "chat",
                    "base_model: m\nadapter: lora\nload_in_4bit: false\nbf16: auto\ndevice: cuda:1\n"
                    "datasets:\n  - {path: chat.jsonl, type: chat_template, field_messages: conv, field_tools: tools}\n"
                    "chat_template: chatml\nlora_target_modules: all-linear\nwarmup_ratio: 0.1\nlearning_rate: 2.0e-4\n");
  fuzz::write_bytes(dir / "anchors", "base_model: &m x\ndatasets:\n  - &d {path: a.jsonl}\n  - *d\noutput_dir: *m\n");
  // The resolved form of a config with every key at its default.
  fuzz::write_bytes(dir / "resolved", config_to_yaml(parse_config(minimal, "minimal")));
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (const fs::path seeds = fuzz::seed_output_dir(); !seeds.empty()) {
    write_seeds(seeds);
    std::exit(0);
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const size_t nul = input.find('\0');
  const std::string yaml(input.substr(0, nul));
  std::vector<std::string> overrides;
  if (nul != std::string_view::npos) {
    size_t at = nul + 1;
    while (true) {
      const size_t next = input.find('\0', at);
      overrides.emplace_back(input.substr(at, next == std::string_view::npos ? std::string_view::npos : next - at));
      if (next == std::string_view::npos) break;
      at = next + 1;
    }
  }
  TrainConfig config;
  if (!fuzz::expect_user_error([&] { config = parse_config(yaml, "fuzz.yaml", overrides); })) return 0;
  const std::string resolved = config_to_yaml(config);
  fuzz::expect_user_error([&] { (void)parse_config(resolved, "resolved.yaml"); });
  return 0;
}
