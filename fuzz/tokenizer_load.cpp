// libFuzzer target: loading tokenizers (src/data/tokenizer_json.cpp, tokenizer_gguf.cpp and the
// finishing step in tokenizer.cpp).
// Input: a GGUF file (it starts with "GGUF": its tokenizer.ggml.* metadata), else tokenizer.json
// text, optionally followed by a NUL byte and a tokenizer_config.json (raw JSON never holds a NUL).
// A tokenizer that loads must encode and decode text without any exception, with every id it
// produces (BOS/EOS included) inside its vocabulary.
//
// Seed mode (QLORA_FUZZ_WRITE_SEEDS) shrinks the real tokenizers under the assets folder (when
// there is one) to their first few hundred tokens, with the merges and special tokens that still
// apply, so that the seeds are small enough to mutate quickly.
#include <nlohmann/json.hpp>

#include <cstdint>
#include <cstring>
#include <set>

#include "fuzz_util.h"
#include "qlora/gguf.h"
#include "qlora/tokenizer.h"

namespace {

namespace fs = std::filesystem;
using namespace qlora;
// std::map objects: json looks keys up linearly, hopeless for a 128k-token vocab.
using json = nlohmann::json;

constexpr int64_t kSeedVocab = 400;  // tokens kept from a real vocabulary in a seed

std::string read_all(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// The first kSeedVocab tokens of a tokenizer.json, its added tokens renumbered after them, the
// merges among the kept tokens, and the post-processor's special ids renumbered to match.
std::string shrink_tokenizer_json(const std::string& text) {
  json j = json::parse(text);
  json& model = j["model"];
  json vocab = json::object();
  std::set<std::string> kept;
  for (auto& [tok, id] : model["vocab"].items())
    if (id.get<int64_t>() < kSeedVocab) vocab[tok] = id, kept.insert(tok);
  std::map<int64_t, int64_t> renumbered;
  if (j.contains("added_tokens") && j["added_tokens"].is_array()) {
    json added = json::array();
    int64_t next = kSeedVocab;
    for (auto a : j["added_tokens"]) {
      const int64_t old = a["id"].get<int64_t>();
      if (old >= kSeedVocab) {
        if (next >= kSeedVocab + 40) continue;  // Llama 3 has 256 reserved specials; a few suffice
        renumbered[old] = next;
        a["id"] = next++;
      }
      added.push_back(a);
    }
    j["added_tokens"] = added;
  }
  model["vocab"] = vocab;
  json merges = json::array();
  for (const auto& m : model["merges"]) {
    std::string a, b;
    if (m.is_string()) {
      const std::string s = m.get<std::string>();
      const size_t sp = s.find(' ');
      a = s.substr(0, sp), b = s.substr(sp + 1);
    } else {
      a = m[0].get<std::string>(), b = m[1].get<std::string>();
    }
    if (kept.count(a) && kept.count(b) && kept.count(a + b)) merges.push_back(m);
  }
  model["merges"] = merges;
  if (j.contains("post_processor") && j["post_processor"].is_object() && j["post_processor"].contains("special_tokens"))
    for (auto& [name, st] : j["post_processor"]["special_tokens"].items())
      for (auto& id : st["ids"])
        if (renumbered.count(id.get<int64_t>())) id = renumbered[id.get<int64_t>()];
  return j.dump();
}

// The first kSeedVocab tokens of a GGUF vocabulary with the metadata that goes with them.
std::string shrink_gguf_vocab(const fs::path& path) {
  const GgufFile g(path);
  GgufWriter w;
  std::set<std::string> kept;
  for (const auto& [key, v] : g.metadata()) {
    if (key.rfind("tokenizer.", 0) != 0 && key != "general.architecture") continue;
    GgufValue c = v;
    if (v.type == GgufType::array && key != "tokenizer.ggml.merges") {
      if (c.strings.size() > kSeedVocab) c.strings.resize(kSeedVocab);
      if (c.integers.size() > kSeedVocab) c.integers.resize(kSeedVocab);
      if (c.reals.size() > kSeedVocab) c.reals.resize(kSeedVocab);
    }
    if (key == "tokenizer.ggml.tokens") kept.insert(c.strings.begin(), c.strings.end());
    if (key.size() > 9 && key.compare(key.size() - 9, 9, "_token_id") == 0 && v.integer >= kSeedVocab) continue;
    w.set(key, c);
  }
  if (g.contains("tokenizer.ggml.merges")) {
    std::vector<std::string> merges;
    for (const std::string& m : g.get_string_array("tokenizer.ggml.merges")) {
      const size_t sp = m.find(' ', 1);
      if (sp == std::string::npos) continue;
      const std::string a = m.substr(0, sp), b = m.substr(sp + 1);
      if (kept.count(a) && kept.count(b) && kept.count(a + b)) merges.push_back(m);
    }
    w.set("tokenizer.ggml.merges", GgufValue::make_string_array(merges));
  }
  return w.serialize();
}

void write_seeds(const fs::path& dir) {
  // Hand-written: the smallest byte-level and sentencepiece tokenizers this loader accepts.
  fuzz::write_bytes(dir / "tiny-bytelevel.json",
                    R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2, "Ġ": 3}, "merges": ["a b"]},)"
                    R"( "added_tokens": [{"id": 4, "content": "<|end|>", "special": true}],)"
                    R"( "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true},)"
                    R"( "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|end|>", "type_id": 0}},)"
                    R"( {"Sequence": {"id": "A", "type_id": 0}}], "special_tokens": {"<|end|>": {"id": "<|end|>", "ids": [4]}}}})");
  fuzz::write_bytes(dir / "tiny-spm.json",
                    std::string(R"({"model": {"type": "BPE", "vocab": {"<unk>": 0, "<s>": 1, "<0x41>": 2, "▁": 3, "a": 4, "▁a": 5},)"
                                R"( "merges": [["▁", "a"]], "byte_fallback": true, "unk_token": "<unk>", "fuse_unk": true},)"
                                R"( "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},)"
                                R"( {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}})") +
                        '\0' + R"({"bos_token": "<s>", "add_bos_token": true, "chat_template": [{"name": "default", "template": "x"}]})");
  const fs::path assets = fuzz::assets_dir();
  if (assets.empty()) return;
  for (const char* name : {"gpt2", "llama2", "llama3"}) {
    const fs::path d = assets / "tokenizers" / name;
    const std::string small = shrink_tokenizer_json(read_all(d / "tokenizer.json"));
    fuzz::write_bytes(dir / (std::string(name) + ".json"), small);
    if (fs::exists(d / "tokenizer_config.json"))
      fuzz::write_bytes(dir / (std::string(name) + "+config.json"), small + '\0' + read_all(d / "tokenizer_config.json"));
  }
  for (const char* name : {"gpt-2", "llama-bpe", "llama-spm"})
    fuzz::write_bytes(dir / (std::string(name) + ".gguf"),
                      shrink_gguf_vocab(assets / "vocab" / ("ggml-vocab-" + std::string(name) + ".gguf")));
}

