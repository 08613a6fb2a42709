// The verdicts: each check states its figure, its threshold and how they compare.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "adapter_job/report/report.h"

namespace adapter_job::verify {

struct PromptLogits {
  at::Tensor base, peft;  // [tokens, vocab], float32 on the CPU
  std::optional<at::Tensor> merged;
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
