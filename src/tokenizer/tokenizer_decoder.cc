// tokenizer.json "decoder" (token strings back to text) and "post_processor" (special tokens
// around an encoded sequence).
#include <numeric>

#include "adapter_job/core/error.h"
#include "tokenizer_internal.h"

namespace adapter_job::tokenizer::internal {
namespace {

constexpr std::string_view kSupportedDecoders =
    "ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip, Sequence";
constexpr std::string_view kSupportedProcessors =
    "TemplateProcessing, ByteLevel, BertProcessing, RobertaProcessing, Sequence";

class SequenceDecoder final : public Decoder {
 public:
  explicit SequenceDecoder(std::vector<std::unique_ptr<Decoder>> steps)
      : steps_(std::move(steps)) {}
  std::vector<std::string> DecodeChain(std::vector<std::string> tokens) const override {
    for (const auto& step : steps_) tokens = step->DecodeChain(std::move(tokens));
    return tokens;
  }

 private:
  std::vector<std::unique_ptr<Decoder>> steps_;
};

class ByteLevelDecoder final : public Decoder {
 public:
  std::vector<std::string> DecodeChain(std::vector<std::string> tokens) const override {
    std::string bytes;
    for (const std::string& token : tokens) {
      // A token with a character outside the alphabet (an added token) passes through as is.
      bytes += ByteLevelDecode(token).value_or(token);
    }
    return {utf8::Lossy(bytes)};
  }
};

class MetaspaceDecoder final : public Decoder {
 public:
  explicit MetaspaceDecoder(MetaspaceConfig config) : config_(std::move(config)) {}
  std::vector<std::string> DecodeChain(std::vector<std::string> tokens) const override {
    const std::string_view replacement = config_.replacement;
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      // The first token loses every replacement character (not just a leading one), as in
      // tokenizers, unless nothing was ever prepended.
      const bool drop = i == 0 && config_.prepend != MetaspaceConfig::Prepend::kNever;
      std::string out;
      const std::string& token = tokens[i];
      for (std::size_t pos = 0; pos < token.size();) {
        if (std::string_view(token).substr(pos).starts_with(replacement)) {
          if (!drop) out += ' ';
          pos += replacement.size();
        } else {
          out += token[pos++];
        }
      }
      tokens[i] = std::move(out);
    }
    return tokens;
  }

 private:
  MetaspaceConfig config_;
};

class ReplaceDecoder final : public Decoder {
 public:
  ReplaceDecoder(Regex pattern, std::string content)
      : pattern_(std::move(pattern)), content_(std::move(content)) {}
  std::vector<std::string> DecodeChain(std::vector<std::string> tokens) const override {
    for (std::string& token : tokens) {
      std::string out;
      for (const Segment& segment : FindSegments(pattern_, token)) {
        if (segment.is_match) {
          out += content_;
        } else {
          out.append(token, segment.span.begin, segment.span.end - segment.span.begin);
        }
      }
      token = std::move(out);
    }
    return tokens;
  }

 private:
  Regex pattern_;
  std::string content_;
};

// Runs of <0xNN> tokens become the text they spell, or one U+FFFD per byte if that is not
// valid UTF-8.
class ByteFallbackDecoder final : public Decoder {
 public:
  std::vector<std::string> DecodeChain(std::vector<std::string> tokens) const override {
    std::vector<std::string> out;
    std::string bytes;
    std::size_t byte_count = 0;
    const auto flush = [&] {
      if (byte_count == 0) return;
      if (utf8::IsValid(bytes)) {
        out.push_back(bytes);
      } else {
        out.insert(out.end(), byte_count, "\xEF\xBF\xBD");
      }
      bytes.clear();
      byte_count = 0;
    };
    for (std::string& token : tokens) {
      if (const std::optional<char> byte = ParseByteToken(token)) {
        bytes += *byte;
        ++byte_count;
      } else {
        flush();
        out.push_back(std::move(token));
      }
    }
    flush();
    return out;
  }

