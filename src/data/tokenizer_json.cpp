// Loading a Hugging Face tokenizer.json (BPE models only) and the tokenizer_config.json next to
// it: vocab, merges, added tokens, the normalizer / pre-tokenizer / post-processor of the known
// byte-level (GPT-2, Llama 3, Qwen2, SmolLM) and sentencepiece-style (Llama 2) tokenizers.
// Anything this encoder would not reproduce exactly is a UserError naming it.
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>

#include "data/tokenizer_internal.h"
#include "qlora/error.h"
#include "qlora/gguf.h"

namespace qlora {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

const char* const kMetaspace = "\xE2\x96\x81";   // "▁"
const char* const kGpt2Regex = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
const char* const kLlama3Regex =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
const char* const kQwen2Regex =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

json read_json(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw UserError(file.string() + ": cannot open (expected a readable JSON file)");
  const std::string text((std::istreambuf_iterator<char>(in)), {});
  try {
    return json::parse(text);
  } catch (const json::exception& e) {  // parse_error, or out_of_range for a number like 1e999
    throw UserError(file.string() + ": not valid JSON (" + e.what() + ")");
  }
}

struct Loader {
  TokenizerImpl& t;
  bool byte_level = false, sentencepiece = false, use_regex_seen = false, digits_seen = false;
  // Ids at or above this are rejected: the vocabulary is a vector indexed by id, so one corrupt
  // id must not allocate gigabytes. Set from the file's token count, plus room for unused ids.
  int64_t id_limit = 0;

  void check_id(const json& idv, const std::string& what) const {
    if (!idv.is_number_integer() || idv.get<int64_t>() < 0 || idv.get<int64_t>() >= id_limit)
      fail(what + " must be a token id in [0, " + std::to_string(id_limit) + ") (the file's token count + " +
           std::to_string(kMaxUnusedIds) + " unused ids), found " + idv.dump());
  }
  static constexpr int64_t kMaxUnusedIds = 65536;

  [[noreturn]] void fail(const std::string& msg) const { throw UserError(t.source + ": " + msg); }

  const json& field(const json& obj, const char* key, const std::string& where) const {
    if (!obj.is_object() || !obj.contains(key)) fail(where + " has no \"" + key + "\"");
    return obj.at(key);
  }
  std::string str(const json& obj, const char* key, const std::string& where) const {
    const json& v = field(obj, key, where);
    if (!v.is_string()) fail(where + "." + key + " must be a string, found " + v.dump());
    return v.get<std::string>();
  }
  bool flag(const json& obj, const char* key, bool dflt) const {
    if (!obj.is_object() || !obj.contains(key) || obj.at(key).is_null()) return dflt;
    if (!obj.at(key).is_boolean()) fail(std::string(key) + " must be true or false, found " + obj.at(key).dump());
    return obj.at(key).get<bool>();
  }

  void normalizer(const json& n) {
    if (n.is_null()) return;
    const std::string type = str(n, "type", "normalizer");
    if (type == "Sequence") {
      for (const json& s : field(n, "normalizers", "normalizer Sequence")) normalizer(s);
    } else if (type == "Prepend") {
      if (str(n, "prepend", "normalizer Prepend") != kMetaspace) fail("normalizer Prepend must prepend \"▁\"");
      t.prefix_space = sentencepiece = true;
    } else if (type == "Replace") {
      const json& pat = field(n, "pattern", "normalizer Replace");
      if (!pat.is_object() || !pat.contains("String") || pat["String"] != " " || str(n, "content", "Replace") != kMetaspace)
        fail("normalizer Replace is supported only as \" \" -> \"▁\", found " + n.dump());
      sentencepiece = true;
    } else if (type == "NFC") {
      t.nfc = true;
    } else {
      fail("normalizer " + type + " is not supported (expected Prepend, Replace \" \" -> \"▁\", NFC or a Sequence of them)");
    }
  }

