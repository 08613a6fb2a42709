// JSON input (config.json, adapter_config.json, index and metadata files) parsed with the error
// every input file gets: exit 2, the file named, nlohmann's reason.
#pragma once

#include <cstddef>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string_view>

#include "adapter_job/core/error.h"
#include "adapter_job/core/file.h"

namespace adapter_job {

// `text` as a JSON document (nlohmann::json or nlohmann::ordered_json); FormatError "not valid
// JSON: <why>", for a caller whose WithContext names the file.
template <typename Json = nlohmann::json>
Json ParseJson(std::string_view text) {
  try {
    return Json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    Fail("not valid JSON: {}", e.what());
  }
}

// A whole JSON file: IoError when it cannot be read, FormatError "<path>: not valid JSON: <why>".
template <typename Json = nlohmann::json>
Json ReadJsonFile(const std::filesystem::path& path, std::size_t max_bytes = 64u << 20) {
  const std::string text = ReadTextFile(path, max_bytes);
  return WithContext([&] { return path.string(); }, [&] { return ParseJson<Json>(text); });
}

}  // namespace adapter_job
