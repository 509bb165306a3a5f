// libFuzzer target: encode and decode of arbitrary bytes with real tokenizers (src/data/
// tokenizer.cpp, pretokenize.cpp, unicode.cpp), loaded once from the test assets: GPT-2, Llama 3
// (byte-level BPE, two pre-tokenizer regexes), Llama 2 (sentencepiece BPE, byte fallback) and the
// GGUF Llama 2 vocabulary (merges by score). Without the assets ($QLORA_ASSETS, ../shared/assets)
// the target says so and exits 0.
// Input: byte 0 picks the tokenizer (bits 0-1) and the options (bit 2: add_special_tokens, bit 3:
// parse_special, bit 4: skip_special in decode); the rest is the text. Encode must not throw, every
// id must be in the vocabulary, decode of those ids must not throw, and for the byte-level
// tokenizers decode(encode(text)) must give the text back byte for byte (no BOS/EOS added).
#include <cstdint>
#include <memory>

#include "fuzz_util.h"
#include "qlora/gguf.h"
#include "qlora/tokenizer.h"

namespace {

namespace fs = std::filesystem;
using namespace qlora;

struct Loaded {
  std::string name;
  Tokenizer tok;
};
std::vector<std::unique_ptr<Loaded>> g_tokenizers;

void load_all() {
  const fs::path assets = fuzz::require_assets("fuzz_tokenizer_encode");
  auto add = [&](const std::string& name, const fs::path& path) {
    auto l = std::make_unique<Loaded>();
    l->name = name;
    l->tok = load_tokenizer(path);
    g_tokenizers.push_back(std::move(l));
  };
  add("gpt2", assets / "tokenizers" / "gpt2");
  add("llama3", assets / "tokenizers" / "llama3");
  add("llama2", assets / "tokenizers" / "llama2");
  add("llama-spm.gguf", assets / "vocab" / "ggml-vocab-llama-spm.gguf");
}

void write_seeds(const fs::path& dir) {
  const char* const texts[] = {
      "Hello world! It's 2026, isn't it?",
      "  leading spaces\n\n\ttabs and\r\nCRLF   ",
      "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
      "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello </s>",
      "caf\xC3\xA9 cafe\xCC\x81 \xE4\xBD\xA0\xE5\xA5\xBD \xF0\x9F\x98\x80\xF0\x9F\x91\x8D\xF0\x9F\x8F\xBD \xE2\x96\x81",
      "invalid \xFF\xFE \xC3 \xE2\x96 \xF0\x9F\x98 bytes",
      "1234567890 3.14159 1,000,000 0x1F",
      "def f(x):\n    return {'a': [1, 2]}  # comment\n",
  };
  int n = 0;
  for (const char* t : texts)
    for (int selector : {0, 1, 2, 3, 12, 13})
      fuzz::write_bytes(dir / ("text-" + std::to_string(n) + "-" + std::to_string(selector)),
                        std::string(1, static_cast<char>(selector)) + t);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (const fs::path seeds = fuzz::seed_output_dir(); !seeds.empty()) {
    write_seeds(seeds);
    std::exit(0);
  }
  load_all();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const Loaded& l = *g_tokenizers[data[0] & 3];
  const std::string_view text(reinterpret_cast<const char*>(data + 1), size - 1);
  EncodeOptions o;
  o.add_special_tokens = data[0] & 4;
  o.parse_special = data[0] & 8;
  const bool skip_special = data[0] & 16;

  const std::vector<int32_t> ids = l.tok.encode(text, o);
  for (const int32_t id : ids)
    if (id < 0 || id >= l.tok.vocab_size())
      fuzz::invariant_failed(l.name + ": encode gave id " + std::to_string(id) + " outside the vocabulary of " +
                             std::to_string(l.tok.vocab_size()));
  const std::string back = l.tok.decode(ids, skip_special);
  if (l.tok.kind() == TokenizerKind::byte_level_bpe && !o.add_special_tokens && !skip_special && back != text)
    fuzz::invariant_failed(l.name + ": decode(encode(text)) differs from the text (" + std::to_string(back.size()) + " vs " +
                           std::to_string(text.size()) + " bytes)");
  return 0;
}
