// The tokenizer of an exported GGUF (tokenizer.ggml.* keys), as llama.cpp's convert_hf_to_gguf.py
// writes it: copied through from a GGUF base, or built from a Hugging Face tokenizer.json through
// our Tokenizer (src/data/tokenizer_internal.h) plus the file's merge list.
//  - byte-level BPE -> model "gpt2": tokens in the vocab's spelling, token_type (1 normal, 3 control
//    for special added tokens and ones that look special such as "<|...|>", 4 user-defined for other
//    added tokens, 5 unused for "[PAD<id>]" fillers up to the model's vocab_size), merges "a b" in
//    rank order, pre = the pre-tokenizer's llama.cpp name (llama-bpe, qwen2, smollm, gpt-2);
//  - sentencepiece BPE -> model "llama": the same plus 2 unknown and 6 byte (<0xNN>) types, and
//    scores. llama.cpp merges a "llama" vocab by score (highest first) where tokenizer.json merges
//    by rank, so a token made by merges gets score -rank of its best merge (rank order == score
//    order); other tokens never come out of a merge and get 0 (special, byte) or -1e9.
#include <nlohmann/json.hpp>

#include <fstream>
#include <map>
#include <unordered_map>

#include "data/tokenizer_internal.h"
#include "qlora/error.h"
#include "qlora/gguf.h"
#include "qlora/gguf_export.h"
#include "qlora/log.h"
#include "qlora/merge.h"
#include "qlora/tokenizer.h"

namespace qlora {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

enum : int64_t { kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6 };

// convert_hf_to_gguf.py does_token_look_special: added tokens some models forget to mark special.
bool looks_special(const std::string& s) {
  auto wrapped = [&](const std::string& open, const std::string& close) {
    return s.size() >= open.size() + close.size() && s.compare(0, open.size(), open) == 0 &&
           s.compare(s.size() - close.size(), close.size(), close) == 0;
  };
  return s == "<pad>" || s == "<mask>" || s == "<2mass>" || s == "[@BOS@]" || wrapped("<|", "|>") ||
         wrapped("<\xEF\xBD\x9C", "\xEF\xBD\x9C>") || wrapped("<unused", ">");
}

bool is_byte_token(const std::string& s) {
  auto hex = [](char c) { return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'F'); };
  return s.size() == 6 && s.compare(0, 3, "<0x") == 0 && hex(s[3]) && hex(s[4]) && s[5] == '>';
}

const char* gguf_pre_name(PreTokenizer pre) {
  switch (pre) {
    case PreTokenizer::llama3: return "llama-bpe";
    case PreTokenizer::qwen2: return "qwen2";
    case PreTokenizer::smollm: return "smollm";
    case PreTokenizer::gpt2: return "gpt-2";
    case PreTokenizer::none: return "default";
  }
  return "default";
}

// tokenizer.json's model.merges as "a b" strings in rank order (both spellings: "a b" and ["a", "b"]).
std::vector<std::string> read_merges(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw UserError(file.string() + ": cannot open");
  json j;
  try {
    j = json::parse(in);
  } catch (const json::exception& e) {
    throw UserError(file.string() + ": not valid JSON: " + e.what());
  }
  std::vector<std::string> out;
  if (!j.is_object() || !j.contains("model") || !j["model"].is_object() || !j["model"].contains("merges")) return out;
  for (const json& m : j["model"]["merges"]) {
    if (m.is_string()) out.push_back(m.get<std::string>());
    else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string())
      out.push_back(m[0].get<std::string>() + " " + m[1].get<std::string>());
    else throw UserError(file.string() + ": model.merges: expected \"a b\" or [\"a\", \"b\"], found " + m.dump());
  }
  return out;
}

void copy_gguf_tokenizer(GgufWriter& w, const fs::path& base) {
  const GgufFile g(base);
  int64_t n = 0;
  for (const auto& [key, value] : g.metadata())
    if (key.rfind("tokenizer.", 0) == 0) {
      w.set(key, value);
      ++n;
    }
  if (n == 0) throw UserError(base.string() + ": has no tokenizer.* metadata to carry into the exported GGUF");
}

}  // namespace

