#include "yaml_values.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>

#include "adapter_job/core/error.h"

namespace adapter_job::checkpoint {
namespace {

enum class Kind { kNull, kBool, kInt, kFloat, kString, kMap, kList };

// A scalar as YAML resolves it (the 1.1 rules PyYAML writes run_config.yaml with): quoted text is
// a string whatever it looks like, and a plain `nan` is the string "nan", not a float.
struct Scalar {
  Kind kind = Kind::kString;
  int64_t i = 0;
  double d = 0;
  bool b = false;
};

bool OneOf(std::string_view text, std::initializer_list<std::string_view> words) {
  return std::find(words.begin(), words.end(), text) != words.end();
}

std::optional<int64_t> ParseInt(std::string_view text) {
  if (text.starts_with('+')) text.remove_prefix(1);
  int64_t value = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size()) return std::nullopt;
  return value;
}

std::optional<double> ParseFloat(std::string_view text) {
  if (text.starts_with('+')) text.remove_prefix(1);
  std::string_view unsigned_text = text.starts_with('-') ? text.substr(1) : text;
  if (OneOf(unsigned_text, {".inf", ".Inf", ".INF"}))
    return text.starts_with('-') ? -HUGE_VAL : HUGE_VAL;
  if (OneOf(text, {".nan", ".NaN", ".NAN"})) return std::numeric_limits<double>::quiet_NaN();
  // from_chars also reads "nan" and "inf", which YAML reads as strings.
  const bool numeric = std::all_of(text.begin(), text.end(), [](char c) {
    return (c >= '0' && c <= '9') || c == '.' || c == 'e' || c == 'E' || c == '-' || c == '+';
  });
  if (!numeric ||
      std::none_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; })) {
    return std::nullopt;
  }
  double value = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec == std::errc::result_out_of_range) return text.starts_with('-') ? -HUGE_VAL : HUGE_VAL;
  if (ec != std::errc() || end != text.data() + text.size()) return std::nullopt;
  return value;
}

Scalar Resolve(const YAML::Node& node) {
  Scalar s;
  if (!node.IsDefined() || node.IsNull()) return {Kind::kNull};
  if (node.IsMap()) return {Kind::kMap};
  if (node.IsSequence()) return {Kind::kList};
  const std::string& tag = node.Tag();
  const std::string& text = node.Scalar();
  if (tag == "!" || tag.ends_with(":str")) return {Kind::kString};
  if (OneOf(text, {"true", "True", "TRUE", "yes", "Yes", "YES", "on", "On", "ON"})) {
    s.kind = Kind::kBool;
    s.b = true;
  } else if (OneOf(text, {"false", "False", "FALSE", "no", "No", "NO", "off", "Off", "OFF"})) {
    s.kind = Kind::kBool;
  } else if (const auto i = ParseInt(text)) {
    s.kind = Kind::kInt;
    s.i = *i;
    s.d = static_cast<double>(*i);
  } else if (const auto d = ParseFloat(text)) {
    s.kind = Kind::kFloat;  // an integer too large for int64 lands here too
    s.d = *d;
  }
  return s;
}

}  // namespace

std::string DescribeYaml(const YAML::Node& node) {
  if (!node.IsDefined() || node.IsNull()) return "null";
  if (node.IsScalar()) {
    return node.Tag() == "!" ? fmt::format("'{}'", node.Scalar()) : node.Scalar();
  }
  YAML::Emitter out;
  out.SetMapFormat(YAML::Flow);
  out.SetSeqFormat(YAML::Flow);
  out.SetNullFormat(YAML::LowerNull);
  out << node;
  std::string text = out.c_str();
  if (text.size() > 80) text = text.substr(0, 77) + "...";
  return text;
}

std::optional<YAML::Node> YamlSection::Get(const char* key) const {
  const YAML::Node value = node[key];
  if (!value.IsDefined() || value.IsNull()) return std::nullopt;
  return value;
}

void YamlSection::Bad(const char* key, const YAML::Node& value, std::string_view expected) const {
  Fail("{}: {} is {}; expected {}", file->string(), KeyPath(key), DescribeYaml(value), expected);
}

void YamlSection::RejectNull(const char* key, std::string_view expected) const {
  const YAML::Node value = node[key];
  if (value.IsDefined() && value.IsNull()) Bad(key, value, expected);
}

std::optional<int64_t> YamlSection::Int(const char* key, int64_t min, int64_t max) const {
  const auto value = Get(key);
  if (!value) return std::nullopt;
  const Scalar s = Resolve(*value);
  if (s.kind != Kind::kInt || s.i < min || s.i > max) {
    Bad(key, *value,
        max == std::numeric_limits<int64_t>::max()
            ? fmt::format("an integer >= {}", min)
            : fmt::format("an integer from {} to {}", min, max));
  }
  return s.i;
}

std::optional<bool> YamlSection::Bool(const char* key) const {
  const auto value = Get(key);
  if (!value) return std::nullopt;
  const Scalar s = Resolve(*value);
  if (s.kind != Kind::kBool) Bad(key, *value, "true or false");
  return s.b;
}

std::optional<std::string> YamlSection::String(const char* key) const {
  const auto value = Get(key);
  if (!value) return std::nullopt;
  if (Resolve(*value).kind != Kind::kString) Bad(key, *value, "a string");
  return value->Scalar();
}

std::optional<nlohmann::json> YamlSection::Number(const char* key, double min, bool min_inclusive,
                                                  double max, bool max_inclusive,
                                                  std::string_view expected) const {
  const auto value = Get(key);
  if (!value) return std::nullopt;
  const Scalar s = Resolve(*value);
  const bool number = s.kind == Kind::kInt || s.kind == Kind::kFloat;
  const bool in_range = std::isfinite(s.d) && (min_inclusive ? s.d >= min : s.d > min) &&
                        (max_inclusive ? s.d <= max : s.d < max);
  if (!number || !in_range) Bad(key, *value, expected);
  if (s.kind == Kind::kInt) return nlohmann::json(s.i);
  return nlohmann::json(s.d);
}

std::optional<std::vector<std::string>> YamlSection::StringList(const char* key) const {
  const auto value = Get(key);
  if (!value) return std::nullopt;
  const char* expected = "a list of strings";
  if (!value->IsSequence()) Bad(key, *value, expected);
  std::vector<std::string> out;
  for (const auto& item : *value) {
    if (Resolve(item).kind != Kind::kString) Bad(key, *value, expected);
    out.push_back(item.Scalar());
  }
  return out;
}

std::optional<YamlSection> YamlSection::Section(const char* key) const {
  const auto value = Get(key);
  if (!value) return std::nullopt;
  if (!value->IsMap()) Bad(key, *value, "a mapping");
  return YamlSection{*value, KeyPath(key), file};
}

}  // namespace adapter_job::checkpoint
