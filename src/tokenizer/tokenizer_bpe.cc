// tokenizer.json "model" of type BPE: splits a word into characters (or bytes, or unk) and
// applies the ranked merges as tokenizers' Word::merge_all does.
#include <fmt/format.h>

#include <queue>

#include "adapter_job/core/error.h"
#include "tokenizer_internal.h"

namespace adapter_job::tokenizer::internal {
namespace {

// Ids above this are not a real vocabulary but a corrupt file; refusing them keeps the
// id-indexed table (32 bytes an id) small: 2M ids is 8x Gemma 3's 262,144, the largest
// vocabulary we know of. At 2^27 one hostile id made a 5.5 GB table.
constexpr uint64_t kMaxTokenId = uint64_t{1} << 21;

std::optional<std::string> OptionalString(const Json& config, std::string_view key,
                                          std::string_view where) {
  const auto it = config.find(key);
  if (it == config.end() || it->is_null()) return std::nullopt;
  return StringField(config, key, where);
}

// Merges come as ["a", "b"] pairs or, in older files, as "a b" strings.
std::vector<std::pair<std::string, std::string>> ParseMerges(const Json& list,
                                                             std::string_view where) {
  std::vector<std::pair<std::string, std::string>> merges;
  merges.reserve(list.size());
  const bool pairs = !list.empty() && list[0].is_array();
  for (std::size_t i = 0; i < list.size(); ++i) {
    const Json& merge = list[i];
    if (pairs) {
      if (!merge.is_array() || merge.size() != 2 || !merge[0].is_string() ||
          !merge[1].is_string()) {
        Fail("\"{}\" must be a pair of strings, not {}", KeyPath(where, i), merge.dump());
      }
      merges.emplace_back(merge[0].get<std::string>(), merge[1].get<std::string>());
      continue;
    }
    if (!merge.is_string()) {
      Fail("\"{}\" must be a string \"a b\", not {}", KeyPath(where, i), merge.dump());
    }
    const std::string line = merge.get<std::string>();
    if (line.starts_with("#version")) continue;
    const std::size_t space = line.find(' ');
    if (space == std::string::npos || line.find(' ', space + 1) != std::string::npos) {
      Fail("\"{}\" must be two tokens separated by one space, not \"{}\"", KeyPath(where, i), line);
    }
    merges.emplace_back(line.substr(0, space), line.substr(space + 1));
  }
  return merges;
}

std::string ByteFallbackToken(unsigned char byte) { return fmt::format("<0x{:02X}>", byte); }

// One symbol of a word being merged; `length` (bytes of input) 0 marks a symbol merged away.
struct Symbol {
  uint32_t id = 0;
  int64_t prev = -1;
  int64_t next = -1;
  std::size_t length = 0;
};

struct Candidate {
  uint32_t rank = 0;
  std::size_t pos = 0;
  uint32_t new_id = 0;
};

// Orders the queue so that its top is the lowest rank, and the leftmost of equal ranks.
struct LaterCandidate {
  bool operator()(const Candidate& a, const Candidate& b) const {
    return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
  }
};

}  // namespace

BpeModel BpeModel::Parse(const Json& config, std::string_view where) {
  const std::string type = ComponentType(config, where);
  if (type != "BPE") FailUnsupported("model", type, where, "BPE");
  if (const auto it = config.find("dropout"); it != config.end() && !it->is_null()) {
    if (!it->is_number() || it->get<double>() != 0.0) {
      Fail("\"{}\": BPE dropout {} is not supported: encoding would be random",
           KeyPath(where, "dropout"), it->dump());
    }
  }
  BpeModel model;
  const Json& vocab = Field(config, "vocab", where);
  if (!vocab.is_object()) Fail("\"{}\" must be an object", KeyPath(where, "vocab"));
  uint64_t max_id = 0;
  for (const auto& [token, id] : vocab.items()) {
    if (!id.is_number_unsigned() || id.get<uint64_t>() >= kMaxTokenId) {
      Fail("\"{}\": token \"{}\" has id {}, not an integer in [0, {})", KeyPath(where, "vocab"),
           token, id.dump(), kMaxTokenId);
    }
    model.vocab_.emplace(token, static_cast<uint32_t>(id.get<uint64_t>()));
    max_id = std::max(max_id, id.get<uint64_t>());
  }
  model.id_to_token_.resize(vocab.empty() ? 0 : max_id + 1);
  for (const auto& [token, id] : model.vocab_) {
    if (!model.id_to_token_[id]) model.id_to_token_[id] = token;
  }

  model.unk_token_ = OptionalString(config, "unk_token", where);
  model.continuing_subword_prefix_ =
      OptionalString(config, "continuing_subword_prefix", where).value_or("");
  model.end_of_word_suffix_ = OptionalString(config, "end_of_word_suffix", where).value_or("");
  model.fuse_unk_ = BoolField(config, "fuse_unk", where, false);
  model.byte_fallback_ = BoolField(config, "byte_fallback", where, false);
  model.ignore_merges_ = BoolField(config, "ignore_merges", where, false);

  const std::string merges_where = KeyPath(where, "merges");
  const auto merges = ParseMerges(ArrayField(config, "merges", where), merges_where);
  const std::size_t prefix_length = model.continuing_subword_prefix_.size();
  for (std::size_t rank = 0; rank < merges.size(); ++rank) {
    const auto& [left, right] = merges[rank];
    const auto id_of = [&](const std::string& token) {
      const std::optional<uint32_t> id = model.Find(token);
      if (!id) {
        Fail("\"{}\": merge {} (\"{} {}\") uses \"{}\", which is not in the vocabulary",
             merges_where, rank, left, right, token);
      }
      return *id;
    };
    const uint32_t left_id = id_of(left);
    const uint32_t right_id = id_of(right);
    // The merged token drops the right part's continuing-subword prefix, as tokenizers does.
    if (right.size() < prefix_length) {
      Fail("\"{}\": merge {} (\"{} {}\"): \"{}\" is shorter than the continuing_subword_prefix",
           merges_where, rank, left, right, right);
    }
    const uint32_t new_id = id_of(left + right.substr(prefix_length));
    // Like tokenizers' HashMap, a repeated pair keeps its last rank.
    model.merges_[PairKey(left_id, right_id)] = {static_cast<uint32_t>(rank), new_id};
  }
  return model;
}

std::optional<uint32_t> BpeModel::Find(std::string_view token) const {
  const auto it = vocab_.find(token);
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

std::optional<int64_t> BpeModel::TokenToId(std::string_view token) const {
  const std::optional<uint32_t> id = Find(token);
  if (!id) return std::nullopt;
  return *id;
}

const std::string* BpeModel::IdToToken(int64_t id) const {
  if (id < 0 || id >= id_limit() || !id_to_token_[id]) return nullptr;
  return &*id_to_token_[id];
}

const BpeModel::Merge* BpeModel::FindMerge(uint32_t left, uint32_t right) const {
  const auto it = merges_.find(PairKey(left, right));
  return it == merges_.end() ? nullptr : &it->second;
}

void BpeModel::Tokenize(std::string_view word, std::vector<int64_t>& ids) const {
  if (word.empty()) return;
  if (ignore_merges_) {
    if (const std::optional<uint32_t> id = Find(word)) {
      ids.push_back(*id);
      return;
    }
  }
  MergeWord(word, ids);
}

void BpeModel::MergeWord(std::string_view word, std::vector<int64_t>& ids) const {
  std::vector<Symbol> symbols;
  const auto add = [&](uint32_t id, std::size_t length) {
    const auto index = static_cast<int64_t>(symbols.size());
    if (!symbols.empty()) symbols.back().next = index;
    symbols.push_back({id, index - 1, -1, length});
  };
  const auto unk_id = [&] {
    const std::optional<uint32_t> id = Find(*unk_token_);
    if (!id) Fail("BPE model: unk_token \"{}\" is not in the vocabulary", *unk_token_);
    return *id;
  };

  // Pending unknown characters (length 0: none). tokenizers adds them only when a known
  // character follows, so byte-fallback tokens in between land before them.
  uint32_t unk_pending_id = 0;
  std::size_t unk_pending_length = 0;
  const auto flush_unk = [&] {
    if (unk_pending_length != 0) add(unk_pending_id, unk_pending_length);
    unk_pending_length = 0;
  };
  for (std::size_t pos = 0, length = 0; pos < word.size(); pos += length) {
    length = utf8::LengthOf(word[pos]);
    std::string piece(word.substr(pos, length));
    if (pos != 0) piece.insert(0, continuing_subword_prefix_);
    if (pos + length == word.size()) piece += end_of_word_suffix_;

    if (const std::optional<uint32_t> id = Find(piece)) {
      flush_unk();
      add(*id, length);
      continue;
    }
    if (byte_fallback_) {
      std::vector<uint32_t> bytes;
      for (const char b : piece) {
        const std::optional<uint32_t> id = Find(ByteFallbackToken(static_cast<unsigned char>(b)));
        if (!id) break;
        bytes.push_back(*id);
      }
      if (bytes.size() == piece.size()) {
        for (const uint32_t id : bytes) add(id, 1);
        continue;
      }
    }
    if (!unk_token_) continue;  // no unk token: the character silently disappears
    if (unk_pending_length != 0 && fuse_unk_) {
      unk_pending_length += length;
    } else {
      flush_unk();
      unk_pending_id = unk_id();
      unk_pending_length = length;
    }
  }
  flush_unk();

  std::priority_queue<Candidate, std::vector<Candidate>, LaterCandidate> queue;
  for (std::size_t i = 0; i + 1 < symbols.size(); ++i) {
    if (const Merge* merge = FindMerge(symbols[i].id, symbols[i + 1].id)) {
      queue.push({merge->rank, i, merge->new_id});
    }
  }
  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& left = symbols[top.pos];
    if (left.length == 0 || left.next == -1) continue;
    const Symbol right = symbols[left.next];
    // Skip entries made stale by an earlier merge.
    const Merge* merge = FindMerge(left.id, right.id);
    if (merge == nullptr || merge->new_id != top.new_id) continue;

    symbols[left.next].length = 0;
    left.id = top.new_id;
    left.length += right.length;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = static_cast<int64_t>(top.pos);

    if (left.prev >= 0) {
      const auto prev = static_cast<std::size_t>(left.prev);
      if (const Merge* m = FindMerge(symbols[prev].id, left.id)) {
        queue.push({m->rank, prev, m->new_id});
      }
    }
    if (left.next >= 0) {
      if (const Merge* m = FindMerge(left.id, symbols[left.next].id)) {
        queue.push({m->rank, top.pos, m->new_id});
      }
    }
  }
  for (const Symbol& symbol : symbols) {
    if (symbol.length != 0) ids.push_back(symbol.id);
  }
}

}  // namespace adapter_job::tokenizer::internal