  void pre_tokenizer(const json& p) {
    if (p.is_null()) return;
    const std::string type = str(p, "type", "pre_tokenizer");
    if (type == "Sequence") {
      for (const json& s : field(p, "pretokenizers", "pre_tokenizer Sequence")) pre_tokenizer(s);
    } else if (type == "Split") {
      const json& pat = field(p, "pattern", "pre_tokenizer Split");
      if (!pat.is_object() || !pat.contains("Regex") || !pat["Regex"].is_string())
        fail("pre_tokenizer Split must have a Regex pattern, found " + pat.dump());
      const std::string re = pat["Regex"].get<std::string>();
      if (flag(p, "invert", false) || (p.contains("behavior") && p["behavior"] != "Isolated"))
        fail("pre_tokenizer Split is supported only with behavior Isolated, not inverted");
      if (t.pre != PreTokenizer::none) fail("more than one splitting pre-tokenizer");
      if (re == kLlama3Regex) t.pre = PreTokenizer::llama3;
      else if (re == kQwen2Regex) t.pre = PreTokenizer::qwen2;
      else if (re == kGpt2Regex) t.pre = PreTokenizer::gpt2;
      else fail("pre_tokenizer Split regex is not one this tokenizer knows (GPT-2, Llama 3, Qwen2): " + re);
    } else if (type == "ByteLevel") {
      byte_level = true;
      t.byte_level_prefix_space = flag(p, "add_prefix_space", false);
      if (flag(p, "use_regex", true)) {
        if (t.pre != PreTokenizer::none) fail("pre_tokenizer ByteLevel use_regex after another splitting pre-tokenizer");
        t.pre = digits_seen ? PreTokenizer::smollm : PreTokenizer::gpt2;
      }
    } else if (type == "Digits") {
      if (!flag(p, "individual_digits", false)) fail("pre_tokenizer Digits is supported only with individual_digits");
      digits_seen = true;
    } else if (type == "Metaspace") {
      sentencepiece = true;
      if (p.contains("replacement") && p["replacement"] != kMetaspace) fail("pre_tokenizer Metaspace must use \"▁\"");
      const std::string scheme = p.contains("prepend_scheme") ? str(p, "prepend_scheme", "Metaspace")
                                 : flag(p, "add_prefix_space", true) ? "always" : "never";
      t.prefix_space = scheme != "never";
      t.prefix_first_only = scheme == "first";
      t.metaspace_split = flag(p, "split", true);
    } else {
      fail("pre_tokenizer " + type + " is not supported (expected ByteLevel, Split, Digits, Metaspace or a Sequence)");
    }
  }

  // The template's leading / trailing special tokens become BOS / EOS.
  void post_processor(const json& p) {
    if (p.is_null()) return;
    const std::string type = str(p, "type", "post_processor");
    if (type == "Sequence") {
      for (const json& s : field(p, "processors", "post_processor Sequence")) post_processor(s);
    } else if (type == "TemplateProcessing") {
      const json& single = field(p, "single", "post_processor TemplateProcessing");
      auto special_id = [&](const json& item) -> int32_t {
        if (!item.is_object() || !item.contains("SpecialToken")) return -1;
        const std::string name = str(item["SpecialToken"], "id", "TemplateProcessing SpecialToken");
        if (p.contains("special_tokens") && p["special_tokens"].is_object() && p["special_tokens"].contains(name)) {
          const json& st = p["special_tokens"][name];
          if (!st.is_object() || !st.contains("ids") || !st["ids"].is_array())
            fail("post_processor special_tokens[\"" + name + "\"] must be an object with an \"ids\" list, found " + st.dump());
          const json& ids = st["ids"];
          if (ids.size() == 1 && ids[0].is_number_integer()) {
            // The post-processor's ids become BOS/EOS, which encode emits: they must be tokens.
            const int64_t id = ids[0].get<int64_t>();
            if (id < 0 || id >= static_cast<int64_t>(t.tokens.size()))
              fail("post_processor special token '" + name + "' has id " + ids[0].dump() + ", outside the vocabulary of " +
                   std::to_string(t.tokens.size()) + " tokens");
            return static_cast<int32_t>(id);
          }
        }
        const auto it = t.token_ids.find(name);
        if (it == t.token_ids.end()) fail("post_processor names the special token '" + name + "', which is unknown");
        return it->second;
      };
      if (!single.is_array() || single.empty()) return;
      if (const int32_t id = special_id(single.front()); id >= 0) t.bos = id, t.adds_bos = true;
      if (single.size() > 1)
        if (const int32_t id = special_id(single.back()); id >= 0) t.eos = id, t.adds_eos = true;
    }
    // ByteLevel (offsets only), RobertaProcessing, BertProcessing: no BOS of the kind this API means.
  }

