// tokenizer::Tokenizer: reads tokenizer.json and runs the encode pipeline of `tokenizers`:
// added tokens -> normalizer -> pre_tokenizer -> model -> post_processor, and back through the
// decoder.
#include "adapter_job/tokenizer/tokenizer.h"

#include <algorithm>

#include "adapter_job/core/error.h"
#include "adapter_job/core/file.h"
#include "adapter_job/core/json_file.h"
#include "tokenizer_internal.h"

namespace adapter_job::tokenizer {

using internal::Json;

struct Tokenizer::Impl {
  std::unique_ptr<internal::Normalizer> normalizer;
  std::unique_ptr<internal::PreTokenizer> pre_tokenizer;
  std::unique_ptr<internal::PostProcessor> post_processor;
  std::unique_ptr<internal::Decoder> decoder;
  internal::BpeModel model;
  internal::AddedVocabulary added;

  static std::unique_ptr<const Impl> Parse(const Json& root);
};

namespace {

const Json& Optional(const Json& root, std::string_view key) {
  static const Json kNull;
  const auto it = root.find(key);
  return it == root.end() ? kNull : *it;
}

}  // namespace

Tokenizer Tokenizer::FromFile(const std::filesystem::path& tokenizer_json) {
  // Large vocabularies make files of tens of MB (Gemma 3's 262k tokens: ~33 MB); parsing takes
  // ~10-20 bytes of memory per byte, so the cap is 4x that, not the 1 GiB it was.
  constexpr std::size_t kMaxBytes = std::size_t{128} << 20;
  return FromJson(ReadTextFile(tokenizer_json, kMaxBytes), tokenizer_json.string());
}

Tokenizer Tokenizer::FromJson(std::string_view json_text, std::string_view source) {
  return WithContext([&] { return std::string(source); },
                     [&] {
                       const Json root = ParseJson<Json>(json_text);
                       try {
                         return Tokenizer(Impl::Parse(root));
                       } catch (const Json::exception& e) {
                         // Checks above name keys; this is a net for the odd type mismatch.
                         Fail("unexpected tokenizer.json content: {}", e.what());
                       }
                     });
}

std::unique_ptr<const Tokenizer::Impl> Tokenizer::Impl::Parse(const Json& root) {
  if (!root.is_object()) Fail("the top level must be a JSON object");
  if (const Json& version = Optional(root, "version"); !version.is_null() && version != "1.0") {
    Fail("\"version\" is {}, not \"1.0\"", version.dump());
  }
  auto impl = std::make_unique<Impl>();
  impl->normalizer = internal::ParseNormalizer(Optional(root, "normalizer"), "normalizer");
  impl->pre_tokenizer =
      internal::ParsePreTokenizer(Optional(root, "pre_tokenizer"), "pre_tokenizer");
  impl->post_processor =
      internal::ParsePostProcessor(Optional(root, "post_processor"), "post_processor");
  impl->decoder = internal::ParseDecoder(Optional(root, "decoder"), "decoder");
  impl->model = internal::BpeModel::Parse(internal::Field(root, "model", ""), "model");
  impl->added = internal::AddedVocabulary::Parse(Optional(root, "added_tokens"), impl->model,
                                                 impl->normalizer.get(), "added_tokens");
  return impl;
}

Tokenizer::Tokenizer(std::unique_ptr<const Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

std::vector<int64_t> Tokenizer::Encode(std::string_view text, bool add_special_tokens) const {
  if (const std::size_t bad = utf8::FindInvalid(text); bad != std::string_view::npos) {
    Fail("cannot encode: the text is not valid UTF-8 (byte {})", bad);
  }
  std::vector<internal::Piece> pieces =
      impl_->added.ExtractAndNormalize(text, impl_->normalizer.get());
  if (impl_->pre_tokenizer) impl_->pre_tokenizer->PreTokenize(pieces);
  std::vector<int64_t> ids;
  ids.reserve(text.size() / 2 + 4);
  for (const internal::Piece& piece : pieces) {
    if (piece.added_token) {
      ids.push_back(*piece.added_token);
    } else {
      impl_->model.Tokenize(piece.text, ids);
    }
  }
  if (impl_->post_processor) impl_->post_processor->Process(ids, add_special_tokens);
  return ids;
}

std::string Tokenizer::Decode(std::span<const int64_t> ids, bool skip_special_tokens) const {
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (const int64_t id : ids) {
    const std::string* token = impl_->added.IdToToken(id);
    if (token == nullptr) token = impl_->model.IdToToken(id);
    if (token == nullptr) continue;
    // Like tokenizers, this compares the text: a model token spelled like a special added
    // token is skipped too.
    if (skip_special_tokens && impl_->added.IsSpecial(*token)) continue;
    tokens.push_back(*token);
  }
  if (!impl_->decoder) {
    std::string text;
    for (std::size_t i = 0; i < tokens.size(); ++i) text += (i ? " " : "") + tokens[i];
    return text;
  }
  std::string text;
  for (const std::string& part : impl_->decoder->DecodeChain(std::move(tokens))) text += part;
  return text;
}

std::string Tokenizer::TokenText(int64_t id) const { return Decode(std::span(&id, 1)); }

int64_t Tokenizer::vocab_size() const {
  return std::max(impl_->model.id_limit(), impl_->added.id_limit());
}

}  // namespace adapter_job::tokenizer
