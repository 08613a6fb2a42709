// The MPI C API as the world collectives and both transports use it: one error check, one wait
// that notices a dead peer, and RAII for communicators and groups. Private to comm.
#pragma once

#include <mpi.h>

#include <string>
#include <utility>
#include <vector>

#include "adapter_job/comm/mpi_world.h"

namespace adapter_job::comm {

// Throws a CommError placed at this process (world rank and host), marked to abort every rank:
// communication failed, so the other ranks may be blocked on this one.
[[noreturn]] void FailComm(const std::string& message);

// An MPI error in communication means a peer died or cannot be reached: FailComm. `call` names the
// operation (for a nonblocking one, its blocking name: what it does, not how it is waited for).
void Check(int rc, const char* call);

// Waits for `request` while watching that every peer this process can see is alive: a dead one
// is a FailComm naming it, where MPI would keep waiting.
void Wait(MPI_Request& request, const char* call, const MpiWorld& world);

// Throws FailComm if a peer's process has ended (MpiWorld::DeadPeers), naming every one that has
// (the first to die cannot be told from those ended after it) and `call`, the wait that saw it.
void CheckPeersAlive(const MpiWorld& world, const char* call);

// Owns an MPI communicator (MPI_Comm is a pointer in Open MPI and an int in MPICH).
class MpiComm {
 public:
  // Errors come back as return codes (to Check) on this communicator too, never as MPI's abort.
  explicit MpiComm(MPI_Comm comm = MPI_COMM_NULL);
  MpiComm(MpiComm&& other) noexcept : comm_(std::exchange(other.comm_, MPI_COMM_NULL)) {}
  MpiComm& operator=(MpiComm&& other) noexcept {
    std::swap(comm_, other.comm_);
    return *this;
  }
  MpiComm(const MpiComm&) = delete;
  MpiComm& operator=(const MpiComm&) = delete;
  ~MpiComm();
  MPI_Comm get() const { return comm_; }
  int rank() const;
  int size() const;

 private:
  MPI_Comm comm_;
};

// Owns an MPI group.
class MpiGroup {
 public:
  MpiGroup() = default;
  MpiGroup(const MpiGroup&) = delete;
  MpiGroup& operator=(const MpiGroup&) = delete;
  ~MpiGroup() {
    if (group_ != MPI_GROUP_NULL) MPI_Group_free(&group_);
  }
  MPI_Group get() const { return group_; }
  MPI_Group* out() { return &group_; }  // for the MPI call that creates it

 private:
  MPI_Group group_ = MPI_GROUP_NULL;
};

// A duplicate of the world's communicator: a transport's traffic never matches the world
// collectives' messages.
MpiComm DuplicateWorld();

// Collective over `members` (ranks of `parent`, sorted, unique) only, not over all of `parent`:
// a communicator of just them.
MpiComm CreateGroupComm(const MpiComm& parent, const std::vector<int>& members);

}  // namespace adapter_job::comm
