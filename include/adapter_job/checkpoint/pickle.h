// A data-only pickle virtual machine (protocols 0-5).
//
// Python's unpickler imports modules and calls whatever the stream names. This one never does:
// GLOBAL yields an inert (module, name) value, and REDUCE/NEWOBJ/BUILD record the call as an
// Object node for an interpreter to read by class name (see dcp_metadata.cc, torch_save.cc).
// Only a handful of pure-data constructors (OrderedDict, set, _codecs.encode) are folded into
// plain values. Every value lives in the Document's arena, so self-referencing containers built
// through the memo neither leak nor recurse on destruction.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace adapter_job::pickle {

enum class Kind {
  kNone,
  kBool,
  kInt,
  kBigInt,  // did not fit int64; `text` holds little-endian two's complement bytes
  kFloat,
  kString,
  kBytes,
  kTuple,
  kList,
  kDict,
  kSet,
  kGlobal,  // `text` = module, `name` = qualified name
  kObject,  // cls(*args) or cls.__new__(cls, *args), plus BUILD state and list/dict items
  kPersistentId,
};

std::string_view KindName(Kind kind);

struct Value {
  Kind kind = Kind::kNone;
  bool boolean = false;
  int64_t integer = 0;
  double real = 0.0;
  std::string text;
  std::string name;
  std::vector<Value*> items;                       // tuple, list, set, object list items
  std::vector<std::pair<Value*, Value*>> entries;  // dict, object dict items
  Value* cls = nullptr;                            // object: the callable, usually a kGlobal
  Value* args = nullptr;                           // object: argument tuple
  Value* kwargs = nullptr;                         // object: NEWOBJ_EX keyword arguments
  Value* state = nullptr;                          // object: BUILD argument; persistent id: pid
  bool newobj = false;                             // object: created by NEWOBJ rather than REDUCE

  bool Is(Kind k) const { return kind == k; }
  bool IsGlobal(std::string_view module, std::string_view qualname) const;
  // For kObject: true when created from that class.
  bool IsInstanceOf(std::string_view module, std::string_view qualname) const;
};

// A short, depth-limited rendering for error messages, e.g. "torch.Size((4, 8))".
std::string Describe(const Value& value, int max_depth = 3);

struct Limits {
  std::size_t max_values = std::size_t{1} << 26;  // values created; bounds memory to the input
  std::size_t max_mark_depth = 1 << 16;
  std::size_t max_memo_index = std::size_t{1} << 32;
};

class Document {
 public:
  const Value& root() const { return *root_; }

 private:
  friend class Machine;
  std::deque<Value> arena_;
  const Value* root_ = nullptr;
};

// Throws FormatError("pickle: ... at byte N") for malformed or unsupported streams.
Document Unpickle(std::span<const std::byte> data, const Limits& limits = {});

// Accessors for interpreters: they throw FormatError with `what` naming the field.
int64_t AsInt(const Value& value, std::string_view what);
bool AsBool(const Value& value, std::string_view what);
const std::string& AsString(const Value& value, std::string_view what);
// A tuple or list of ints, e.g. torch.Size's argument.
std::vector<int64_t> AsIntSequence(const Value& value, std::string_view what);
const std::vector<Value*>& AsSequence(const Value& value, std::string_view what);
// The last entry whose key is the string `key` (last wins, as in a Python dict); null if absent.
const Value* FindKey(const Value& dict, std::string_view key);
// The attribute `name` from an object's dict-valued BUILD state; null if absent.
const Value* FindAttribute(const Value& object, std::string_view name);

}  // namespace adapter_job::pickle
