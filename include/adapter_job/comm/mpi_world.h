// The MPI world: the one piece of process-wide state, owned by main() of the commands that run
// distributed, and the collectives over it (agreement, reports, placement). Collective calls are
// noted as such.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "adapter_job/core/error.h"

namespace adapter_job::comm {

// Another rank's process as this one can see it.
struct PeerProcess {
  std::string host;
  // 0 when this process cannot watch it: another host, or another PID namespace (a container).
  int pid = 0;
  uint64_t start_ticks = 0;  // its start time since boot, which tells a reused pid apart
};

class MpiWorld {
 public:
  // Collective: MPI_Init_thread, but only when a launcher (mpirun, srun, hydra) started us; a
  // process started alone is a world of one without MPI, which spares MPI's singleton start-up.
  // The ranks then tell each other their host and process, so that a wait can notice a dead peer.
  MpiWorld(int& argc, char**& argv);
  MpiWorld(const MpiWorld&) = delete;
  MpiWorld& operator=(const MpiWorld&) = delete;
  ~MpiWorld();  // collective: MPI_Finalize

  int rank() const { return rank_; }
  int size() const { return size_; }
  bool uses_mpi() const { return uses_mpi_; }
  const std::string& host() const { return host_; }
  const std::string& HostOf(int rank) const { return peers_[static_cast<std::size_t>(rank)].host; }

  // The ranks whose processes have ended, among those this process can watch (same host and PID
  // namespace), in rank order. MPI over shared memory and NCCL over NVLink would wait for a dead
  // peer forever, and a launcher started with recovery on (or srun without --kill-on-bad-exit)
  // leaves the survivors running.
  std::vector<int> DeadPeers() const;

  // Ends every rank: a peer may be blocked in a collective that this rank will never join.
  [[noreturn]] void Abort(int exit_code) const;

 private:
  int rank_ = 0;
  int size_ = 1;
  bool uses_mpi_ = false;
  std::string host_;
  std::vector<PeerProcess> peers_;  // by world rank, this one included
};

// Another rank failed and has reported why; this rank ends quietly with the same exit code.
class PeerFailure : public Error {
 public:
  PeerFailure(int rank, ExitCode code)
      : Error("rank " + std::to_string(rank) + " failed"), code_(code) {}
  ExitCode exit_code() const override { return code_; }

 private:
  ExitCode code_;
};

// The world collectives. Each waits for its peers while watching that they are alive: a dead one
// is a CommError naming it, marked to abort every rank. A world of one needs no MPI.

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
