// UTF-8, checked as the Unicode standard defines it (table 3-7): the one validator and decoder
// of the project, for pickle strings, report text and tokenizer input alike.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

namespace adapter_job::utf8 {

// Whether the encoded forms of U+D800..U+DFFF count as well-formed. They are not UTF-8, but
// Python's pickle writes lone surrogates that way ('surrogatepass').
enum class Surrogates { kReject, kAllow };

// Byte length (1 to 4) of the well-formed sequence that starts `s`, or 0 when `s` is empty or
// starts with something else: a stray continuation byte, a truncated sequence, an overlong form,
// a surrogate (unless allowed) or a code point past U+10FFFF.
std::size_t SequenceLength(std::string_view s, Surrogates surrogates = Surrogates::kReject);

// Byte offset of the first ill-formed sequence, or std::string_view::npos if `s` is valid.
std::size_t FindInvalid(std::string_view s, Surrogates surrogates = Surrogates::kReject);
inline bool IsValid(std::string_view s, Surrogates surrogates = Surrogates::kReject) {
  return FindInvalid(s, surrogates) == std::string_view::npos;
}

// Each maximal ill-formed subpart (Unicode's "maximal subpart" practice, which Rust's
// String::from_utf8_lossy and Python's errors="replace" follow) becomes one U+FFFD.
std::string Lossy(std::string_view bytes);

// The following read text already known to be valid UTF-8.

// Byte length of the sequence that `lead` starts (1 for a byte that cannot start one).
std::size_t LengthOf(char lead);
// The code point at byte `pos`; `*length` receives its byte length.
char32_t DecodeAt(std::string_view valid, std::size_t pos, std::size_t* length);
std::vector<char32_t> CodePoints(std::string_view valid);

void Append(char32_t code_point, std::string& out);
std::string Encode(char32_t code_point);

}  // namespace adapter_job::utf8
