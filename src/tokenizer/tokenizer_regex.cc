// PCRE2 patterns with Oniguruma's conventions, and splitting text around their matches.
#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <new>

#include "adapter_job/core/error.h"
#include "tokenizer_internal.h"

namespace adapter_job::tokenizer::internal {
namespace {

std::string Pcre2Message(int code) {
  std::array<PCRE2_UCHAR, 256> buffer{};
  const int length = pcre2_get_error_message(code, buffer.data(), buffer.size());
  if (length < 0) return fmt::format("PCRE2 error {}", code);
  return std::string(reinterpret_cast<const char*>(buffer.data()),
                     static_cast<std::size_t>(length));
}

// Oniguruma writes a code point as \uHHHH, which PCRE2 spells \x{HHHH}; other escapes pass
// through unchanged (an escaped backslash stays one, so "\\u0041" is not a code point).
std::string TranslateOnigEscapes(std::string_view pattern) {
  const auto is_hex = [](char c) { return std::isxdigit(static_cast<unsigned char>(c)) != 0; };
  std::string out;
  out.reserve(pattern.size());
  for (std::size_t i = 0; i < pattern.size(); ++i) {
    if (pattern[i] != '\\' || i + 1 == pattern.size()) {
      out += pattern[i];
    } else if (pattern[i + 1] == 'u' && i + 6 <= pattern.size() &&
               std::all_of(pattern.begin() + i + 2, pattern.begin() + i + 6, is_hex)) {
      out += fmt::format("\\x{{{}}}", pattern.substr(i + 2, 4));
      i += 5;
    } else {
      out += pattern.substr(i, 2);
      ++i;
    }
  }
  return out;
}

}  // namespace

Regex::Regex(std::string_view pattern, Syntax syntax, std::string_view where) : pattern_(pattern) {
  uint32_t options = PCRE2_UTF;
  std::string source;
  if (syntax == Syntax::kLiteral) {
    options |= PCRE2_LITERAL;
    source = pattern;
  } else {
    // Oniguruma's default (Ruby) syntax, which tokenizers compiles with: \s, \w, \d are
    // Unicode classes, ^ and $ always anchor at lines, and only \n is a newline.
    options |= PCRE2_UCP | PCRE2_MULTILINE;
    source = "(*LF)" + TranslateOnigEscapes(pattern);
  }
  int error = 0;
  PCRE2_SIZE offset = 0;
  code_.reset(pcre2_compile(reinterpret_cast<PCRE2_SPTR>(source.data()), source.size(), options,
                            &error, &offset, nullptr));
  if (!code_) {
    Fail("\"{}\": the regular expression \"{}\" does not compile: {}", where, pattern,
         Pcre2Message(error));
  }
  // Without JIT support (or memory for it) pcre2_match interprets: slower, same results.
  pcre2_jit_compile(code_.get(), PCRE2_JIT_COMPLETE);
}

std::optional<Span> Regex::MatchAt(std::string_view text, std::size_t start, uint32_t options,
                                   pcre2_match_data* data) const {
  static constexpr char kEmpty[] = "";
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.empty() ? kEmpty : text.data());
  int rc = pcre2_match(code_.get(), subject, text.size(), start, options, data, nullptr);
  if (rc == PCRE2_ERROR_JIT_STACKLIMIT) {
    // The JIT backtracks on a 32 KiB stack; the interpreter keeps its frames on the heap.
    rc = pcre2_match(code_.get(), subject, text.size(), start, options | PCRE2_NO_JIT, data,
                     nullptr);
  }
  if (rc == PCRE2_ERROR_NOMATCH) return std::nullopt;
  if (rc < 0) {
    Fail("the regular expression \"{}\" failed on a {}-byte text: {}", pattern_, text.size(),
         Pcre2Message(rc));
  }
  const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(data);
  return Span{ovector[0], ovector[1]};
}

std::optional<Span> Regex::Find(std::string_view text) const {
  const MatchData data(pcre2_match_data_create_from_pattern(code_.get(), nullptr));
  if (!data) throw std::bad_alloc();
  return MatchAt(text, 0, 0, data.get());
}

