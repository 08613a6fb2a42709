// The verdicts: each check states its figure, its threshold and how they compare.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "adapter_job/report/report.h"

namespace adapter_job::verify {

// Each variant's logits, [tokens, vocab], float32 on the CPU; the optional ones when computed.
struct PromptLogits {
  at::Tensor base, peft;
  std::optional<at::Tensor> merged;          // given the Megatron checkpoint
  std::optional<at::Tensor> peft_as_stored;  // given a merged model
  std::optional<at::Tensor> merged_model;

  // By the variant's name in the report ("base", "peft", "merged", ...).
  at::Tensor& Of(std::string_view variant);
};

// How the merged model's weights compare with PEFT's merge of the same adapter in float32: each
// element's distance in units of what rounding to the stored dtype may add (one step of that
// dtype, plus float32 noise of 1e-5 of the tensor row's largest element).
struct RoundingTally {
  uint64_t elements = 0;    // stored as bf16 or fp16
  uint64_t misrounded = 0;  // of those, not the nearest value of the stored dtype
  double worst = 0;         // largest distance / allowed (NaN counts as infinite)
  std::string worst_tensor;
};

// The MTP layers' weights updated as PEFT applies the adapter against the Megatron merge's update
// (no forward pass runs those layers: the model PEFT wraps has no MTP module).
struct UpdateComparison {
  int64_t layers = 0;
  double max_diff = 0;  // largest |PEFT update - Megatron update| of any weight element
  double scale = 0;     // largest |Megatron update|
  std::string worst_tensor;
};

struct CheckInputs {
  std::vector<PromptLogits> prompts;
  std::optional<RoundingTally> merged_model_weights;
  std::optional<UpdateComparison> mtp_layers;
  int top_k = 5;
  std::size_t unused_tensors = 0;
  std::size_t missing_tensors = 0;
  std::string first_unused, first_missing;
  // adapter_config.json fields PEFT applies that the PEFT variant does not model
  std::vector<std::string> unmodelled_fields;
};

std::vector<CheckResult> RunChecks(const CheckInputs& inputs);

}  // namespace adapter_job::verify
