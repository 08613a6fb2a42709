// The Megatron-merged variant: the adapter tensors read from the checkpoint itself and merged
// into the base weights in Megatron's fused layout (linear_qkv interleaved per query group,
// linear_fc1 = [gate; up], each TP rank's local rows as Megatron holds them), converted to the HF
// layout only afterwards. It shares nothing with the exporter's conversion, so a wrong split
// there shows up as a difference from the PEFT variant.
#pragma once

#include <ATen/ATen.h>

#include <filesystem>
#include <memory>
#include <optional>

#include "adapter_job/checkpoint/adapter_layout.h"
#include "adapter_job/checkpoint/checkpoint_reader.h"
#include "adapter_job/checkpoint/run_directory.h"
#include "adapter_job/convert/hf_config.h"
#include "decoder_forward.h"

namespace adapter_job::verify {

class MegatronAdapter {
 public:
  // `adapter_dtype`: the dtype the exported adapter stores; the checkpoint's tensors are rounded
  // to it first, as the export legitimately does (a float32 checkpoint exported as bf16).
  // `settings` names the experts' HF modules for MoE models; `selection` leaves out what the
  // export left out, and numbers the MTP layers as it did.
  static std::unique_ptr<MegatronAdapter> Open(const std::filesystem::path& checkpoint,
                                               const convert::HfModelConfig& model,
                                               const LlamaSettings& settings,
                                               at::ScalarType adapter_dtype,
                                               const checkpoint::AdapterSelection& selection = {});

  // The MTP layers the checkpoint holds adapters for (numbered after the decoder's).
  int64_t mtp_layers() const { return layout_.mtp_layers; }

  // Replaces the adapted linear weights of `layer` in `weights` by their Megatron-merged values.
  void Apply(int64_t layer, LayerWeights& weights, const at::Device& device) const;

 private:
  // One module's adapter as the checkpoint holds it: linear_in, linear_out, the DoRA magnitude.
  struct Adapter {
    std::optional<at::Tensor> a, b, m;
  };
  void ApplyHybrid(int64_t layer, const std::string& module, const std::string& canonical,
                   const Adapter& p, LayerWeights& w, const std::string& what) const;

  MegatronAdapter(checkpoint::RunDirectory run, checkpoint::CheckpointReader reader)
      : run_(std::move(run)), reader_(std::move(reader)) {}

  checkpoint::RunDirectory run_;
  checkpoint::CheckpointReader reader_;
  checkpoint::AdapterLayout layout_;
  convert::HfModelConfig model_;
  MoeSettings moe_;
  double alpha_ = 1.0;
  double scale_ = 1.0;
  at::ScalarType adapter_dtype_ = at::kFloat;
  bool hybrid_ = false;  // Nemotron-H: ApplyHybrid's module semantics
};

}  // namespace adapter_job::verify
