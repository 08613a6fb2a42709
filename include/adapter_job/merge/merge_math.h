// The merge itself, W' = W + s·B·A, in float32 whatever the weights are stored in, rounded once
// to the output dtype; for DoRA then W'' = m ⊙ W' / ‖W'‖ with the row norm PEFT uses (one norm
// per output feature) and the magnitude the run trained.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "adapter_job/core/dtype.h"

namespace adapter_job::merge {

// One module's adapter, widened to float32.
struct LowRankUpdate {
  int64_t rank = 0;
  std::vector<float> a;          // lora_A, [rank, in]
  std::vector<float> b;          // lora_B, [out, rank]
  double scale = 1;              // alpha / rank
  std::vector<float> magnitude;  // DoRA's lora_magnitude_vector, [out]; empty for LoRA
};

// Widens `count` elements of `bytes` (float32, bfloat16 or float16) to float32.
std::vector<float> ToFloat32(std::span<const std::byte> bytes, DType dtype);
// Rounds `values` to `dtype` (to nearest even, as torch's .to()) into `out`.
void FromFloat32(std::span<const float> values, DType dtype, std::span<std::byte> out);

// Merges `update` into `weight` ([out, in], float32, row-major) in place, rows split over
// `threads` threads.
void MergeInto(std::span<float> weight, int64_t out, int64_t in, const LowRankUpdate& update,
               int threads);

}  // namespace adapter_job::merge
