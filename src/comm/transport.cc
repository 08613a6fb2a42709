#include "adapter_job/comm/transport.h"

#include "adapter_job/comm/accelerator.h"
#include "adapter_job/comm/mpi_world.h"

namespace adapter_job::comm {
namespace {

struct GpuChoice {
  int device = -1;
  std::string problem;  // why this rank cannot have a GPU of its own; empty when it can
  int ranks_on_host = 1;
};

// Collective over the host. Launchers hand out GPUs two ways: every rank sees all of the host's
// GPUs (mpirun, srun --gpus-per-node), so host-local rank i takes GPU i; or each rank sees only its
// own (srun --gpus-per-task=1, CUDA_VISIBLE_DEVICES set per rank), so every rank takes its GPU 0.
// Local rank modulo the visible count covers both; comparing UUIDs across the host's ranks is what
// tells whether the GPUs really differ, since device numbers are per process.
GpuChoice ChooseGpu(const MpiWorld& world) {
  const AcceleratorInfo info = ProbeAccelerators();
  const HostPlacement here = PlaceOnHost(world);
  GpuChoice choice;
  choice.ranks_on_host = here.local_size;
  std::string uuid;
  if (info.device_count > 0) {
    choice.device = here.local_rank % info.device_count;
    uuid = DeviceUuid(choice.device);
  }
  const std::vector<std::string> uuids = AllGatherOnHost(world, uuid);
  if (info.device_count == 0) {
    choice.problem = fmt::format("rank {} on {} sees no GPU ({})", world.rank(), world.host(),
                                 info.unavailable_reason);
    return choice;
  }
  if (uuid.empty()) {
    choice.problem = fmt::format("rank {} on {} cannot read the UUID of its GPU {}", world.rank(),
                                 world.host(), choice.device);
    return choice;
  }
  for (int other = 0; other < here.local_rank; ++other) {
    if (uuids[static_cast<std::size_t>(other)] != uuid) continue;
    choice.problem = fmt::format(
        "{} ranks on {} see {} GPU(s), and host-local ranks {} and {} would both drive {}; start "
        "at most one rank per GPU, each seeing all of them or only its own (CUDA_VISIBLE_DEVICES)",
        here.local_size, world.host(), info.device_count, other, here.local_rank, uuid);
    break;
  }
  return choice;
}

}  // namespace

std::unique_ptr<Transport> MakeTransport(const MpiWorld& world, Backend backend) {
  // One process moves nothing between ranks: no transport to set up, whatever was asked.
  if (!world.uses_mpi()) return MakeMpiTransport(world);
  if (backend == Backend::kMpi) return MakeMpiTransport(world);
  const GpuChoice gpu = ChooseGpu(world);
  const std::string problem = FirstNonEmpty(world, gpu.problem);
  if (backend == Backend::kNccl) {
    if (!problem.empty())
      Fail<CommError>("--backend nccl needs a GPU of its own for every rank: {}", problem);
    return MakeNcclTransport(world, gpu.device);
  }
  // auto: the shards live in host memory, so on one host MPI's shared memory moves them with one
  // copy, where NCCL adds two host-device copies and about a second of set-up (docs/BENCHMARKS.md:
  // 2.8 s against 1.1 s for an 8B export on 2 GPUs). NCCL pays off between hosts.
  const bool one_host = gpu.ranks_on_host == world.size();
  return problem.empty() && !one_host ? MakeNcclTransport(world, gpu.device)
                                      : MakeMpiTransport(world);
}

Backend ParseBackend(std::string_view name) {
  if (name == "auto") return Backend::kAuto;
  if (name == "mpi") return Backend::kMpi;
  if (name == "nccl") return Backend::kNccl;
  Fail("--backend must be auto, nccl or mpi, not '{}'", name);
}

std::string_view BackendName(Backend backend) {
  switch (backend) {
    case Backend::kMpi:
      return "mpi";
    case Backend::kNccl:
      return "nccl";
    default:
      return "auto";
  }
}

}  // namespace adapter_job::comm