  void model(const json& m) {
    if (!m.is_object()) fail("\"model\" must be an object");
    const std::string type = m.contains("type") ? str(m, "type", "model") : m.contains("merges") ? "BPE" : "";
    if (type != "BPE") fail("model type " + (type.empty() ? std::string("(none)") : type) + " is not supported (expected BPE)");
    const json& vocab = field(m, "vocab", "model");
    if (!vocab.is_object()) fail("model.vocab must be an object of token -> id");
    for (const auto& [tok, idv] : vocab.items()) {
      check_id(idv, "model.vocab[\"" + tok + "\"]");
      const auto id = idv.get<int32_t>();
      if (static_cast<size_t>(id) >= t.tokens.size()) t.tokens.resize(id + 1);
      t.tokens[id] = tok;
      t.token_ids.emplace(tok, id);
    }
    if (m.contains("continuing_subword_prefix") && m["continuing_subword_prefix"].is_string() &&
        !m["continuing_subword_prefix"].get<std::string>().empty())
      fail("model.continuing_subword_prefix is not supported");
    if (m.contains("end_of_word_suffix") && m["end_of_word_suffix"].is_string() &&
        !m["end_of_word_suffix"].get<std::string>().empty())
      fail("model.end_of_word_suffix is not supported");
    if (m.contains("dropout") && m["dropout"].is_number() && m["dropout"].get<double>() > 0.0)
      fail("model.dropout is not supported (BPE dropout is for training the tokenizer)");
    t.byte_fallback = flag(m, "byte_fallback", false);
    t.ignore_merges = flag(m, "ignore_merges", false);
    t.fuse_unk = flag(m, "fuse_unk", false);
    if (m.contains("unk_token") && m["unk_token"].is_string()) {
      const auto it = t.token_ids.find(m["unk_token"].get<std::string>());
      if (it == t.token_ids.end()) fail("model.unk_token '" + m["unk_token"].get<std::string>() + "' is not in the vocab");
      t.unk_id = it->second;
    }
    const json& merges = field(m, "merges", "model");
    if (!merges.is_array()) fail("model.merges must be an array");
    int32_t rank = 0;
    for (const json& mg : merges) {
      std::string a, b;
      const std::string what = "merge " + std::to_string(rank);
      if (mg.is_string()) {
        const std::string s = mg.get<std::string>();
        const size_t sp = s.find(' ');
        if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
          fail(what + " \"" + s + "\" must be two tokens separated by one space");
        a = s.substr(0, sp), b = s.substr(sp + 1);
      } else if (mg.is_array() && mg.size() == 2 && mg[0].is_string() && mg[1].is_string()) {
        a = mg[0].get<std::string>(), b = mg[1].get<std::string>();
      } else {
        fail(what + " must be \"a b\" or [\"a\", \"b\"], found " + mg.dump());
      }
      add_merge(t, a, b, rank++, what);
    }
  }

