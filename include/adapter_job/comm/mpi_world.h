// The MPI world: the one piece of process-wide state, owned by main() of the commands that run
// distributed. Collective calls are noted as such.
#pragma once

#include <string>

namespace adapter_job::comm {

class MpiWorld {
 public:
  // Collective: MPI_Init_thread, but only when a launcher (mpirun, srun, hydra) started us; a
  // process started alone is a world of one without MPI, which spares MPI's singleton start-up.
  MpiWorld(int& argc, char**& argv);
  MpiWorld(const MpiWorld&) = delete;
  MpiWorld& operator=(const MpiWorld&) = delete;
  ~MpiWorld();  // collective: MPI_Finalize

  int rank() const { return rank_; }
  int size() const { return size_; }
  bool uses_mpi() const { return uses_mpi_; }
  const std::string& host() const { return host_; }

  // Ends every rank: a peer may be blocked in a collective that this rank will never join.
  [[noreturn]] void Abort(int exit_code) const;

 private:
  int rank_ = 0;
  int size_ = 1;
  bool uses_mpi_ = false;
  std::string host_;
};

}  // namespace adapter_job::comm