void check_id(const Tokenizer& tok, int32_t id, const char* what) {
  if (id == -1) return;
  if (id < 0 || id >= tok.vocab_size())
    fuzz::invariant_failed(std::string(what) + " " + std::to_string(id) + " is outside the vocabulary of " +
                           std::to_string(tok.vocab_size()));
  (void)tok.id_to_token(id);
}

// What every loaded tokenizer must do without throwing.
void exercise(const Tokenizer& tok, std::string_view input) {
  check_id(tok, tok.bos_id(), "bos id");
  check_id(tok, tok.eos_id(), "eos id");
  check_id(tok, tok.pad_id(), "pad id");
  const std::string probes[] = {
      "Hello world! 123 4567 <s></s><|end|>",
      " \xE2\x96\x81leading  spaces\n\n\ttabs",
      "h\xC3\xA9llo caf\x65\xCC\x81 \xF0\x9F\x98\x80 \xFF\xFE\xC3",
      std::string(input.substr(0, 256)),
  };
  for (const std::string& text : probes)
    for (const bool special : {false, true}) {
      EncodeOptions o;
      o.add_special_tokens = special;
      o.parse_special = special;
      const std::vector<int32_t> ids = tok.encode(text, o);
      for (const int32_t id : ids) check_id(tok, id, "encoded id");
      (void)tok.decode(ids, special);
    }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::initialize(write_seeds);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  Tokenizer tok;
  bool loaded = false;
  if (input.substr(0, 4) == "GGUF") {
    const fs::path file = fuzz::write_scratch("vocab.gguf", input);
    loaded = fuzz::expect_user_error([&] { tok = tokenizer_from_gguf(GgufFile(file)); });
  } else {
    const fs::path dir = fuzz::scratch_dir() / "tokenizer";
    fs::create_directories(dir);
    const size_t nul = input.find('\0');
    fuzz::write_bytes(dir / "tokenizer.json", input.substr(0, nul));
    if (nul == std::string_view::npos) fs::remove(dir / "tokenizer_config.json");
    else fuzz::write_bytes(dir / "tokenizer_config.json", input.substr(nul + 1));
    loaded = fuzz::expect_user_error([&] { tok = load_tokenizer(dir); });
  }
  if (loaded) exercise(tok, input);
  return 0;
}
