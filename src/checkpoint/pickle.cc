// Opcode semantics follow CPython's Lib/pickletools.py (the format's specification) and
// Lib/pickle.py's _Unpickler, minus every import and call.
#include "adapter_job/checkpoint/pickle.h"

#include <algorithm>
#include <array>
#include <charconv>
#include <cstring>
#include <unordered_map>

#include "adapter_job/core/error.h"
#include "adapter_job/core/utf8.h"

namespace adapter_job::pickle {
namespace {

// A line of the input as an error message quotes it: printable ASCII as it is, every other byte
// as \xNN, at most 40 bytes. Damaged input is bytes, and a message must stay text.
std::string Quoted(std::string_view line) {
  constexpr std::size_t kMaxBytes = 40;
  std::string out = "'";
  for (const char c : line.substr(0, kMaxBytes)) {
    const auto byte = static_cast<unsigned char>(c);
    if (byte >= 0x20 && byte < 0x7f && c != '\\') {
      out += c;
    } else {
      out += fmt::format("\\x{:02x}", byte);
    }
  }
  out += line.size() > kMaxBytes ? "'..." : "'";
  return out;
}

// Values a stream may create: at most one per kMinBytesPerValue input bytes (plus a few for tiny
// pickles), so memory stays proportional to the input. A DeepSeek-V3-sized .metadata (19 MB,
// bench/metadata_size.py) makes one per ~11 bytes with the shared values below; a hostile
// stream of EMPTY_LIST opcodes made one per byte, ~190 bytes of memory per input byte.
constexpr std::size_t kMinBytesPerValue = 4;
constexpr std::size_t kBaseValues = 4096;

enum Opcode : uint8_t {
  kMark = '(',
  kStop = '.',
  kPop = '0',
  kPopMark = '1',
  kDup = '2',
  kFloat = 'F',
  kInt = 'I',
  kBinInt = 'J',
  kBinInt1 = 'K',
  kLong = 'L',
  kBinInt2 = 'M',
  kNone = 'N',
  kPersId = 'P',
  kBinPersId = 'Q',
  kReduce = 'R',
  kString = 'S',
  kBinString = 'T',
  kShortBinString = 'U',
  kUnicode = 'V',
  kBinUnicode = 'X',
  kAppend = 'a',
  kBuild = 'b',
  kGlobal = 'c',
  kDict = 'd',
  kEmptyDict = '}',
  kAppends = 'e',
  kGet = 'g',
  kBinGet = 'h',
  kInst = 'i',
  kLongBinGet = 'j',
  kList = 'l',
  kEmptyList = ']',
  kObj = 'o',
  kPut = 'p',
  kBinPut = 'q',
  kLongBinPut = 'r',
  kSetItem = 's',
  kTuple = 't',
  kEmptyTuple = ')',
  kSetItems = 'u',
  kBinFloat = 'G',
  kProto = 0x80,
  kNewObj = 0x81,
  kExt1 = 0x82,
  kExt2 = 0x83,
  kExt4 = 0x84,
  kTuple1 = 0x85,
  kTuple2 = 0x86,
  kTuple3 = 0x87,
  kNewTrue = 0x88,
  kNewFalse = 0x89,
  kLong1 = 0x8a,
  kLong4 = 0x8b,
  kBinBytes = 'B',
  kShortBinBytes = 'C',
  kShortBinUnicode = 0x8c,
  kBinUnicode8 = 0x8d,
  kBinBytes8 = 0x8e,
  kEmptySet = 0x8f,
  kAddItems = 0x90,
  kFrozenSet = 0x91,
  kNewObjEx = 0x92,
  kStackGlobal = 0x93,
  kMemoize = 0x94,
  kFrame = 0x95,
  kByteArray8 = 0x96,
  kNextBuffer = 0x97,
  kReadOnlyBuffer = 0x98,
};

// Python pickles str with 'surrogatepass', so lone surrogates are written and must read back.
bool IsUtf8(std::string_view s) { return utf8::IsValid(s, utf8::Surrogates::kAllow); }

}  // namespace

class Machine {
 public:
  Machine(std::span<const std::byte> data, const Limits& limits)
      : data_(data),
        limits_(limits),
        max_values_(std::min(limits.max_values, data.size() / kMinBytesPerValue + kBaseValues)) {}

