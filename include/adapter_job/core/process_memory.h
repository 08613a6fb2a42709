#pragma once

#include <cstdint>

namespace adapter_job {

// The peak resident set of this process so far (getrusage's ru_maxrss), in bytes: the figure a
// scheduler's memory limit is checked against.
uint64_t PeakResidentBytes();

}  // namespace adapter_job
