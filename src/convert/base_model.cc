#include "adapter_job/convert/base_model.h"

#include "adapter_job/core/error.h"

namespace adapter_job::convert {
namespace {

namespace fs = std::filesystem;

// A hub id is "name" or "org/name"; anything a shell user types as a path is a path.
bool LooksLikePath(const std::string& text) {
  if (text.starts_with("/") || text.starts_with("./") || text.starts_with("../") ||
      text.starts_with("~") || text == "." || text == "..")
    return true;
  const fs::path parent = fs::path(text).parent_path();
  std::error_code ec;
  return !parent.empty() && fs::is_directory(parent, ec);
}

}  // namespace

BaseModel ResolveBaseModel(const std::string& hf_model_id) {
  BaseModel base;
  base.id = hf_model_id;
  if (hf_model_id.empty()) Fail("--hf-model-id is empty: expected a local HF model directory");
  std::error_code ec;
  const fs::path path(hf_model_id);
  const auto status = fs::status(path, ec);
  if (fs::is_directory(status)) {
    base.dir = path;
    return base;
  }
  if (fs::exists(status)) {
    Fail(
        "--hf-model-id '{}' is a file; expected a local HF model directory (config.json and "
        "safetensors weights) or a model id",
        hf_model_id);
  }
  if (LooksLikePath(hf_model_id)) {
    Fail(
        "--hf-model-id '{}' looks like a local path but does not exist (a model id that is only "
        "recorded has the form 'org/name')",
        hf_model_id);
  }
  return base;
}

}  // namespace adapter_job::convert
