// Unicode character data from utf8proc (its tables follow one Unicode version, 15 for Debian 12's
// 2.8): normalization forms, simple case mappings and character properties.
#pragma once

#include <optional>
#include <string>
#include <string_view>

namespace adapter_job::text {

enum class NormalizationForm { kNfc, kNfd, kNfkc, kNfkd };

// `valid` (valid UTF-8) in the normalization form; throws FormatError if it is not valid UTF-8.
std::string Normalize(std::string_view valid, NormalizationForm form);

// The simple (one code point) lowercase mapping of UnicodeData.txt: U+0130 gives "i".
char32_t SimpleLowercase(char32_t code_point);

// The White_Space property: general category Zs, Zl or Zp, and U+0009..U+000D and U+0085.
bool IsWhiteSpace(char32_t code_point);

// The value of a decimal digit (general category Nd) of any script, as Python's int() reads it.
std::optional<int> DecimalDigitValue(char32_t code_point);

}  // namespace adapter_job::text
