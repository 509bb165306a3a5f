// UTF-8 decoding and the Unicode properties the pre-tokenizers ask about (major general-category
// class, White_Space, "NFC may change") and Unicode NFC itself (for the NFC normalizer), looked up
// in the generated tables of unicode_tables.cpp; and GPT-2's byte-to-unicode alphabet.
#include <algorithm>
#include <array>
#include <utility>
#include <vector>

#include "data/tokenizer_internal.h"

namespace qlora {

uint32_t utf8_next(std::string_view s, size_t& pos) {
  const size_t n = s.size();
  const auto b0 = static_cast<uint8_t>(s[pos]);
  if (b0 < 0x80) {
    ++pos;
    return b0;
  }
  int len;
  uint32_t cp, min;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    len = 2, cp = b0 & 0x1F, min = 0x80;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    len = 3, cp = b0 & 0x0F, min = 0x800;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    len = 4, cp = b0 & 0x07, min = 0x10000;
  } else {
    ++pos;   // continuation byte, C0/C1 (always overlong) or F5..FF
    return 0xFFFD;
  }
  if (pos + len > n) {
    ++pos;
    return 0xFFFD;
  }
  for (int i = 1; i < len; ++i) {
    const auto b = static_cast<uint8_t>(s[pos + i]);
    if ((b & 0xC0) != 0x80) {
      ++pos;
      return 0xFFFD;
    }
    cp = (cp << 6) | (b & 0x3F);
  }
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
    ++pos;   // overlong, beyond Unicode, or an encoded surrogate
    return 0xFFFD;
  }
  pos += len;
  return cp;
}

void utf8_append(std::string& out, uint32_t cp) {
  if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) cp = 0xFFFD;
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

namespace {

using unicode_tables::CodeRange;

std::array<uint8_t, 128> make_ascii_classes() {
  std::array<uint8_t, 128> a{};
  size_t r = 0;
  for (uint32_t cp = 0; cp < 128; ++cp) {
    while (r + 1 < unicode_tables::kClassRunCount && unicode_tables::kClassRuns[r + 1].first <= cp) ++r;
    a[cp] = unicode_tables::kClassRuns[r].cls;
  }
  return a;
}

bool in_ranges(const CodeRange* ranges, size_t n, uint32_t cp) {
  const CodeRange* end = ranges + n;
  const CodeRange* it = std::upper_bound(ranges, end, cp, [](uint32_t c, const CodeRange& r) { return c < r.first; });
  return it != ranges && cp <= (it - 1)->last;
}

}  // namespace

UnicodeClass unicode_class(uint32_t cp) {
  static const std::array<uint8_t, 128> ascii = make_ascii_classes();
  if (cp < 128) return static_cast<UnicodeClass>(ascii[cp]);
  if (cp > 0x10FFFF) return UnicodeClass::other;
  const auto* runs = unicode_tables::kClassRuns;
  const auto* end = runs + unicode_tables::kClassRunCount;
  const auto* it = std::upper_bound(runs, end, cp, [](uint32_t c, const unicode_tables::ClassRun& r) {
    return c < r.first;
  });
  return static_cast<UnicodeClass>((it - 1)->cls);   // runs[0].first == 0
}

bool unicode_is_whitespace(uint32_t cp) {
  if (cp < 128) return cp == ' ' || (cp >= 9 && cp <= 13);
  return in_ranges(unicode_tables::kWhiteSpace, unicode_tables::kWhiteSpaceCount, cp);
}

bool unicode_nfc_may_change(std::string_view text) {
  for (size_t pos = 0; pos < text.size();) {
    if (static_cast<uint8_t>(text[pos]) < 0x80) {   // ASCII never changes (U+0300.. would follow)
      ++pos;
      continue;
    }
    const uint32_t cp = utf8_next(text, pos);
    if (in_ranges(unicode_tables::kNfcMayChange, unicode_tables::kNfcMayChangeCount, cp)) return true;
  }
  return false;
}

