// Typed access to tokenizer.json fields whose errors name the key path.
#include <fmt/format.h>

#include "adapter_job/core/error.h"
#include "tokenizer_internal.h"

namespace adapter_job::tokenizer::internal {

std::string KeyPath(std::string_view where, std::string_view key) {
  return where.empty() ? std::string(key) : fmt::format("{}.{}", where, key);
}

std::string KeyPath(std::string_view where, std::size_t index) {
  return fmt::format("{}[{}]", where, index);
}

const Json& Field(const Json& object, std::string_view key, std::string_view where) {
  if (!object.is_object()) {
    Fail("\"{}\" must be a JSON object, not {}", where, object.type_name());
  }
  const auto it = object.find(key);
  if (it == object.end()) Fail("\"{}\" is missing", KeyPath(where, key));
  return *it;
}

std::string StringField(const Json& object, std::string_view key, std::string_view where) {
  const Json& value = Field(object, key, where);
  if (!value.is_string()) {
    Fail("\"{}\" must be a string, not {}", KeyPath(where, key), value.type_name());
  }
  return value.get<std::string>();
}

bool BoolField(const Json& object, std::string_view key, std::string_view where,
               std::optional<bool> fallback) {
  if (fallback && object.is_object()) {
    const auto it = object.find(key);
    if (it == object.end() || it->is_null()) return *fallback;
  }
  const Json& value = Field(object, key, where);
  if (!value.is_boolean()) {
    Fail("\"{}\" must be true or false, not {}", KeyPath(where, key), value.type_name());
  }
  return value.get<bool>();
}

uint64_t UintField(const Json& object, std::string_view key, std::string_view where) {
  const Json& value = Field(object, key, where);
  if (!value.is_number_unsigned()) {
    Fail("\"{}\" must be a non-negative integer, not {}", KeyPath(where, key), value.dump());
  }
  return value.get<uint64_t>();
}

char32_t CharField(const Json& object, std::string_view key, std::string_view where) {
  const std::string text = StringField(object, key, where);
  std::size_t length = 0;
  if (text.empty() || !utf8::IsValid(text) ||
      (utf8::DecodeAt(text, 0, &length), length != text.size())) {
    Fail("\"{}\" must be a single character, not \"{}\"", KeyPath(where, key), text);
  }
  return utf8::DecodeAt(text, 0, &length);
}

const Json& ArrayField(const Json& object, std::string_view key, std::string_view where) {
  const Json& value = Field(object, key, where);
  if (!value.is_array()) {
    Fail("\"{}\" must be a list, not {}", KeyPath(where, key), value.type_name());
  }
  return value;
}

std::string ComponentType(const Json& component, std::string_view where) {
  return StringField(component, "type", where);
}

void FailUnsupported(std::string_view kind, std::string_view type, std::string_view where,
                     std::string_view supported) {
  Fail("\"{}\": {} type \"{}\" is not supported (supported: {})", where, kind, type, supported);
}

}  // namespace adapter_job::tokenizer::internal
