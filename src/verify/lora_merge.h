// The one formula both adapter variants share: W' = W + s·B·A, or for DoRA
// W' = m / ‖W + s·B·A‖_row · (W + s·B·A) (PEFT tuners/lora/dora.py; Megatron-Bridge
// dora_layers.py).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string_view>

#include "adapter_job/core/error.h"
#include "adapter_job/core/tensor.h"

namespace adapter_job::verify {

// Shapes are checked before any math, so an adapter against the wrong base model is bad input
// naming the module and both shapes, never a libtorch broadcast error halfway through the pass.
inline void CheckMergeShapes(std::string_view what, const at::Tensor& weight,
                             const at::Tensor& lora_a, const at::Tensor& lora_b,
                             const std::optional<at::Tensor>& magnitude) {
  const auto shape = [](const at::Tensor& t) {
    return ShapeToString(std::span<const int64_t>(t.sizes().data(), t.sizes().size()));
  };
  if (weight.dim() != 2 || lora_a.dim() != 2 || lora_b.dim() != 2) {
    Fail("{}: the base weight {}, lora_A {} and lora_B {} must all be matrices", what,
         shape(weight), shape(lora_a), shape(lora_b));
  }
  if (lora_a.size(1) != weight.size(1)) {
    Fail(
        "{}: lora_A is {} but the base weight is {}: lora_A needs {} columns (the base "
        "model's input features); is this the base model the adapter was trained on?",
        what, shape(lora_a), shape(weight), weight.size(1));
  }
  if (lora_b.size(0) != weight.size(0)) {
    Fail(
        "{}: lora_B is {} but the base weight is {}: lora_B needs {} rows (the base model's "
        "output features); is this the base model the adapter was trained on?",
        what, shape(lora_b), shape(weight), weight.size(0));
  }
  if (lora_b.size(1) != lora_a.size(0)) {
    Fail("{}: lora_B {} and lora_A {} disagree on the rank", what, shape(lora_b), shape(lora_a));
  }
  if (magnitude && (magnitude->dim() != 1 || magnitude->size(0) != weight.size(0))) {
    Fail("{}: the DoRA magnitude is {} but the base weight has {} rows", what, shape(*magnitude),
         weight.size(0));
  }
}

inline at::Tensor MergeAdapter(const at::Tensor& weight, const at::Tensor& lora_a,
                               const at::Tensor& lora_b, double scale,
                               const std::optional<at::Tensor>& magnitude,
                               std::string_view what = "an adapted module") {
  CheckMergeShapes(what, weight, lora_a, lora_b, magnitude);
  const at::Tensor merged = weight + scale * at::matmul(lora_b, lora_a);
  if (!magnitude) return merged;
  const at::Tensor norm = at::linalg_vector_norm(merged, 2, {1}, /*keepdim=*/false);
  return (*magnitude / norm).unsqueeze(1) * merged;
}

}  // namespace adapter_job::verify
