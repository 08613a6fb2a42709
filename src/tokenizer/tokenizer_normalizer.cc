// tokenizer.json "normalizer": rewrites the text between added tokens before pre-tokenization.
#include "adapter_job/core/error.h"
#include "adapter_job/text/unicode.h"
#include "tokenizer_internal.h"

namespace adapter_job::tokenizer::internal {
namespace {

constexpr std::string_view kSupported =
    "NFC, NFD, NFKC, NFKD, Prepend, Replace, Lowercase, Strip, ByteLevel, Sequence";

class SequenceNormalizer final : public Normalizer {
 public:
  explicit SequenceNormalizer(std::vector<std::unique_ptr<Normalizer>> steps)
      : steps_(std::move(steps)) {}
  void Normalize(std::string& text) const override {
    for (const auto& step : steps_) step->Normalize(text);
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> steps_;
};

class UnicodeNormalizer final : public Normalizer {
 public:
  explicit UnicodeNormalizer(text::NormalizationForm form) : form_(form) {}
  void Normalize(std::string& text) const override { text = text::Normalize(text, form_); }

 private:
  text::NormalizationForm form_;
};

class PrependNormalizer final : public Normalizer {
 public:
  explicit PrependNormalizer(std::string prefix) : prefix_(std::move(prefix)) {}
  void Normalize(std::string& text) const override {
    if (!text.empty()) text.insert(0, prefix_);
  }

 private:
  std::string prefix_;
};

class ReplaceNormalizer final : public Normalizer {
 public:
  ReplaceNormalizer(Regex pattern, std::string content)
      : pattern_(std::move(pattern)), content_(std::move(content)) {}
  void Normalize(std::string& text) const override {
    std::string out;
    out.reserve(text.size());
    for (const Segment& segment : FindSegments(pattern_, text)) {
      if (segment.is_match) {
        out += content_;
      } else {
        out.append(text, segment.span.begin, segment.span.end - segment.span.begin);
      }
    }
    text = std::move(out);
  }

 private:
  Regex pattern_;
  std::string content_;
};

class LowercaseNormalizer final : public Normalizer {
 public:
  void Normalize(std::string& text) const override { LowercaseInPlace(text); }
};

class StripNormalizer final : public Normalizer {
 public:
  StripNormalizer(bool left, bool right) : left_(left), right_(right) {}
  void Normalize(std::string& text) const override {
    const std::vector<char32_t> chars = utf8::CodePoints(text);
    std::size_t begin = 0;
    std::size_t end = chars.size();
    while (left_ && begin < end && text::IsWhiteSpace(chars[begin])) ++begin;
    while (right_ && end > begin && text::IsWhiteSpace(chars[end - 1])) --end;
    std::string out;
    for (std::size_t i = begin; i < end; ++i) utf8::Append(chars[i], out);
    text = std::move(out);
  }

 private:
  bool left_;
  bool right_;
};

class ByteLevelNormalizer final : public Normalizer {
 public:
  void Normalize(std::string& text) const override { text = ByteLevelEncode(text); }
};

}  // namespace

std::unique_ptr<Normalizer> ParseNormalizer(const Json& config, std::string_view where) {
  if (config.is_null()) return nullptr;
  const std::string type = ComponentType(config, where);
  if (type == "Sequence") {
    const Json& list = ArrayField(config, "normalizers", where);
    std::vector<std::unique_ptr<Normalizer>> steps;
    for (std::size_t i = 0; i < list.size(); ++i) {
      const std::string step_where = KeyPath(KeyPath(where, "normalizers"), i);
      if (list[i].is_null()) Fail("\"{}\" is null", step_where);
      steps.push_back(ParseNormalizer(list[i], step_where));
    }
    return std::make_unique<SequenceNormalizer>(std::move(steps));
  }
  if (type == "NFC") return std::make_unique<UnicodeNormalizer>(text::NormalizationForm::kNfc);
  if (type == "NFD") return std::make_unique<UnicodeNormalizer>(text::NormalizationForm::kNfd);
  if (type == "NFKC") return std::make_unique<UnicodeNormalizer>(text::NormalizationForm::kNfkc);
  if (type == "NFKD") return std::make_unique<UnicodeNormalizer>(text::NormalizationForm::kNfkd);
  if (type == "Prepend") {
    return std::make_unique<PrependNormalizer>(StringField(config, "prepend", where));
  }
  if (type == "Replace") {
    return std::make_unique<ReplaceNormalizer>(
        ParsePattern(Field(config, "pattern", where), KeyPath(where, "pattern")),
        StringField(config, "content", where));
  }
  if (type == "Lowercase") return std::make_unique<LowercaseNormalizer>();
  if (type == "Strip") {
    return std::make_unique<StripNormalizer>(BoolField(config, "strip_left", where),
                                             BoolField(config, "strip_right", where));
  }
  if (type == "ByteLevel") return std::make_unique<ByteLevelNormalizer>();
  FailUnsupported("normalizer", type, where, kSupported);
}

}  // namespace adapter_job::tokenizer::internal
