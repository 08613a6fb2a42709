// tokenizer.json "added_tokens": strings matched in the input before pre-tokenization and
// encoded whole (tokenizers' AddedVocabulary).
#include "adapter_job/core/error.h"
#include "tokenizer_internal.h"

namespace adapter_job::tokenizer::internal {
namespace {

AddedToken ParseAddedToken(const Json& config, std::string_view where) {
  AddedToken token;
  token.content = StringField(config, "content", where);
  token.special = BoolField(config, "special", where, false);
  token.single_word = BoolField(config, "single_word", where, false);
  token.lstrip = BoolField(config, "lstrip", where, false);
  token.rstrip = BoolField(config, "rstrip", where, false);
  token.normalized = BoolField(config, "normalized", where, !token.special);
  return token;
}

bool SameToken(const AddedToken& a, const AddedToken& b) {
  return a.content == b.content && a.single_word == b.single_word && a.lstrip == b.lstrip &&
         a.rstrip == b.rstrip && a.normalized == b.normalized && a.special == b.special;
}

// The regexes tokenizers checks around a match: \w$, ^\w, \s*$ and ^\s* (Rust regex classes).
bool EndsWithWord(std::string_view text) {
  if (text.empty()) return false;
  std::size_t pos = text.size() - 1;
  while (pos > 0 && (static_cast<unsigned char>(text[pos]) & 0xC0) == 0x80) --pos;
  std::size_t length = 0;
  return IsWordChar(utf8::DecodeAt(text, pos, &length));
}

bool StartsWithWord(std::string_view text) {
  std::size_t length = 0;
  return !text.empty() && IsWordChar(utf8::DecodeAt(text, 0, &length));
}

// Start of the whitespace run that ends `text`.
std::size_t TrailingSpaceStart(std::string_view text) {
  std::size_t begin = text.size();
  while (begin > 0) {
    std::size_t pos = begin - 1;
    while (pos > 0 && (static_cast<unsigned char>(text[pos]) & 0xC0) == 0x80) --pos;
    std::size_t length = 0;
    if (!text::IsWhiteSpace(utf8::DecodeAt(text, pos, &length))) break;
    begin = pos;
  }
  return begin;
}

// Bytes of the whitespace run that starts `text`.
std::size_t LeadingSpaceLength(std::string_view text) {
  std::size_t end = 0;
  for (std::size_t length = 0; end < text.size(); end += length) {
    if (!text::IsWhiteSpace(utf8::DecodeAt(text, end, &length))) break;
  }
  return end;
}

}  // namespace

void AddedVocabulary::Trie::Insert(std::string_view pattern, int64_t id) {
  uint32_t node = 0;
  for (const char c : pattern) {
    const auto byte = static_cast<unsigned char>(c);
    const auto it = nodes_[node].next.find(byte);
    if (it != nodes_[node].next.end()) {
      node = it->second;
      continue;
    }
    const auto child = static_cast<uint32_t>(nodes_.size());
    nodes_[node].next.emplace(byte, child);
    nodes_.emplace_back();
    node = child;
  }
  // Two tokens with one pattern (possible after normalization): the lower id wins, so the
  // choice does not depend on hash order.
  if (!nodes_[node].id || id < *nodes_[node].id) nodes_[node].id = id;
}

std::optional<std::pair<std::size_t, int64_t>> AddedVocabulary::Trie::LongestAt(
    std::string_view text, std::size_t pos) const {
  std::optional<std::pair<std::size_t, int64_t>> longest;
  uint32_t node = 0;
  for (std::size_t i = pos; i < text.size(); ++i) {
    const auto it = nodes_[node].next.find(static_cast<unsigned char>(text[i]));
    if (it == nodes_[node].next.end()) break;
    node = it->second;
    if (nodes_[node].id) longest = std::make_pair(i + 1 - pos, *nodes_[node].id);
  }
  return longest;
}

AddedVocabulary AddedVocabulary::Parse(const Json& tokens, const BpeModel& model,
                                       const Normalizer* normalizer, std::string_view where) {
  AddedVocabulary vocabulary;
  if (tokens.is_null()) return vocabulary;
  if (!tokens.is_array()) Fail("\"{}\" must be a list", where);
  // tokenizers numbers unknown contents from the model's vocabulary size on.
  auto next_id = static_cast<int64_t>(model.size());
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    const std::string token_where = KeyPath(where, i);
    WithContext([&] { return fmt::format("\"{}\"", token_where); },
                [&] {
                  vocabulary.Add(ParseAddedToken(tokens[i], token_where), model, normalizer,
                                 next_id);
                });
  }
  for (const auto& [id, token] : vocabulary.tokens_) {
    if (token.normalized) {
      const auto it = vocabulary.normalized_.find(id);
      vocabulary.normalized_trie_.Insert(
          it == vocabulary.normalized_.end() ? token.content : it->second, id);
    } else {
      vocabulary.raw_trie_.Insert(token.content, id);
    }
    vocabulary.id_limit_ = std::max(vocabulary.id_limit_, id + 1);
  }
  return vocabulary;
}

