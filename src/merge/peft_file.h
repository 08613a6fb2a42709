// The PEFT adapter as the merge reads it (the export's own output, staged): each module's
// lora_A, lora_B and DoRA magnitude, widened to float32 when its weight is merged.
#pragma once

#include <filesystem>
#include <map>
#include <string>

#include "adapter_job/merge/merge_math.h"
#include "adapter_job/merge/merged_layout.h"
#include "adapter_job/safetensors/model_weights.h"
#include "adapter_job/safetensors/safetensors.h"

namespace adapter_job::merge {

class PeftFile {
 public:
  // FormatError for a tensor that is not a LoRA/DoRA weight, or settings PEFT applies that the
  // merge does not (use_rslora, alpha_pattern). `base` resolves PEFT's ParamWrapper adapters of
  // fused expert parameters (see Modules).
  static PeftFile Open(const std::filesystem::path& adapter_dir,
                       const safetensors::ModelWeights& base);

  // The adapted modules, e.g. model.layers.0.self_attn.q_proj; for an adapter of a fused expert
  // parameter (PEFT's ParamWrapper, "model.layers.0.mlp.experts.base_layer"), the parameter it
  // adapts ("model.layers.0.mlp.experts.gate_up_proj"): the one of its module's
  // target_parameters whose [experts, in, out] fits lora_A [experts x r, in] and lora_B
  // [out, r x experts] (FormatError when none or several do).
  std::vector<std::string> Modules() const;
  // FormatError naming the file, module and shapes unless the adapter of `target.module` fits
  // `target` (lora_A [r, in], lora_B [out, r], a DoRA magnitude [out]; a fused parameter's as
  // above).
  void Check(const OutputTensor& target) const;
  // The update for `target` (whose `module` is set), checked.
  LowRankUpdate Update(const OutputTensor& target) const;

 private:
  struct Module {
    const safetensors::TensorEntry* a = nullptr;
    const safetensors::TensorEntry* b = nullptr;
    const safetensors::TensorEntry* magnitude = nullptr;
    int64_t experts = 0;  // a fused expert parameter's ParamWrapper
  };
  explicit PeftFile(safetensors::File file) : file_(std::move(file)) {}

  safetensors::File file_;
  std::map<std::string, Module> modules_;
  double alpha_ = 0;
};

}  // namespace adapter_job::merge
