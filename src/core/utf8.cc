#include "adapter_job/core/utf8.h"

#include <cstdint>

namespace adapter_job::utf8 {
namespace {

// A lead byte's sequence length and the range its second byte may take: the narrower ranges
// after E0, ED, F0 and F4 exclude overlong forms, surrogates and code points past U+10FFFF
// (Unicode table 3-7). Length 0 for a byte that cannot start a sequence (80..C1, F5..FF).
struct Lead {
  std::size_t length = 0;
  unsigned char second_min = 0x80;
  unsigned char second_max = 0xBF;
};

Lead LeadOf(unsigned char b, Surrogates surrogates) {
  if (b < 0x80) return {1};
  if (b >= 0xC2 && b <= 0xDF) return {2};
  if (b == 0xE0) return {3, 0xA0, 0xBF};
  if (b == 0xED) return {3, 0x80, surrogates == Surrogates::kAllow ? uint8_t{0xBF} : uint8_t{0x9F}};
  if (b >= 0xE1 && b <= 0xEF) return {3};
  if (b == 0xF0) return {4, 0x90, 0xBF};
  if (b >= 0xF1 && b <= 0xF3) return {4};
  if (b == 0xF4) return {4, 0x80, 0x8F};
  return {0};
}

// Length of the well-formed sequence at the start of `s`, or 0 with `*invalid` set to the
// length of the maximal ill-formed subpart there (at least 1).
std::size_t Scan(std::string_view s, Surrogates surrogates, std::size_t* invalid) {
  const auto byte = [&](std::size_t i) { return static_cast<unsigned char>(s[i]); };
  *invalid = 1;
  if (s.empty()) return 0;
  const Lead lead = LeadOf(byte(0), surrogates);
  if (lead.length <= 1) return lead.length;
  if (s.size() < 2 || byte(1) < lead.second_min || byte(1) > lead.second_max) return 0;
  for (std::size_t i = 2; i < lead.length; ++i) {
    if (i >= s.size() || (byte(i) & 0xC0) != 0x80) {
      *invalid = i;
      return 0;
    }
  }
  return lead.length;
}

}  // namespace

std::size_t SequenceLength(std::string_view s, Surrogates surrogates) {
  std::size_t invalid = 0;
  return Scan(s, surrogates, &invalid);
}

std::size_t FindInvalid(std::string_view s, Surrogates surrogates) {
  std::size_t invalid = 0;
  for (std::size_t pos = 0; pos < s.size();) {
    const std::size_t length = Scan(s.substr(pos), surrogates, &invalid);
    if (length == 0) return pos;
    pos += length;
  }
  return std::string_view::npos;
}

std::string Lossy(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  std::size_t invalid = 0;
  for (std::size_t pos = 0; pos < bytes.size();) {
    const std::size_t length = Scan(bytes.substr(pos), Surrogates::kReject, &invalid);
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

std::size_t LengthOf(char lead) {
  const std::size_t length = LeadOf(static_cast<unsigned char>(lead), Surrogates::kAllow).length;
  return length == 0 ? 1 : length;
}

char32_t DecodeAt(std::string_view valid, std::size_t pos, std::size_t* length) {
  const auto byte = [&](std::size_t i) { return static_cast<unsigned char>(valid[pos + i]); };
  *length = LengthOf(valid[pos]);
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

std::vector<char32_t> CodePoints(std::string_view valid) {
  std::vector<char32_t> result;
  result.reserve(valid.size());
  for (std::size_t pos = 0, length = 0; pos < valid.size(); pos += length) {
    result.push_back(DecodeAt(valid, pos, &length));
  }
  return result;
}

void Append(char32_t c, std::string& out) {
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

std::string Encode(char32_t code_point) {
  std::string out;
  Append(code_point, out);
  return out;
}

}  // namespace adapter_job::utf8
