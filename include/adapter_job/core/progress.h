// How far a long stage has come, reported by the library to whoever runs it (the command line
// draws a bar or prints lines; a service could forward it). Only rank 0 reports.
#pragma once

#include <cstdint>
#include <functional>
#include <string_view>

namespace adapter_job {

struct Progress {
  std::string_view stage;            // "export", "merge", "verify"
  uint64_t done = 0;                 // steps finished
  uint64_t total = 0;                // steps in all
  uint64_t bytes_gathered = 0;       // adapter bytes gathered on rank 0 so far (export)
  uint64_t tensors = 0;              // tensors written so far (export, merge)
  uint64_t bytes = 0;                // bytes written so far (export, merge)
  std::string_view unit = "layers";  // what a step is
};

// Called after every step of a stage, from the thread that runs it; must not throw.
using ProgressSink = std::function<void(const Progress&)>;

}  // namespace adapter_job
