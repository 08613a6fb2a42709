// Character classes and the ByteLevel alphabet, as Rust and `tokenizers` define them.
#include <array>
#include <unordered_map>

#include "adapter_job/text/unicode.h"
#include "tokenizer_internal.h"

namespace adapter_job::tokenizer::internal {
namespace {

// GPT-2's bytes_to_unicode(): printable Latin-1 bytes map to themselves, the other 68 bytes to
// U+0100 onwards in byte order.
const std::array<std::string, 256>& ByteToChar() {
  static const std::array<std::string, 256> table = [] {
    std::array<std::string, 256> result;
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      result[b] = utf8::Encode(printable ? static_cast<char32_t>(b) : next++);
    }
    return result;
  }();
  return table;
}

const std::unordered_map<char32_t, unsigned char>& CharToByte() {
  static const std::unordered_map<char32_t, unsigned char> table = [] {
    std::unordered_map<char32_t, unsigned char> result;
    for (int b = 0; b < 256; ++b) {
      std::size_t length = 0;
      result.emplace(utf8::DecodeAt(ByteToChar()[b], 0, &length), static_cast<unsigned char>(b));
    }
    return result;
  }();
  return table;
}

}  // namespace

bool IsWordChar(char32_t c) {
  if (c < 0x80) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
  }
  static const Regex word(R"([\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\p{Join_Control}])",
                          Regex::Syntax::kPattern, "\\w");
  return word.Contains(utf8::Encode(c));
}

void LowercaseInPlace(std::string& text) {
  // Rust's to_lowercase is the simple mapping except for U+0130, whose full mapping is two
  // characters (SpecialCasing.txt's only unconditional lowercase entry of that kind).
  std::string out;
  out.reserve(text.size());
  for (std::size_t pos = 0, length = 0; pos < text.size(); pos += length) {
    const char32_t c = utf8::DecodeAt(text, pos, &length);
    if (c == 0x130) {
      out += "i\xCC\x87";
    } else {
      utf8::Append(text::SimpleLowercase(c), out);
    }
  }
  text = std::move(out);
}

std::string ByteLevelEncode(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() * 2);
  for (const char b : bytes) out += ByteToChar()[static_cast<unsigned char>(b)];
  return out;
}

std::optional<std::string> ByteLevelDecode(std::string_view token) {
  std::string out;
  out.reserve(token.size());
  for (std::size_t pos = 0, length = 0; pos < token.size(); pos += length) {
    const auto it = CharToByte().find(utf8::DecodeAt(token, pos, &length));
    if (it == CharToByte().end()) return std::nullopt;
    out += static_cast<char>(it->second);
  }
  return out;
}

}  // namespace adapter_job::tokenizer::internal
