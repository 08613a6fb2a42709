#include "adapter_job/text/unicode.h"

#include <utf8proc.h>

#include <cstdlib>
#include <memory>
#include <new>

#include "adapter_job/core/error.h"

namespace adapter_job::text {

std::string Normalize(std::string_view valid, NormalizationForm form) {
  // UTF8PROC_STABLE keeps unassigned code points as they are, as the standard asks.
  int options = UTF8PROC_STABLE;
  switch (form) {
    case NormalizationForm::kNfc:
      options |= UTF8PROC_COMPOSE;
      break;
    case NormalizationForm::kNfd:
      options |= UTF8PROC_DECOMPOSE;
      break;
    case NormalizationForm::kNfkc:
      options |= UTF8PROC_COMPOSE | UTF8PROC_COMPAT;
      break;
    case NormalizationForm::kNfkd:
      options |= UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT;
      break;
  }
  if (valid.empty()) return {};
  utf8proc_uint8_t* out = nullptr;
  const utf8proc_ssize_t length = utf8proc_map(
      reinterpret_cast<const utf8proc_uint8_t*>(valid.data()),
      static_cast<utf8proc_ssize_t>(valid.size()), &out, static_cast<utf8proc_option_t>(options));
  const std::unique_ptr<utf8proc_uint8_t, decltype(&std::free)> owned(out, &std::free);
  if (length == UTF8PROC_ERROR_NOMEM) throw std::bad_alloc();
  if (length < 0)
    Fail("cannot normalize a {}-byte text: {}", valid.size(), utf8proc_errmsg(length));
  return std::string(reinterpret_cast<const char*>(out), static_cast<std::size_t>(length));
}

char32_t SimpleLowercase(char32_t code_point) {
  return static_cast<char32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(code_point)));
}

bool IsWhiteSpace(char32_t c) {
  if ((c >= 0x09 && c <= 0x0D) || c == 0x85) return true;
  switch (utf8proc_category(static_cast<utf8proc_int32_t>(c))) {
    case UTF8PROC_CATEGORY_ZS:
    case UTF8PROC_CATEGORY_ZL:
    case UTF8PROC_CATEGORY_ZP:
      return true;
    default:
      return false;
  }
}

std::optional<int> DecimalDigitValue(char32_t c) {
  const auto is_digit = [](char32_t d) {
    return utf8proc_category(static_cast<utf8proc_int32_t>(d)) == UTF8PROC_CATEGORY_ND;
  };
  if (!is_digit(c)) return std::nullopt;
  // Unicode encodes decimal digits in contiguous runs 0..9, and runs that touch (the
  // mathematical digits U+1D7CE..U+1D7FF) each start where the last ends: the value is the
  // distance from the start of the stretch, modulo 10.
  char32_t start = c;
  while (start > 0 && is_digit(start - 1)) --start;
  return static_cast<int>((c - start) % 10);
}

}  // namespace adapter_job::text
