// The Tokenizer: encode (added tokens split out, normalizer, pre-tokenizer, BPE, byte fallback)
// and decode, over a TokenizerImpl that a loader filled (tokenizer_json.cpp, tokenizer_gguf.cpp).
// BPE merges the adjacent pair of best priority first (lowest merge rank, or highest token score
// for a GGUF "llama" vocab), leftmost on ties, as HF tokenizers and llama.cpp do; byte-level
// pre-tokens' results are cached per thread.
#include <algorithm>
#include <atomic>
#include <cctype>
#include <queue>

#include "data/tokenizer_internal.h"
#include "qlora/error.h"

namespace qlora {
namespace {

struct Symbol {
  int32_t id;
  uint32_t start, end;   // byte range in the word
  int32_t prev, next;
};

struct Candidate {
  double key;            // larger merges first: -rank or the score
  int32_t left, right;
  uint32_t len;          // bytes the merged symbol covers, to spot stale candidates
  int32_t id;
  bool operator<(const Candidate& o) const { return key < o.key || (key == o.key && left > o.left); }
};

struct BpeScratch {
  std::vector<Symbol> syms;
  std::vector<Candidate> heap;
};

void push_candidate(const TokenizerImpl& t, std::string_view w, const std::vector<Symbol>& syms,
                    std::vector<Candidate>& heap, int32_t l) {
  if (l < 0) return;
  const Symbol& a = syms[l];
  if (a.next < 0) return;
  const Symbol& b = syms[a.next];
  Candidate c{0.0, l, a.next, b.end - a.start, -1};
  if (t.merge_mode == MergeMode::rank) {
    if (a.id < 0 || b.id < 0) return;
    const MergeRule* r = t.merges.find((static_cast<uint64_t>(static_cast<uint32_t>(a.id)) << 32) |
                                       static_cast<uint32_t>(b.id));
    if (!r) return;
    c.key = -static_cast<double>(r->rank);
    c.id = r->id;
  } else {
    const auto it = t.lookup.find(w.substr(a.start, c.len));
    if (it == t.lookup.end()) return;
    c.key = t.scores[it->second];
    c.id = it->second;
  }
  heap.push_back(c);
  std::push_heap(heap.begin(), heap.end());
}

void emit_bytes(const TokenizerImpl& t, std::string_view bytes, std::vector<int32_t>& out) {
  for (char ch : bytes) {
    const int32_t id = t.byte_ids[static_cast<uint8_t>(ch)];
    if (id >= 0) out.push_back(id);
    else if (t.unk_id >= 0 && !(t.fuse_unk && !out.empty() && out.back() == t.unk_id)) out.push_back(t.unk_id);
  }
}

// One word (a pre-token, or a whole sentencepiece segment) to ids, appended to out.
void bpe_word(const TokenizerImpl& t, std::string_view w, std::vector<int32_t>& out) {
  thread_local BpeScratch s;
  std::vector<Symbol>& syms = s.syms;
  syms.clear();
  s.heap.clear();
  auto add = [&](int32_t id, size_t a, size_t b) {
    const auto n = static_cast<int32_t>(syms.size());
    syms.push_back({id, static_cast<uint32_t>(a), static_cast<uint32_t>(b), n - 1, n + 1});
  };
  if (t.kind == TokenizerKind::byte_level_bpe) {
    for (size_t k = 0; k < w.size(); ++k) add(t.byte_ids[static_cast<uint8_t>(w[k])], k, k + 1);
  } else {
    for (size_t pos = 0; pos < w.size();) {
      const size_t at = pos;
      utf8_next(w, pos);
      const auto it = t.lookup.find(w.substr(at, pos - at));
      if (it != t.lookup.end() || t.merge_mode == MergeMode::score) {
        add(it != t.lookup.end() ? it->second : -1, at, pos);   // score mode: bytes at the end
      } else if (t.byte_fallback) {
        for (size_t k = at; k < pos; ++k) add(t.byte_ids[static_cast<uint8_t>(w[k])], k, k + 1);
      } else if (t.fuse_unk && !syms.empty() && syms.back().id == t.unk_id && t.unk_id >= 0) {
        syms.back().end = static_cast<uint32_t>(pos);
      } else {
        add(t.unk_id, at, pos);
      }
    }
  }
  if (syms.empty()) return;
  syms.back().next = -1;
  for (int32_t i = 0; i + 1 < static_cast<int32_t>(syms.size()); ++i) push_candidate(t, w, syms, s.heap, i);
  while (!s.heap.empty()) {
    std::pop_heap(s.heap.begin(), s.heap.end());
    const Candidate c = s.heap.back();
    s.heap.pop_back();
    Symbol& a = syms[c.left];
    if (a.next != c.right || a.end == a.start) continue;   // a was merged away or its neighbour changed
    Symbol& b = syms[c.right];
    if (b.end - a.start != c.len) continue;                  // b grew since
    a.end = b.end;
    a.id = c.id;
    a.next = b.next;
    if (b.next >= 0) syms[b.next].prev = c.left;
    b.start = b.end;   // dead
    push_candidate(t, w, syms, s.heap, a.prev);
    push_candidate(t, w, syms, s.heap, c.left);
  }
  for (int32_t i = 0; i >= 0; i = syms[i].next) {
    const Symbol& sym = syms[i];
    if (sym.id >= 0) out.push_back(sym.id);
    else if (t.merge_mode == MergeMode::score) emit_bytes(t, w.substr(sym.start, sym.end - sym.start), out);
    // rank mode: -1 only for a byte or an unknown character the vocab has no token for; dropped
  }
}

struct SvHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using WordCache = std::unordered_map<std::string, std::vector<int32_t>, SvHash, std::equal_to<>>;

// Byte-level pre-tokens repeat a lot: their ids are cached per thread and tokenizer instance.
void bpe_cached(const TokenizerImpl& t, std::string_view w, std::vector<int32_t>& out) {
  if (t.ignore_merges) {
    const auto it = t.lookup.find(w);
    if (it != t.lookup.end()) {
      out.push_back(it->second);
      return;
    }
  }
  if (w.size() > 64) {
    bpe_word(t, w, out);
    return;
  }
  struct Slot { uint64_t serial = 0; WordCache cache; };
  thread_local Slot slots[4];
  thread_local unsigned next_slot = 0;
  Slot* slot = nullptr;
  for (Slot& sl : slots)
    if (sl.serial == t.serial) slot = &sl;
  if (!slot) {
    slot = &slots[next_slot++ % 4];
    slot->serial = t.serial;
    slot->cache.clear();
  }
  const auto it = slot->cache.find(w);
  if (it != slot->cache.end()) {
    out.insert(out.end(), it->second.begin(), it->second.end());
    return;
  }
  const size_t from = out.size();
  bpe_word(t, w, out);
  if (slot->cache.size() >= (1u << 17)) slot->cache.clear();
  slot->cache.emplace(std::string(w), std::vector<int32_t>(out.begin() + static_cast<std::ptrdiff_t>(from), out.end()));
}

// Decodes the code point that ends at byte `end` (U+FFFD when those bytes are not one).
uint32_t code_point_before(std::string_view s, size_t end, size_t& start) {
  size_t p = end - 1;
  while (p > 0 && end - p < 4 && (static_cast<uint8_t>(s[p]) & 0xC0) == 0x80) --p;
  size_t q = p;
  const uint32_t cp = utf8_next(s, q);
  if (q == end) {
    start = p;
    return cp;
  }
  start = end - 1;
  return 0xFFFD;
}

bool is_word_char(uint32_t cp) {
  const UnicodeClass c = unicode_class(cp);
  return c == UnicodeClass::letter || c == UnicodeClass::number || cp == '_';
}

void encode_text(const TokenizerImpl& t, std::string_view seg, bool first, std::vector<int32_t>& out) {
  if (seg.empty()) return;
  // The NFC normalizer applies to the text between added tokens (matched on the raw text before).
  thread_local std::string normalized;
  if (t.nfc && unicode_nfc_may_change(seg)) {
    normalized = unicode_nfc(seg);
    seg = normalized;
  }
  if (t.kind == TokenizerKind::byte_level_bpe) {
    thread_local std::string prefixed;
    if (t.byte_level_prefix_space && first && seg[0] != ' ') {
      prefixed.assign(1, ' ');
      prefixed.append(seg);
      seg = prefixed;
    }
    thread_local PieceRanges ranges;
    ranges.clear();
    pretokenize(t.pre, seg, ranges);
    for (const auto& [a, b] : ranges) bpe_cached(t, seg.substr(a, b - a), out);
    return;
  }
  thread_local std::string w;
  w.clear();
  if (t.prefix_space && (first || !t.prefix_first_only)) w += "\xE2\x96\x81";
  for (char ch : seg) {
    if (ch == ' ') w += "\xE2\x96\x81";
    else w += ch;
  }
  if (!t.metaspace_split) {
    bpe_word(t, w, out);
    return;
  }
  // Metaspace split: a word starts at every "▁".
  size_t a = 0;
  for (size_t k = 1; k <= w.size(); ++k)
    if (k == w.size() || w.compare(k, 3, "\xE2\x96\x81") == 0) {
      bpe_word(t, std::string_view(w).substr(a, k - a), out);
      a = k;
    }
}

std::atomic<uint64_t> g_serial{0};

}  // namespace

Tokenizer make_tokenizer(std::unique_ptr<TokenizerImpl> impl) {
  impl->serial = ++g_serial;
  Tokenizer tok;
  tok.impl() = std::move(*impl);
  return tok;
}

Tokenizer::Tokenizer() : impl_(std::make_unique<TokenizerImpl>()) {}
Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

TokenizerKind Tokenizer::kind() const { return impl_->kind; }
PreTokenizer Tokenizer::pre_tokenizer() const { return impl_->pre; }
int64_t Tokenizer::vocab_size() const { return static_cast<int64_t>(impl_->tokens.size()); }
int32_t Tokenizer::bos_id() const { return impl_->bos; }
int32_t Tokenizer::eos_id() const { return impl_->eos; }
int32_t Tokenizer::pad_id() const { return impl_->pad; }
bool Tokenizer::adds_bos() const { return impl_->adds_bos && impl_->bos >= 0; }
const std::string& Tokenizer::chat_template() const { return impl_->chat_template; }

int32_t Tokenizer::token_to_id(std::string_view token) const {
  const auto it = impl_->token_ids.find(std::string(token));
  return it == impl_->token_ids.end() ? -1 : it->second;
}

std::string Tokenizer::id_to_token(int32_t id) const {
  if (id < 0 || id >= static_cast<int32_t>(impl_->tokens.size()))
    throw UserError("token id " + std::to_string(id) + " is out of range (expected 0.." +
                    std::to_string(static_cast<int64_t>(impl_->tokens.size()) - 1) + ")");
  return impl_->tokens[id];
}

bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && id < static_cast<int32_t>(impl_->special.size()) && impl_->special[id];
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, const EncodeOptions& options) const {
  const TokenizerImpl& t = *impl_;
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  if (options.add_special_tokens && t.adds_bos && t.bos >= 0) out.push_back(t.bos);
  // Added tokens first, longest match at the leftmost position (HF's AddedVocabulary).
  size_t seg_start = 0, i = 0;
  bool first = true;
  const size_t n = text.size();
  while (i < n) {
    if (!t.added_first_byte[static_cast<uint8_t>(text[i])]) {
      ++i;
      continue;
    }
    const AddedToken* hit = nullptr;
    for (const AddedToken& a : t.added) {
      if (a.special && !options.parse_special) continue;
      if (text.compare(i, a.content.size(), a.content) == 0) {
        hit = &a;   // sorted longest first
        break;
      }
    }
    if (!hit) {
      ++i;
      continue;
    }
    size_t start = i, stop = i + hit->content.size();
    if (hit->single_word) {
      size_t p;
      const bool before_ok = start == 0 || !is_word_char(code_point_before(text, start, p));
      size_t q = stop;
      const bool after_ok = stop == n || !is_word_char(utf8_next(text, q));
      if (!before_ok || !after_ok) {
        i = stop;
        continue;
      }
    }
    if (hit->lstrip) {
      while (start > seg_start) {
        size_t p;
        if (!unicode_is_whitespace(code_point_before(text, start, p))) break;
        start = p;
      }
    }
    if (hit->rstrip) {
      while (stop < n) {
        size_t q = stop;
        if (!unicode_is_whitespace(utf8_next(text, q))) break;
        stop = q;
      }
    }
    if (start > seg_start) {
      encode_text(t, text.substr(seg_start, start - seg_start), first, out);
      first = false;
    }
    out.push_back(hit->id);
    first = false;
    seg_start = i = stop;
  }
  if (seg_start < n) encode_text(t, text.substr(seg_start), first, out);
  if (options.add_special_tokens && t.adds_eos && t.eos >= 0) out.push_back(t.eos);
  return out;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special) const {
  const TokenizerImpl& t = *impl_;
  std::string out;
  for (int32_t id : ids) {
    if (id < 0 || id >= static_cast<int32_t>(t.pieces.size()))
      throw UserError("decode: token id " + std::to_string(id) + " is out of range (expected 0.." +
                      std::to_string(static_cast<int64_t>(t.pieces.size()) - 1) + ")");
    if (skip_special && t.special[id]) continue;
    out += t.pieces[id];
  }
  if (t.kind == TokenizerKind::sentencepiece_bpe && t.prefix_space && !out.empty() && out[0] == ' ') out.erase(0, 1);
  return out;
}

