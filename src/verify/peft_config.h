// adapter_config.json as PEFT 0.21 reads it when loading a LoRA adapter (LoraConfig.__post_init__,
// tuners_utils.check_target_module_exists and _maybe_include_all_linear_layers, utils/other.py
// get_pattern_key, LoraLayer.update_layer): which modules it wraps, with which rank and scale.
// A config PEFT refuses to load is a FormatError here too; a field that changes what PEFT
// computes and that verification does not model is listed in unmodelled(), so the check fails
// rather than pass on math PEFT does not do. Patterns are PCRE2 in Python's dialect
// (text::Regex), anchored as PEFT's re.fullmatch / re.match calls anchor them.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "adapter_job/text/regex.h"

namespace adapter_job::verify {

// Whether a target_parameters entry names the parameter `name` (e.g.
// "model.layers.0.mlp.gate_proj.weight"): the name itself, or a suffix of it after a dot
// (tuners_utils.py _inject_parameters).
bool NamesParameter(const std::string& target, const std::string& name);

class PeftConfig {
 public:
  // Reads `path`; throws FormatError for what PEFT would refuse (bad JSON, a wrong type,
  // lora_dropout > 1, layers_to_transform with a regex target, an invalid regex, ...).
  // `model_type` (config.json's) decides PEFT's re-targeting of fused MoE experts (Targets).
  static PeftConfig Read(const std::filesystem::path& path, const std::string& model_type = "");

  // Whether PEFT wraps `module` ("model.layers.3.self_attn.q_proj"), a linear of the base model,
  // or its weight (target_parameters). For the MoE model types PEFT 0.21 converts on
  // transformers 5 (utils/transformers_weight_conversion.py _MODEL_TO_CONVERSION_PATTERN,
  // _MOE_TARGET_MODULE_MAPPING), a target_modules leaf of the experts (gate_proj, up_proj,
  // down_proj; Mixtral's w1, w3, w2) names the fused expert parameters only: a dense or shared
  // linear of that name is then wrapped only through target_parameters.
  bool Targets(const std::string& module) const;
  // The target_parameters entries, matched as PEFT does (the name, or a suffix after a dot).
  const std::vector<std::string>& target_parameters() const { return target_parameters_; }
  // rank_pattern/r and alpha_pattern/lora_alpha for `module`, and the scale they give.
  int64_t RankOf(const std::string& module) const;
  double ScaleOf(const std::string& module) const;

  bool dora() const { return dora_; }
  double dropout() const { return dropout_; }
  bool all_linear() const { return all_linear_; }
  // "field: value" for every field that changes PEFT's math and is not modelled here.
  const std::vector<std::string>& unmodelled() const { return unmodelled_; }

 private:
  int64_t r_ = 8;
  double alpha_ = 8;
  bool rslora_ = false;
  bool dora_ = false;
  double dropout_ = 0;
  bool all_linear_ = false;
  std::optional<text::Regex> target_regex_, exclude_regex_;  // re.fullmatch
  std::vector<std::string> target_names_, exclude_names_, target_parameters_;
  std::vector<std::string> fused_expert_leaves_;  // see Targets
  std::vector<text::Regex> modules_to_save_;      // re.match
  std::optional<std::vector<int64_t>> layers_;    // layers_to_transform, when it filters
  std::vector<text::Regex> layer_patterns_;  // re.match, from layers_pattern (or PEFT's default)
  std::vector<std::pair<text::Regex, int64_t>> rank_pattern_;  // re.match
  std::vector<std::pair<text::Regex, double>> alpha_pattern_;
  std::vector<std::string> unmodelled_;
};

}  // namespace adapter_job::verify
