// A Megatron(-Bridge) checkpoint as users point at it: the top-level save directory (whose
// latest_checkpointed_iteration.txt names `iter_%07d`) or an `iter_*` directory, with the
// training configuration found beside it.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "adapter_job/core/parallel_sizes.h"

namespace adapter_job::checkpoint {

enum class AdapterKind { kLoRA, kDoRA, kCanonicalLoRA, kVLMLoRA };
std::string_view AdapterKindName(AdapterKind kind);

// run_config.yaml `peft:`; numbers keep their YAML type (alpha 16 stays an int).
struct PeftSettings {
  std::string target;  // `_target_`, e.g. megatron.bridge.peft.lora.LoRA
  AdapterKind kind = AdapterKind::kLoRA;
  int64_t dim = 32;
  nlohmann::json alpha = 32;
  nlohmann::json dropout = 0.0;
  std::string dropout_position = "pre";
  std::vector<std::string> target_modules;
  std::vector<std::string> exclude_modules;
  bool share_expert_adapters = true;
  bool normalize_moe_lora = false;
};

// run_config.yaml `model:`, the fields the export needs; every one is type- and range-checked.
struct ModelSettings {
  int64_t tensor_parallel = 1;
  int64_t pipeline_parallel = 1;
  std::optional<int64_t> virtual_pipeline_parallel;
  int64_t expert_parallel = 1;
  int64_t expert_tensor_parallel = 1;
  std::optional<int64_t> num_layers;
  std::optional<int64_t> hidden_size;
  std::optional<int64_t> ffn_hidden_size;
  std::optional<int64_t> num_attention_heads;
  std::optional<int64_t> num_query_groups;
  std::optional<int64_t> kv_channels;
  std::optional<int64_t> num_moe_experts;  // experts per MoE layer (null for a dense model)
  std::optional<std::string> hf_model_id;
  std::optional<std::string> params_dtype;  // e.g. "torch.bfloat16"
  bool bf16 = false;
  bool fp16 = false;
};

// Throws FormatError naming the first stated size that differs from `model`'s (from
// `run_config`).
void RequireParallelSizes(const ParallelSizes& stated, const ModelSettings& model,
                          const std::filesystem::path& run_config);

struct IntegrityManifest {
  std::string algorithm;                     // "sha256"
  std::map<std::string, std::string> files;  // file name -> hex digest
};

struct RunDirectory {
  std::filesystem::path given;          // what the user passed
  std::filesystem::path iteration_dir;  // holds .metadata and the .distcp files
  std::optional<int64_t> iteration;     // from latest_checkpointed_iteration.txt or the dir name
  std::optional<std::filesystem::path> run_config_path;
  std::optional<PeftSettings> peft;
  ModelSettings model;
  nlohmann::json metadata_json;  // Megatron's metadata.json (null when absent)
  std::optional<IntegrityManifest> integrity;
};

// Throws FormatError naming the file and key for anything missing or malformed. `before_parsing`
// sees the run once its iteration directory and integrity.json are known, before any other file
// is parsed (to check the files' digests first).
RunDirectory OpenRunDirectory(const std::filesystem::path& path,
                              const std::function<void(const RunDirectory&)>& before_parsing = {});

}  // namespace adapter_job::checkpoint
