// The merge's CUDA kernels (device_merge_kernels.cu) behind a plain interface, so that only that
// file goes through nvcc and everything around it (device_merge.cc) is ordinary C++20.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace adapter_job::merge::kernels {

// One thread per lane of the DoRA norm (merge_math.h's kNormLanes).
inline constexpr int kThreads = 256;

enum class Element : int { kFloat32, kBFloat16, kFloat16 };

// The canonical quiet NaNs every NaN is written as (merge_math.h's, which this header cannot
// include: nvcc compiles it as C++17).
inline constexpr uint32_t kNaN32 = 0x7fc00000;
inline constexpr uint16_t kNaNBFloat16 = 0x7fc0;
inline constexpr uint16_t kNaNFloat16 = 0x7e00;

struct Update {
  const float* a = nullptr;          // lora_A, [rank, cols], on the device
  const float* b = nullptr;          // lora_B, [out, rank], on the device
  const float* magnitude = nullptr;  // DoRA's [out] on the device; null for LoRA
  int64_t rank = 0;
  float scale = 1;
};

// Merges rows [first_row, first_row + rows) of a [*, cols] tensor, all pointers on the device:
// `in` widened to float32, plus the update when there is one, then for DoRA (through `scratch`,
// rows * cols floats) scaled to the magnitude, rounded into `out`. Queued on `stream`; returns the
// launch's error.
cudaError_t LaunchMerge(const void* in, Element in_type, void* out, Element out_type,
                        float* scratch, int64_t first_row, int64_t rows, int64_t cols,
                        const Update* update, int max_blocks, cudaStream_t stream);

}  // namespace adapter_job::merge::kernels
