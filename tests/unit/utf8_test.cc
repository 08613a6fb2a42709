// core/utf8 against the Unicode standard's table 3-7 and its "maximal subpart" examples
// (section 3.9, "U+FFFD Substitution of Maximal Subparts"), which Python's decoder follows too.
#include "adapter_job/core/utf8.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>

namespace adapter_job::utf8 {
namespace {

using ::testing::ElementsAre;
using namespace std::string_literals;
constexpr auto kNpos = std::string_view::npos;

TEST(Utf8Test, AcceptsEveryLengthAtTheEdgesOfTheTable) {
  for (const std::string& s :
       {"\x00"s, "\x7F"s, "\xC2\x80"s, "\xDF\xBF"s, "\xE0\xA0\x80"s, "\xED\x9F\xBF"s,
        "\xEE\x80\x80"s, "\xEF\xBF\xBF"s, "\xF0\x90\x80\x80"s, "\xF4\x8F\xBF\xBF"s}) {
    EXPECT_EQ(SequenceLength(s), s.size()) << testing::PrintToString(s);
    EXPECT_TRUE(IsValid(s + "a" + s));
  }
}

TEST(Utf8Test, RejectsOverlongForms) {
  // '/' and U+0000 in two, three and four bytes, and the smallest overlong of each length.
  for (const char* s : {"\xC0\xAF", "\xC0\x80", "\xC1\xBF", "\xE0\x80\xAF", "\xE0\x9F\xBF",
                        "\xF0\x80\x80\xAF", "\xF0\x8F\xBF\xBF"}) {
    EXPECT_EQ(SequenceLength(s), 0u) << testing::PrintToString(std::string(s));
    EXPECT_EQ(FindInvalid(std::string("ok") + s), 2u);
  }
}

TEST(Utf8Test, RejectsSurrogatesUnlessAllowed) {
  for (const char* s : {"\xED\xA0\x80", "\xED\xAD\xBF", "\xED\xB0\x80", "\xED\xBF\xBF"}) {
    EXPECT_EQ(SequenceLength(s), 0u);
    EXPECT_FALSE(IsValid(s));
    EXPECT_EQ(SequenceLength(s, Surrogates::kAllow), 3u);
    EXPECT_TRUE(IsValid(s, Surrogates::kAllow));
  }
  // Allowing surrogates allows nothing else.
  EXPECT_FALSE(IsValid("\xC0\x80", Surrogates::kAllow));
  EXPECT_FALSE(IsValid("\xF4\x90\x80\x80", Surrogates::kAllow));
}

TEST(Utf8Test, RejectsCodePointsPastTheLastAndBytesThatStartNothing) {
  for (const char* s : {"\xF4\x90\x80\x80", "\xF5\x80\x80\x80", "\xF7\xBF\xBF\xBF", "\xF8", "\xFF",
                        "\x80", "\xBF"}) {
    EXPECT_EQ(SequenceLength(s), 0u) << testing::PrintToString(std::string(s));
  }
}

TEST(Utf8Test, RejectsTruncatedSequencesWhereverTheyEnd) {
  EXPECT_EQ(SequenceLength(""), 0u);
  EXPECT_EQ(FindInvalid("abc\xE2\x82"), 3u);
  EXPECT_EQ(FindInvalid("abc\xF0\x9F\x98"), 3u);
  EXPECT_EQ(FindInvalid("\xC3"), 0u);
  EXPECT_EQ(FindInvalid("\xE2\x82x"), 0u);  // a non-continuation byte ends it early
  EXPECT_EQ(FindInvalid("caf\xC3\xA9"), kNpos);
  EXPECT_EQ(FindInvalid(""), kNpos);
}

TEST(Utf8Test, LossyReplacesEachMaximalSubpartOnce) {
  // Table 3-8 of the standard: 61 F1 80 80 E1 80 C2 62 80 63 80 BF 64 gives
  // a FFFD FFFD FFFD b FFFD c FFFD FFFD d.
  const std::string r = "\xEF\xBF\xBD";
  EXPECT_EQ(Lossy("a\xF1\x80\x80\xE1\x80\xC2"
                  "b\x80"
                  "c\x80\xBF"
                  "d"),
            "a" + r + r + r + "b" + r + "c" + r + r + "d");
  EXPECT_EQ(Lossy("\xED\xA0\x80"), r + r + r);  // a surrogate is three subparts
  EXPECT_EQ(Lossy("/data/mod\xE8le"), "/data/mod" + r + "le");
  EXPECT_EQ(Lossy("caf\xC3\xA9 \xF0\x9F\x98\x80"), "caf\xC3\xA9 \xF0\x9F\x98\x80");
}

TEST(Utf8Test, DecodesAndEncodesEveryLength) {
  const std::string text = "a\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80";
  EXPECT_THAT(CodePoints(text), ElementsAre(U'a', U'\u00E9', U'\u20AC', U'\U0001F600'));
  std::string back;
  for (const char32_t c : CodePoints(text)) Append(c, back);
  EXPECT_EQ(back, text);
  EXPECT_EQ(Encode(0x10FFFF), "\xF4\x8F\xBF\xBF");
  std::size_t length = 0;
  EXPECT_EQ(DecodeAt(text, 3, &length), U'\u20AC');
  EXPECT_EQ(length, 3u);
  EXPECT_EQ(LengthOf('\xF0'), 4u);
  EXPECT_EQ(LengthOf('\x80'), 1u);
}

}  // namespace
}  // namespace adapter_job::utf8