 private:
  static std::optional<char> ParseByteToken(std::string_view token) {
    if (token.size() != 6 || !token.starts_with("<0x") || token[5] != '>') return std::nullopt;
    const auto digit = [](char c) -> int {
      if (c >= '0' && c <= '9') return c - '0';
      if (c >= 'a' && c <= 'f') return c - 'a' + 10;
      if (c >= 'A' && c <= 'F') return c - 'A' + 10;
      return -1;
    };
    const int high = digit(token[3]);
    const int low = digit(token[4]);
    if (high < 0 || low < 0) return std::nullopt;
    return static_cast<char>(high * 16 + low);
  }
};

class FuseDecoder final : public Decoder {
 public:
  std::vector<std::string> DecodeChain(std::vector<std::string> tokens) const override {
    return {std::accumulate(tokens.begin(), tokens.end(), std::string())};
  }
};

// Removes up to `start` leading and `stop` trailing `content` characters from every token.
class StripDecoder final : public Decoder {
 public:
  StripDecoder(char32_t content, std::size_t start, std::size_t stop)
      : content_(content), start_(start), stop_(stop) {}
  std::vector<std::string> DecodeChain(std::vector<std::string> tokens) const override {
    for (std::string& token : tokens) {
      const std::vector<char32_t> chars = utf8::CodePoints(token);
      std::size_t begin = 0;
      while (begin < start_ && begin < chars.size() && chars[begin] == content_) ++begin;
      std::size_t end = chars.size();
      while (chars.size() - end < stop_ && end > begin && chars[end - 1] == content_) --end;
      std::string out;
      for (std::size_t i = begin; i < end; ++i) utf8::Append(chars[i], out);
      token = std::move(out);
    }
    return tokens;
  }

 private:
  char32_t content_;
  std::size_t start_;
  std::size_t stop_;
};

class SequenceProcessor final : public PostProcessor {
 public:
  explicit SequenceProcessor(std::vector<std::unique_ptr<PostProcessor>> steps)
      : steps_(std::move(steps)) {}
  void Process(std::vector<int64_t>& ids, bool add_special_tokens) const override {
    for (const auto& step : steps_) step->Process(ids, add_special_tokens);
  }

 private:
  std::vector<std::unique_ptr<PostProcessor>> steps_;
};

// TemplateProcessing's single-sequence template; also Bert/RobertaProcessing, which are
// "cls $A sep".
class TemplateProcessor final : public PostProcessor {
 public:
  // Each element is the ids of a special token, or std::nullopt for the sequence itself.
  explicit TemplateProcessor(std::vector<std::optional<std::vector<int64_t>>> pieces)
      : pieces_(std::move(pieces)) {}
  void Process(std::vector<int64_t>& ids, bool add_special_tokens) const override {
    if (!add_special_tokens) return;
    std::vector<int64_t> out;
    for (const auto& piece : pieces_) {
      const std::vector<int64_t>& part = piece ? *piece : ids;
      out.insert(out.end(), part.begin(), part.end());
    }
    ids = std::move(out);
  }

 private:
  std::vector<std::optional<std::vector<int64_t>>> pieces_;
};

class NoOpProcessor final : public PostProcessor {
 public:
  void Process(std::vector<int64_t>&, bool) const override {}
};

std::vector<int64_t> TemplateSpecialIds(const Json& special_tokens, const std::string& name,
                                        std::string_view where) {
  const std::string tokens_where = KeyPath(where, "special_tokens");
  if (!special_tokens.is_object() || !special_tokens.contains(name)) {
    Fail("\"{}\" has no entry for \"{}\", which the template uses", tokens_where, name);
  }
  const std::string token_where = KeyPath(tokens_where, name);
  const Json& ids = ArrayField(special_tokens[name], "ids", token_where);
  std::vector<int64_t> result;
  for (const Json& id : ids) {
    if (!id.is_number_unsigned()) {
      Fail("\"{}.ids\" must hold non-negative integers, not {}", token_where, id.dump());
    }
    result.push_back(id.get<int64_t>());
  }
  return result;
}

std::unique_ptr<PostProcessor> ParseTemplate(const Json& config, std::string_view where) {
  const std::string single_where = KeyPath(where, "single");
  const Json& single = ArrayField(config, "single", where);
  const Json& special_tokens = Field(config, "special_tokens", where);
  std::vector<std::optional<std::vector<int64_t>>> pieces;
  for (std::size_t i = 0; i < single.size(); ++i) {
    const Json& piece = single[i];
    const std::string piece_where = KeyPath(single_where, i);
    if (piece.is_object() && piece.contains("Sequence")) {
      const std::string id = StringField(piece["Sequence"], "id", KeyPath(piece_where, "Sequence"));
      if (id != "A") Fail("\"{}\": a single-sequence template can only use $A", piece_where);
      pieces.emplace_back(std::nullopt);
    } else if (piece.is_object() && piece.contains("SpecialToken")) {
      const std::string id =
          StringField(piece["SpecialToken"], "id", KeyPath(piece_where, "SpecialToken"));
      pieces.emplace_back(TemplateSpecialIds(special_tokens, id, where));
    } else {
      Fail("\"{}\" must be {{\"Sequence\": ...}} or {{\"SpecialToken\": ...}}, not {}", piece_where,
           piece.dump());
    }
  }
  return std::make_unique<TemplateProcessor>(std::move(pieces));
}

// Bert/RobertaProcessing's ["token", id] pairs.
int64_t PairId(const Json& config, std::string_view key, std::string_view where) {
  const Json& pair = Field(config, key, where);
  if (!pair.is_array() || pair.size() != 2 || !pair[0].is_string() ||
      !pair[1].is_number_unsigned()) {
    Fail("\"{}\" must be [\"token\", id], not {}", KeyPath(where, key), pair.dump());
  }
  return pair[1].get<int64_t>();
}

}  // namespace

