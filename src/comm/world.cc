// The world collectives, all in one place: each starts its nonblocking MPI call and waits with
// Wait, which notices a dead peer where the blocking call would wait for it forever.
#include <climits>

#include "adapter_job/comm/mpi_world.h"
#include "mpi_comm.h"

namespace adapter_job::comm {

namespace {

// The ranks of this rank's host, as a communicator (MPI's shared-memory split).
MpiComm HostComm() {
  MPI_Comm split = MPI_COMM_NULL;
  Check(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &split),
        "MPI_Comm_split_type");
  return MpiComm(split);
}

int MinOverWorld(const MpiWorld& world, int value) {
  int min = INT_MAX;
  MPI_Request request;
  Check(MPI_Iallreduce(&value, &min, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD, &request),
        "MPI_Allreduce");
  Wait(request, "MPI_Allreduce", world);
  return min;
}

void BroadcastFrom(const MpiWorld& world, void* data, int count, MPI_Datatype type, int root) {
  MPI_Request request;
  Check(MPI_Ibcast(data, count, type, root, MPI_COMM_WORLD, &request), "MPI_Bcast");
  Wait(request, "MPI_Bcast", world);
}

}  // namespace

std::string FirstNonEmpty(const MpiWorld& world, const std::string& value) {
  if (!world.uses_mpi()) return value;
  const int first = MinOverWorld(world, value.empty() ? INT_MAX : world.rank());
  if (first == INT_MAX) return {};
  std::string text = first == world.rank() ? value : std::string();
  int length = static_cast<int>(text.size());
  BroadcastFrom(world, &length, 1, MPI_INT, first);
  text.resize(static_cast<std::size_t>(length));
  BroadcastFrom(world, text.data(), length, MPI_CHAR, first);
  return text;
}

std::vector<std::string> AllGatherOnHost(const MpiWorld& world, const std::string& value) {
  if (!world.uses_mpi()) return {value};
  const MpiComm local = HostComm();
  const int size = local.size();
  const int length = static_cast<int>(value.size());
  std::vector<int> lengths(static_cast<std::size_t>(size));
  MPI_Request request;
  Check(MPI_Iallgather(&length, 1, MPI_INT, lengths.data(), 1, MPI_INT, local.get(), &request),
        "MPI_Allgather");
  Wait(request, "MPI_Allgather", world);
  std::vector<int> offsets(lengths.size());
  int total = 0;
  for (std::size_t i = 0; i < lengths.size(); ++i) {
    offsets[i] = total;
    total += lengths[i];
  }
  std::string all(static_cast<std::size_t>(total), '\0');
  Check(MPI_Iallgatherv(value.data(), length, MPI_CHAR, all.data(), lengths.data(), offsets.data(),
                        MPI_CHAR, local.get(), &request),
        "MPI_Allgatherv");
  Wait(request, "MPI_Allgatherv", world);
  std::vector<std::string> values;
  for (std::size_t i = 0; i < lengths.size(); ++i)
    values.push_back(
        all.substr(static_cast<std::size_t>(offsets[i]), static_cast<std::size_t>(lengths[i])));
  return values;
}

std::vector<uint64_t> GatherToRoot(const MpiWorld& world, uint64_t value) {
  if (!world.uses_mpi()) return {value};
  std::vector<uint64_t> all(world.rank() == 0 ? static_cast<std::size_t>(world.size()) : 0);
  MPI_Request request;
  Check(MPI_Igather(&value, 1, MPI_UINT64_T, all.data(), 1, MPI_UINT64_T, 0, MPI_COMM_WORLD,
                    &request),
        "MPI_Gather");
  Wait(request, "MPI_Gather", world);
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
  const int first = MinOverWorld(world, error ? world.rank() : INT_MAX);
  if (first == INT_MAX) return;
  BroadcastFrom(world, &code, 1, MPI_INT, first);
  if (first == world.rank()) std::rethrow_exception(error);
  throw PeerFailure(first, static_cast<ExitCode>(code));
}

HostPlacement PlaceOnHost(const MpiWorld& world) {
  HostPlacement placement;
  if (!world.uses_mpi()) return placement;
  const MpiComm local = HostComm();
  placement.local_rank = local.rank();
  placement.local_size = local.size();
  return placement;
}

void Barrier(const MpiWorld& world) {
  if (!world.uses_mpi()) return;
  MPI_Request request;
  Check(MPI_Ibarrier(MPI_COMM_WORLD, &request), "MPI_Barrier");
  Wait(request, "MPI_Barrier", world);
}

}  // namespace adapter_job::comm
