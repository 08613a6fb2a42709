// What this process can use for the NCCL transport and GPU verification. Works on machines with
// no GPU or no driver: the answer is then zero devices and the reason.
#pragma once

#include <string>

namespace adapter_job::comm {

struct AcceleratorInfo {
  bool built_with_cuda = false;  // the CUDA runtime + NCCL backend was compiled in
  int device_count = 0;
  std::string cuda_runtime_version;  // e.g. "13.0"
  std::string driver_version;        // empty without a driver
  std::string nccl_version;          // e.g. "2.28.9"
  std::string unavailable_reason;    // why device_count is 0, if it is
};

AcceleratorInfo ProbeAccelerators();

// The device's UUID as nvidia-smi prints it ("GPU-xxxxxxxx-..."): the same physical GPU seen by two
// processes has the same UUID whatever CUDA_VISIBLE_DEVICES numbered it there. Empty without CUDA.
std::string DeviceUuid(int device);

}  // namespace adapter_job::comm
