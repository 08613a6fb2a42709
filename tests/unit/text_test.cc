// text::Regex in Python's dialect against what CPython 3.11's `re` answers (each expectation
// below was read off it; tests/python/test_regex_dialect.py compares many more live), and
// text/unicode against Python's unicodedata.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "adapter_job/core/error.h"
#include "adapter_job/text/regex.h"
#include "adapter_job/text/unicode.h"

namespace adapter_job::text {
namespace {

using ::testing::HasSubstr;
using Anchor = Regex::Anchor;

bool PyFull(const char* pattern, const std::string& text) {
  return Regex(pattern, Regex::Dialect::kPython).Matches(text, Anchor::kFull);
}

TEST(RegexTest, PythonDialectIsUnicodeAware) {
  // re.fullmatch(r"model\.layers\.\d+\.q_proj", "model.layers.\u0663.q_proj") matches: \d is
  // every decimal digit; ECMAScript's (std::regex) \d is only 0-9.
  EXPECT_TRUE(PyFull(R"(model\.layers\.\d+\.q_proj)", "model.layers.\u0663.q_proj"));
  // (?i) folds the Kelvin sign to k; std::regex cannot even compile an inline flag.
  EXPECT_TRUE(PyFull("(?i)k", "\u212A"));
  EXPECT_TRUE(PyFull(R"((?i).*\.Q_PROJ)", "model.layers.0.self_attn.q_proj"));
}

TEST(RegexTest, PythonDialectHasLookbehindAndNamedGroups) {
  EXPECT_FALSE(PyFull(R"(.*(?<!mlp)\.\w+_proj)", "model.layers.0.mlp.up_proj"));
  EXPECT_TRUE(PyFull(R"(.*(?<!mlp)\.\w+_proj)", "model.layers.0.self_attn.q_proj"));
  EXPECT_TRUE(PyFull("(?P<n>a)(?P=n)", "aa"));
}

TEST(RegexTest, PythonAnchorsAtTheEnds) {
  const Regex dollar(R"((.*\.)?(q_proj)$)", Regex::Dialect::kPython);
  // $ also matches before a final newline, \Z only at the very end.
  const auto groups = dollar.Match("a.q_proj\n", Anchor::kStart);
  ASSERT_TRUE(groups);
  EXPECT_EQ((*groups)[0]->end, 8u);
  EXPECT_EQ((*groups)[1]->end, 2u);
  EXPECT_FALSE(
      Regex(R"((.*\.)?(q_proj)\Z)", Regex::Dialect::kPython).Match("a.q_proj\n", Anchor::kStart));
  // re.match anchors at the start only; re.fullmatch at both ends.
  const Regex layer(R"(.*?\.[^.]*\.(?P<idx>\d+)\.)", Regex::Dialect::kPython);
  const auto idx = layer.Match("model.layers.12.mlp.experts.3.w", Anchor::kStart);
  ASSERT_TRUE(idx);
  EXPECT_EQ((*idx)[1]->begin, 13u);
  EXPECT_EQ((*idx)[1]->end, 15u);
  EXPECT_FALSE(layer.Matches("model.layers.12.mlp.experts.3.w", Anchor::kFull));
  EXPECT_FALSE(Regex("b", Regex::Dialect::kPython).Matches("ab", Anchor::kStart));
  EXPECT_TRUE(Regex("b", Regex::Dialect::kPython).Matches("ab", Anchor::kSearch));
  // An unmatched optional group is absent, not empty.
  const auto optional = dollar.Match("q_proj", Anchor::kFull);
  ASSERT_TRUE(optional);
  EXPECT_FALSE((*optional)[1].has_value());
}

TEST(RegexTest, OnigurumaDialectAnchorsAtLinesAndReadsUEscapes) {
  const Regex line("^b$", Regex::Dialect::kOniguruma);
  const auto found = line.Find("a\nb\nc");
  ASSERT_TRUE(found);
  EXPECT_EQ(found->begin, 2u);
  EXPECT_TRUE(Regex(R"(\u00e9)", Regex::Dialect::kOniguruma).Find("caf\u00e9"));
  EXPECT_FALSE(Regex(".", Regex::Dialect::kLiteral).Find("abc"));
}

TEST(RegexTest, ReportsWhereAPatternFails) {
  try {
    Regex("(a", Regex::Dialect::kPython);
    FAIL() << "compiled";
  } catch (const FormatError& e) {
    EXPECT_THAT(e.what(), HasSubstr("offset 2"));
  }
  EXPECT_THROW(Regex("a", Regex::Dialect::kPython).Find("\xFF"), FormatError);
}

TEST(UnicodeTest, NormalizationFormsAsUnicodedataGivesThem) {
  // unicodedata.normalize(form, "e\u0301 \ufb01 \u212b \u1e9b\u0323")
  const std::string text = "e\u0301 \uFB01 \u212B \u1E9B\u0323";
  EXPECT_EQ(Normalize(text, NormalizationForm::kNfc), "\u00E9 \uFB01 \u00C5 \u1E9B\u0323");
  EXPECT_EQ(Normalize(text, NormalizationForm::kNfd), "e\u0301 \uFB01 A\u030A \u017F\u0323\u0307");
  EXPECT_EQ(Normalize(text, NormalizationForm::kNfkc), "\u00E9 fi \u00C5 \u1E69");
  EXPECT_EQ(Normalize(text, NormalizationForm::kNfkd), "e\u0301 fi A\u030A s\u0323\u0307");
  EXPECT_EQ(Normalize("", NormalizationForm::kNfc), "");
  EXPECT_THROW(Normalize("\xC3", NormalizationForm::kNfc), FormatError);
}

TEST(UnicodeTest, LowercaseAndWhiteSpace) {
  EXPECT_EQ(SimpleLowercase(U'\u01C5'), U'\u01C6');
  EXPECT_EQ(SimpleLowercase(U'\u03A3'), U'\u03C3');
  EXPECT_EQ(SimpleLowercase(U'\u0130'), U'i');
  EXPECT_EQ(SimpleLowercase(U'a'), U'a');
  for (const char32_t c : {U'\t', U'\r', U' ', U'\u0085', U'\u00A0', U'\u1680', U'\u200A',
                           U'\u2028', U'\u2029', U'\u202F', U'\u3000'}) {
    EXPECT_TRUE(IsWhiteSpace(c)) << static_cast<uint32_t>(c);
  }
  for (const char32_t c : {U'a', U'\u200B', U'\u180E', U'\uFEFF', U'\u0000'}) {
    EXPECT_FALSE(IsWhiteSpace(c)) << static_cast<uint32_t>(c);
  }
}

TEST(UnicodeTest, DecimalDigitValueOfAnyScriptAsPythonInt) {
  // int("\u0663"), int("\uff17"), int("\U0001d7d9") (MATHEMATICAL DOUBLE-STRUCK DIGIT ONE,
  // in the second of five touching runs), int("\u0e59")
  EXPECT_EQ(DecimalDigitValue(U'\u0663'), 3);
  EXPECT_EQ(DecimalDigitValue(U'\uFF17'), 7);
  EXPECT_EQ(DecimalDigitValue(U'\U0001D7D9'), 1);
  EXPECT_EQ(DecimalDigitValue(U'\u0E59'), 9);
  EXPECT_EQ(DecimalDigitValue(U'0'), 0);
  EXPECT_EQ(DecimalDigitValue(U'\u00B2'), std::nullopt);  // superscript two is No, not Nd
  EXPECT_EQ(DecimalDigitValue(U'a'), std::nullopt);
}

}  // namespace
}  // namespace adapter_job::text
