// tokenizer::Tokenizer on small hand-written tokenizer.json files; tests/python/test_tokenizer.py
// compares it with the `tokenizers` library on trained ones.
#include "adapter_job/tokenizer/tokenizer.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "adapter_job/core/error.h"

namespace adapter_job::tokenizer {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using Ids = std::vector<int64_t>;
using nlohmann::json;

json BpeModel(json vocab, json merges) {
  return {{"type", "BPE"},
          {"dropout", nullptr},
          {"unk_token", nullptr},
          {"fuse_unk", false},
          {"byte_fallback", false},
          {"ignore_merges", false},
          {"vocab", std::move(vocab)},
          {"merges", std::move(merges)}};
}

json TokenizerJson(json model) {
  return {{"version", "1.0"},          {"truncation", nullptr},
          {"padding", nullptr},        {"added_tokens", json::array()},
          {"normalizer", nullptr},     {"pre_tokenizer", nullptr},
          {"post_processor", nullptr}, {"decoder", nullptr},
          {"model", std::move(model)}};
}

Tokenizer Load(const json& config) { return Tokenizer::FromJson(config.dump(), "test.json"); }

std::string LoadError(const json& config) {
  try {
    Load(config);
  } catch (const FormatError& e) {
    return e.what();
  }
  return "no error";
}

TEST(TokenizerTest, MergesApplyLowestRankFirst) {
  // "bc" outranks "ab", so "abc" becomes a + bc even though "ab" is on the left.
  const json vocab = {{"a", 0}, {"b", 1}, {"c", 2}, {"ab", 3}, {"bc", 4}, {"abc", 5}};
  const Tokenizer by_rank = Load(TokenizerJson(BpeModel(vocab, {"b c", "a b", "a bc"})));
  EXPECT_THAT(by_rank.Encode("abc"), ElementsAre(5));
  EXPECT_THAT(by_rank.Encode("abab"), ElementsAre(3, 3));

  const json pairs = json::array({json::array({"a", "b"}), json::array({"b", "c"})});
  const Tokenizer ab_first = Load(TokenizerJson(BpeModel(vocab, pairs)));
  EXPECT_THAT(ab_first.Encode("abc"), ElementsAre(3, 2));
}

TEST(TokenizerTest, EqualRanksMergeLeftmostFirst) {
  const Tokenizer tokenizer =
      Load(TokenizerJson(BpeModel({{"a", 0}, {"aa", 1}}, json::array({"a a"}))));
  EXPECT_THAT(tokenizer.Encode("aaa"), ElementsAre(1, 0));
  EXPECT_THAT(tokenizer.Encode("aaaa"), ElementsAre(1, 1));
}

TEST(TokenizerTest, IgnoreMergesTakesWholeWordsFromTheVocabulary) {
  // With no merge that builds "abc", only ignore_merges finds it.
  json model = BpeModel({{"a", 0}, {"b", 1}, {"c", 2}, {"abc", 3}}, json::array());
  EXPECT_THAT(Load(TokenizerJson(model)).Encode("abc"), ElementsAre(0, 1, 2));
  model["ignore_merges"] = true;
  EXPECT_THAT(Load(TokenizerJson(model)).Encode("abc"), ElementsAre(3));
}

TEST(TokenizerTest, ByteFallbackSpellsUnknownCharactersInBytes) {
  json vocab = {{"<unk>", 0}, {"a", 1}};
  for (int b = 0; b < 256; ++b) vocab[fmt::format("<0x{:02X}>", b)] = 2 + b;
  json model = BpeModel(vocab, json::array());
  model["byte_fallback"] = true;
  model["unk_token"] = "<unk>";
  json config = TokenizerJson(model);
  config["decoder"] = {{"type", "Sequence"},
                       {"decoders", {{{"type", "ByteFallback"}}, {{"type", "Fuse"}}}}};
  const Tokenizer tokenizer = Load(config);
  // U+00E9 is C3 A9 in UTF-8.
  const Ids ids = tokenizer.Encode("a\u00e9");
  EXPECT_THAT(ids, ElementsAre(1, 2 + 0xC3, 2 + 0xA9));
  EXPECT_EQ(tokenizer.Decode(ids), "a\u00e9");
  // A lone continuation byte is not UTF-8: one U+FFFD per byte.
  EXPECT_EQ(tokenizer.Decode(Ids{2 + 0xA9, 1}), "\uFFFDa");
}

TEST(TokenizerTest, UnknownCharactersBecomeUnkAndFuse) {
  json model = BpeModel({{"<unk>", 0}, {"a", 1}}, json::array());
  model["unk_token"] = "<unk>";
  EXPECT_THAT(Load(TokenizerJson(model)).Encode("a\u00e9\u00e9a"), ElementsAre(1, 0, 0, 1));
  model["fuse_unk"] = true;
  EXPECT_THAT(Load(TokenizerJson(model)).Encode("a\u00e9\u00e9a"), ElementsAre(1, 0, 1));
}

TEST(TokenizerTest, AddedTokensAreMatchedLongestFirstAndNeverSplit) {
  json config =
      TokenizerJson(BpeModel({{"<", 0}, {">", 1}, {"s", 2}, {"x", 3}, {" ", 4}}, json::array()));
  config["added_tokens"] = {
      {{"id", 5}, {"content", "<s>"}, {"special", true}, {"normalized", false}},
      {{"id", 6}, {"content", "<s>>"}, {"special", true}, {"normalized", false}},
      {{"id", 7}, {"content", "xy"}, {"special", false}, {"normalized", true}, {"lstrip", true}},
  };
  const Tokenizer tokenizer = Load(config);
  EXPECT_THAT(tokenizer.Encode("s<s>s<s>>"), ElementsAre(2, 5, 2, 6));
  // lstrip swallows the spaces before "xy".
  EXPECT_THAT(tokenizer.Encode("s  xy"), ElementsAre(2, 7));
  EXPECT_EQ(tokenizer.vocab_size(), 8);
  EXPECT_EQ(tokenizer.Decode(Ids{2, 5, 6, 7}, /*skip_special_tokens=*/true), "s xy");
  EXPECT_EQ(tokenizer.TokenText(5), "<s>");
  EXPECT_EQ(tokenizer.TokenText(99), "");
}

TEST(TokenizerTest, TemplateAddsBosOnlyWithSpecialTokens) {
  json config = TokenizerJson(BpeModel({{"<s>", 0}, {"a", 1}}, json::array()));
  config["post_processor"] = {
      {"type", "TemplateProcessing"},
      {"single",
       {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}},
        {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
      {"pair", json::array()},
      {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {0}}, {"tokens", {"<s>"}}}}}}};
  const Tokenizer tokenizer = Load(config);
  EXPECT_THAT(tokenizer.Encode("aa"), ElementsAre(0, 1, 1));
  EXPECT_THAT(tokenizer.Encode("aa", /*add_special_tokens=*/false), ElementsAre(1, 1));
}

