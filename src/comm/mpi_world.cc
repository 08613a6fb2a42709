#include "adapter_job/comm/mpi_world.h"

#include <mpi.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>

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

struct ProcState {
  char state = '?';
  uint64_t start_ticks = 0;
};

// /proc/<pid>/stat: the state (field 3) and the start time (field 22); nullopt once the process
// is gone. The command name (field 2) may hold spaces and parentheses, so fields count from the
// last ')'.
std::optional<ProcState> ReadProcStat(int pid) {
  std::ifstream file("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!file || !std::getline(file, line)) return std::nullopt;
  const auto close = line.rfind(')');
  if (close == std::string::npos) return std::nullopt;
  std::istringstream fields(line.substr(close + 1));
  ProcState stat;
  fields >> stat.state;
  std::string skipped;
  for (int field = 4; field < 22; ++field) fields >> skipped;
  fields >> stat.start_ticks;
  if (!fields) return std::nullopt;
  return stat;
}

// What names this process's PID namespace on this kernel: two processes with the same key see
// the same pids.
std::string PidNamespaceKey() {
  std::ifstream boot("/proc/sys/kernel/random/boot_id");
  std::string boot_id;
  struct stat ns {};
  if (!boot || !std::getline(boot, boot_id) || boot_id.empty() ||
      ::stat("/proc/self/ns/pid", &ns) != 0) {
    return {};
  }
  return boot_id + "/" + std::to_string(ns.st_ino);
}

// One rank's entry in the exchange, fixed size so that one MPI_Allgather carries it.
struct ProcessRecord {
  int32_t pid = 0;
  uint64_t start_ticks = 0;
  char pid_namespace[96] = {};
  char host[MPI_MAX_PROCESSOR_NAME + 1] = {};
};

void CopyTruncated(const std::string& text, char* out, std::size_t capacity) {
  std::memcpy(out, text.data(), std::min(text.size(), capacity - 1));
}

}  // namespace

MpiWorld::MpiWorld(int& argc, char**& argv) {
  if (!LaunchedByMpi()) {
    char name[256] = {};
    ::gethostname(name, sizeof name - 1);
    host_ = name;
    peers_.push_back({host_, 0, 0});
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

  ProcessRecord mine;
  const std::string pid_namespace = PidNamespaceKey();
  const auto stat = ReadProcStat(static_cast<int>(::getpid()));
  if (!pid_namespace.empty() && stat) {
    mine.pid = static_cast<int32_t>(::getpid());
    mine.start_ticks = stat->start_ticks;
    CopyTruncated(pid_namespace, mine.pid_namespace, sizeof mine.pid_namespace);
  }
  CopyTruncated(host_, mine.host, sizeof mine.host);
  std::vector<ProcessRecord> all(static_cast<std::size_t>(size_));
  // Before any command runs, like MPI_Init_thread above (and not a test hook's target).
  if (MPI_Allgather(&mine, sizeof mine, MPI_BYTE, all.data(), sizeof mine, MPI_BYTE,
                    MPI_COMM_WORLD) != MPI_SUCCESS) {
    Fail<IoError>("MPI_Allgather of the ranks' hosts and processes failed");
  }
  for (const ProcessRecord& record : all) {
    PeerProcess peer;
    peer.host = record.host;
    // Only a process in this one's PID namespace can be watched: elsewhere the pid means another.
    // And only one this process can see now, alive (it just took part): /proc may hide others
    // (hidepid), which must not read as their death later.
    const auto seen = record.pid != 0 ? ReadProcStat(record.pid) : std::nullopt;
    if (mine.pid != 0 && seen && seen->start_ticks == record.start_ticks &&
        std::strncmp(record.pid_namespace, mine.pid_namespace, sizeof mine.pid_namespace) == 0) {
      peer.pid = record.pid;
      peer.start_ticks = record.start_ticks;
    }
    peers_.push_back(std::move(peer));
  }
}

MpiWorld::~MpiWorld() {
  if (!uses_mpi_) return;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

std::vector<int> MpiWorld::DeadPeers() const {
  std::vector<int> dead;
  for (std::size_t rank = 0; rank < peers_.size(); ++rank) {
    const PeerProcess& peer = peers_[rank];
    if (peer.pid == 0 || static_cast<int>(rank) == rank_) continue;
    const auto stat = ReadProcStat(peer.pid);
    // Gone, a zombie not yet reaped, or the pid already reused by a process started later.
    if (!stat || stat->state == 'Z' || stat->state == 'X' ||
        stat->start_ticks != peer.start_ticks) {
      dead.push_back(static_cast<int>(rank));
    }
  }
  return dead;
}

void MpiWorld::Abort(int exit_code) const {
  if (uses_mpi_) MPI_Abort(MPI_COMM_WORLD, exit_code);
  std::_Exit(exit_code);  // MPI_Abort should not return
}

}  // namespace adapter_job::comm