void add_gguf_tokenizer(GgufWriter& w, const fs::path& base, int64_t vocab_size) {
  if (is_gguf_path(base)) {
    copy_gguf_tokenizer(w, base);
    return;
  }
  const fs::path file = base / "tokenizer.json";
  if (!fs::exists(file))
    throw UserError(base.string() + ": tokenizer.json is missing (llama.cpp needs the tokenizer inside the GGUF file)");
  const Tokenizer tok = load_tokenizer(base);
  const TokenizerImpl& t = tok.impl();
  const int64_t n_tok = static_cast<int64_t>(t.tokens.size());
  if (n_tok > vocab_size)
    throw UserError(file.string() + ": the tokenizer has ids up to " + std::to_string(n_tok - 1) +
                    ", beyond the model's vocab_size " + std::to_string(vocab_size));
  const bool spm = t.kind == TokenizerKind::sentencepiece_bpe;
  std::unordered_map<int32_t, const AddedToken*> added;
  for (const AddedToken& a : t.added) added[a.id] = &a;

  std::vector<std::string> tokens(static_cast<size_t>(vocab_size));
  std::vector<int64_t> types(static_cast<size_t>(vocab_size), kNormal);
  int64_t padded = 0;
  for (int64_t id = 0; id < vocab_size; ++id) {
    if (id >= n_tok || t.tokens[id].empty()) {
      tokens[id] = "[PAD" + std::to_string(id) + "]";
      types[id] = kUnused;
      ++padded;
      continue;
    }
    tokens[id] = t.tokens[id];
    if (const auto it = added.find(static_cast<int32_t>(id)); it != added.end()) {
      types[id] = it->second->special || looks_special(tokens[id]) ? kControl : kUserDefined;
      if (spm && id == t.unk_id) types[id] = kUnknown;
    } else if (spm && id == t.unk_id) {
      types[id] = kUnknown;
    } else if (spm && t.byte_fallback && is_byte_token(tokens[id])) {
      types[id] = kByte;
    }
  }
  if (padded > 0) log_info(cat("gguf export: ", padded, " token ids without a token padded as [PAD<id>] up to vocab_size ", vocab_size));

  const std::vector<std::string> merges = read_merges(file);
  w.set("tokenizer.ggml.model", GgufValue::make_string(spm ? "llama" : "gpt2"));
  if (!spm) w.set("tokenizer.ggml.pre", GgufValue::make_string(gguf_pre_name(t.pre)));
  w.set("tokenizer.ggml.tokens", GgufValue::make_string_array(tokens));
  if (spm) {
    std::unordered_map<std::string, int64_t> rank_of;  // merged token -> its best rank
    for (size_t r = 0; r < merges.size(); ++r) {
      const std::string& m = merges[r];
      const size_t sp = m.find(' ', 1);
      if (sp == std::string::npos) continue;
      rank_of.emplace(m.substr(0, sp) + m.substr(sp + 1), static_cast<int64_t>(r));
    }
    std::vector<double> scores(static_cast<size_t>(vocab_size), 0.0);
    for (int64_t id = 0; id < vocab_size; ++id) {
      if (types[id] != kNormal) continue;
      const auto it = rank_of.find(tokens[id]);
      scores[id] = it != rank_of.end() ? -static_cast<double>(it->second) : -1e9;
    }
    w.set("tokenizer.ggml.scores", GgufValue::make_float_array(std::move(scores)));
  }
  w.set("tokenizer.ggml.token_type", GgufValue::make_int_array(GgufType::int32, std::move(types)));
  if (!spm) w.set("tokenizer.ggml.merges", GgufValue::make_string_array(merges));
  auto id_key = [&](const char* key, int32_t id) {
    if (id >= 0) w.set(key, GgufValue::make_uint32(static_cast<uint32_t>(id)));
  };
  id_key("tokenizer.ggml.bos_token_id", t.bos);
  id_key("tokenizer.ggml.eos_token_id", t.eos);
  id_key("tokenizer.ggml.unknown_token_id", t.unk_id);
  id_key("tokenizer.ggml.padding_token_id", t.pad);
  w.set("tokenizer.ggml.add_bos_token", GgufValue::make_bool(t.adds_bos));
  w.set("tokenizer.ggml.add_eos_token", GgufValue::make_bool(t.adds_eos));
  if (spm) w.set("tokenizer.ggml.add_space_prefix", GgufValue::make_bool(t.prefix_space));
  if (!t.chat_template.empty()) w.set("tokenizer.chat_template", GgufValue::make_string(t.chat_template));
}

}  // namespace qlora
