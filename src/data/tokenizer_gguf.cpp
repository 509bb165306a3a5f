// A tokenizer from GGUF metadata (llama.cpp's tokenizer.ggml.* keys): "gpt2" is byte-level BPE
// with merges ranked by order and the pre-tokenizer named by tokenizer.ggml.pre; "llama" is
// sentencepiece BPE that merges by token score (highest first), with byte fallback to <0xNN>
// tokens and a space prefix. Control and unknown tokens are special added tokens, user-defined
// ones plain added tokens (llama.cpp's token types 3, 2 and 4).
#include "data/tokenizer_internal.h"
#include "qlora/error.h"
#include "qlora/gguf.h"

namespace qlora {
namespace {

enum : int64_t { kTypeNormal = 1, kTypeUnknown = 2, kTypeControl = 3, kTypeUserDefined = 4, kTypeByte = 6 };

PreTokenizer pre_from_name(const std::string& name, const std::string& where) {
  if (name == "llama3" || name == "llama-v3" || name == "llama-bpe") return PreTokenizer::llama3;
  if (name == "gpt-2" || name == "gpt2" || name == "default") return PreTokenizer::gpt2;
  if (name == "qwen2" || name == "deepseek-r1-qwen") return PreTokenizer::qwen2;
  if (name == "smollm") return PreTokenizer::smollm;
  throw UserError(where + ": tokenizer.ggml.pre \"" + name +
                  "\" is not supported (expected llama-bpe/llama3, gpt-2/default, qwen2 or smollm)");
}

int32_t optional_id(const GgufFile& g, const std::string& key, size_t n) {
  if (!g.contains(key)) return -1;
  const int64_t v = g.get_int(key);
  if (v < 0 || static_cast<size_t>(v) >= n)
    throw UserError(g.path().string() + ": " + key + " = " + std::to_string(v) + " is not a token id (vocab has " +
                    std::to_string(n) + " tokens)");
  return static_cast<int32_t>(v);
}

}  // namespace

Tokenizer tokenizer_from_gguf(const GgufFile& g) {
  auto impl = std::make_unique<TokenizerImpl>();
  TokenizerImpl& t = *impl;
  t.source = g.path().string();
  const std::string model = g.get_string("tokenizer.ggml.model");
  t.tokens = g.get_string_array("tokenizer.ggml.tokens");
  const size_t n = t.tokens.size();
  if (n == 0) throw UserError(t.source + ": tokenizer.ggml.tokens is empty");
  std::vector<int64_t> types(n, kTypeNormal);
  if (g.contains("tokenizer.ggml.token_type")) {
    types = g.get_int_array("tokenizer.ggml.token_type");
    if (types.size() != n)
      throw UserError(t.source + ": tokenizer.ggml.token_type has " + std::to_string(types.size()) +
                      " entries, expected one per token (" + std::to_string(n) + ")");
  }
  for (size_t id = 0; id < n; ++id) {
    if (types[id] == kTypeControl || types[id] == kTypeUnknown || types[id] == kTypeUserDefined) {
      AddedToken a;
      a.content = t.tokens[id];
      a.id = static_cast<int32_t>(id);
      a.special = types[id] != kTypeUserDefined;
      t.added.push_back(std::move(a));
    }
    t.token_ids.emplace(t.tokens[id], static_cast<int32_t>(id));
  }
  t.unk_id = optional_id(g, "tokenizer.ggml.unknown_token_id", n);
  if (model == "gpt2") {
    t.kind = TokenizerKind::byte_level_bpe;
    const std::string pre = g.contains("tokenizer.ggml.pre") ? g.get_string("tokenizer.ggml.pre") : "default";
    t.pre = pre_from_name(pre, t.source);
    t.ignore_merges = t.pre == PreTokenizer::llama3;
    const std::vector<std::string>& merges = g.get_string_array("tokenizer.ggml.merges");
    for (size_t r = 0; r < merges.size(); ++r) {
      const std::string& m = merges[r];
      const size_t sp = m.find(' ', 1);
      const std::string what = "tokenizer.ggml.merges[" + std::to_string(r) + "]";
      if (sp == std::string::npos) throw UserError(t.source + ": " + what + " \"" + m + "\" has no space between two tokens");
      add_merge(t, m.substr(0, sp), m.substr(sp + 1), static_cast<int32_t>(r), what);
    }
    t.adds_bos = t.pre == PreTokenizer::llama3;
  } else if (model == "llama") {
    t.kind = TokenizerKind::sentencepiece_bpe;
    t.merge_mode = MergeMode::score;
    t.byte_fallback = true;
    const std::vector<double>& scores = g.get_float_array("tokenizer.ggml.scores");
    if (scores.size() != n)
      throw UserError(t.source + ": tokenizer.ggml.scores has " + std::to_string(scores.size()) +
                      " entries, expected one per token (" + std::to_string(n) + ")");
    t.scores.assign(scores.begin(), scores.end());
    t.prefix_space = g.contains("tokenizer.ggml.add_space_prefix") ? g.get_bool("tokenizer.ggml.add_space_prefix") : true;
    t.adds_bos = true;
  } else {
    throw UserError(t.source + ": tokenizer.ggml.model \"" + model + "\" is not supported (expected gpt2 or llama)");
  }
  t.bos = optional_id(g, "tokenizer.ggml.bos_token_id", n);
  t.eos = optional_id(g, "tokenizer.ggml.eos_token_id", n);
  t.pad = optional_id(g, "tokenizer.ggml.padding_token_id", n);
  if (g.contains("tokenizer.ggml.add_bos_token")) t.adds_bos = g.get_bool("tokenizer.ggml.add_bos_token");
  if (g.contains("tokenizer.ggml.add_eos_token")) t.adds_eos = g.get_bool("tokenizer.ggml.add_eos_token");
  if (g.contains("tokenizer.chat_template")) t.chat_template = g.get_string("tokenizer.chat_template");
  finish_tokenizer(t);
  return make_tokenizer(std::move(impl));
}

}  // namespace qlora
