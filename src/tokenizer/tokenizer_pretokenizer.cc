// tokenizer.json "pre_tokenizer": cuts normalized text into the words the model sees alone.
#include "adapter_job/core/error.h"
#include "tokenizer_internal.h"

namespace adapter_job::tokenizer::internal {
namespace {

constexpr std::string_view kSupported = "ByteLevel, Split, Digits, Metaspace, Sequence";

// GPT-2's word pattern, which ByteLevel applies when use_regex is set.
constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

class SequencePreTokenizer final : public PreTokenizer {
 public:
  explicit SequencePreTokenizer(std::vector<std::unique_ptr<PreTokenizer>> steps)
      : steps_(std::move(steps)) {}
  void PreTokenize(std::vector<Piece>& pieces) const override {
    for (const auto& step : steps_) step->PreTokenize(pieces);
  }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> steps_;
};

class ByteLevelPreTokenizer final : public PreTokenizer {
 public:
  ByteLevelPreTokenizer(bool add_prefix_space, bool use_regex)
      : add_prefix_space_(add_prefix_space),
        gpt2_(use_regex
                  ? std::make_optional<Regex>(kGpt2Pattern, Regex::Syntax::kPattern, "ByteLevel")
                  : std::nullopt) {}

  void PreTokenize(std::vector<Piece>& pieces) const override {
    SplitPieces(pieces, [&](const Piece& piece, std::vector<Piece>& out) {
      Piece prefixed = piece;
      if (add_prefix_space_ && !prefixed.text.starts_with(' ')) prefixed.text.insert(0, " ");
      if (gpt2_) {
        SplitPiece(prefixed, FindSegments(*gpt2_, prefixed.text), SplitBehavior::kIsolated, out);
      } else {
        out.push_back(std::move(prefixed));
      }
    });
    // Every piece not yet an added token is mapped, including those earlier steps made.
    for (Piece& piece : pieces) {
      if (!piece.added_token) piece.text = ByteLevelEncode(piece.text);
    }
  }

 private:
  bool add_prefix_space_;
  std::optional<Regex> gpt2_;
};

class SplitPreTokenizer final : public PreTokenizer {
 public:
  SplitPreTokenizer(Regex pattern, SplitBehavior behavior, bool invert)
      : pattern_(std::move(pattern)), behavior_(behavior), invert_(invert) {}

  void PreTokenize(std::vector<Piece>& pieces) const override {
    SplitPieces(pieces, [&](const Piece& piece, std::vector<Piece>& out) {
      std::vector<Segment> segments = FindSegments(pattern_, piece.text);
      if (invert_) {
        for (Segment& segment : segments) segment.is_match = !segment.is_match;
      }
      SplitPiece(piece, segments, behavior_, out);
    });
  }

 private:
  Regex pattern_;
  SplitBehavior behavior_;
  bool invert_;
};

class MetaspacePreTokenizer final : public PreTokenizer {
 public:
  explicit MetaspacePreTokenizer(MetaspaceConfig config)
      : config_(std::move(config)),
        replacement_(config_.replacement, Regex::Syntax::kLiteral, "Metaspace") {}

  void PreTokenize(std::vector<Piece>& pieces) const override {
    using Prepend = MetaspaceConfig::Prepend;
    SplitPieces(pieces, [&](const Piece& piece, std::vector<Piece>& out) {
      Piece replaced = piece;
      replaced.text.clear();
      for (const char c : piece.text) {
        if (c == ' ') {
          replaced.text += config_.replacement;
        } else {
          replaced.text += c;
        }
      }
      const bool prepend = !replaced.text.starts_with(config_.replacement) &&
                           (config_.prepend == Prepend::kAlways ||
                            (config_.prepend == Prepend::kFirst && replaced.at_origin));
      if (prepend) replaced.text.insert(0, config_.replacement);
      if (config_.split) {
        SplitPiece(replaced, FindSegments(replacement_, replaced.text),
                   SplitBehavior::kMergedWithNext, out);
      } else {
        out.push_back(std::move(replaced));
      }
    });
  }

 private:
  MetaspaceConfig config_;
  Regex replacement_;
};

}  // namespace

MetaspaceConfig ParseMetaspace(const Json& config, std::string_view where) {
  MetaspaceConfig result;
  result.replacement = utf8::Encode(CharField(config, "replacement", where));
  std::string scheme = "always";
  if (config.contains("prepend_scheme") && !config["prepend_scheme"].is_null()) {
    scheme = StringField(config, "prepend_scheme", where);
  }
  if (scheme == "always") {
    result.prepend = MetaspaceConfig::Prepend::kAlways;
  } else if (scheme == "first") {
    result.prepend = MetaspaceConfig::Prepend::kFirst;
  } else if (scheme == "never") {
    result.prepend = MetaspaceConfig::Prepend::kNever;
  } else {
    Fail("\"{}\": unknown prepend_scheme \"{}\"", KeyPath(where, "prepend_scheme"), scheme);
  }
  // Files from before prepend_scheme existed say add_prefix_space; tokenizers accepts false
  // only together with "never".
  if (!BoolField(config, "add_prefix_space", where, true) &&
      result.prepend != MetaspaceConfig::Prepend::kNever) {
    Fail("\"{}\": add_prefix_space false contradicts prepend_scheme \"{}\"", where, scheme);
  }
  result.split = BoolField(config, "split", where, true);
  return result;
}

std::unique_ptr<PreTokenizer> ParsePreTokenizer(const Json& config, std::string_view where) {
  if (config.is_null()) return nullptr;
  const std::string type = ComponentType(config, where);
  if (type == "Sequence") {
    const Json& list = ArrayField(config, "pretokenizers", where);
    std::vector<std::unique_ptr<PreTokenizer>> steps;
    for (std::size_t i = 0; i < list.size(); ++i) {
      const std::string step_where = KeyPath(KeyPath(where, "pretokenizers"), i);
      if (list[i].is_null()) Fail("\"{}\" is null", step_where);
      steps.push_back(ParsePreTokenizer(list[i], step_where));
    }
    return std::make_unique<SequencePreTokenizer>(std::move(steps));
  }
  if (type == "ByteLevel") {
    return std::make_unique<ByteLevelPreTokenizer>(
        BoolField(config, "add_prefix_space", where, true),
        BoolField(config, "use_regex", where, true));
  }
  if (type == "Split") {
    return std::make_unique<SplitPreTokenizer>(
        ParsePattern(Field(config, "pattern", where), KeyPath(where, "pattern")),
        ParseSplitBehavior(config, where), BoolField(config, "invert", where, false));
  }
  if (type == "Digits") {
    const bool individual = BoolField(config, "individual_digits", where, false);
    // Rust's char::is_numeric is the Unicode N category.
    return std::make_unique<SplitPreTokenizer>(
        Regex(R"(\p{N})", Regex::Syntax::kPattern, where),
        individual ? SplitBehavior::kIsolated : SplitBehavior::kContiguous, false);
  }
  if (type == "Metaspace") {
    return std::make_unique<MetaspacePreTokenizer>(ParseMetaspace(config, where));
  }
  FailUnsupported("pre_tokenizer", type, where, kSupported);
}

}  // namespace adapter_job::tokenizer::internal
