#include "adapter_job/dist/accelerator.h"

namespace adapter_job::dist {

AcceleratorInfo ProbeAccelerators() {
  AcceleratorInfo info;
  info.unavailable_reason = "built without the CUDA toolkit and NCCL";
  return info;
}

std::string DeviceUuid(int) { return {}; }

}  // namespace adapter_job::dist
