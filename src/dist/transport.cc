#include "adapter_job/dist/transport.h"

#include "adapter_job/dist/accelerator.h"
#include "adapter_job/dist/mpi_world.h"

namespace adapter_job::dist {

std::unique_ptr<Transport> MakeTransport(const MpiWorld& world, Backend backend) {
  // One process moves nothing between ranks: no transport to set up, whatever was asked.
  if (!world.uses_mpi()) return MakeMpiTransport(world);
  if (backend == Backend::kMpi) return MakeMpiTransport(world);
  const AcceleratorInfo info = ProbeAccelerators();
  const bool usable = info.built_with_cuda && info.device_count > 0;
  const bool everywhere = AllRanksAgree(world, usable);
  if (backend == Backend::kNccl && !everywhere) {
    Fail<DistError>("--backend nccl needs a GPU on every rank{}",
                    usable ? "" : ": " + info.unavailable_reason);
  }
  return everywhere ? MakeNcclTransport(world) : MakeMpiTransport(world);
}

}  // namespace adapter_job::dist
