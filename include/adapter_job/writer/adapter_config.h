// adapter_config.json as PEFT reads it. Only keys PEFT >= 0.9 knows, so every PEFT that can load
// a DoRA adapter loads ours without an "unexpected keyword" warning.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

namespace adapter_job::writer {

// A PEFT adapter directory's files, named here only.
inline constexpr const char* kAdapterWeightsFile = "adapter_model.safetensors";
inline constexpr const char* kAdapterConfigFile = "adapter_config.json";

// PEFT saves the HF module names under this prefix (its PeftModel wraps the model as
// base_model.model); everything else in the export uses the bare HF names.
inline constexpr std::string_view kPeftNamePrefix = "base_model.model.";
inline std::string PeftName(std::string_view hf_name) {
  return std::string(kPeftNamePrefix) + std::string(hf_name);
}

struct AdaptedModule {
  std::string module;  // e.g. "model.layers.3.mlp.down_proj"
  std::string leaf;    // e.g. "down_proj"
  int64_t rank = 0;
  // The rank_pattern entries that give it that rank when it differs from `r`; empty: {module,
  // rank}. Modules may share a key (all experts of a leaf), which must then mean one rank.
  std::vector<std::pair<std::string, int64_t>> rank_keys;
  // Non-empty: target it as a parameter (target_parameters, e.g. "mlp.down_proj.weight") rather
  // than by its leaf. PEFT 0.21 on transformers 5 turns the leaf names of fused MoE experts
  // (gate_proj, up_proj, down_proj) into the experts' parameters, so a dense or shared MLP linear
  // of that name would be left unwrapped and its adapter silently dropped
  // (peft/utils/transformers_weight_conversion.py _convert_peft_config_moe).
  std::string parameter;
};

struct AdapterConfigInputs {
  std::string base_model_name_or_path;
  int64_t r = 0;              // the default rank (peft.dim)
  nlohmann::json lora_alpha;  // as typed in run_config.yaml
  nlohmann::json lora_dropout;
  bool use_dora = false;
  std::vector<AdaptedModule> modules;
  std::vector<std::string> exclude_modules;  // written only when not empty
};

// Megatron-Bridge's key order (build_adapter_config_dict); `rank_pattern` lists the modules
// whose rank differs from `r` (by their rank_keys); `target_modules` is the sorted set of leaf
// names, `target_parameters` (only when there are any) the sorted set of parameters, and then
// `lora_dropout` 0 (PEFT's ParamWrapper refuses dropout). Throws Error when two modules give one
// rank_pattern key different ranks, or a module targeted as a parameter has a rank other than `r`
// and no rank_keys.
nlohmann::ordered_json BuildAdapterConfig(const AdapterConfigInputs& inputs);

// The text Python's json.dump(obj, f, indent=2) writes (ASCII-only, no trailing newline).
std::string ToPythonJson(const nlohmann::ordered_json& value);

}  // namespace adapter_job::writer
