// tokenizer.json patterns (on text::Regex), and splitting text around their matches.
#include <algorithm>

#include "adapter_job/core/error.h"
#include "tokenizer_internal.h"

namespace adapter_job::tokenizer::internal {
namespace {

text::Regex Compile(std::string_view pattern, Regex::Syntax syntax, std::string_view where) {
  try {
    return text::Regex(pattern, syntax == Regex::Syntax::kLiteral
                                    ? text::Regex::Dialect::kLiteral
                                    : text::Regex::Dialect::kOniguruma);
  } catch (const FormatError& e) {
    Fail("\"{}\": the regular expression \"{}\" does not compile: {}", where, pattern, e.what());
  }
}

}  // namespace

Regex::Regex(std::string_view pattern, Syntax syntax, std::string_view where)
    : regex_(Compile(pattern, syntax, where)) {}

std::vector<Span> Regex::FindAll(std::string_view text) const {
  std::vector<Span> matches;
  // PCRE2 validates the UTF-8 once; later searches start at character boundaries of it.
  bool checked = false;
  std::size_t search_from = 0;
  std::optional<std::size_t> last_match_end;
  while (search_from <= text.size()) {
    const std::optional<Span> match = regex_.Find(text, search_from, checked);
    checked = true;
    if (!match) break;
    if (match->begin == match->end && last_match_end == match->end) {
      search_from += search_from < text.size() ? utf8::LengthOf(text[search_from]) : 1;
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
