// A HuggingFace tokenizer.json reader for verification prompts: encodes text to ids and decodes
// ids (e.g. a model's top-k) back to text, with the same results as the `tokenizers` library.
//
// Supported, as real Llama / Mistral / Qwen / Gemma files use them:
//   model           BPE (merges as "a b" or ["a", "b"], ignore_merges, byte_fallback, unk_token,
//                   fuse_unk, continuing_subword_prefix, end_of_word_suffix; dropout must be off)
//   normalizer      NFC, NFD, NFKC, NFKD, Prepend, Replace, Lowercase, Strip, ByteLevel,
//                   Sequence
//   pre_tokenizer   ByteLevel, Split, Digits, Metaspace, Sequence
//   post_processor  TemplateProcessing, ByteLevel, BertProcessing, RobertaProcessing, Sequence
//   decoder         ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip, Sequence
//   added_tokens    special or not, with single_word / lstrip / rstrip / normalized
// Anything else is rejected when the file is loaded, with a FormatError naming the file, the
// key and the component type.
//
// Deliberate differences from `tokenizers`:
//   - `truncation` and `padding` are ignored, as transformers' tokenizers ignore them unless a
//     call asks for them.
//   - Regular expressions run on PCRE2 rather than Oniguruma; the two agree on the syntax that
//     tokenizer.json patterns use (\p{..}, \s, (?i:..), look-ahead, ^ and $ as line anchors,
//     \uHHHH). Character properties come from PCRE2's tables (Unicode 14 in 10.42), and
//     normalization, Lowercase and White_Space from utf8proc's (Unicode 15 in 2.8), so characters
//     added to Unicode since either may be classified differently than in Rust.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace adapter_job::tokenizer {

class Tokenizer {
 public:
  // Throws IoError if the file cannot be read and FormatError naming the file and the
  // unsupported or malformed component otherwise.
  static Tokenizer FromFile(const std::filesystem::path& tokenizer_json);
  // The same from the JSON text; `source` names it in error messages.
  static Tokenizer FromJson(std::string_view json_text, std::string_view source);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // Throws FormatError if `text` is not valid UTF-8.
  std::vector<int64_t> Encode(std::string_view text, bool add_special_tokens = true) const;
  // Ids the tokenizer does not know are skipped, as `tokenizers` does (a model's embedding is
  // often padded past the vocabulary). Invalid UTF-8 is replaced by U+FFFD.
  std::string Decode(std::span<const int64_t> ids, bool skip_special_tokens = false) const;
  // What Decode({id}) gives: a token's text for reports (empty for an unknown id).
  std::string TokenText(int64_t id) const;
  // The highest id of the model vocabulary and the added tokens, plus one.
  int64_t vocab_size() const;

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<const Impl> impl);

  std::unique_ptr<const Impl> impl_;
};

}  // namespace adapter_job::tokenizer
