#include "mpi_comm.h"

#include <unistd.h>

#include <charconv>
#include <chrono>
#include <cstdlib>
#include <string_view>

namespace adapter_job::comm {
namespace {

// How often a wait looks at its peers' processes: a few file reads per peer, far below the cost
// of the wait itself, and soon enough that a dead peer ends the job within a second.
constexpr auto kWatchPeriod = std::chrono::milliseconds(100);

// Test hook for fault tests: ADAPTER_JOB_TEST_MPI_ERROR=<world rank>:<MPI call>[:<n>] makes that
// call (its n-th on that rank; by default every one) report an error on that rank, as a dead peer
// does where the MPI library notices it (Open MPI 4 itself mostly ends the whole job first).
bool InjectedError(const char* call) {
  static const char* const spec = std::getenv("ADAPTER_JOB_TEST_MPI_ERROR");
  if (spec == nullptr) return false;
  const std::string_view text(spec);
  const auto colon = text.find(':');
  if (colon == std::string_view::npos) return false;
  int rank = -1;
  if (std::from_chars(text.data(), text.data() + colon, rank).ec != std::errc()) return false;
  std::string_view name = text.substr(colon + 1);
  int nth = 0;  // every call
  if (const auto count = name.find(':'); count != std::string_view::npos) {
    if (std::from_chars(name.data() + count + 1, name.data() + name.size(), nth).ec !=
        std::errc()) {
      return false;
    }
    name = name.substr(0, count);
  }
  if (name != call) return false;
  int mine = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &mine);
  if (mine != rank) return false;
  static int calls = 0;  // MPI_THREAD_FUNNELED: only the main thread gets here
  return nth == 0 || ++calls == nth;
}

}  // namespace

void FailComm(const std::string& message) {
  int rank = 0;
  std::string host;
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) {
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    char name[MPI_MAX_PROCESSOR_NAME];
    int length = 0;
    MPI_Get_processor_name(name, &length);
    host.assign(name, static_cast<std::size_t>(length));
  } else {
    char name[256] = {};
    ::gethostname(name, sizeof name - 1);
    host = name;
  }
  CommError error(message, host, rank);
  error.MarkAbortPeers();
  throw error;
}

namespace {

[[noreturn]] void FailMpi(int rc, const char* call) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(rc, text, &length);
  FailComm(fmt::format(
      "{} failed: {}; another rank has died or cannot be reached, so every rank is aborted", call,
      std::string(text, static_cast<std::size_t>(length))));
}

}  // namespace

void Check(int rc, const char* call) {
  if (InjectedError(call)) FailMpi(MPI_ERR_OTHER, call);
  if (rc != MPI_SUCCESS) FailMpi(rc, call);
}

void CheckPeersAlive(const MpiWorld& world, const char* call) {
  const std::vector<int> dead = world.DeadPeers();
  if (dead.empty()) return;
  std::string names;
  for (std::size_t i = 0; i < dead.size(); ++i) {
    if (i > 0) names += i + 1 == dead.size() ? " and " : ", ";
    names += fmt::format("rank {} on {}", dead[i], world.HostOf(dead[i]));
  }
  FailComm(fmt::format("{} failed: {} {} died, so every rank is aborted", call, names,
                       dead.size() == 1 ? "has" : "have"));
}

void Wait(MPI_Request& request, const char* call, const MpiWorld& world) {
  auto next_watch = std::chrono::steady_clock::now() + kWatchPeriod;
  for (;;) {
    int done = 0;
    // The hook has had its turn when the call started: one operation counts once.
    if (const int rc = MPI_Test(&request, &done, MPI_STATUS_IGNORE); rc != MPI_SUCCESS)
      FailMpi(rc, call);
    if (done) return;
    // MPI_Test drives MPI's progress engine, as MPI_Wait's own loop does.
    if (const auto now = std::chrono::steady_clock::now(); now >= next_watch) {
      CheckPeersAlive(world, call);
      next_watch = now + kWatchPeriod;
    }
  }
}

MpiComm::MpiComm(MPI_Comm comm) : comm_(comm) {
  if (comm_ != MPI_COMM_NULL) MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
}

MpiComm::~MpiComm() {
  if (comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
}

int MpiComm::rank() const {
  int rank = 0;
  Check(MPI_Comm_rank(comm_, &rank), "MPI_Comm_rank");
  return rank;
}

int MpiComm::size() const {
  int size = 0;
  Check(MPI_Comm_size(comm_, &size), "MPI_Comm_size");
  return size;
}

MpiComm DuplicateWorld() {
  MPI_Comm dup = MPI_COMM_NULL;
  Check(MPI_Comm_dup(MPI_COMM_WORLD, &dup), "MPI_Comm_dup");
  return MpiComm(dup);
}

MpiComm CreateGroupComm(const MpiComm& parent, const std::vector<int>& members) {
  MpiGroup parent_group, group;
  Check(MPI_Comm_group(parent.get(), parent_group.out()), "MPI_Comm_group");
  Check(MPI_Group_incl(parent_group.get(), static_cast<int>(members.size()), members.data(),
                       group.out()),
        "MPI_Group_incl");
  MPI_Comm comm = MPI_COMM_NULL;
  // The tag (the lowest member) keeps concurrent creations of disjoint groups apart.
  Check(MPI_Comm_create_group(parent.get(), group.get(), members.front(), &comm),
        "MPI_Comm_create_group");
  return MpiComm(comm);
}

}  // namespace adapter_job::comm
