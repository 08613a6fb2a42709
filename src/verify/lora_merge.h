// The one formula both adapter variants share: W' = W + s·B·A, or for DoRA
// W' = m / ‖W + s·B·A‖_row · (W + s·B·A) (PEFT tuners/lora/dora.py; Megatron-Bridge
// dora_layers.py).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace adapter_job::verify {

inline at::Tensor MergeAdapter(const at::Tensor& weight, const at::Tensor& lora_a,
                               const at::Tensor& lora_b, double scale,
                               const std::optional<at::Tensor>& magnitude) {
  const at::Tensor merged = weight + scale * at::matmul(lora_b, lora_a);
  if (!magnitude) return merged;
  const at::Tensor norm = at::linalg_vector_norm(merged, 2, {1}, /*keepdim=*/false);
  return (*magnitude / norm).unsqueeze(1) * merged;
}

}  // namespace adapter_job::verify
