// UTF-8, character classes and the ByteLevel alphabet, as Rust and `tokenizers` define them.
#include <fmt/format.h>
#include <locale.h>
#include <wctype.h>

#include <array>

#include "adapter_job/core/error.h"
#include "tokenizer_internal.h"

namespace adapter_job::tokenizer::internal {
namespace {

// The byte range a valid second byte may take after `lead`, and the sequence length; length 0
// for a byte that cannot start a sequence. Rust's validator uses the same table, so "maximal
// invalid subsequence" below means what it means for from_utf8_lossy.
struct LeadInfo {
  std::size_t length = 0;
  unsigned char second_min = 0x80;
  unsigned char second_max = 0xBF;
};

LeadInfo Lead(unsigned char b) {
  if (b < 0x80) return {1};
  if (b >= 0xC2 && b <= 0xDF) return {2};
  if (b == 0xE0) return {3, 0xA0, 0xBF};
  if (b == 0xED) return {3, 0x80, 0x9F};
  if (b >= 0xE1 && b <= 0xEF) return {3};
  if (b == 0xF0) return {4, 0x90, 0xBF};
  if (b >= 0xF1 && b <= 0xF3) return {4};
  if (b == 0xF4) return {4, 0x80, 0x8F};
  return {0};
}

// Length of the valid sequence at `pos`, or 0 with `*invalid` set to the length of the maximal
// invalid subsequence there (at least 1).
std::size_t ValidSequenceAt(std::string_view text, std::size_t pos, std::size_t* invalid) {
  const auto byte = [&](std::size_t i) { return static_cast<unsigned char>(text[i]); };
  const LeadInfo lead = Lead(byte(pos));
  *invalid = 1;
  if (lead.length == 0) return 0;
  if (lead.length == 1) return 1;
  std::size_t i = pos + 1;
  if (i >= text.size() || byte(i) < lead.second_min || byte(i) > lead.second_max) return 0;
  for (++i; i < pos + lead.length; ++i) {
    if (i >= text.size() || (byte(i) & 0xC0) != 0x80) {
      *invalid = i - pos;
      return 0;
    }
  }
  return lead.length;
}

// GPT-2's bytes_to_unicode(): printable Latin-1 bytes map to themselves, the other 68 bytes to
// U+0100 onwards in byte order.
const std::array<std::string, 256>& ByteToChar() {
  static const std::array<std::string, 256> table = [] {
    std::array<std::string, 256> result;
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      result[b] = Utf8(printable ? static_cast<char32_t>(b) : next++);
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
      result.emplace(DecodeUtf8(ByteToChar()[b], 0, &length), static_cast<unsigned char>(b));
    }
    return result;
  }();
  return table;
}

}  // namespace

std::size_t FindInvalidUtf8(std::string_view text) {
  std::size_t invalid = 0;
  for (std::size_t pos = 0; pos < text.size();) {
    const std::size_t length = ValidSequenceAt(text, pos, &invalid);
    if (length == 0) return pos;
    pos += length;
  }
  return kValidUtf8;
}

std::size_t Utf8Length(char lead_byte) {
  const std::size_t length = Lead(static_cast<unsigned char>(lead_byte)).length;
  return length == 0 ? 1 : length;
}

char32_t DecodeUtf8(std::string_view text, std::size_t pos, std::size_t* length) {
  const auto byte = [&](std::size_t i) { return static_cast<unsigned char>(text[pos + i]); };
  *length = Utf8Length(text[pos]);
  switch (*length) {
    case 1:
      return byte(0);
    case 2:
      return (char32_t{byte(0)} & 0x1F) << 6 | (byte(1) & 0x3F);
    case 3:
      return (char32_t{byte(0)} & 0x0F) << 12 | (char32_t{byte(1)} & 0x3F) << 6 | (byte(2) & 0x3F);
    default:
      return (char32_t{byte(0)} & 0x07) << 18 | (char32_t{byte(1)} & 0x3F) << 12 |
             (char32_t{byte(2)} & 0x3F) << 6 | (byte(3) & 0x3F);
  }
}

void AppendUtf8(char32_t c, std::string& out) {
  if (c < 0x80) {
    out += static_cast<char>(c);
  } else if (c < 0x800) {
    out += static_cast<char>(0xC0 | (c >> 6));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    out += static_cast<char>(0xE0 | (c >> 12));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (c >> 18));
    out += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  }
}

std::string Utf8(char32_t code_point) {
  std::string out;
  AppendUtf8(code_point, out);
  return out;
}

std::vector<char32_t> CodePoints(std::string_view text) {
  std::vector<char32_t> result;
  result.reserve(text.size());
  for (std::size_t pos = 0, length = 0; pos < text.size(); pos += length) {
    result.push_back(DecodeUtf8(text, pos, &length));
  }
  return result;
}

