#include <mpi.h>

#include <charconv>
#include <climits>
#include <cstdlib>
#include <string_view>

#include "adapter_job/comm/mpi_world.h"
#include "adapter_job/comm/transport.h"

namespace adapter_job::comm {
namespace {

// MPI counts are ints: large buffers travel as chunks of at most this many bytes.
constexpr std::size_t kMaxMessage = std::size_t{1} << 30;
constexpr int kLayerTag = 7;

// Test hook for fault tests: ADAPTER_JOB_TEST_MPI_ERROR=<world rank>:<MPI call> makes that call
// report an error on that rank, as a dead peer does where the MPI library notices it (Open MPI 4
// itself mostly ends the whole job first).
bool InjectedError(const char* call) {
  static const char* const spec = std::getenv("ADAPTER_JOB_TEST_MPI_ERROR");
  if (spec == nullptr) return false;
  const std::string_view text(spec);
  const auto colon = text.find(':');
  int rank = -1;
  if (colon == std::string_view::npos ||
      std::from_chars(text.data(), text.data() + colon, rank).ec != std::errc() ||
      text.substr(colon + 1) != call) {
    return false;
  }
  int mine = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &mine);
  return mine == rank;
}

// An MPI error in communication means a peer died or cannot be reached: the other ranks may be
// blocked on this one, so the error always ends every rank (main calls MPI_Abort with exit 4).
void Check(int rc, const char* call) {
  if (rc == MPI_SUCCESS && !InjectedError(call)) return;
  if (rc == MPI_SUCCESS) rc = MPI_ERR_OTHER;
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(rc, text, &length);
  DistError error(fmt::format(
      "{} failed: {}; another rank has died or cannot be reached, so every rank is aborted", call,
      std::string(text, static_cast<std::size_t>(length))));
  error.MarkAbortPeers();
  throw error;
}

// Owns an MPI communicator (MPI_Comm is a pointer in Open MPI and an int in MPICH).
class MpiComm {
 public:
  // Errors come back as return codes (to Check) on this communicator too, never as MPI's abort.
  explicit MpiComm(MPI_Comm comm) : comm_(comm) {
    if (comm_ != MPI_COMM_NULL) MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
  }
  MpiComm(const MpiComm&) = delete;
  MpiComm& operator=(const MpiComm&) = delete;
  ~MpiComm() {
    if (comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
  }
  MPI_Comm get() const { return comm_; }

 private:
  MPI_Comm comm_;
};

class MpiGroup final : public GroupCommunicator {
 public:
  explicit MpiGroup(MPI_Comm comm) : comm_(comm) {
    Check(MPI_Comm_rank(comm, &rank_), "MPI_Comm_rank");
    Check(MPI_Comm_size(comm, &size_), "MPI_Comm_size");
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void AllGather(std::span<const std::byte> send, std::span<std::byte> recv) override {
    if (recv.size() != send.size() * static_cast<std::size_t>(size_)) {
      Fail<DistError>("AllGather: receive buffer of {} bytes for {} x {}", recv.size(), size_,
                      send.size());
    }
    if (send.size() <= kMaxMessage) {
      Check(MPI_Allgather(send.data(), static_cast<int>(send.size()), MPI_BYTE, recv.data(),
                          static_cast<int>(send.size()), MPI_BYTE, comm_.get()),
            "MPI_Allgather");
      return;
    }
    // Huge contributions: gather each member's block by broadcast, in slices.
    for (int member = 0; member < size_; ++member) {
      std::byte* block = recv.data() + static_cast<std::size_t>(member) * send.size();
      if (member == rank_) std::copy(send.begin(), send.end(), block);
      for (std::size_t at = 0; at < send.size(); at += kMaxMessage) {
        const int n = static_cast<int>(std::min(kMaxMessage, send.size() - at));
        Check(MPI_Bcast(block + at, n, MPI_BYTE, member, comm_.get()), "MPI_Bcast");
      }
    }
  }

 private:
  MpiComm comm_;
  int rank_ = 0;
  int size_ = 1;
};

class MpiTransport final : public Transport {
 public:
  MpiTransport() {
    MPI_Comm dup;
    Check(MPI_Comm_dup(MPI_COMM_WORLD, &dup), "MPI_Comm_dup");
    world_ = std::make_unique<MpiComm>(dup);
  }
  std::string_view name() const override { return "mpi"; }

  std::unique_ptr<GroupCommunicator> CreateGroup(const std::vector<int>& members) override {
    MPI_Group world_group, group;
    Check(MPI_Comm_group(world_->get(), &world_group), "MPI_Comm_group");
    Check(MPI_Group_incl(world_group, static_cast<int>(members.size()), members.data(), &group),
          "MPI_Group_incl");
    MPI_Comm comm;
    // Collective over the members only; the tag keeps concurrent creations apart.
    const int rc = MPI_Comm_create_group(world_->get(), group, members.front(), &comm);
    MPI_Group_free(&group);
    MPI_Group_free(&world_group);
    Check(rc, "MPI_Comm_create_group");
    return std::make_unique<MpiGroup>(comm);
  }

  void Send(std::span<const std::byte> data, int dest) override {
    std::size_t at = 0;
    do {
      const int n = static_cast<int>(std::min(kMaxMessage, data.size() - at));
      Check(MPI_Send(data.data() + at, n, MPI_BYTE, dest, kLayerTag, world_->get()), "MPI_Send");
      at += static_cast<std::size_t>(n);
    } while (at < data.size());
  }

