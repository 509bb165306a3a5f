// The tokenizer's internal state (TokenizerImpl) and the pieces the tokenizer*.cpp files share:
// the Unicode tables (generated into unicode_tables.cpp), the pre-tokenizers (pretokenize.cpp),
// the byte-level alphabet, and the loaders' common finishing step.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "qlora/tokenizer.h"

namespace qlora {

namespace unicode_tables {
struct ClassRun { uint32_t first; uint8_t cls; };      // UnicodeClass value
struct CodeRange { uint32_t first, last; };            // inclusive
extern const char* const kUnicodeVersion;
extern const ClassRun kClassRuns[];
extern const size_t kClassRunCount;
extern const CodeRange kWhiteSpace[];
extern const size_t kWhiteSpaceCount;
extern const CodeRange kNfcMayChange[];
extern const size_t kNfcMayChangeCount;
struct CccRange { uint32_t first, last; uint8_t ccc; };             // inclusive, non-zero classes
struct Decomposition { uint32_t cp, first, second; };              // second 0: a singleton
struct Composition { uint32_t first, second, composite; };         // primary composites
extern const CccRange kCcc[];
extern const size_t kCccCount;
extern const Decomposition kDecomp[];   // sorted by cp; Hangul syllables are algorithmic
extern const size_t kDecompCount;
extern const Composition kComp[];       // sorted by (first, second)
extern const size_t kCompCount;
}  // namespace unicode_tables

// True when some code point of `text` can make NFC(text) differ from text (so text that returns
// false is already NFC). Invalid UTF-8 bytes count as U+FFFD, which is stable.
bool unicode_nfc_may_change(std::string_view text);

// Unicode NFC of `text` (full canonical decomposition, canonical ordering, canonical composition,
// Hangul included) at the tables' Unicode version. Invalid UTF-8 bytes are kept byte for byte and
// act as starters that compose with nothing. Returns `text` unchanged when
// unicode_nfc_may_change(text) is false.
std::string unicode_nfc(std::string_view text);

// Appends the byte ranges [first, second) of the pre-tokens of `text` (which cover it in order).
using PieceRanges = std::vector<std::pair<uint32_t, uint32_t>>;
void pretokenize(PreTokenizer pre, std::string_view text, PieceRanges& out);

// GPT-2's byte-to-unicode alphabet: byte b is shown as code point byte_to_unicode(b); the inverse
// returns -1 for a code point outside the alphabet.
uint32_t byte_to_unicode(uint8_t b);
int unicode_to_byte(uint32_t cp);
// A byte-level token string back to its bytes; false when a character is outside the alphabet.
bool byte_level_decode(std::string_view token, std::string& out);

struct AddedToken {
  std::string content;
  int32_t id = -1;
  bool special = false;
  bool lstrip = false, rstrip = false, single_word = false;
};

enum class MergeMode { rank, score };   // HF merges by rank; GGUF "llama" by token score

struct MergeRule { int32_t rank; int32_t id; };

// (left id << 32 | right id) -> MergeRule, open addressing in one flat array: a lookup is about one
// cache miss, where std::unordered_map takes two (bucket, node); BPE does one per adjacent pair.
class MergeMap {
 public:
  // Keeps the first rule of a key (a repeated pair keeps its best rank); false when it was there.
  bool insert(uint64_t key, MergeRule rule) {
    if ((count_ + 1) * 2 > slots_.size()) grow();
    Slot* s = probe(key);
    if (s->key == key) return false;
    *s = {key, rule};
    ++count_;
    return true;
  }
  const MergeRule* find(uint64_t key) const {
    if (slots_.empty()) return nullptr;
    const Slot* s = const_cast<MergeMap*>(this)->probe(key);
    return s->key == key ? &s->rule : nullptr;
  }
  size_t size() const { return count_; }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t{0};
  struct Slot { uint64_t key; MergeRule rule; };
  Slot* probe(uint64_t key) {
    for (size_t i = (key * 0x9E3779B97F4A7C15ull) >> shift_;; i = (i + 1) & (slots_.size() - 1))
      if (slots_[i].key == key || slots_[i].key == kEmpty) return &slots_[i];
  }
  void grow() {
    std::vector<Slot> old = std::move(slots_);
    const size_t n = old.empty() ? 1024 : old.size() * 2;
    slots_.assign(n, Slot{kEmpty, {0, 0}});
    shift_ = 64;
    for (size_t m = n; m > 1; m >>= 1) --shift_;
    for (const Slot& s : old)
      if (s.key != kEmpty) *probe(s.key) = s;
  }
  std::vector<Slot> slots_;
  size_t count_ = 0;
  int shift_ = 64;
};

struct TokenizerImpl {
  TokenizerKind kind = TokenizerKind::byte_level_bpe;
  PreTokenizer pre = PreTokenizer::none;
  MergeMode merge_mode = MergeMode::rank;
  std::string source;                    // file name, for messages

  std::vector<std::string> tokens;       // id -> token as written in the vocab ("" = hole)
  std::vector<std::string> pieces;       // id -> the bytes it decodes to
  std::vector<uint8_t> special;          // id -> 1 when a special added token
  std::unordered_map<std::string, int32_t> token_ids;   // token string -> id (vocab + added)
  // What BPE looks symbols up by: raw bytes for byte-level, the "▁" text for sentencepiece.
  // Keys view into `lookup_keys`, which is not touched after finish_tokenizer.
  std::vector<std::string> lookup_keys;
  std::unordered_map<std::string_view, int32_t> lookup;
  MergeMap merges;
  std::vector<float> scores;                        // MergeMode::score
  int32_t byte_ids[256];                            // byte-level: the byte's token; spm: <0xNN>

  bool ignore_merges = false;       // a pre-token that is in the vocab is emitted whole
  bool byte_fallback = false;
  bool fuse_unk = false;
  int32_t unk_id = -1;
  bool prefix_space = false;        // sentencepiece: "▁" before each text segment
  bool prefix_first_only = false;   // Metaspace prepend_scheme "first"
  bool metaspace_split = false;     // Metaspace split: BPE per "▁"-started word
  bool byte_level_prefix_space = false;   // ByteLevel add_prefix_space
  bool nfc = false;                 // normalizer NFC (applied between added tokens, see tokenizer.cpp)

  std::vector<AddedToken> added;    // sorted longest first by finish_tokenizer
  bool added_first_byte[256] = {};

  int32_t bos = -1, eos = -1, pad = -1;
  bool adds_bos = false, adds_eos = false;
  std::string chat_template;
  uint64_t serial = 0;              // distinguishes instances for the per-thread BPE caches

  TokenizerImpl() { for (int32_t& v : byte_ids) v = -1; }
};

// Adds the merge a + b with `rank`, looking the tokens up in token_ids (the vocab); UserError
// naming `what` when a, b or a + b is not in the vocab.
void add_merge(TokenizerImpl& t, const std::string& a, const std::string& b, int32_t rank, const std::string& what);
// After a loader filled tokens, merges (as ids), added tokens and options: builds pieces,
// lookup, byte_ids, the added-token index; checks what encode relies on.
void finish_tokenizer(TokenizerImpl& t);
// Makes a Tokenizer around a finished impl.
Tokenizer make_tokenizer(std::unique_ptr<TokenizerImpl> impl);

}  // namespace qlora