std::string LossyUtf8(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  std::size_t invalid = 0;
  for (std::size_t pos = 0; pos < bytes.size();) {
    const std::size_t length = ValidSequenceAt(bytes, pos, &invalid);
    if (length == 0) {
      out += "\xEF\xBF\xBD";
      pos += invalid;
    } else {
      out.append(bytes.substr(pos, length));
      pos += length;
    }
  }
  return out;
}

bool IsWhiteSpace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

bool IsWordChar(char32_t c) {
  if (c < 0x80) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
  }
  static const Regex word(R"([\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\p{Join_Control}])",
                          Regex::Syntax::kPattern, "\\w");
  return word.Contains(Utf8(c));
}

void LowercaseInPlace(std::string& text) {
  // glibc's C.UTF-8 tables carry Unicode's simple lowercase mappings; Rust's to_lowercase
  // differs from them only for U+0130, whose full mapping is two characters.
  static const locale_t utf8_locale = newlocale(LC_CTYPE_MASK, "C.UTF-8", locale_t{});
  std::string out;
  out.reserve(text.size());
  for (std::size_t pos = 0, length = 0; pos < text.size(); pos += length) {
    const char32_t c = DecodeUtf8(text, pos, &length);
    if (c < 0x80) {
      out += static_cast<char>(c >= 'A' && c <= 'Z' ? c + ('a' - 'A') : c);
    } else if (c == 0x130) {
      out += "i\xCC\x87";
    } else if (utf8_locale != locale_t{}) {
      AppendUtf8(static_cast<char32_t>(towlower_l(static_cast<wint_t>(c), utf8_locale)), out);
    } else {
      Fail("Lowercase normalizer: no C.UTF-8 locale to lowercase U+{:04X}",
           static_cast<uint32_t>(c));
    }
  }
  text = std::move(out);
}

void CheckNfcInert(std::string_view text) {
  // The NFC quick check answers "unchanged" for text whose every character has NFC_QC=Yes and
  // canonical combining class 0. Those are the assigned characters outside general category M
  // except the few listed here (singleton and excluded decompositions, Hangul vowel and final
  // jamo), computed from the Unicode 14 data that PCRE2 10.42 also carries.
  static const Regex needs_nfc(
      R"([\p{Cn}\p{M}\x{374}\x{37E}\x{387}\x{958}-\x{95F}\x{9DC}\x{9DD}\x{9DF}\x{A33}\x{A36})"
      R"(\x{A59}-\x{A5B}\x{A5E}\x{B5C}\x{B5D}\x{F43}\x{F4D}\x{F52}\x{F57}\x{F5C}\x{F69})"
      R"(\x{1161}-\x{1175}\x{11A8}-\x{11C2}\x{1F71}\x{1F73}\x{1F75}\x{1F77}\x{1F79}\x{1F7B})"
      R"(\x{1F7D}\x{1FBB}\x{1FBE}\x{1FC9}\x{1FCB}\x{1FD3}\x{1FDB}\x{1FE3}\x{1FEB})"
      R"(\x{1FEE}\x{1FEF}\x{1FF9}\x{1FFB}\x{1FFD}\x{2000}\x{2001}\x{2126}\x{212A}\x{212B})"
      R"(\x{2329}\x{232A}\x{2ADC}\x{F900}-\x{FA0D}\x{FA10}\x{FA12}\x{FA15}-\x{FA1E}\x{FA20})"
      R"(\x{FA22}\x{FA25}\x{FA26}\x{FA2A}-\x{FA6D}\x{FA70}-\x{FAD9}\x{FB1D}\x{FB1F})"
      R"(\x{FB2A}-\x{FB36}\x{FB38}-\x{FB3C}\x{FB3E}\x{FB40}\x{FB41}\x{FB43}\x{FB44})"
      R"(\x{FB46}-\x{FB4E}\x{1D15E}-\x{1D164}\x{1D1BB}-\x{1D1C0}\x{2F800}-\x{2FA1D}])",
      Regex::Syntax::kPattern, "NFC check");
  if (const std::optional<Span> found = needs_nfc.Find(text)) {
    std::size_t length = 0;
    Fail(
        "NFC normalizer: the text contains U+{:04X} at byte {}, which NFC may change; this "
        "build implements NFC only for text that it leaves unchanged",
        static_cast<uint32_t>(DecodeUtf8(text, found->begin, &length)), found->begin);
  }
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
    const auto it = CharToByte().find(DecodeUtf8(token, pos, &length));
    if (it == CharToByte().end()) return std::nullopt;
    out += static_cast<char>(it->second);
  }
  return out;
}

}  // namespace adapter_job::tokenizer::internal