  Document Run() {
    while (true) {
      const std::size_t at = pos_;
      const uint8_t op = ReadU8();
      try {
        if (Step(op)) break;
      } catch (FormatError& e) {
        e.AddContext(fmt::format("pickle: opcode 0x{:02x} at byte {}", op, at));
        throw;
      }
    }
    if (!mark_stack_.empty()) Fail("pickle: STOP with an unclosed MARK");
    if (stack_.size() != 1)
      Fail("pickle: STOP with {} values on the stack, expected 1", stack_.size());
    doc_.root_ = stack_.back();
    return std::move(doc_);
  }

 private:
  // --- reading -------------------------------------------------------------------------------
  [[noreturn]] void Truncated(std::size_t need) const {
    Fail("pickle: truncated: need {} bytes at byte {} of {}", need, pos_, data_.size());
  }
  std::span<const std::byte> Take(uint64_t n) {
    if (n > data_.size() - pos_)
      Truncated(static_cast<std::size_t>(std::min<uint64_t>(n, SIZE_MAX)));
    auto out = data_.subspan(pos_, static_cast<std::size_t>(n));
    pos_ += static_cast<std::size_t>(n);
    return out;
  }
  uint64_t ReadLittleEndian(std::size_t n) {
    const auto bytes = Take(n);
    uint64_t v = 0;
    for (std::size_t i = 0; i < n; ++i) v |= static_cast<uint64_t>(bytes[i]) << (8 * i);
    return v;
  }
  uint8_t ReadU8() { return static_cast<uint8_t>(ReadLittleEndian(1)); }
  std::string ReadString(uint64_t n) {
    const auto bytes = Take(n);
    return std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  }
  std::string ReadLine() {
    const auto rest = data_.subspan(pos_);
    for (std::size_t i = 0; i < rest.size(); ++i) {
      if (rest[i] == std::byte{'\n'}) {
        std::string line(reinterpret_cast<const char*>(rest.data()), i);
        pos_ += i + 1;
        return line;
      }
    }
    Fail("pickle: truncated: text argument without a newline at byte {}", pos_);
  }

