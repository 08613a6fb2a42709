// Typed, range-checked reads of run_config.yaml values. A value of the wrong type or out of range
// is a FormatError naming the file, the key path (`peft.alpha`), the value and what was expected:
// a silent default would export an adapter that disagrees with its training.
#pragma once

#include <yaml-cpp/yaml.h>

#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace adapter_job::checkpoint {

// One section of the file (`peft`, `model`, `model.params_dtype`) and where it came from.
struct YamlSection {
  YAML::Node node;   // a map
  std::string path;  // its key path, e.g. "peft"
  const std::filesystem::path* file;

  // The key's node, or nullopt when the key is absent or its value is null (`~`, `null`, empty).
  std::optional<YAML::Node> Get(const char* key) const;
  std::string KeyPath(const char* key) const { return path + "." + key; }
  [[noreturn]] void Bad(const char* key, const YAML::Node& value, std::string_view expected) const;

  // Absent and null give nullopt; any other value must be of the type and in the range asked for.
  std::optional<int64_t> Int(const char* key, int64_t min, int64_t max) const;
  std::optional<bool> Bool(const char* key) const;
  std::optional<std::string> String(const char* key) const;
  // A finite number, kept as the JSON int or float it was written as (alpha 16 stays 16).
  std::optional<nlohmann::json> Number(const char* key, double min, bool min_inclusive, double max,
                                       bool max_inclusive, std::string_view expected) const;
  std::optional<std::vector<std::string>> StringList(const char* key) const;
  // A nested section: nullopt when absent or null, an error when not a map.
  std::optional<YamlSection> Section(const char* key) const;

  // Null is not "absent" for a key whose default is not null: `alpha: ~` is an error, not 32.
  void RejectNull(const char* key, std::string_view expected) const;
};

// How a value reads, for messages: the scalar as written ('quoted' when it was quoted), or the
// map or list in flow style, cut short when long.
std::string DescribeYaml(const YAML::Node& node);

}  // namespace adapter_job::checkpoint
