// Tokenizers: byte-level BPE (GPT-2, Llama 3, Qwen2) and sentencepiece-style BPE (Llama 2), read
// from a Hugging Face tokenizer.json or from a GGUF file's tokenizer.ggml.* metadata. Encoding
// follows HF tokenizers step by step: added/special tokens are split out first, then normalizer,
// pre-tokenizer (the Split regex of the known models, hand-written over Unicode categories),
// BPE by merge rank (or by score for a GGUF "llama" vocab), byte fallback. Any byte string is
// accepted: invalid UTF-8 never crashes (byte-level BPE encodes the raw bytes; the Unicode steps
// see each invalid byte as U+FFFD).
#pragma once
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace qlora {

class GgufFile;

enum class TokenizerKind {
  byte_level_bpe,      // GPT-2 byte-to-unicode alphabet, regex pre-tokenizer
  sentencepiece_bpe,   // Metaspace "▁", optional prepend, byte_fallback <0xNN> tokens
};

// How text is split before BPE for byte-level tokenizers (recognised from the tokenizer.json
// Split regex or the GGUF `tokenizer.ggml.pre` name; anything else is a UserError naming it).
// smollm: GPT-2's regex after every digit was split off alone (SmolLM2: HF Digits + ByteLevel).
enum class PreTokenizer { none, gpt2, llama3, qwen2, smollm };

const char* pre_tokenizer_name(PreTokenizer pre);   // "gpt2", "llama3", ...; "none"

struct EncodeOptions {
  bool add_special_tokens = false;   // the post-processor's BOS (and EOS where it adds one)
  bool parse_special = true;         // text like "<|eot_id|>" becomes the special token
};

struct TokenizerImpl;  // vocab, merges, added tokens (src/data/tokenizer*.cpp)

class Tokenizer {
 public:
  Tokenizer();
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  TokenizerKind kind() const;
  PreTokenizer pre_tokenizer() const;
  int64_t vocab_size() const;                 // largest id + 1, added tokens included

  std::vector<int32_t> encode(std::string_view text, const EncodeOptions& options = {}) const;
  // Inverse of encode: byte-level tokens map back to their bytes, sentencepiece "▁" to spaces
  // (the prepended one dropped) and <0xNN> tokens to bytes. skip_special drops special tokens.
  std::string decode(const std::vector<int32_t>& ids, bool skip_special = false) const;

  int32_t token_to_id(std::string_view token) const;   // -1 when absent
  std::string id_to_token(int32_t id) const;           // UserError when out of range
  bool is_special(int32_t id) const;

  // Special ids, -1 when the tokenizer has none. From tokenizer_config.json (bos_token,
  // eos_token, pad_token) or the post-processor when loaded from a directory, from
  // tokenizer.ggml.{bos,eos,padding}_token_id for GGUF.
  int32_t bos_id() const;
  int32_t eos_id() const;
  int32_t pad_id() const;
  // True when encode(add_special_tokens=true) puts BOS first (Llama 2/3: yes; GPT-2: no).
  bool adds_bos() const;
  // tokenizer_config.json's chat_template (or tokenizer.chat_template in GGUF), "" when none.
  const std::string& chat_template() const;

  const TokenizerImpl& impl() const { return *impl_; }
  TokenizerImpl& impl() { return *impl_; }

 private:
  std::unique_ptr<TokenizerImpl> impl_;
};

// `path` is a tokenizer.json file or a directory holding tokenizer.json (and optionally
// tokenizer_config.json, which supplies bos/eos/pad and the chat template), or a .gguf model file
// (its tokenizer.ggml.* metadata: tokenizer_from_gguf).
Tokenizer load_tokenizer(const std::filesystem::path& path);
// From GGUF metadata: tokenizer.ggml.model ("gpt2" = byte-level BPE, "llama" = sentencepiece BPE
// ranked by scores), .pre, .tokens, .merges, .scores, .token_type, special token ids.
Tokenizer tokenizer_from_gguf(const GgufFile& gguf);

// Unicode helpers the pre-tokenizers use (src/data/unicode.cpp), exposed for tests.
// Decodes one code point at `pos`, advancing `pos`; an invalid or truncated sequence yields
// U+FFFD and advances by one byte.
uint32_t utf8_next(std::string_view s, size_t& pos);
void utf8_append(std::string& out, uint32_t cp);
enum class UnicodeClass : uint8_t { letter, number, mark, punctuation, symbol, separator, other };
UnicodeClass unicode_class(uint32_t cp);     // the general category's major class
bool unicode_is_whitespace(uint32_t cp);     // the White_Space property (regex \s)

}  // namespace qlora