std::vector<Span> Regex::FindAll(std::string_view text) const {
  const MatchData data(pcre2_match_data_create_from_pattern(code_.get(), nullptr));
  if (!data) throw std::bad_alloc();
  std::vector<Span> matches;
  // PCRE2 validates the UTF-8 once; later searches start at character boundaries of it.
  uint32_t options = 0;
  std::size_t search_from = 0;
  std::optional<std::size_t> last_match_end;
  while (search_from <= text.size()) {
    const std::optional<Span> match = MatchAt(text, search_from, options, data.get());
    options = PCRE2_NO_UTF_CHECK;
    if (!match) break;
    if (match->begin == match->end && last_match_end == match->end) {
      search_from += search_from < text.size() ? Utf8Length(text[search_from]) : 1;
      continue;
    }
    search_from = match->end;
    last_match_end = match->end;
    matches.push_back(*match);
  }
  return matches;
}

Regex ParsePattern(const Json& pattern, std::string_view where) {
  if (pattern.is_object() && pattern.size() == 1) {
    if (pattern.contains("String")) {
      return Regex(StringField(pattern, "String", where), Regex::Syntax::kLiteral, where);
    }
    if (pattern.contains("Regex")) {
      return Regex(StringField(pattern, "Regex", where), Regex::Syntax::kPattern, where);
    }
  }
  Fail("\"{}\" must be {{\"String\": ...}} or {{\"Regex\": ...}}, not {}", where, pattern.dump());
}

SplitBehavior ParseSplitBehavior(const Json& object, std::string_view where) {
  const std::string name = StringField(object, "behavior", where);
  if (name == "Removed") return SplitBehavior::kRemoved;
  if (name == "Isolated") return SplitBehavior::kIsolated;
  if (name == "MergedWithPrevious") return SplitBehavior::kMergedWithPrevious;
  if (name == "MergedWithNext") return SplitBehavior::kMergedWithNext;
  if (name == "Contiguous") return SplitBehavior::kContiguous;
  Fail("\"{}\": unknown split behavior \"{}\"", KeyPath(where, "behavior"), name);
}

std::vector<Segment> FindSegments(const Regex& regex, std::string_view text) {
  if (text.empty()) return {Segment{{0, 0}, false}};
  std::vector<Segment> segments;
  std::size_t previous = 0;
  for (const Span& match : regex.FindAll(text)) {
    if (previous != match.begin) segments.push_back({{previous, match.begin}, false});
    segments.push_back({match, true});
    previous = match.end;
  }
  if (previous != text.size()) segments.push_back({{previous, text.size()}, false});
  return segments;
}

void SplitPiece(const Piece& piece, const std::vector<Segment>& segments, SplitBehavior behavior,
                std::vector<Piece>& out) {
  // (span, remove) pairs, folded exactly as NormalizedString::split folds them.
  std::vector<std::pair<Span, bool>> parts;
  bool previous_match = false;
  switch (behavior) {
    case SplitBehavior::kIsolated:
      for (const Segment& s : segments) parts.emplace_back(s.span, false);
      break;
    case SplitBehavior::kRemoved:
      for (const Segment& s : segments) parts.emplace_back(s.span, s.is_match);
      break;
    case SplitBehavior::kContiguous:
      for (const Segment& s : segments) {
        if (s.is_match == previous_match && !parts.empty()) {
          parts.back().first.end = s.span.end;
        } else {
          parts.emplace_back(s.span, false);
        }
        previous_match = s.is_match;
      }
      break;
    case SplitBehavior::kMergedWithPrevious:
      for (const Segment& s : segments) {
        if (s.is_match && !previous_match && !parts.empty()) {
          parts.back().first.end = s.span.end;
        } else {
          parts.emplace_back(s.span, false);
        }
        previous_match = s.is_match;
      }
      break;
    case SplitBehavior::kMergedWithNext:
      for (auto it = segments.rbegin(); it != segments.rend(); ++it) {
        if (it->is_match && !previous_match && !parts.empty()) {
          parts.back().first.begin = it->span.begin;
        } else {
          parts.emplace_back(it->span, false);
        }
        previous_match = it->is_match;
      }
      std::reverse(parts.begin(), parts.end());
      break;
  }
  for (const auto& [span, remove] : parts) {
    if (remove) continue;
    out.push_back(Piece{piece.text.substr(span.begin, span.end - span.begin),
                        piece.at_origin && span.begin == 0, std::nullopt});
  }
}

}  // namespace adapter_job::tokenizer::internal