  void added_tokens(const json& list) {
    if (list.is_null()) return;
    if (!list.is_array()) fail("added_tokens must be an array");
    for (const json& a : list) {
      AddedToken tok;
      tok.content = str(a, "content", "added token");
      const json& idv = field(a, "id", "added token '" + tok.content + "'");
      check_id(idv, "added token '" + tok.content + "' id");
      tok.id = idv.get<int32_t>();
      tok.special = flag(a, "special", false);
      tok.lstrip = flag(a, "lstrip", false);
      tok.rstrip = flag(a, "rstrip", false);
      tok.single_word = flag(a, "single_word", false);
      if (static_cast<size_t>(tok.id) >= t.tokens.size()) t.tokens.resize(tok.id + 1);
      t.tokens[tok.id] = tok.content;
      t.added.push_back(std::move(tok));
    }
  }
};

int32_t config_token(const TokenizerImpl& t, const json& cfg, const char* key, const fs::path& file) {
  if (!cfg.contains(key) || cfg[key].is_null()) return -1;
  const json& v = cfg[key];
  std::string s;
  if (v.is_string()) s = v.get<std::string>();
  else if (v.is_object() && v.contains("content") && v["content"].is_string()) s = v["content"].get<std::string>();
  else throw UserError(file.string() + ": " + key + " must be a string or {\"content\": ...}, found " + v.dump());
  const auto it = t.token_ids.find(s);
  if (it == t.token_ids.end()) throw UserError(file.string() + ": " + key + " '" + s + "' is not a token of the tokenizer");
  return it->second;
}

void apply_config(TokenizerImpl& t, const fs::path& file) {
  const json cfg = read_json(file);
  if (!cfg.is_object()) throw UserError(file.string() + ": expected a JSON object");
  if (const int32_t id = config_token(t, cfg, "bos_token", file); id >= 0) t.bos = id;
  if (const int32_t id = config_token(t, cfg, "eos_token", file); id >= 0) t.eos = id;
  if (const int32_t id = config_token(t, cfg, "pad_token", file); id >= 0) t.pad = id;
  auto get_bool = [&](const char* key, bool& out) {
    if (!cfg.contains(key) || cfg[key].is_null()) return false;
    if (!cfg[key].is_boolean()) throw UserError(file.string() + ": " + key + " must be true or false");
    out = cfg[key].get<bool>();
    return true;
  };
  const bool bos_given = get_bool("add_bos_token", t.adds_bos);
  get_bool("add_eos_token", t.adds_eos);
  // Llama 3's tokenizer.json in some copies lacks the TemplateProcessing that adds
  // <|begin_of_text|>; Llama 3 always starts with BOS (llama.cpp does the same for this pre-tokenizer).
  if (!bos_given && !t.adds_bos && t.pre == PreTokenizer::llama3 && t.bos >= 0) t.adds_bos = true;
  if (cfg.contains("chat_template")) {
    const json& ct = cfg["chat_template"];
    if (ct.is_string()) {
      t.chat_template = ct.get<std::string>();
    } else if (ct.is_array()) {
      for (const json& e : ct)
        if (e.is_object() && e.contains("name") && e["name"] == "default" && e.contains("template") && e["template"].is_string())
          t.chat_template = e["template"].get<std::string>();
    }
  }
}

}  // namespace

Tokenizer load_tokenizer(const std::filesystem::path& path) {
  // A GGUF model file carries its tokenizer in its metadata (tokenizer.ggml.*).
  if (path.extension() == ".gguf" && fs::is_regular_file(path)) return tokenizer_from_gguf(GgufFile(path));
  const fs::path file = fs::is_directory(path) ? path / "tokenizer.json" : path;
  if (!fs::exists(file))
    throw UserError(file.string() + ": no such file (expected a tokenizer.json or a directory holding one)");
  auto impl = std::make_unique<TokenizerImpl>();
  TokenizerImpl& t = *impl;
  t.source = file.string();
  const json j = read_json(file);
  Loader l{t};
  if (!j.is_object()) l.fail("expected a JSON object");
  {
    size_t n = 0;
    if (const auto m = j.find("model"); m != j.end() && m->is_object() && m->contains("vocab")) n += m->at("vocab").size();
    if (const auto a = j.find("added_tokens"); a != j.end() && a->is_array()) n += a->size();
    l.id_limit = static_cast<int64_t>(n) + Loader::kMaxUnusedIds;
  }
  l.model(l.field(j, "model", "tokenizer.json"));
  l.added_tokens(j.value("added_tokens", json()));
  l.normalizer(j.value("normalizer", json()));
  l.pre_tokenizer(j.value("pre_tokenizer", json()));
  if (t.byte_fallback && !l.byte_level) l.sentencepiece = true;
  if (l.byte_level == l.sentencepiece)
    l.fail(l.byte_level ? "mixes byte-level and sentencepiece (\"▁\") steps"
                        : "cannot tell the tokenizer kind (expected a ByteLevel pre-tokenizer, or a sentencepiece "
                          "Metaspace / Prepend \"▁\" normalizer)");
  t.kind = l.byte_level ? TokenizerKind::byte_level_bpe : TokenizerKind::sentencepiece_bpe;
  if (t.kind == TokenizerKind::sentencepiece_bpe && t.nfc) l.fail("NFC with a sentencepiece tokenizer is not supported");
  for (const AddedToken& a : t.added) t.token_ids[a.content] = a.id;
  l.post_processor(j.value("post_processor", json()));
  const fs::path cfg = file.parent_path() / "tokenizer_config.json";
  if (fs::exists(cfg)) apply_config(t, cfg);
  finish_tokenizer(t);
  return make_tokenizer(std::move(impl));
}

}  // namespace qlora
