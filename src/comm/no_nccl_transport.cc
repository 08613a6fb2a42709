#include "adapter_job/comm/transport.h"

namespace adapter_job::comm {

std::unique_ptr<Transport> MakeNcclTransport(const MpiWorld&, int) {
  Fail<CommError>("this build has no NCCL backend (the CUDA toolkit or NCCL was not found)");
}

}  // namespace adapter_job::comm