  // --- values --------------------------------------------------------------------------------
  Value* New(Kind kind) {
    if (doc_.arena_.size() >= max_values_) {
      Fail("pickle: more than {} values in {} bytes", max_values_, data_.size());
    }
    Value& v = doc_.arena_.emplace_back();
    v.kind = kind;
    return &v;
  }
  // None, booleans, small ints and the empty tuple are immutable (no opcode changes them in
  // place), so one value of each serves every occurrence: a .metadata is ~30% small ints.
  Value* Shared(Value*& slot, Kind kind) {
    if (slot == nullptr) slot = New(kind);
    return slot;
  }
  Value* None() { return Shared(none_, Kind::kNone); }
  Value* EmptyTuple() { return Shared(empty_tuple_, Kind::kTuple); }
  Value* NewInt(int64_t i) {
    const bool small = i >= 0 && i < static_cast<int64_t>(small_ints_.size());
    if (small && small_ints_[static_cast<std::size_t>(i)] != nullptr) {
      return small_ints_[static_cast<std::size_t>(i)];
    }
    Value* v = New(Kind::kInt);
    v->integer = i;
    if (small) small_ints_[static_cast<std::size_t>(i)] = v;
    return v;
  }
  Value* NewText(Kind kind, std::string text) {
    if (kind == Kind::kString && !IsUtf8(text)) Fail("pickle: string is not valid UTF-8");
    Value* v = New(kind);
    v->text = std::move(text);
    return v;
  }
  Value* NewSequence(Kind kind, std::vector<Value*> items) {
    if (kind == Kind::kTuple && items.empty()) return EmptyTuple();
    Value* v = New(kind);
    v->items = std::move(items);
    return v;
  }
  // Little-endian two's complement of any width (LONG1/LONG4).
  Value* NewLong(std::span<const std::byte> bytes) {
    if (bytes.empty()) return NewInt(0);
    const bool negative = (static_cast<uint8_t>(bytes.back()) & 0x80) != 0;
    std::size_t significant = bytes.size();
    const auto fill = std::byte{negative ? uint8_t{0xff} : uint8_t{0}};
    while (significant > 8 && bytes[significant - 1] == fill) --significant;
    if (significant <= 8) {
      uint64_t v = negative ? ~uint64_t{0} : 0;
      for (std::size_t i = 0; i < std::min<std::size_t>(bytes.size(), 8); ++i) {
        v &= ~(uint64_t{0xff} << (8 * i));
        v |= static_cast<uint64_t>(bytes[i]) << (8 * i);
      }
      const auto value = static_cast<int64_t>(v);
      // A value that needs 8 bytes keeps its sign only if bit 63 agrees with the sign byte.
      if ((value < 0) == negative) return NewInt(value);
    }
    Value* v = New(Kind::kBigInt);
    v->text.assign(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    return v;
  }
  Value* NewDecimal(const std::string& line, bool allow_bool) {
    if (allow_bool && line == "00") return NewBool(false);
    if (allow_bool && line == "01") return NewBool(true);
    std::string_view digits = line;
    if (!digits.empty() && digits.back() == 'L') digits.remove_suffix(1);
    int64_t value = 0;
    const auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), value);
    if (ec != std::errc() || end != digits.data() + digits.size()) {
      Fail("pickle: {} is not an integer that fits 64 bits", Quoted(line));
    }
    return NewInt(value);
  }
  Value* NewBool(bool b) {
    Value*& slot = b ? true_ : false_;
    if (slot == nullptr) {
      slot = New(Kind::kBool);
      slot->boolean = b;
    }
    return slot;
  }
  Value* NewGlobal(std::string module, std::string name) {
    if (!IsUtf8(module) || !IsUtf8(name)) Fail("pickle: global name is not valid UTF-8");
    Value* v = New(Kind::kGlobal);
    v->text = std::move(module);
    v->name = std::move(name);
    return v;
  }
  Value* NewObject(Value* cls, Value* args, bool newobj) {
    // Pure-data constructors become the data they build; nothing else is interpreted here.
    const bool args_tuple = args->kind == Kind::kTuple;
    if (cls->IsGlobal("collections", "OrderedDict") && args_tuple && args->items.empty()) {
      return New(Kind::kDict);
    }
    if ((cls->IsGlobal("builtins", "set") || cls->IsGlobal("builtins", "frozenset") ||
         cls->IsGlobal("__builtin__", "set")) &&
        args_tuple && args->items.size() <= 1) {
      Value* set = New(Kind::kSet);
      if (!args->items.empty()) set->items = AsSequence(*args->items[0], "set() argument");
      return set;
    }
    if (cls->IsGlobal("_codecs", "encode") && args_tuple && args->items.size() == 2 &&
        args->items[0]->kind == Kind::kString && args->items[1]->kind == Kind::kString &&
        args->items[1]->text == "latin1") {
      return Latin1Bytes(args->items[0]->text);
    }
    Value* v = New(Kind::kObject);
    v->cls = cls;
    v->args = args;
    v->newobj = newobj;
    return v;
  }
  // Protocol 2 pickles `bytes` as _codecs.encode(<latin-1 text as str>, 'latin1').
  Value* Latin1Bytes(const std::string& utf8) {
    std::string out;
    for (std::size_t i = 0; i < utf8.size(); ++i) {
      const auto c = static_cast<unsigned char>(utf8[i]);
      if (c < 0x80) {
        out.push_back(static_cast<char>(c));
      } else if ((c & 0xe0) == 0xc0 && i + 1 < utf8.size() && c <= 0xc3) {
        out.push_back(static_cast<char>(((c & 0x1f) << 6) | (utf8[++i] & 0x3f)));
      } else {
        Fail("pickle: _codecs.encode(..., 'latin1') of a character above U+00FF");
      }
    }
    return NewText(Kind::kBytes, std::move(out));
  }