void add_merge(TokenizerImpl& t, const std::string& a, const std::string& b, int32_t rank, const std::string& what) {
  auto id_of = [&](const std::string& tok) {
    const auto it = t.token_ids.find(tok);
    if (it == t.token_ids.end())
      throw UserError(t.source + ": " + what + " names the token '" + tok + "', which is not in the vocab");
    return it->second;
  };
  const int32_t ia = id_of(a), ib = id_of(b);
  const auto it = t.token_ids.find(a + b);
  if (it == t.token_ids.end())
    throw UserError(t.source + ": " + what + " makes '" + a + b + "', which is not in the vocab");
  t.merges.insert((static_cast<uint64_t>(static_cast<uint32_t>(ia)) << 32) | static_cast<uint32_t>(ib),
                  MergeRule{rank, it->second});   // a repeated pair keeps its first (best) rank
}

void finish_tokenizer(TokenizerImpl& t) {
  const size_t n = t.tokens.size();
  t.pieces.assign(n, std::string());
  t.special.resize(n, 0);
  t.lookup_keys.assign(n, std::string());
  std::vector<uint8_t> is_added(n, 0);
  for (const AddedToken& a : t.added) {
    is_added[a.id] = 1;
    t.special[a.id] = a.special ? 1 : 0;
  }
  std::vector<uint8_t> has_key(n, 0);
  for (size_t id = 0; id < n; ++id) {
    const std::string& tok = t.tokens[id];
    if (tok.empty()) continue;
    if (t.kind == TokenizerKind::byte_level_bpe) {
      std::string bytes;
      if (byte_level_decode(tok, bytes)) {
        t.lookup_keys[id] = bytes;
        has_key[id] = 1;
      }
      t.pieces[id] = has_key[id] && !is_added[id] ? bytes : tok;
    } else {
      t.lookup_keys[id] = tok;
      // Exactly two hex digits: sscanf's %X would also take a sign ("<0x-1>") and index past byte_ids.
      if (tok.size() == 6 && tok.compare(0, 3, "<0x") == 0 && tok[5] == '>' && std::isxdigit(static_cast<unsigned char>(tok[3])) &&
          std::isxdigit(static_cast<unsigned char>(tok[4]))) {
        const unsigned v = static_cast<unsigned>(std::stoul(tok.substr(3, 2), nullptr, 16));
        t.pieces[id] = std::string(1, static_cast<char>(v));
        t.byte_ids[v] = static_cast<int32_t>(id);
      } else if (is_added[id]) {
        t.pieces[id] = tok;
      } else {
        has_key[id] = 1;   // <0xNN> tokens are byte fallback only, never looked up by text
        std::string p;
        for (size_t k = 0; k < tok.size(); ++k) {
          if (tok.compare(k, 3, "\xE2\x96\x81") == 0) {
            p += ' ';
            k += 2;
          } else {
            p += tok[k];
          }
        }
        t.pieces[id] = std::move(p);
      }
    }
  }
  // BPE never produces an added token: those come only from the added-token split.
  t.lookup.clear();
  t.lookup.reserve(n);
  for (size_t id = 0; id < n; ++id)
    if (has_key[id] && !is_added[id]) t.lookup.emplace(t.lookup_keys[id], static_cast<int32_t>(id));
  if (t.kind == TokenizerKind::byte_level_bpe) {
    for (int b = 0; b < 256; ++b) {
      const char c = static_cast<char>(b);
      const auto it = t.lookup.find(std::string_view(&c, 1));
      t.byte_ids[b] = it == t.lookup.end() ? t.unk_id : it->second;
    }
  }
  t.token_ids.clear();
  t.token_ids.reserve(n);
  for (size_t id = 0; id < n; ++id)
    if (!t.tokens[id].empty()) t.token_ids.emplace(t.tokens[id], static_cast<int32_t>(id));
  std::stable_sort(t.added.begin(), t.added.end(),
                   [](const AddedToken& a, const AddedToken& b) { return a.content.size() > b.content.size(); });
  for (bool& b : t.added_first_byte) b = false;
  t.added.erase(std::remove_if(t.added.begin(), t.added.end(), [](const AddedToken& a) { return a.content.empty(); }),
                t.added.end());
  for (const AddedToken& a : t.added) t.added_first_byte[static_cast<uint8_t>(a.content[0])] = true;
}

}  // namespace qlora
