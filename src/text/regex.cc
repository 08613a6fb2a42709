#include "adapter_job/text/regex.h"

#ifndef PCRE2_CODE_UNIT_WIDTH
#define PCRE2_CODE_UNIT_WIDTH 8
#endif
#include <fmt/format.h>
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <new>

#include "adapter_job/core/error.h"

namespace adapter_job::text {
namespace {

struct ContextFree {
  void operator()(pcre2_compile_context* context) const { pcre2_compile_context_free(context); }
};
struct MatchDataFree {
  void operator()(pcre2_match_data* data) const { pcre2_match_data_free(data); }
};

std::string Pcre2Message(int code) {
  std::array<PCRE2_UCHAR, 256> buffer{};
  const int length = pcre2_get_error_message(code, buffer.data(), buffer.size());
  if (length < 0) return fmt::format("PCRE2 error {}", code);
  return std::string(reinterpret_cast<const char*>(buffer.data()),
                     static_cast<std::size_t>(length));
}

// Python's re refuses global inline flags such as "(?i)" anywhere but at the start of the
// pattern (PEFT's rf"(.*\.)?({key})$" puts them inside); PCRE2 would apply them from there on.
bool IsGlobalFlagGroup(std::string_view rest) {
  if (!rest.starts_with("(?")) return false;
  const std::size_t end = rest.find_first_not_of("aiLmsux", 2);
  return end != 2 && end != std::string_view::npos && rest[end] == ')';
}

// Rewrites the escapes whose meaning differs from PCRE2's: Oniguruma's \uHHHH (PCRE2's
// \x{HHHH}) and Python's \Z (PCRE2's \z: the very end, not before a final newline). Other
// escapes pass through unchanged; an escaped backslash stays one, so "\\u0041" is no code point.
std::string TranslateEscapes(std::string_view pattern, Regex::Dialect dialect) {
  const auto is_hex = [](char c) { return std::isxdigit(static_cast<unsigned char>(c)) != 0; };
  const bool python = dialect == Regex::Dialect::kPython;
  std::string out;
  out.reserve(pattern.size());
  bool in_class = false;              // inside [...], where "(?" is two plain characters
  std::size_t leading_flags_end = 0;  // "(?i)(?s)..." at the start is fine
  while (IsGlobalFlagGroup(pattern.substr(leading_flags_end)))
    leading_flags_end = pattern.find(')', leading_flags_end) + 1;
  for (std::size_t i = 0; i < pattern.size(); ++i) {
    if (pattern[i] == '\\' && i + 1 < pattern.size()) {
      if (dialect == Regex::Dialect::kOniguruma && pattern[i + 1] == 'u' &&
          i + 6 <= pattern.size() &&
          std::all_of(pattern.begin() + i + 2, pattern.begin() + i + 6, is_hex)) {
        out += fmt::format("\\x{{{}}}", pattern.substr(i + 2, 4));
        i += 5;
      } else if (python && pattern[i + 1] == 'Z') {
        out += "\\z";
        ++i;
      } else {
        out += pattern.substr(i, 2);
        ++i;
      }
      continue;
    }
    if (!in_class && pattern[i] == '[') {
      in_class = true;
      // A ']' right after '[' or '[^' is a member, not the end.
      const std::size_t first = i + (pattern.substr(i + 1, 1) == "^" ? 2 : 1);
      if (pattern.substr(first, 1) == "]") {
        out += pattern.substr(i, first + 1 - i);
        i = first;
        continue;
      }
    } else if (in_class && pattern[i] == ']') {
      in_class = false;
    } else if (python && !in_class && i >= leading_flags_end &&
               IsGlobalFlagGroup(pattern.substr(i))) {
      Fail("global flags not at the start of the expression at position {}", i);
    }
    out += pattern[i];
  }
  return out;
}

}  // namespace

void Regex::CodeFree::operator()(pcre2_real_code_8* code) const { pcre2_code_free(code); }

Regex::Regex(std::string_view pattern, Dialect dialect) : pattern_(pattern) {
  uint32_t options = PCRE2_UTF;
  std::string source;
  if (dialect == Dialect::kLiteral) {
    options |= PCRE2_LITERAL;
    source = pattern;
  } else {
    // Both dialects read \d, \w, \s and case-insensitivity as Unicode (UCP), and only \n as a
    // newline (for ., ^ and $). Oniguruma anchors ^ and $ at lines.
    options |= PCRE2_UCP;
    if (dialect == Dialect::kOniguruma) options |= PCRE2_MULTILINE;
    source = TranslateEscapes(pattern, dialect);
  }
  const std::unique_ptr<pcre2_compile_context, ContextFree> context(
      pcre2_compile_context_create(nullptr));
  if (!context) throw std::bad_alloc();
  pcre2_set_newline(context.get(), PCRE2_NEWLINE_LF);
  int error = 0;
  PCRE2_SIZE offset = 0;
  code_.reset(pcre2_compile(reinterpret_cast<PCRE2_SPTR>(source.data()), source.size(), options,
                            &error, &offset, context.get()));
  if (!code_) Fail("{} (at offset {})", Pcre2Message(error), offset);
  // Without JIT support (or memory for it) pcre2_match interprets: slower, same results.
  pcre2_jit_compile(code_.get(), PCRE2_JIT_COMPLETE);
}

Regex::Regex(Regex&&) noexcept = default;
Regex& Regex::operator=(Regex&&) noexcept = default;
Regex::~Regex() = default;

std::optional<Groups> Regex::Match(std::string_view text, Anchor anchor, std::size_t start,
                                   bool text_checked) const {
  const std::unique_ptr<pcre2_match_data, MatchDataFree> data(
      pcre2_match_data_create_from_pattern(code_.get(), nullptr));
  if (!data) throw std::bad_alloc();
  uint32_t options = text_checked ? PCRE2_NO_UTF_CHECK : 0;
  if (anchor != Anchor::kSearch) options |= PCRE2_ANCHORED;
  if (anchor == Anchor::kFull) options |= PCRE2_ENDANCHORED;
  static constexpr char kEmpty[] = "";
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.empty() ? kEmpty : text.data());
  int rc = pcre2_match(code_.get(), subject, text.size(), start, options, data.get(), nullptr);
  if (rc == PCRE2_ERROR_JIT_STACKLIMIT) {
    // The JIT backtracks on a 32 KiB stack; the interpreter keeps its frames on the heap.
    rc = pcre2_match(code_.get(), subject, text.size(), start, options | PCRE2_NO_JIT, data.get(),
                     nullptr);
  }
  if (rc == PCRE2_ERROR_NOMATCH) return std::nullopt;
  if (rc < 0) {
    Fail("the regular expression \"{}\" failed on a {}-byte text: {}", pattern_, text.size(),
         Pcre2Message(rc));
  }
  const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(data.get());
  const uint32_t pairs = pcre2_get_ovector_count(data.get());
  Groups groups(pairs);
  for (uint32_t i = 0; i < pairs; ++i) {
    if (ovector[2 * i] != PCRE2_UNSET) groups[i] = Span{ovector[2 * i], ovector[2 * i + 1]};
  }
  return groups;
}

std::optional<Span> Regex::Find(std::string_view text, std::size_t start, bool text_checked) const {
  const std::optional<Groups> groups = Match(text, Anchor::kSearch, start, text_checked);
  if (!groups) return std::nullopt;
  return (*groups)[0];
}

}  // namespace adapter_job::text
