// The merge itself, W' = W + s·B·A, in float32 whatever the weights are stored in, rounded once
// to the output dtype; for DoRA then W'' = m ⊙ W' / ‖W'‖ with the row norm PEFT uses (one norm
// per output feature) and the magnitude the run trained. Every step is row by row, so a tensor
// can be merged in blocks of rows, and rows are split over threads. A GPU merges with the same
// arithmetic in the same order (merge/device_merge.h): the bytes written never depend on where
// the merge ran.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "adapter_job/core/dtype.h"

namespace adapter_job::merge {

// DoRA's squared row norm is summed in double over this many interleaved lanes, which are then
// added pairwise (lane j += lane j + w, for w = 128, 64, ..., 1): one GPU thread per lane.
inline constexpr int kNormLanes = 256;

// What a NaN is written as, whatever its sign and payload (which differ between x86 and CUDA
// arithmetic): the canonical quiet NaN of each dtype.
inline constexpr uint32_t kFloat32NaN = 0x7fc00000;
inline constexpr uint16_t kBFloat16NaN = 0x7fc0;
inline constexpr uint16_t kFloat16NaN = 0x7e00;

// One module's adapter, widened to float32.
struct LowRankUpdate {
  int64_t rank = 0;
  std::vector<float> a;          // lora_A, [rank, in]
  std::vector<float> b;          // lora_B, [out, rank]
  double scale = 1;              // alpha / rank
  std::vector<float> magnitude;  // DoRA's lora_magnitude_vector, [out]; empty for LoRA
  // Set for a fused expert parameter (GPT-OSS's [experts, in, out]), whose rows come in runs of
  // this many per expert: `a` then holds one [rank, in] per expert, each run using its own.
  int64_t rows_per_expert = 0;
};

// Widens `bytes` (float32, bfloat16 or float16) to float32.
std::vector<float> ToFloat32(std::span<const std::byte> bytes, DType dtype);

// Rows [first_row, first_row + rows) of a [*, cols] tensor: `in` holds them as `in_dtype`; each
// is widened to float32, merged with `update`'s rows when there is one, and rounded (to nearest
// even, as torch's .to()) into `out` as `out_dtype`. Rows are split over `threads` threads.
// FormatError for a dtype other than float32, bfloat16 or float16.
void MergeRows(std::span<const std::byte> in, DType in_dtype, std::span<std::byte> out,
               DType out_dtype, int64_t first_row, int64_t rows, int64_t cols,
               const LowRankUpdate* update, int threads);

}  // namespace adapter_job::merge