  // --- stacks --------------------------------------------------------------------------------
  void Push(Value* v) { stack_.push_back(v); }
  Value* Pop() {
    if (stack_.empty()) Fail("pickle: stack underflow");
    Value* v = stack_.back();
    stack_.pop_back();
    return v;
  }
  Value* Top() {
    if (stack_.empty()) Fail("pickle: stack underflow");
    return stack_.back();
  }
  void PushMark() {
    if (mark_stack_.size() >= limits_.max_mark_depth) {
      Fail("pickle: more than {} nested MARKs", limits_.max_mark_depth);
    }
    mark_stack_.push_back(std::move(stack_));
    stack_.clear();
  }
  std::vector<Value*> PopMark() {
    if (mark_stack_.empty()) Fail("pickle: no MARK to pop");
    std::vector<Value*> items = std::move(stack_);
    stack_ = std::move(mark_stack_.back());
    mark_stack_.pop_back();
    return items;
  }
  void Memoize(uint64_t index, Value* v) {
    if (index >= limits_.max_memo_index) Fail("pickle: memo index {} too large", index);
    // Memo indexes are dense in practice (MEMOIZE numbers them 0, 1, ...): a vector costs 8
    // bytes an entry where a hash map node costs ~64.
    if (index < memo_dense_.size()) {
      memo_dense_[index] = v;
    } else if (index == memo_dense_.size()) {
      memo_dense_.push_back(v);
      memo_sparse_.erase(index);
    } else {
      memo_sparse_[index] = v;
    }
  }
  std::size_t MemoSize() const { return memo_dense_.size() + memo_sparse_.size(); }
  Value* Recall(uint64_t index) {
    if (index < memo_dense_.size()) return memo_dense_[index];
    const auto it = memo_sparse_.find(index);
    if (it == memo_sparse_.end()) Fail("pickle: memo index {} was never stored", index);
    return it->second;
  }

  static void AddEntries(Value* target, const std::vector<Value*>& flat) {
    if (flat.size() % 2 != 0) Fail("pickle: odd number of items for a dict");
    if (target->kind != Kind::kDict && target->kind != Kind::kObject) {
      Fail("pickle: setting items on a {}", KindName(target->kind));
    }
    for (std::size_t i = 0; i < flat.size(); i += 2)
      target->entries.emplace_back(flat[i], flat[i + 1]);
  }
  static void AddItems(Value* target, const std::vector<Value*>& items, bool set) {
    const bool ok = set ? target->kind == Kind::kSet
                        : (target->kind == Kind::kList || target->kind == Kind::kObject);
    if (!ok) Fail("pickle: appending to a {}", KindName(target->kind));
    target->items.insert(target->items.end(), items.begin(), items.end());
  }

