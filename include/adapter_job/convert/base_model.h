// What --hf-model-id names: a local HF model directory, or a hub model id that is only recorded
// (base_model_name_or_path). A mistyped path must never pass for a model id: the export would
// then skip what needs the base weights and still look like a success.
#pragma once

#include <filesystem>
#include <optional>
#include <string>

namespace adapter_job::convert {

struct BaseModel {
  std::string id;                            // as given
  std::optional<std::filesystem::path> dir;  // set when it is a local directory
};

// Throws FormatError when `hf_model_id` looks like a path (absolute, ./ or ../, ~, or a parent
// directory that exists) but names no directory.
BaseModel ResolveBaseModel(const std::string& hf_model_id);

}  // namespace adapter_job::convert
