// Building blocks of tokenizer::Tokenizer, one per tokenizer.json component. Each one mirrors its
// counterpart in HuggingFace `tokenizers` (Rust), the reference the tests compare against; the
// comments name the Rust code where the behavior is surprising.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "adapter_job/core/utf8.h"
#include "adapter_job/text/regex.h"
#include "adapter_job/text/unicode.h"

namespace adapter_job::tokenizer::internal {

using Json = nlohmann::json;

// ---- JSON fields --------------------------------------------------------------------------
// `where` is the key path of `object` in the file, e.g. "pre_tokenizer.pretokenizers[1]"; every
// error names it.

std::string KeyPath(std::string_view where, std::string_view key);
std::string KeyPath(std::string_view where, std::size_t index);
const Json& Field(const Json& object, std::string_view key, std::string_view where);
std::string StringField(const Json& object, std::string_view key, std::string_view where);
// A missing or null key gives `fallback`; without one it is an error.
bool BoolField(const Json& object, std::string_view key, std::string_view where,
               std::optional<bool> fallback = std::nullopt);
uint64_t UintField(const Json& object, std::string_view key, std::string_view where);
// A string of exactly one character (Rust `char` fields).
char32_t CharField(const Json& object, std::string_view key, std::string_view where);
const Json& ArrayField(const Json& object, std::string_view key, std::string_view where);
// The "type" of a component object.
std::string ComponentType(const Json& component, std::string_view where);
[[noreturn]] void FailUnsupported(std::string_view kind, std::string_view type,
                                  std::string_view where, std::string_view supported);

// ---- Characters (UTF-8 is adapter_job::utf8, White_Space text::IsWhiteSpace)
// ------------------------------------

// Rust's regex \w: Alphabetic, Mark, Decimal_Number, Connector_Punctuation, Join_Control.
bool IsWordChar(char32_t code_point);
// Rust's char::to_lowercase, character by character (no context-dependent final sigma).
void LowercaseInPlace(std::string& text);

// ---- ByteLevel alphabet -------------------------------------------------------------------

// GPT-2's reversible mapping of every byte to a printable character.
std::string ByteLevelEncode(std::string_view bytes);
// The inverse for one token; std::nullopt if a character is outside the alphabet.
std::optional<std::string> ByteLevelDecode(std::string_view token);

// ---- Regular expressions ------------------------------------------------------------------

using text::Span;

// A tokenizer.json pattern with Oniguruma's conventions, which `tokenizers` uses (see
// text::Regex::Dialect::kOniguruma), or a plain string.
class Regex {
 public:
  enum class Syntax { kPattern, kLiteral };
  // Throws FormatError naming `where` if the pattern does not compile.
  Regex(std::string_view pattern, Syntax syntax, std::string_view where);

  // All non-overlapping matches, found as onig's find_iter finds them: an empty match right
  // where the previous match ended is skipped.
  std::vector<Span> FindAll(std::string_view text) const;
  // The first match.
  std::optional<Span> Find(std::string_view text) const { return regex_.Find(text); }
  bool Contains(std::string_view text) const { return Find(text).has_value(); }

 private:
  text::Regex regex_;
};

// A tokenizers.json pattern object: {"String": "..."} or {"Regex": "..."}.
Regex ParsePattern(const Json& pattern, std::string_view where);

// ---- Pieces of the input between the pipeline stages ----------------------------------------

struct Piece {
  std::string text;
  // Starts at offset 0 of the input (Metaspace's prepend_scheme "first" asks).
  bool at_origin = false;
  // An added token, never split, normalized or given to the model.
  std::optional<int64_t> added_token;
};

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };
SplitBehavior ParseSplitBehavior(const Json& object, std::string_view where);

// tokenizers' Pattern::find_matches: the matches and the gaps between them, in order.
struct Segment {
  Span span;
  bool is_match = false;
};
std::vector<Segment> FindSegments(const Regex& regex, std::string_view text);

// NormalizedString::split: appends the parts of `piece` that `behavior` keeps to `out`.
void SplitPiece(const Piece& piece, const std::vector<Segment>& segments, SplitBehavior behavior,
                std::vector<Piece>& out);

// PreTokenizedString::split: `split(piece, out)` replaces each piece that is not an added token;
// empty pieces are dropped.
template <typename SplitFn>
void SplitPieces(std::vector<Piece>& pieces, SplitFn&& split) {
  std::vector<Piece> result;
  result.reserve(pieces.size());
  for (Piece& piece : pieces) {
    if (piece.added_token) {
      result.push_back(std::move(piece));
    } else {
      split(piece, result);
    }
  }
  std::erase_if(result, [](const Piece& p) { return p.text.empty(); });
  pieces = std::move(result);
}

// ---- Components ---------------------------------------------------------------------------

class Normalizer {
 public:
  virtual ~Normalizer() = default;
  virtual void Normalize(std::string& text) const = 0;
};
// nullptr for a JSON null.
std::unique_ptr<Normalizer> ParseNormalizer(const Json& config, std::string_view where);