namespace {

// Hangul syllable arithmetic (Unicode ch. 3.12).
constexpr uint32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr uint32_t kLCount = 19, kVCount = 21, kTCount = 28, kNCount = kVCount * kTCount, kSCount = kLCount * kNCount;
// An invalid UTF-8 byte b is carried through NFC as kRawByte + b: a starter composing with nothing.
constexpr uint32_t kRawByte = 0x110000;

uint8_t ccc_of(uint32_t cp) {
  if (cp < 0x300 || cp >= kRawByte) return 0;
  const auto* r = unicode_tables::kCcc;
  const auto* end = r + unicode_tables::kCccCount;
  const auto* it = std::upper_bound(r, end, cp, [](uint32_t c, const unicode_tables::CccRange& x) { return c < x.first; });
  return (it != r && cp <= (it - 1)->last) ? (it - 1)->ccc : 0;
}

void decompose(uint32_t cp, std::vector<uint32_t>& out) {
  if (cp >= kSBase && cp < kSBase + kSCount) {
    const uint32_t s = cp - kSBase;
    out.push_back(kLBase + s / kNCount);
    out.push_back(kVBase + (s % kNCount) / kTCount);
    if (s % kTCount) out.push_back(kTBase + s % kTCount);
    return;
  }
  if (cp >= 0xC0 && cp < kRawByte) {
    const auto* d = unicode_tables::kDecomp;
    const auto* end = d + unicode_tables::kDecompCount;
    const auto* it = std::lower_bound(d, end, cp, [](const unicode_tables::Decomposition& x, uint32_t c) { return x.cp < c; });
    if (it != end && it->cp == cp) {
      decompose(it->first, out);
      if (it->second) decompose(it->second, out);
      return;
    }
  }
  out.push_back(cp);
}

// The primary composite of (a, b), or 0 when there is none.
uint32_t compose(uint32_t a, uint32_t b) {
  if (a >= kLBase && a < kLBase + kLCount && b >= kVBase && b < kVBase + kVCount)
    return kSBase + ((a - kLBase) * kVCount + (b - kVBase)) * kTCount;
  if (a >= kSBase && a < kSBase + kSCount && (a - kSBase) % kTCount == 0 && b > kTBase && b < kTBase + kTCount)
    return a + (b - kTBase);
  const auto* c = unicode_tables::kComp;
  const auto* end = c + unicode_tables::kCompCount;
  const auto* it = std::lower_bound(c, end, std::make_pair(a, b), [](const unicode_tables::Composition& x, const std::pair<uint32_t, uint32_t>& k) {
    return x.first != k.first ? x.first < k.first : x.second < k.second;
  });
  return (it != end && it->first == a && it->second == b) ? it->composite : 0;
}

}  // namespace

std::string unicode_nfc(std::string_view text) {
  if (!unicode_nfc_may_change(text)) return std::string(text);
  // Full canonical decomposition; invalid bytes kept as kRawByte + byte.
  std::vector<uint32_t> buf;
  buf.reserve(text.size() + 8);
  for (size_t pos = 0; pos < text.size();) {
    const size_t at = pos;
    uint32_t cp = utf8_next(text, pos);
    if (cp == 0xFFFD && pos - at == 1) cp = kRawByte + static_cast<uint8_t>(text[at]);   // an invalid byte
    decompose(cp, buf);
  }
  // Canonical ordering: stable sort by class within each run of non-starters.
  std::vector<uint8_t> cls(buf.size());
  for (size_t i = 0; i < buf.size(); ++i) cls[i] = ccc_of(buf[i]);
  for (size_t i = 0; i < buf.size();) {
    if (cls[i] == 0) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < buf.size() && cls[j] != 0) ++j;
    if (j - i > 1) {
      std::vector<std::pair<uint8_t, uint32_t>> run;
      for (size_t k = i; k < j; ++k) run.emplace_back(cls[k], buf[k]);
      std::stable_sort(run.begin(), run.end(), [](const auto& x, const auto& y) { return x.first < y.first; });
      for (size_t k = i; k < j; ++k) cls[k] = run[k - i].first, buf[k] = run[k - i].second;
    }
    i = j;
  }
  // Canonical composition (UAX #15): a character joins the last starter unless blocked.
  size_t out_n = 0;
  if (!buf.empty()) {
    bool have_starter = cls[0] == 0;   // a leading non-starter composes with nothing
    size_t starter = 0;
    int last_cls = 0;
    out_n = 1;
    for (size_t i = 1; i < buf.size(); ++i) {
      const uint32_t ch = buf[i];
      const int c = cls[i];
      const uint32_t composite = have_starter && (last_cls < c || last_cls == 0) ? compose(buf[starter], ch) : 0;
      if (composite) {
        buf[starter] = composite;
        continue;
      }
      if (c == 0) starter = out_n, have_starter = true;
      last_cls = c;
      buf[out_n++] = ch;
    }
  }
  std::string out;
  out.reserve(text.size() + 8);
  for (size_t i = 0; i < out_n; ++i) {
    if (buf[i] >= kRawByte) out += static_cast<char>(buf[i] - kRawByte);
    else utf8_append(out, buf[i]);
  }
  return out;
}

namespace {

struct ByteAlphabet {
  uint32_t to_cp[256];
  std::array<int16_t, 324> from_cp;   // every alphabet code point is < 324
  ByteAlphabet() {
    from_cp.fill(-1);
    // Printable Latin-1 bytes stand for themselves; the others are moved to U+0100 onwards in order.
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      to_cp[b] = printable ? static_cast<uint32_t>(b) : next++;
      from_cp[to_cp[b]] = static_cast<int16_t>(b);
    }
  }
};

const ByteAlphabet& byte_alphabet() {
  static const ByteAlphabet a;
  return a;
}

}  // namespace

uint32_t byte_to_unicode(uint8_t b) { return byte_alphabet().to_cp[b]; }

int unicode_to_byte(uint32_t cp) {
  return cp < byte_alphabet().from_cp.size() ? byte_alphabet().from_cp[cp] : -1;
}

bool byte_level_decode(std::string_view token, std::string& out) {
  for (size_t pos = 0; pos < token.size();) {
    const int b = unicode_to_byte(utf8_next(token, pos));   // U+FFFD (invalid UTF-8) is not in the alphabet
    if (b < 0) return false;
    out += static_cast<char>(b);
  }
  return true;
}

}  // namespace qlora
