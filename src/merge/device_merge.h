// The merge of merge_math.h on a GPU. Same arithmetic in the same order: float32 products and
// sums each rounded (no fused multiply-add, as the CPU build), the DoRA norm summed over
// kNormLanes lanes, the same rounding to bfloat16/float16. So a merge writes the same bytes on a
// GPU as on the CPU, and a job whose ranks differ in GPUs writes one model.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "adapter_job/core/dtype.h"
#include "adapter_job/merge/merge_math.h"

namespace adapter_job::merge {

// Whether this build has the CUDA kernels (a build without the CUDA toolkit has none).
bool DeviceMergeBuilt();

// Host memory for the pipeline's blocks: page-locked when a GPU merges, so the copies to and from
// it run at the bus's speed; plain otherwise.
struct HostBufferDeleter {
  bool pinned = false;
  void operator()(std::byte* p) const noexcept;
};
using HostBuffer = std::unique_ptr<std::byte[], HostBufferDeleter>;

// One GPU's merge: a stream, its device buffers (grown to the largest block) and the update of
// the tensor being merged. CUDA failures throw CommError naming the call and the GPU.
class DeviceMerger {
 public:
  explicit DeviceMerger(int device);  // the CUDA device ordinal
  ~DeviceMerger();
  DeviceMerger(const DeviceMerger&) = delete;
  DeviceMerger& operator=(const DeviceMerger&) = delete;

  int device() const;
  std::string name() const;  // e.g. "cuda:0 (NVIDIA H200)"
  // The device memory its buffers hold: they only grow, so this is also their peak. The CUDA
  // context's own few hundred MiB are not counted.
  uint64_t device_bytes() const;

  // Uploads one module's update; the rows merged after it use it.
  void Load(const LowRankUpdate& update);
  // As merge::MergeRows, with the update last loaded when `with_update`.
  void MergeRows(std::span<const std::byte> in, DType in_dtype, std::span<std::byte> out,
                 DType out_dtype, int64_t first_row, int64_t rows, int64_t cols, bool with_update);
  HostBuffer AllocateHost(std::size_t bytes);

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace adapter_job::merge
