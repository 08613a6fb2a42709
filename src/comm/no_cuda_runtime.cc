#include "adapter_job/comm/accelerator.h"

namespace adapter_job::comm {

AcceleratorInfo ProbeAccelerators() {
  AcceleratorInfo info;
  info.unavailable_reason = "built without the CUDA toolkit and NCCL";
  return info;
}

std::string DeviceUuid(int) { return {}; }

}  // namespace adapter_job::comm
