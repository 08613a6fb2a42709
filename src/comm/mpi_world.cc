#include "adapter_job/comm/mpi_world.h"

#include <mpi.h>
#include <unistd.h>

#include <cstdlib>

#include "adapter_job/core/error.h"

namespace adapter_job::comm {

namespace {

// Variables the common launchers set in every process they start.
bool LaunchedByMpi() {
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMIX_RANK",
                           "MPI_LOCALNRANKS", "MV2_COMM_WORLD_SIZE"}) {
    if (std::getenv(name) != nullptr) return true;
  }
  // srun without an MPI plugin still starts several tasks: let MPI sort them out.
  const char* tasks = std::getenv("SLURM_NTASKS");
  return tasks != nullptr && std::atoi(tasks) > 1;
}

}  // namespace

MpiWorld::MpiWorld(int& argc, char**& argv) {
  if (!LaunchedByMpi()) {
    char name[256] = {};
    ::gethostname(name, sizeof name - 1);
    host_ = name;
    return;
  }
  uses_mpi_ = true;
  int provided = 0;
  if (MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
    Fail<IoError>("MPI_Init_thread failed");
  }
  // Errors come back as return codes, to be thrown with context, rather than aborting inside MPI.
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &size_);
  char name[MPI_MAX_PROCESSOR_NAME];
  int length = 0;
  MPI_Get_processor_name(name, &length);
  host_.assign(name, static_cast<std::size_t>(length));
}

MpiWorld::~MpiWorld() {
  if (!uses_mpi_) return;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

void MpiWorld::Abort(int exit_code) const {
  if (uses_mpi_) MPI_Abort(MPI_COMM_WORLD, exit_code);
  std::_Exit(exit_code);  // MPI_Abort should not return
}

}  // namespace adapter_job::comm