TEST(TokenizerTest, ByteLevelRoundTripsAnyText) {
  // Every byte's character, no merges: each UTF-8 byte is one token.
  json vocab = json::object();
  const std::string alphabet =
      "!\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`"
      "abcdefghijklmnopqrstuvwxyz{|}~";
  for (const char c : alphabet) vocab[std::string(1, c)] = static_cast<int>(vocab.size());
  vocab["\u0120"] = static_cast<int>(vocab.size());  // space
  vocab["\u00c3"] = static_cast<int>(vocab.size());
  vocab["\u00a9"] = static_cast<int>(vocab.size());
  json config = TokenizerJson(BpeModel(vocab, json::array()));
  config["pre_tokenizer"] = {{"type", "ByteLevel"},
                             {"add_prefix_space", false},
                             {"trim_offsets", true},
                             {"use_regex", true}};
  config["decoder"] = {{"type", "ByteLevel"}};
  const Tokenizer tokenizer = Load(config);
  const Ids ids = tokenizer.Encode("Hi \u00e9!");
  EXPECT_EQ(ids.size(), 6u);
  EXPECT_EQ(tokenizer.Decode(ids), "Hi \u00e9!");
  // Half a character decodes to U+FFFD, as from_utf8_lossy does.
  EXPECT_EQ(tokenizer.TokenText(ids[3]), "\uFFFD");
}

TEST(TokenizerTest, RejectsUnsupportedModelsNamingTheFileAndType) {
  json config = TokenizerJson(BpeModel(json::object(), json::array()));
  config["model"] = {{"type", "WordPiece"}, {"vocab", json::object()}};
  EXPECT_THAT(LoadError(config),
              AllOf(HasSubstr("test.json"), HasSubstr("\"model\""), HasSubstr("WordPiece")));
  config["model"] = {{"type", "Unigram"}, {"vocab", json::array()}};
  EXPECT_THAT(LoadError(config), HasSubstr("Unigram"));
}

TEST(TokenizerTest, RejectsUnsupportedComponentsNamingTheKey) {
  json config = TokenizerJson(BpeModel({{"a", 0}}, json::array()));
  config["pre_tokenizer"] = {
      {"type", "Sequence"},
      {"pretokenizers",
       {{{"type", "Digits"}, {"individual_digits", true}}, {{"type", "BertPreTokenizer"}}}}};
  EXPECT_THAT(LoadError(config),
              AllOf(HasSubstr("pre_tokenizer.pretokenizers[1]"), HasSubstr("BertPreTokenizer")));
  config["pre_tokenizer"] = nullptr;
  config["normalizer"] = {{"type", "BertNormalizer"}};
  EXPECT_THAT(LoadError(config), AllOf(HasSubstr("\"normalizer\""), HasSubstr("BertNormalizer")));
  config["normalizer"] = nullptr;
  config["model"]["merges"] = {"a b"};
  EXPECT_THAT(LoadError(config), AllOf(HasSubstr("model.merges"), HasSubstr("\"b\"")));
}

TEST(TokenizerTest, UnicodeNormalizersComposeAndDecompose) {
  // unicodedata.normalize gives "\u00e9" for NFC/NFKC of "e\u0301", "fi" for NFKC/NFKD of
  // "\ufb01", and "e\u0301" for NFD/NFKD of "\u00e9".
  json config = TokenizerJson(BpeModel(
      {{"e", 0}, {"\u00e9", 1}, {"\u0301", 2}, {"f", 3}, {"i", 4}, {"\ufb01", 5}}, json::array()));
  config["normalizer"] = {{"type", "NFC"}};
  EXPECT_THAT(Load(config).Encode("e\u0301\ufb01"), ElementsAre(1, 5));
  config["normalizer"] = {{"type", "NFKC"}};
  EXPECT_THAT(Load(config).Encode("e\u0301\ufb01"), ElementsAre(1, 3, 4));
  config["normalizer"] = {{"type", "NFD"}};
  EXPECT_THAT(Load(config).Encode("\u00e9\ufb01"), ElementsAre(0, 2, 5));
  config["normalizer"] = {{"type", "NFKD"}};
  EXPECT_THAT(Load(config).Encode("\u00e9\ufb01"), ElementsAre(0, 2, 3, 4));
}

TEST(TokenizerTest, RejectsInvalidUtf8Input) {
  const Tokenizer tokenizer = Load(TokenizerJson(BpeModel({{"a", 0}}, json::array())));
  EXPECT_THROW(tokenizer.Encode("a\xC3"), FormatError);
}

}  // namespace
}  // namespace adapter_job::tokenizer
