// Regular expressions on PCRE2 with Unicode semantics (UTF + UCP: \d, \w, \s and (?i) know every
// script), the one engine of the project. Two dialects: Python's `re` for PEFT's patterns
// (target_modules, rank_pattern, ...) and Oniguruma's for tokenizer.json (`tokenizers`).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

// PCRE2's 8-bit types, declared rather than included, so that users need not see pcre2.h.
struct pcre2_real_code_8;

namespace adapter_job::text {

struct Span {
  std::size_t begin = 0;
  std::size_t end = 0;
};

// The groups of a match: [0] is the whole match, [i] the i-th group (nullopt if it took no part).
using Groups = std::vector<std::optional<Span>>;

class Regex {
 public:
  enum class Dialect {
    // Python's `re` on str: ^ and $ anchor at the ends of the text ($ also before a final \n),
    // \Z only at the very end, and . matches anything but \n.
    kPython,
    // Oniguruma's default syntax, as `tokenizers` compiles it: ^ and $ anchor at every line, only
    // \n ends one, and \uHHHH writes a code point.
    kOniguruma,
    // The pattern is a plain string.
    kLiteral,
  };
  // Where a match must lie: anywhere (re.search), from the start (re.match) or exactly the
  // whole text (re.fullmatch).
  enum class Anchor { kSearch, kStart, kFull };

  // Throws FormatError with PCRE2's message and the offset where the pattern fails to compile;
  // the caller adds where the pattern comes from.
  Regex(std::string_view pattern, Dialect dialect);
  Regex(Regex&&) noexcept;
  Regex& operator=(Regex&&) noexcept;
  ~Regex();

  // The first match at or after byte `start`; throws FormatError if `text` is not valid UTF-8.
  // With `text_checked`, the caller vouches that `text` is valid (a later search in a text
  // already searched) and PCRE2 skips its check.
  std::optional<Groups> Match(std::string_view text, Anchor anchor = Anchor::kSearch,
                              std::size_t start = 0, bool text_checked = false) const;
  std::optional<Span> Find(std::string_view text, std::size_t start = 0,
                           bool text_checked = false) const;
  bool Matches(std::string_view text, Anchor anchor) const {
    return Match(text, anchor).has_value();
  }
  const std::string& pattern() const { return pattern_; }

 private:
  struct CodeFree {
    void operator()(pcre2_real_code_8* code) const;
  };
  std::string pattern_;
  std::unique_ptr<pcre2_real_code_8, CodeFree> code_;
};

}  // namespace adapter_job::text
