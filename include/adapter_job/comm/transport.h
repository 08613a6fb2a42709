// How ranks move adapter bytes: collectives inside groups of world ranks plus point-to-point
// transfers to rank 0. Two backends implement it: MPI (host memory, any machine) and NCCL (GPU
// memory through pinned host staging). All calls are blocking for the caller, and each fails with
// a CommError, marked to abort every rank, rather than wait forever for a peer that has died.
#pragma once

#include <cstddef>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "adapter_job/comm/backend.h"
#include "adapter_job/comm/mpi_world.h"

namespace adapter_job::comm {

class GroupCommunicator {
 public:
  virtual ~GroupCommunicator() = default;
  virtual int rank() const = 0;  // within the group
  virtual int size() const = 0;
  // Collective: every member passes `send` of one size; `recv` receives size() x send.size()
  // bytes, member by member in group-rank order.
  virtual void AllGather(std::span<const std::byte> send, std::span<std::byte> recv) = 0;
};

class Transport {
 public:
  virtual ~Transport() = default;
  virtual std::string_view name() const = 0;
  // Called by every world rank in `members` (sorted, unique), in the same order on all of them.
  virtual std::unique_ptr<GroupCommunicator> CreateGroup(const std::vector<int>& members) = 0;
  // Matched pairs in the same order on both sides.
  virtual void Send(std::span<const std::byte> data, int dest) = 0;
  virtual void Recv(std::span<std::byte> data, int source) = 0;
};

// Collective over the world: picks NCCL for kAuto only when the ranks span hosts and every rank
// drives a GPU no other rank of its host drives; an explicit kNccl that cannot work is an error on
// every rank.
std::unique_ptr<Transport> MakeTransport(const MpiWorld& world, Backend backend);

std::unique_ptr<Transport> MakeMpiTransport(const MpiWorld& world);
// `device`: the CUDA device this rank drives, as numbered in this process.
std::unique_ptr<Transport> MakeNcclTransport(const MpiWorld& world, int device);

}  // namespace adapter_job::comm
