// Parallel sizes a caller states, as Megatron-Bridge's scripts take them (--tp/--pp/--ep/--etp).
// A checkpoint's run_config.yaml decides its sizes; stated ones are only checked against it.
#pragma once

#include <cstdint>
#include <optional>

namespace adapter_job {

struct ParallelSizes {
  std::optional<int64_t> tensor, pipeline, expert, expert_tensor;
};

}  // namespace adapter_job
