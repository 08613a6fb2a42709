// What verification needs before it can start, checked without the plugin (and libtorch).
#include <system_error>

#include "adapter_job/core/error.h"
#include "adapter_job/verify/verify.h"

namespace adapter_job::verify {

namespace fs = std::filesystem;

std::optional<fs::path> FindBaseWeights(const fs::path& model_dir) {
  std::error_code ec;
  for (const char* name : {"model.safetensors", "model.safetensors.index.json"}) {
    if (fs::exists(model_dir / name, ec)) return model_dir / name;
  }
  return std::nullopt;
}

void RequireVerifiable(const std::string& hf_model) {
  std::error_code ec;
  if (!fs::is_directory(hf_model, ec)) {
    Fail(
        "verification needs the base model's weights, but --hf-model-id '{}' is not a local "
        "directory (a model id is only recorded in adapter_config.json); pass the local HF model "
        "directory, or --no-verify to export without verification",
        hf_model);
  }
  if (!FindBaseWeights(hf_model)) {
    Fail(
        "verification needs the base model's weights, but '{}' has no model.safetensors or "
        "model.safetensors.index.json; add them, or pass --no-verify to export without "
        "verification",
        fs::path(hf_model).string());
  }
}

}  // namespace adapter_job::verify
