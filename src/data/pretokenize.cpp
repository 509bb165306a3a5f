// The pre-tokenizers of the byte-level BPE models, written out by hand from their regexes (the
// alternatives are tried in order at each position, with the backtracking that the regex engine
// would do made explicit). Text is decoded once into code points with their byte offsets and a
// letter/number/space flag each; an invalid UTF-8 byte is one U+FFFD (a symbol).
//   gpt2:   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//   llama3: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|
//           \s*[\r\n]+|\s+(?!\S)|\s+
//   qwen2:  llama3 with \p{N} (one digit per pre-token)
//   smollm: every \p{N} alone, then gpt2 on the text between them (HF Digits + ByteLevel)
#include <cstdint>

#include "data/tokenizer_internal.h"

namespace qlora {
namespace {

enum : uint8_t { kL = 1, kN = 2, kS = 4 };

struct Decoded {
  std::vector<uint32_t> cps;
  std::vector<uint32_t> offs;   // byte offset of each code point, plus the end
  std::vector<uint8_t> flags;
};

uint8_t flags_of(uint32_t cp) {
  if (unicode_is_whitespace(cp)) return kS;
  const UnicodeClass c = unicode_class(cp);
  return c == UnicodeClass::letter ? kL : c == UnicodeClass::number ? kN : 0;
}

void decode(std::string_view text, Decoded& d) {
  static const struct Ascii {
    uint8_t f[128];
    Ascii() { for (uint32_t c = 0; c < 128; ++c) f[c] = flags_of(c); }
  } ascii;
  d.cps.clear();
  d.offs.clear();
  d.flags.clear();
  for (size_t pos = 0; pos < text.size();) {
    d.offs.push_back(static_cast<uint32_t>(pos));
    const auto b = static_cast<uint8_t>(text[pos]);
    uint32_t cp;
    if (b < 0x80) {
      cp = b;
      ++pos;
      d.flags.push_back(ascii.f[b]);
    } else {
      cp = utf8_next(text, pos);
      d.flags.push_back(flags_of(cp));
    }
    d.cps.push_back(cp);
  }
  d.offs.push_back(static_cast<uint32_t>(text.size()));
}

struct Splitter {
  const Decoded& d;
  PieceRanges& out;
  bool is(size_t i, uint8_t f) const { return (d.flags[i] & f) != 0; }
  bool punct(size_t i) const { return d.flags[i] == 0; }   // [^\s\p{L}\p{N}]
  bool newline(size_t i) const { return d.cps[i] == '\r' || d.cps[i] == '\n'; }
  void emit(size_t i, size_t j) { out.emplace_back(d.offs[i], d.offs[j]); }

  // 's|'t|'re|'ve|'m|'ll|'d at i: its length in code points, 0 when none.
  size_t contraction(size_t i, size_t n, bool any_case) const {
    if (d.cps[i] != '\'' || i + 1 >= n) return 0;
    auto low = [&](size_t k) -> uint32_t {
      const uint32_t c = d.cps[k];
      return any_case && c >= 'A' && c <= 'Z' ? c + 32 : c;
    };
    const uint32_t a = low(i + 1);
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
    if (i + 2 >= n) return 0;
    const uint32_t b = low(i + 2);
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
    return 0;
  }

  size_t run(size_t j, size_t n, uint8_t f) const {
    while (j < n && is(j, f)) ++j;
    return j;
  }

  void gpt2(size_t i, size_t n) {
    while (i < n) {
      size_t j = contraction(i, n, false);
      if (j) {
        emit(i, i + j);
        i += j;
        continue;
      }
      const size_t k = d.cps[i] == ' ' && i + 1 < n ? i + 1 : i;   // the optional leading space
      if (is(k, kL)) j = run(k + 1, n, kL);
      else if (is(k, kN)) j = run(k + 1, n, kN);
      else if (punct(k)) {
        j = k + 1;
        while (j < n && punct(j)) ++j;
      } else {   // whitespace: \s+(?!\S) leaves the last space to the next pre-token, else \s+
        j = run(i, n, kS);
        if (j < n && j - i >= 2) --j;
      }
      emit(i, j);
      i = j;
    }
  }

  void llama3(size_t n, size_t max_digits) {
    size_t i = 0;
    while (i < n) {
      size_t j = contraction(i, n, true);
      if (j) {
        emit(i, i + j);
        i += j;
        continue;
      }
      if (is(i, kL)) {
        j = run(i + 1, n, kL);
      } else if (!is(i, kN) && !newline(i) && i + 1 < n && is(i + 1, kL)) {
        j = run(i + 2, n, kL);
      } else if (is(i, kN)) {
        j = i + 1;
        while (j < n && j - i < max_digits && is(j, kN)) ++j;
      } else if (punct(i) || (d.cps[i] == ' ' && i + 1 < n && punct(i + 1))) {
        j = d.cps[i] == ' ' ? i + 1 : i;
        while (j < n && punct(j)) ++j;
        while (j < n && newline(j)) ++j;
      } else {   // whitespace
        const size_t end = run(i, n, kS);
        size_t last_newline = end;
        for (size_t k = i; k < end; ++k)
          if (newline(k)) last_newline = k;
        if (last_newline != end) j = last_newline + 1;           // \s*[\r\n]+
        else if (end < n && end - i >= 2) j = end - 1;           // \s+(?!\S)
        else j = end;                                            // \s+
      }
      emit(i, j);
      i = j;
    }
  }

  void smollm(size_t n) {
    size_t start = 0;
    for (size_t i = 0; i < n; ++i) {
      if (!is(i, kN)) continue;
      gpt2(start, i);
      emit(i, i + 1);
      start = i + 1;
    }
    gpt2(start, n);
  }
};

}  // namespace

void pretokenize(PreTokenizer pre, std::string_view text, PieceRanges& out) {
  if (text.empty()) return;
  if (pre == PreTokenizer::none) {
    out.emplace_back(0, static_cast<uint32_t>(text.size()));
    return;
  }
  thread_local Decoded d;
  decode(text, d);
  Splitter s{d, out};
  const size_t n = d.cps.size();
  switch (pre) {
    case PreTokenizer::gpt2: s.gpt2(0, n); break;
    case PreTokenizer::llama3: s.llama3(n, 3); break;
    case PreTokenizer::qwen2: s.llama3(n, 1); break;
    case PreTokenizer::smollm: s.smollm(n); break;
    case PreTokenizer::none: break;
  }
}

const char* pre_tokenizer_name(PreTokenizer pre) {
  switch (pre) {
    case PreTokenizer::gpt2: return "gpt2";
    case PreTokenizer::llama3: return "llama3";
    case PreTokenizer::qwen2: return "qwen2";
    case PreTokenizer::smollm: return "smollm";
    case PreTokenizer::none: break;
  }
  return "none";
}

}  // namespace qlora