  void Recv(std::span<std::byte> data, int source) override {
    std::size_t at = 0;
    do {
      const int n = static_cast<int>(std::min(kMaxMessage, data.size() - at));
      Check(MPI_Recv(data.data() + at, n, MPI_BYTE, source, kLayerTag, world_->get(),
                     MPI_STATUS_IGNORE),
            "MPI_Recv");
      at += static_cast<std::size_t>(n);
    } while (at < data.size());
  }

 private:
  std::unique_ptr<MpiComm> world_;
};

// A world of one, without MPI: nothing ever travels.
class LocalTransport final : public Transport {
 public:
  std::string_view name() const override { return "local"; }
  std::unique_ptr<GroupCommunicator> CreateGroup(const std::vector<int>&) override {
    Fail<DistError>("a single process has no groups");
  }
  void Send(std::span<const std::byte>, int) override {
    Fail<DistError>("a single process cannot send");
  }
  void Recv(std::span<std::byte>, int) override {
    Fail<DistError>("a single process cannot receive");
  }
};

}  // namespace

std::unique_ptr<Transport> MakeMpiTransport(const MpiWorld& world) {
  if (!world.uses_mpi()) return std::make_unique<LocalTransport>();
  return std::make_unique<MpiTransport>();
}

std::string FirstNonEmpty(const MpiWorld& world, const std::string& value) {
  if (!world.uses_mpi()) return value;
  const int mine = value.empty() ? INT_MAX : world.rank();
  int first = INT_MAX;
  Check(MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD), "MPI_Allreduce");
  if (first == INT_MAX) return {};
  std::string text = first == world.rank() ? value : std::string();
  int length = static_cast<int>(text.size());
  Check(MPI_Bcast(&length, 1, MPI_INT, first, MPI_COMM_WORLD), "MPI_Bcast");
  text.resize(static_cast<std::size_t>(length));
  Check(MPI_Bcast(text.data(), length, MPI_CHAR, first, MPI_COMM_WORLD), "MPI_Bcast");
  return text;
}

std::vector<std::string> AllGatherOnHost(const MpiWorld& world, const std::string& value) {
  if (!world.uses_mpi()) return {value};
  MPI_Comm split;
  Check(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &split),
        "MPI_Comm_split_type");
  const MpiComm local(split);
  int size = 0;
  MPI_Comm_size(local.get(), &size);
  const int length = static_cast<int>(value.size());
  std::vector<int> lengths(static_cast<std::size_t>(size));
  Check(MPI_Allgather(&length, 1, MPI_INT, lengths.data(), 1, MPI_INT, local.get()),
        "MPI_Allgather");
  std::vector<int> offsets(lengths.size());
  int total = 0;
  for (std::size_t i = 0; i < lengths.size(); ++i) {
    offsets[i] = total;
    total += lengths[i];
  }
  std::string all(static_cast<std::size_t>(total), '\0');
  Check(MPI_Allgatherv(value.data(), length, MPI_CHAR, all.data(), lengths.data(), offsets.data(),
                       MPI_CHAR, local.get()),
        "MPI_Allgatherv");
  std::vector<std::string> values;
  for (std::size_t i = 0; i < lengths.size(); ++i)
    values.push_back(
        all.substr(static_cast<std::size_t>(offsets[i]), static_cast<std::size_t>(lengths[i])));
  return values;
}

std::vector<uint64_t> GatherToRoot(const MpiWorld& world, uint64_t value) {
  if (!world.uses_mpi()) return {value};
  std::vector<uint64_t> all(world.rank() == 0 ? static_cast<std::size_t>(world.size()) : 0);
  Check(MPI_Gather(&value, 1, MPI_UINT64_T, all.data(), 1, MPI_UINT64_T, 0, MPI_COMM_WORLD),
        "MPI_Gather");
  return all;
}

void RunAgreed(const MpiWorld& world, const std::function<void()>& step) {
  std::exception_ptr error;
  int code = 0;
  try {
    step();
  } catch (const Error& e) {
    // A failed MPI call: agreeing would need that same broken communication. main aborts all.
    if (e.abort_peers()) throw;
    error = std::current_exception();
    code = static_cast<int>(e.exit_code());
  } catch (const std::exception&) {
    error = std::current_exception();
    code = static_cast<int>(ExitCode::kInternal);
  }
  if (!world.uses_mpi()) {
    if (error) std::rethrow_exception(error);
    return;
  }
  // The lowest failing rank speaks for everyone.
  int mine = error ? world.rank() : INT_MAX;
  int first = INT_MAX;
  Check(MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD), "MPI_Allreduce");
  if (first == INT_MAX) return;
  Check(MPI_Bcast(&code, 1, MPI_INT, first, MPI_COMM_WORLD), "MPI_Bcast");
  if (first == world.rank()) std::rethrow_exception(error);
  throw PeerFailure(first, static_cast<ExitCode>(code));
}

HostPlacement PlaceOnHost(const MpiWorld& world) {
  HostPlacement placement;
  if (!world.uses_mpi()) return placement;
  MPI_Comm split;
  Check(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &split),
        "MPI_Comm_split_type");
  const MpiComm local(split);
  MPI_Comm_rank(local.get(), &placement.local_rank);
  MPI_Comm_size(local.get(), &placement.local_size);
  return placement;
}

void Barrier(const MpiWorld& world) {
  if (world.uses_mpi()) Check(MPI_Barrier(MPI_COMM_WORLD), "MPI_Barrier");
}

Backend ParseBackend(std::string_view name) {
  if (name == "auto") return Backend::kAuto;
  if (name == "mpi") return Backend::kMpi;
  if (name == "nccl") return Backend::kNccl;
  Fail("--backend must be auto, nccl or mpi, not '{}'", name);
}

}  // namespace adapter_job::comm