std::unique_ptr<Decoder> ParseDecoder(const Json& config, std::string_view where) {
  if (config.is_null()) return nullptr;
  const std::string type = ComponentType(config, where);
  if (type == "Sequence") {
    const Json& list = ArrayField(config, "decoders", where);
    std::vector<std::unique_ptr<Decoder>> steps;
    for (std::size_t i = 0; i < list.size(); ++i) {
      const std::string step_where = KeyPath(KeyPath(where, "decoders"), i);
      if (list[i].is_null()) Fail("\"{}\" is null", step_where);
      steps.push_back(ParseDecoder(list[i], step_where));
    }
    return std::make_unique<SequenceDecoder>(std::move(steps));
  }
  if (type == "ByteLevel") return std::make_unique<ByteLevelDecoder>();
  if (type == "Metaspace") return std::make_unique<MetaspaceDecoder>(ParseMetaspace(config, where));
  if (type == "Replace") {
    return std::make_unique<ReplaceDecoder>(
        ParsePattern(Field(config, "pattern", where), KeyPath(where, "pattern")),
        StringField(config, "content", where));
  }
  if (type == "ByteFallback") return std::make_unique<ByteFallbackDecoder>();
  if (type == "Fuse") return std::make_unique<FuseDecoder>();
  if (type == "Strip") {
    return std::make_unique<StripDecoder>(CharField(config, "content", where),
                                          UintField(config, "start", where),
                                          UintField(config, "stop", where));
  }
  FailUnsupported("decoder", type, where, kSupportedDecoders);
}

std::unique_ptr<PostProcessor> ParsePostProcessor(const Json& config, std::string_view where) {
  if (config.is_null()) return nullptr;
  const std::string type = ComponentType(config, where);
  if (type == "Sequence") {
    const Json& list = ArrayField(config, "processors", where);
    std::vector<std::unique_ptr<PostProcessor>> steps;
    for (std::size_t i = 0; i < list.size(); ++i) {
      const std::string step_where = KeyPath(KeyPath(where, "processors"), i);
      if (list[i].is_null()) Fail("\"{}\" is null", step_where);
      steps.push_back(ParsePostProcessor(list[i], step_where));
    }
    return std::make_unique<SequenceProcessor>(std::move(steps));
  }
  if (type == "TemplateProcessing") return ParseTemplate(config, where);
  // Only offsets change; ids do not.
  if (type == "ByteLevel") return std::make_unique<NoOpProcessor>();
  if (type == "BertProcessing" || type == "RobertaProcessing") {
    std::vector<std::optional<std::vector<int64_t>>> pieces;
    pieces.emplace_back(std::vector<int64_t>{PairId(config, "cls", where)});
    pieces.emplace_back(std::nullopt);
    pieces.emplace_back(std::vector<int64_t>{PairId(config, "sep", where)});
    return std::make_unique<TemplateProcessor>(std::move(pieces));
  }
  FailUnsupported("post_processor", type, where, kSupportedProcessors);
}

}  // namespace adapter_job::tokenizer::internal