void AddedVocabulary::Add(AddedToken token, const BpeModel& model, const Normalizer* normalizer,
                          int64_t& next_id) {
  if (token.content.empty()) return;
  const auto known = ids_.find(token.content);
  if (known != ids_.end() && SameToken(tokens_.at(known->second), token)) return;

  int64_t id = 0;
  if (known != ids_.end()) {
    id = known->second;
  } else if (const std::optional<int64_t> model_id = model.TokenToId(token.content)) {
    id = *model_id;
  } else {
    id = next_id++;
  }
  if (token.normalized && normalizer != nullptr) {
    std::string normalized = token.content;
    normalizer->Normalize(normalized);
    if (normalized != token.content) normalized_[id] = std::move(normalized);
  }
  ids_[token.content] = id;
  if (token.special) special_.insert(token.content);
  tokens_[id] = std::move(token);
}

std::vector<Piece> AddedVocabulary::ExtractAndNormalize(std::string_view text,
                                                        const Normalizer* normalizer) const {
  std::vector<Piece> pieces{Piece{std::string(text), true, std::nullopt}};
  SplitPieces(pieces, [&](const Piece& piece, std::vector<Piece>& out) {
    SplitWithTrie(raw_trie_, piece, out);
  });
  // Normalization runs on each stretch between raw-matched tokens separately, so e.g. a
  // Prepend normalizer prefixes every stretch.
  SplitPieces(pieces, [&](const Piece& piece, std::vector<Piece>& out) {
    Piece normalized = piece;
    if (normalizer != nullptr) normalizer->Normalize(normalized.text);
    SplitWithTrie(normalized_trie_, normalized, out);
  });
  return pieces;
}

void AddedVocabulary::SplitWithTrie(const Trie& trie, const Piece& piece,
                                    std::vector<Piece>& out) const {
  const std::string& text = piece.text;
  if (text.empty() || trie.empty()) {
    out.push_back(piece);
    return;
  }
  const auto emit = [&](std::size_t begin, std::size_t end, std::optional<int64_t> id) {
    out.push_back(Piece{text.substr(begin, end - begin), piece.at_origin && begin == 0, id});
  };
  std::size_t done = 0;  // end of the last emitted token
  for (std::size_t pos = 0; pos < text.size();) {
    const auto match = trie.LongestAt(text, pos);
    if (!match) {
      ++pos;
      continue;
    }
    std::size_t start = pos;
    std::size_t stop = pos + match->first;
    // The search resumes after the match even when the checks below discard it.
    pos = stop;
    const AddedToken& token = tokens_.at(match->second);
    if (token.single_word &&
        ((start != 0 && EndsWithWord(std::string_view(text).substr(0, start))) ||
         (stop != text.size() && StartsWithWord(std::string_view(text).substr(stop))))) {
      continue;
    }
    if (token.lstrip) {
      start = std::max(TrailingSpaceStart(std::string_view(text).substr(0, start)), done);
    }
    if (token.rstrip) stop += LeadingSpaceLength(std::string_view(text).substr(stop));
    if (done < start) emit(done, start, std::nullopt);
    emit(start, stop, match->second);
    done = stop;
  }
  if (done != text.size()) emit(done, text.size(), std::nullopt);
}

const std::string* AddedVocabulary::IdToToken(int64_t id) const {
  if (const auto it = normalized_.find(id); it != normalized_.end()) return &it->second;
  if (const auto it = tokens_.find(id); it != tokens_.end()) return &it->second.content;
  return nullptr;
}

}  // namespace adapter_job::tokenizer::internal
