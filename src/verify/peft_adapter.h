// The PEFT variant: built only from the files the export wrote, matched to the base model's
// modules by name the way PEFT's loader does, so a misnamed or unused tensor shows up here.
#pragma once

#include <ATen/ATen.h>

#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "adapter_job/report/report.h"
#include "decoder_forward.h"
#include "hf_weights.h"

namespace adapter_job::verify {

class PeftAdapter {
 public:
  // Reads adapter_config.json and adapter_model.safetensors from `dir`; `base` tells which of a
  // layer's `linears` (paths within it) exist, and their shapes. Throws FormatError for files that
  // do not parse and for what PEFT refuses to load: a config it rejects, no module targeted, a
  // lora_A/lora_B/magnitude whose shape does not fit the rank and the base weight.
  // `model_type` is config.json's (PeftConfig::Read). Experts stored fused (`moe.fused`) are
  // adapted as PEFT's ParamWrapper adapts a parameter named in target_parameters. Layer l's
  // modules are "<layers_prefix>.<l>.<linear>" (model.layers; Nemotron-H: backbone.layers).
  // `for_stock_peft`: the adapter is one people load in PEFT, so what PEFT refuses to inject
  // (LoRA on a Mamba out_proj) is an error; a merge's own adapter is only its arithmetic.
  static PeftAdapter Open(const std::filesystem::path& dir, const HfWeights& base,
                          const std::string& layers_prefix, int64_t num_layers,
                          const std::vector<std::string>& linears, const MoeSettings& moe,
                          const std::string& model_type, bool for_stock_peft);

  // Replaces the adapted linear weights of `layer` in `weights` by their merged values.
  void Apply(int64_t layer, LayerWeights& weights, const at::Device& device) const;

  const std::vector<std::string>& unused_tensors() const { return unused_; }
  const std::vector<std::string>& missing_tensors() const { return missing_; }
  // "field: value" for each adapter_config.json field that changes what PEFT computes and that
  // this variant does not model (peft_config.h): the verdict must fail, not pass on other math.
  const std::vector<std::string>& unmodelled_fields() const { return unmodelled_; }
  const std::vector<TensorStat>& stats() const { return stats_; }
  std::size_t tensor_count() const { return tensor_count_; }
  // The dtype the file stores its tensors in (the widest, if they differ).
  at::ScalarType storage_dtype() const { return storage_dtype_; }

 private:
  struct Module {
    std::optional<at::Tensor> lora_a, lora_b, magnitude;
    double scale = 1.0;
    int64_t rank = 0, in_features = 0, out_features = 0;  // the shapes PEFT builds
    // A fused expert parameter's ParamWrapper: its index in moe_.fused, its experts, and
    // whether PEFT swapped in and out (a parameter stored [experts, out, in]).
    std::optional<std::size_t> fused;
    int64_t experts = 1;
    bool swapped = false;
  };
  // Adds each expert's slices of a fused parameter's delta to its linears.
  void ApplyFused(const Module& m, const std::string& layer_prefix, LayerWeights& weights,
                  const at::Device& device) const;

  MoeSettings moe_;
  std::string layers_prefix_;
  // "model.layers.3.self_attn.q_proj"; a ParamWrapper's under PEFT's name for it,
  // "model.layers.3.mlp.experts.base_layer".
  std::map<std::string, Module> modules_;
  std::vector<std::string> unused_;
  std::vector<std::string> missing_;
  std::vector<std::string> unmodelled_;
  std::vector<TensorStat> stats_;
  std::size_t tensor_count_ = 0;
  at::ScalarType storage_dtype_ = at::kFloat;
};

}  // namespace adapter_job::verify
