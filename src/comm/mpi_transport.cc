// The MPI backend: host memory, any machine. Every call is nonblocking underneath and waited for
// with Wait, so a dead peer is noticed.
#include <algorithm>

#include "adapter_job/comm/transport.h"
#include "mpi_comm.h"

namespace adapter_job::comm {
namespace {

// MPI counts are ints: large buffers travel as chunks of at most this many bytes.
constexpr std::size_t kMaxMessage = std::size_t{1} << 30;
constexpr int kLayerTag = 7;

class MpiGroupCommunicator final : public GroupCommunicator {
 public:
  MpiGroupCommunicator(MpiComm comm, const MpiWorld& world)
      : comm_(std::move(comm)), world_(world), rank_(comm_.rank()), size_(comm_.size()) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }

  void AllGather(std::span<const std::byte> send, std::span<std::byte> recv) override {
    if (recv.size() != send.size() * static_cast<std::size_t>(size_)) {
      Fail<CommError>("AllGather: receive buffer of {} bytes for {} x {}", recv.size(), size_,
                      send.size());
    }
    MPI_Request request;
    if (send.size() <= kMaxMessage) {
      Check(MPI_Iallgather(send.data(), static_cast<int>(send.size()), MPI_BYTE, recv.data(),
                           static_cast<int>(send.size()), MPI_BYTE, comm_.get(), &request),
            "MPI_Allgather");
      Wait(request, "MPI_Allgather", world_);
      return;
    }
    // Huge contributions: gather each member's block by broadcast, in slices.
    for (int member = 0; member < size_; ++member) {
      std::byte* block = recv.data() + static_cast<std::size_t>(member) * send.size();
      if (member == rank_) std::copy(send.begin(), send.end(), block);
      for (std::size_t at = 0; at < send.size(); at += kMaxMessage) {
        const int n = static_cast<int>(std::min(kMaxMessage, send.size() - at));
        Check(MPI_Ibcast(block + at, n, MPI_BYTE, member, comm_.get(), &request), "MPI_Bcast");
        Wait(request, "MPI_Bcast", world_);
      }
    }
  }

 private:
  MpiComm comm_;
  const MpiWorld& world_;
  int rank_ = 0;
  int size_ = 1;
};

class MpiTransport final : public Transport {
 public:
  explicit MpiTransport(const MpiWorld& world) : world_(world), comm_(DuplicateWorld()) {}
  std::string_view name() const override { return "mpi"; }

  std::unique_ptr<GroupCommunicator> CreateGroup(const std::vector<int>& members) override {
    return std::make_unique<MpiGroupCommunicator>(CreateGroupComm(comm_, members), world_);
  }

  void Send(std::span<const std::byte> data, int dest) override {
    std::size_t at = 0;
    do {
      const int n = static_cast<int>(std::min(kMaxMessage, data.size() - at));
      MPI_Request request;
      Check(MPI_Isend(data.data() + at, n, MPI_BYTE, dest, kLayerTag, comm_.get(), &request),
            "MPI_Send");
      Wait(request, "MPI_Send", world_);
      at += static_cast<std::size_t>(n);
    } while (at < data.size());
  }

  void Recv(std::span<std::byte> data, int source) override {
    std::size_t at = 0;
    do {
      const int n = static_cast<int>(std::min(kMaxMessage, data.size() - at));
      MPI_Request request;
      Check(MPI_Irecv(data.data() + at, n, MPI_BYTE, source, kLayerTag, comm_.get(), &request),
            "MPI_Recv");
      Wait(request, "MPI_Recv", world_);
      at += static_cast<std::size_t>(n);
    } while (at < data.size());
  }

 private:
  const MpiWorld& world_;
  MpiComm comm_;
};

// A world of one, without MPI: nothing ever travels.
class LocalTransport final : public Transport {
 public:
  std::string_view name() const override { return "local"; }
  std::unique_ptr<GroupCommunicator> CreateGroup(const std::vector<int>&) override {
    Fail<CommError>("a single process has no groups");
  }
  void Send(std::span<const std::byte>, int) override {
    Fail<CommError>("a single process cannot send");
  }
  void Recv(std::span<std::byte>, int) override {
    Fail<CommError>("a single process cannot receive");
  }
};

}  // namespace

std::unique_ptr<Transport> MakeMpiTransport(const MpiWorld& world) {
  if (!world.uses_mpi()) return std::make_unique<LocalTransport>();
  return std::make_unique<MpiTransport>(world);
}

}  // namespace adapter_job::comm