  // Returns true on STOP.
  bool Step(uint8_t op) {
    switch (op) {
      case kProto: {
        const uint8_t version = ReadU8();
        if (version > 5) Fail("pickle: protocol {} is newer than 5", version);
        return false;
      }
      case kFrame: {
        const uint64_t length = ReadLittleEndian(8);
        if (length > data_.size() - pos_)
          Truncated(static_cast<std::size_t>(std::min<uint64_t>(length, SIZE_MAX)));
        return false;
      }
      case kStop:
        return true;
      case kMark:
        PushMark();
        return false;
      case kPop:
        if (!stack_.empty()) {
          stack_.pop_back();
        } else {
          PopMark();
        }
        return false;
      case kPopMark:
        PopMark();
        return false;
      case kDup:
        Push(Top());
        return false;

      case kNone:
        Push(None());
        return false;
      case kNewTrue:
        Push(NewBool(true));
        return false;
      case kNewFalse:
        Push(NewBool(false));
        return false;
      case kInt:
        Push(NewDecimal(ReadLine(), /*allow_bool=*/true));
        return false;
      case kLong:
        Push(NewDecimal(ReadLine(), /*allow_bool=*/false));
        return false;
      case kBinInt:
        Push(NewInt(static_cast<int32_t>(ReadLittleEndian(4))));
        return false;
      case kBinInt1:
        Push(NewInt(ReadU8()));
        return false;
      case kBinInt2:
        Push(NewInt(static_cast<int64_t>(ReadLittleEndian(2))));
        return false;
      case kLong1:
        Push(NewLong(Take(ReadU8())));
        return false;
      case kLong4: {
        const auto n = static_cast<int32_t>(ReadLittleEndian(4));
        if (n < 0) Fail("pickle: LONG4 with negative length {}", n);
        Push(NewLong(Take(static_cast<uint64_t>(n))));
        return false;
      }
      case kBinFloat: {
        const uint64_t bits = __builtin_bswap64(ReadLittleEndian(8));  // big-endian on disk
        Value* v = New(Kind::kFloat);
        std::memcpy(&v->real, &bits, sizeof bits);
        Push(v);
        return false;
      }
      case kFloat: {
        const std::string line = ReadLine();
        Value* v = New(Kind::kFloat);
        const auto [end, ec] = std::from_chars(line.data(), line.data() + line.size(), v->real);
        if (ec != std::errc() || end != line.data() + line.size()) {
          Fail("pickle: {} is not a float", Quoted(line));
        }
        Push(v);
        return false;
      }

      case kShortBinUnicode:
        Push(NewText(Kind::kString, ReadString(ReadU8())));
        return false;
      case kBinUnicode:
        Push(NewText(Kind::kString, ReadString(ReadLittleEndian(4))));
        return false;
      case kBinUnicode8:
        Push(NewText(Kind::kString, ReadString(ReadLittleEndian(8))));
        return false;
      case kUnicode:  // raw-unicode-escape; escapes are kept verbatim
        Push(NewText(Kind::kString, ReadLine()));
        return false;
      case kShortBinString:  // Python 2 str: bytes that Python 3 decodes as text
        Push(NewText(Kind::kBytes, ReadString(ReadU8())));
        return false;
      case kBinString: {
        const auto n = static_cast<int32_t>(ReadLittleEndian(4));
        if (n < 0) Fail("pickle: BINSTRING with negative length {}", n);
        Push(NewText(Kind::kBytes, ReadString(static_cast<uint64_t>(n))));
        return false;
      }
      case kString: {
        std::string line = ReadLine();
        if (line.size() < 2 || (line.front() != '\'' && line.front() != '"') ||
            line.back() != line.front()) {
          Fail("pickle: STRING argument is not quoted");
        }
        Push(NewText(Kind::kBytes, line.substr(1, line.size() - 2)));
        return false;
      }
      case kShortBinBytes:
        Push(NewText(Kind::kBytes, ReadString(ReadU8())));
        return false;
      case kBinBytes:
        Push(NewText(Kind::kBytes, ReadString(ReadLittleEndian(4))));
        return false;
      case kBinBytes8:
      case kByteArray8:
        Push(NewText(Kind::kBytes, ReadString(ReadLittleEndian(8))));
        return false;

      case kEmptyTuple:
        Push(EmptyTuple());
        return false;
      case kTuple:
        Push(NewSequence(Kind::kTuple, PopMark()));
        return false;
      case kTuple1:
      case kTuple2:
      case kTuple3: {
        const std::size_t n = op - kTuple1 + 1;
        if (stack_.size() < n) Fail("pickle: stack underflow");
        std::vector<Value*> items(stack_.end() - static_cast<std::ptrdiff_t>(n), stack_.end());
        stack_.resize(stack_.size() - n);
        Push(NewSequence(Kind::kTuple, std::move(items)));
        return false;
      }
      case kEmptyList:
        Push(New(Kind::kList));
        return false;
      case kList:
        Push(NewSequence(Kind::kList, PopMark()));
        return false;
      case kAppend: {
        Value* item = Pop();
        AddItems(Top(), {item}, /*set=*/false);
        return false;
      }
      case kAppends: {
        const auto items = PopMark();
        AddItems(Top(), items, /*set=*/false);
        return false;
      }
      case kEmptyDict:
        Push(New(Kind::kDict));
        return false;
      case kDict: {
        Value* dict = New(Kind::kDict);
        AddEntries(dict, PopMark());
        Push(dict);
        return false;
      }
      case kSetItem: {
        Value* value = Pop();
        Value* key = Pop();
        AddEntries(Top(), {key, value});
        return false;
      }
      case kSetItems: {
        const auto flat = PopMark();
        AddEntries(Top(), flat);
        return false;
      }
      case kEmptySet:
        Push(New(Kind::kSet));
        return false;
      case kAddItems: {
        const auto items = PopMark();
        AddItems(Top(), items, /*set=*/true);
        return false;
      }
      case kFrozenSet:
        Push(NewSequence(Kind::kSet, PopMark()));
        return false;

      case kGlobal: {
        std::string module = ReadLine();
        std::string name = ReadLine();
        Push(NewGlobal(std::move(module), std::move(name)));
        return false;
      }
      case kStackGlobal: {
        Value* name = Pop();
        Value* module = Pop();
        if (!module->Is(Kind::kString) || !name->Is(Kind::kString)) {
          Fail("pickle: STACK_GLOBAL needs two strings, got {} and {}", KindName(module->kind),
               KindName(name->kind));
        }
        Push(NewGlobal(module->text, name->text));
        return false;
      }
      case kReduce: {
        Value* args = Pop();
        Value* callable = Pop();
        if (!args->Is(Kind::kTuple))
          Fail("pickle: REDUCE arguments are a {}, not a tuple", KindName(args->kind));
        Push(NewObject(callable, args, /*newobj=*/false));
        return false;
      }
      case kNewObj: {
        Value* args = Pop();
        Value* cls = Pop();
        if (!args->Is(Kind::kTuple))
          Fail("pickle: NEWOBJ arguments are a {}, not a tuple", KindName(args->kind));
        Push(NewObject(cls, args, /*newobj=*/true));
        return false;
      }
      case kNewObjEx: {
        Value* kwargs = Pop();
        Value* args = Pop();
        Value* cls = Pop();
        if (!args->Is(Kind::kTuple) || !kwargs->Is(Kind::kDict)) {
          Fail("pickle: NEWOBJ_EX needs a tuple and a dict");
        }
        Value* object = NewObject(cls, args, /*newobj=*/true);
        object->kwargs = kwargs;
        Push(object);
        return false;
      }
      case kObj: {
        auto items = PopMark();
        if (items.empty()) Fail("pickle: OBJ without a class");
        Value* cls = items.front();
        items.erase(items.begin());
        Push(NewObject(cls, NewSequence(Kind::kTuple, std::move(items)), /*newobj=*/false));
        return false;
      }
      case kInst: {
        std::string module = ReadLine();
        std::string name = ReadLine();
        Value* cls = NewGlobal(std::move(module), std::move(name));
        Push(NewObject(cls, NewSequence(Kind::kTuple, PopMark()), /*newobj=*/false));
        return false;
      }
      case kBuild: {
        Value* state = Pop();
        Value* target = Top();
        if (!target->Is(Kind::kObject)) Fail("pickle: BUILD on a {}", KindName(target->kind));
        target->state = state;
        return false;
      }
      case kPersId: {
        Value* id = New(Kind::kPersistentId);
        id->state = NewText(Kind::kString, ReadLine());
        Push(id);
        return false;
      }
      case kBinPersId: {
        Value* id = New(Kind::kPersistentId);
        id->state = Pop();
        Push(id);
        return false;
      }

      case kPut: {
        const std::string line = ReadLine();
        uint64_t index = 0;
        const auto [end, ec] = std::from_chars(line.data(), line.data() + line.size(), index);
        if (ec != std::errc() || end != line.data() + line.size())
          Fail("pickle: bad PUT index {}", Quoted(line));
        Memoize(index, Top());
        return false;
      }
      case kBinPut:
        Memoize(ReadU8(), Top());
        return false;
      case kLongBinPut:
        Memoize(ReadLittleEndian(4), Top());
        return false;
      case kMemoize:
        Memoize(MemoSize(), Top());
        return false;
      case kGet: {
        const std::string line = ReadLine();
        uint64_t index = 0;
        const auto [end, ec] = std::from_chars(line.data(), line.data() + line.size(), index);
        if (ec != std::errc() || end != line.data() + line.size())
          Fail("pickle: bad GET index {}", Quoted(line));
        Push(Recall(index));
        return false;
      }
      case kBinGet:
        Push(Recall(ReadU8()));
        return false;
      case kLongBinGet:
        Push(Recall(ReadLittleEndian(4)));
        return false;

      case kExt1:
      case kExt2:
      case kExt4:
        Fail("pickle: copyreg extension codes (EXT1/2/4) are not supported");
      case kNextBuffer:
      case kReadOnlyBuffer:
        Fail("pickle: out-of-band buffers (NEXT_BUFFER) are not supported");
      default:
        Fail("pickle: unknown opcode");
    }
  }

  std::span<const std::byte> data_;
  Limits limits_;
  std::size_t max_values_;
  std::size_t pos_ = 0;
  Document doc_;
  std::vector<Value*> stack_;
  std::vector<std::vector<Value*>> mark_stack_;
  std::vector<Value*> memo_dense_;
  std::unordered_map<uint64_t, Value*> memo_sparse_;
  Value* none_ = nullptr;
  Value* true_ = nullptr;
  Value* false_ = nullptr;
  Value* empty_tuple_ = nullptr;
  std::array<Value*, 256> small_ints_{};
};

Document Unpickle(std::span<const std::byte> data, const Limits& limits) {
  return Machine(data, limits).Run();
}

}  // namespace adapter_job::pickle
