// What --hf-model-id names: a local HF model directory, a model id in the local HF cache (resolved
// offline, as huggingface_hub resolves it), or a hub model id that is only recorded
// (base_model_name_or_path). A mistyped path must never pass for a model id: the export would
// then skip what needs the base weights and still look like a success.
#pragma once

#include <filesystem>
#include <optional>
#include <string>

namespace adapter_job::convert {

struct BaseModel {
  std::string id;                            // as given
  std::optional<std::filesystem::path> dir;  // the local directory, when there is one
  // What adapter_config.json's base_model_name_or_path records: the model id ("org/name") for a
  // model found in the HF cache or a snapshot directory of it, else `id` as given.
  std::string name;
  std::string resolved_how;  // for the log: where `dir` came from; empty for a local directory
};

// The hub cache huggingface_hub uses: $HF_HUB_CACHE, else $HF_HOME/hub, else
// ~/.cache/huggingface/hub ($XDG_CACHE_HOME/huggingface/hub where XDG_CACHE_HOME is set).
std::filesystem::path HfHubCache();

// Resolves `hf_model_id`: a directory is itself; "name" or "org/name" is looked up in the HF cache
// at `revision` (a branch or tag through refs/<revision>, or a commit hash), never downloaded;
// else only recorded. Throws FormatError when it looks like a path (absolute, ./ or ../, ~, or a
// parent directory that exists) but names no directory, and when the cache holds the model but
// not that revision.
BaseModel ResolveBaseModel(const std::string& hf_model_id, const std::string& revision = "main");

// Without --hf-model-id: the base model a checkpoint's run_config.yaml (`run_config`) records as
// model.hf_model_id, resolved as above. A checkpoint recording none, or one that cannot be used
// here (a path on the training machine), is a FormatError saying so.
BaseModel ResolveRecordedBaseModel(const std::optional<std::string>& recorded,
                                   const std::filesystem::path& run_config,
                                   const std::string& revision);

}  // namespace adapter_job::convert
