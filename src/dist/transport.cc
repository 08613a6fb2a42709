#include "adapter_job/dist/transport.h"

#include "adapter_job/dist/accelerator.h"
#include "adapter_job/dist/mpi_world.h"

namespace adapter_job::dist {

std::unique_ptr<Transport> MakeTransport(const MpiWorld& world, Backend backend) {
  // One process moves nothing between ranks: no transport to set up, whatever was asked.
  if (!world.uses_mpi()) return MakeMpiTransport(world);
  if (backend == Backend::kMpi) return MakeMpiTransport(world);
  // NCCL needs a GPU of its own for every rank: no two ranks of a host may share one.
  const AcceleratorInfo info = ProbeAccelerators();
  const int ranks_here = PlaceOnHost(world).local_size;
  const bool usable = info.built_with_cuda && info.device_count >= ranks_here;
  const bool everywhere = AllRanksAgree(world, usable);
  if (backend == Backend::kNccl && !everywhere) {
    std::string why;
    if (!usable) {
      why = fmt::format(": {} ranks on {} and {} GPUs there", ranks_here, world.host(),
                        info.device_count);
      if (info.device_count == 0) why += " (" + info.unavailable_reason + ")";
    }
    Fail<DistError>("--backend nccl needs a GPU of its own for every rank{}", why);
  }
  if (backend == Backend::kNccl) return MakeNcclTransport(world);
  // auto: the shards live in host memory, so on one host MPI's shared memory moves them with one
  // copy, where NCCL adds two host-device copies and about a second of set-up (docs/BENCHMARKS.md:
  // 2.8 s against 1.1 s for an 8B export on 2 GPUs). NCCL pays off between hosts.
  const bool one_host = ranks_here == world.size();
  return everywhere && !one_host ? MakeNcclTransport(world) : MakeMpiTransport(world);
}

}  // namespace adapter_job::dist
