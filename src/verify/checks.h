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

struct CheckInputs {
  std::vector<PromptLogits> prompts;
  int top_k = 5;
  std::size_t unused_tensors = 0;
  std::size_t missing_tensors = 0;
  std::string first_unused, first_missing;
  // adapter_config.json fields PEFT applies that the PEFT variant does not model
  std::vector<std::string> unmodelled_fields;
};

std::vector<CheckResult> RunChecks(const CheckInputs& inputs);

}  // namespace adapter_job::verify