class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  virtual void PreTokenize(std::vector<Piece>& pieces) const = 0;
};
std::unique_ptr<PreTokenizer> ParsePreTokenizer(const Json& config, std::string_view where);

// Metaspace's settings, shared by the pre-tokenizer and the decoder of that name.
struct MetaspaceConfig {
  enum class Prepend { kAlways, kFirst, kNever };
  std::string replacement;  // one character
  Prepend prepend = Prepend::kAlways;
  bool split = true;
};
MetaspaceConfig ParseMetaspace(const Json& config, std::string_view where);

class Decoder {
 public:
  virtual ~Decoder() = default;
  virtual std::vector<std::string> DecodeChain(std::vector<std::string> tokens) const = 0;
};
std::unique_ptr<Decoder> ParseDecoder(const Json& config, std::string_view where);

class PostProcessor {
 public:
  virtual ~PostProcessor() = default;
  // Adds the special tokens around a single sequence.
  virtual void Process(std::vector<int64_t>& ids, bool add_special_tokens) const = 0;
};
std::unique_ptr<PostProcessor> ParsePostProcessor(const Json& config, std::string_view where);

// The BPE model: vocabulary, ranked merges and the handling of unknown characters.
class BpeModel {
 public:
  static BpeModel Parse(const Json& config, std::string_view where);

  // Appends the ids of one pre-tokenized word.
  void Tokenize(std::string_view word, std::vector<int64_t>& ids) const;
  std::optional<int64_t> TokenToId(std::string_view token) const;
  const std::string* IdToToken(int64_t id) const;
  // Entries in the vocabulary (tokenizers' get_vocab_size), and the highest id plus one.
  std::size_t size() const { return vocab_.size(); }
  int64_t id_limit() const { return static_cast<int64_t>(id_to_token_.size()); }

 private:
  struct StringHash {
    using is_transparent = void;
    std::size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };
  struct Merge {
    uint32_t rank = 0;
    uint32_t new_id = 0;
  };
  static uint64_t PairKey(uint32_t left, uint32_t right) {
    return (static_cast<uint64_t>(left) << 32) | right;
  }
  const Merge* FindMerge(uint32_t left, uint32_t right) const;
  std::optional<uint32_t> Find(std::string_view token) const;
  void MergeWord(std::string_view word, std::vector<int64_t>& ids) const;

  std::unordered_map<std::string, uint32_t, StringHash, std::equal_to<>> vocab_;
  std::vector<std::optional<std::string>> id_to_token_;
  std::unordered_map<uint64_t, Merge> merges_;
  std::optional<std::string> unk_token_;
  std::string continuing_subword_prefix_;
  std::string end_of_word_suffix_;
  bool fuse_unk_ = false;
  bool byte_fallback_ = false;
  bool ignore_merges_ = false;
};

struct AddedToken {
  std::string content;
  bool single_word = false;
  bool lstrip = false;
  bool rstrip = false;
  bool normalized = true;
  bool special = false;
};

// Added tokens: found in the input before pre-tokenization and kept whole (AddedVocabulary).
class AddedVocabulary {
 public:
  // Ids are assigned as tokenizers assigns them: the model's id for a known content, else the
  // next free id; the "id" in the file is not consulted.
  static AddedVocabulary Parse(const Json& tokens, const BpeModel& model,
                               const Normalizer* normalizer, std::string_view where);

  // extract_and_normalize: splits out the tokens matched on the raw text, normalizes the rest
  // and splits out the tokens matched on the normalized text.
  std::vector<Piece> ExtractAndNormalize(std::string_view text, const Normalizer* normalizer) const;

  // The text Decode uses for an added token id (its normalized form when it has one).
  const std::string* IdToToken(int64_t id) const;
  bool IsSpecial(const std::string& token) const { return special_.contains(token); }
  int64_t id_limit() const { return id_limit_; }

 private:
  // Leftmost-longest matching of many strings (tokenizers uses an Aho-Corasick automaton).
  class Trie {
   public:
    void Insert(std::string_view pattern, int64_t id);
    bool empty() const { return nodes_.size() == 1; }
    // Longest pattern starting at `pos`: (length, id).
    std::optional<std::pair<std::size_t, int64_t>> LongestAt(std::string_view text,
                                                             std::size_t pos) const;

   private:
    struct Node {
      std::unordered_map<unsigned char, uint32_t> next;
      std::optional<int64_t> id;
    };
    std::vector<Node> nodes_{1};
  };

  void Add(AddedToken token, const BpeModel& model, const Normalizer* normalizer, int64_t& next_id);
  void SplitWithTrie(const Trie& trie, const Piece& piece, std::vector<Piece>& out) const;

  std::unordered_map<std::string, int64_t> ids_;
  std::unordered_map<int64_t, AddedToken> tokens_;
  std::unordered_map<int64_t, std::string> normalized_;
  std::unordered_set<std::string> special_;
  Trie raw_trie_;         // tokens with normalized=false, matched on the raw input
  Trie normalized_trie_;  // tokens with normalized=true, matched on normalized pieces
  int64_t id_limit_ = 0;
};

}  // namespace adapter_job::tokenizer::internal
