// How ranks move adapter bytes: collectives inside groups of world ranks plus point-to-point
// transfers to rank 0. Two backends implement it: MPI (host memory, any machine) and NCCL (GPU
// memory through pinned host staging). All calls are blocking for the caller.
#pragma once

#include <cstddef>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "adapter_job/core/error.h"

namespace adapter_job::comm {

class MpiWorld;

// MPI, NCCL or CUDA failed.
class DistError : public Error {
 public:
  using Error::Error;
  ExitCode exit_code() const override { return ExitCode::kInfrastructure; }
};

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

enum class Backend { kAuto, kMpi, kNccl };
Backend ParseBackend(std::string_view name);  // "auto" | "mpi" | "nccl"

// Collective over the world: picks NCCL for kAuto only when the ranks span hosts and every rank
// drives a GPU no other rank of its host drives; an explicit kNccl that cannot work is an error on
// every rank.
std::unique_ptr<Transport> MakeTransport(const MpiWorld& world, Backend backend);

std::unique_ptr<Transport> MakeMpiTransport(const MpiWorld& world);
// `device`: the CUDA device this rank drives, as numbered in this process.
std::unique_ptr<Transport> MakeNcclTransport(const MpiWorld& world, int device);

// Another rank failed and has reported why; this rank ends quietly with the same exit code.
class PeerFailure : public Error {
 public:
  PeerFailure(int rank, ExitCode code)
      : Error("rank " + std::to_string(rank) + " failed"), code_(code) {}
  ExitCode exit_code() const override { return code_; }

 private:
  ExitCode code_;
};

// Collective helpers on the world (MPI), used for agreement and reports.
// The non-empty `value` of the lowest rank that has one, on every rank; empty if none has.
std::string FirstNonEmpty(const MpiWorld& world, const std::string& value);
// Every `value` of the ranks on this rank's host, by host-local rank.
std::vector<std::string> AllGatherOnHost(const MpiWorld& world, const std::string& value);

// Collective: runs `step` on every rank, then agrees on the outcome so that a failure on any
// rank ends every rank without a hang. The lowest failing rank rethrows its own error (the one
// message the user sees); every other rank throws PeerFailure with that error's exit code.
void RunAgreed(const MpiWorld& world, const std::function<void()>& step);
std::vector<uint64_t> GatherToRoot(const MpiWorld& world, uint64_t value);
void Barrier(const MpiWorld& world);
// This rank's place among the ranks of the world that run on its host.
struct HostPlacement {
  int local_rank = 0;
  int local_size = 1;
};
HostPlacement PlaceOnHost(const MpiWorld& world);

}  // namespace adapter_job::comm
