// Reading pickle values: typed accessors with errors that name the field, and short renderings.
#include <fmt/format.h>

#include "adapter_job/checkpoint/pickle.h"
#include "adapter_job/core/error.h"

namespace adapter_job::pickle {

std::string_view KindName(Kind kind) {
  switch (kind) {
    case Kind::kNone:
      return "None";
    case Kind::kBool:
      return "bool";
    case Kind::kInt:
      return "int";
    case Kind::kBigInt:
      return "big int";
    case Kind::kFloat:
      return "float";
    case Kind::kString:
      return "str";
    case Kind::kBytes:
      return "bytes";
    case Kind::kTuple:
      return "tuple";
    case Kind::kList:
      return "list";
    case Kind::kDict:
      return "dict";
    case Kind::kSet:
      return "set";
    case Kind::kGlobal:
      return "global";
    case Kind::kObject:
      return "object";
    case Kind::kPersistentId:
      return "persistent id";
  }
  return "?";
}

bool Value::IsGlobal(std::string_view module, std::string_view qualname) const {
  return kind == Kind::kGlobal && text == module && name == qualname;
}

bool Value::IsInstanceOf(std::string_view module, std::string_view qualname) const {
  return kind == Kind::kObject && cls != nullptr && cls->IsGlobal(module, qualname);
}

std::string Describe(const Value& value, int max_depth) {
  const auto join = [&](const std::vector<Value*>& items) {
    std::string out;
    for (std::size_t i = 0; i < items.size(); ++i) {
      if (i == 8) return out + ", ...";
      if (i > 0) out += ", ";
      out += Describe(*items[i], max_depth - 1);
    }
    return out;
  };
  if (max_depth <= 0) return "...";
  switch (value.kind) {
    case Kind::kNone:
      return "None";
    case Kind::kBool:
      return value.boolean ? "True" : "False";
    case Kind::kInt:
      return std::to_string(value.integer);
    case Kind::kBigInt:
      return fmt::format("<{}-byte int>", value.text.size());
    case Kind::kFloat:
      return fmt::format("{}", value.real);
    case Kind::kString:
      return value.text.size() <= 80 ? "'" + value.text + "'"
                                     : "'" + value.text.substr(0, 77) + "...'";
    case Kind::kBytes:
      return fmt::format("<{} bytes>", value.text.size());
    case Kind::kTuple:
      return "(" + join(value.items) + (value.items.size() == 1 ? ",)" : ")");
    case Kind::kList:
      return "[" + join(value.items) + "]";
    case Kind::kSet:
      return "{" + join(value.items) + "}";
    case Kind::kDict:
      return fmt::format("<dict of {}>", value.entries.size());
    case Kind::kGlobal:
      return value.text + "." + value.name;
    case Kind::kObject:
      return (value.cls ? Describe(*value.cls, max_depth - 1) : "?") +
             (value.args ? Describe(*value.args, max_depth - 1) : "()");
    case Kind::kPersistentId:
      return "persistent_id(" + (value.state ? Describe(*value.state, max_depth - 1) : "") + ")";
  }
  return "?";
}

namespace {
[[noreturn]] void WrongKind(const Value& value, std::string_view what, std::string_view expected) {
  Fail("{} should be {}, found {}", what, expected, Describe(value));
}
}  // namespace

int64_t AsInt(const Value& value, std::string_view what) {
  if (value.kind == Kind::kInt) return value.integer;
  if (value.kind == Kind::kBool) return value.boolean ? 1 : 0;
  WrongKind(value, what, "an int");
}

bool AsBool(const Value& value, std::string_view what) {
  if (value.kind == Kind::kBool) return value.boolean;
  WrongKind(value, what, "a bool");
}

const std::string& AsString(const Value& value, std::string_view what) {
  if (value.kind == Kind::kString) return value.text;
  WrongKind(value, what, "a str");
}

const std::vector<Value*>& AsSequence(const Value& value, std::string_view what) {
  if (value.kind == Kind::kTuple || value.kind == Kind::kList) return value.items;
  WrongKind(value, what, "a tuple or list");
}

std::vector<int64_t> AsIntSequence(const Value& value, std::string_view what) {
  std::vector<int64_t> out;
  for (const Value* item : AsSequence(value, what)) {
    if (item->kind != Kind::kInt) WrongKind(value, what, "a sequence of ints");
    out.push_back(item->integer);
  }
  return out;
}

const Value* FindKey(const Value& dict, std::string_view key) {
  const Value* found = nullptr;
  for (const auto& [k, v] : dict.entries) {
    if (k->kind == Kind::kString && k->text == key) found = v;
  }
  return found;
}

const Value* FindAttribute(const Value& object, std::string_view name) {
  if (object.kind != Kind::kObject || object.state == nullptr) return nullptr;
  if (object.state->kind == Kind::kDict) return FindKey(*object.state, name);
  // (state, slotstate) from objects with __slots__: look in both.
  if (object.state->kind == Kind::kTuple && object.state->items.size() == 2) {
    for (const Value* part : object.state->items) {
      if (part->kind == Kind::kDict) {
        if (const Value* found = FindKey(*part, name)) return found;
      }
    }
  }
  return nullptr;
}

}  // namespace adapter_job::pickle
