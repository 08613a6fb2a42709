// The NCCL backend: one communicator per group (ids broadcast over MPI, as nccl-tests does),
// one CUDA stream each, and pinned host buffers staging the host-side adapter bytes.
//
// A dead peer must end the job rather than hang it. Waiting polls the stream, NCCL's asynchronous
// error and the peers' processes (as nccl-tests does, plus the processes: over NVLink a kernel
// waits for a dead peer's data forever); and every failure aborts the communicator
// (ncclCommAbort), which stops its kernels, where ncclCommDestroy would wait for operations that
// will never complete.
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <chrono>
#include <cstring>
#include <exception>
#include <thread>

#include "adapter_job/comm/transport.h"
#include "mpi_comm.h"

namespace adapter_job::comm {
namespace {

// As in Wait (mpi_comm.cc): the peers' processes are looked at this often.
constexpr auto kWatchPeriod = std::chrono::milliseconds(100);

void CudaCheck(cudaError_t rc, const char* call) {
  if (rc != cudaSuccess) FailComm(fmt::format("{} failed: {}", call, cudaGetErrorString(rc)));
}

class CudaStream {
 public:
  CudaStream() {
    CudaCheck(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
  }
  CudaStream(const CudaStream&) = delete;
  CudaStream& operator=(const CudaStream&) = delete;
  ~CudaStream() { cudaStreamDestroy(stream_); }
  cudaStream_t get() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

// Device and pinned host memory of one size, grown on demand.
class StagingBuffers {
 public:
  StagingBuffers() = default;
  StagingBuffers(const StagingBuffers&) = delete;
  StagingBuffers& operator=(const StagingBuffers&) = delete;
  ~StagingBuffers() { Release(); }

  void Reserve(std::size_t bytes) {
    if (bytes <= capacity_) return;
    Release();
    CudaCheck(cudaMalloc(&device_, bytes), "cudaMalloc");
    CudaCheck(cudaHostAlloc(&host_, bytes, cudaHostAllocDefault), "cudaHostAlloc");
    capacity_ = bytes;
  }
  std::byte* device() const { return static_cast<std::byte*>(device_); }
  std::byte* host() const { return static_cast<std::byte*>(host_); }

 private:
  void Release() {
    if (device_) cudaFree(device_);
    if (host_) cudaFreeHost(host_);
    device_ = host_ = nullptr;
    capacity_ = 0;
  }
  void* device_ = nullptr;
  void* host_ = nullptr;
  std::size_t capacity_ = 0;
};

// Owns an NCCL communicator: destroyed after success, aborted after any failure.
class NcclComm {
 public:
  // Collective over `group`, the members' MPI communicator: its rank 0 makes the id, everyone
  // joins.
  NcclComm(const MpiComm& group, const MpiWorld& world) : world_(world) {
    rank_ = group.rank();
    size_ = group.size();
    ncclUniqueId id{};
    if (rank_ == 0) Check(ncclGetUniqueId(&id), "ncclGetUniqueId");
    MPI_Request request;
    comm::Check(MPI_Ibcast(&id, sizeof id, MPI_BYTE, 0, group.get(), &request), "MPI_Bcast");
    Wait(request, "MPI_Bcast", world);
    Check(ncclCommInitRank(&comm_, size_, id, rank_), "ncclCommInitRank");
  }
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;
  ~NcclComm() {
    // Unwinding means this rank or a peer failed: operations may be queued that never complete.
    if (std::uncaught_exceptions() > uncaught_at_start_) {
      Abort();
    } else if (comm_ != nullptr) {
      ncclCommDestroy(comm_);
    }
  }
  ncclComm_t get() const { return comm_; }
  int rank() const { return rank_; }
  int size() const { return size_; }

  // A failed NCCL call aborts the communicator, then throws.
  void Check(ncclResult_t rc, const char* call) {
    if (rc == ncclSuccess || rc == ncclInProgress) return;
    const std::string detail = comm_ != nullptr ? ncclGetLastError(comm_) : "";
    Abort();
    // NCCL's codes for a peer or connection lost; the others are this rank's own failure.
    const bool peer = rc == ncclRemoteError || rc == ncclSystemError;
    FailComm(fmt::format(
        "{} failed: {}{}{}; {}", call, ncclGetErrorString(rc), detail.empty() ? "" : ": ", detail,
        peer ? "another rank has died or cannot be reached, so every rank is aborted"
             : "every rank is aborted"));
  }

  // Waits until the work queued on `stream` for `call` is done, or fails: a CUDA error, NCCL's
  // asynchronous error (a peer's connection lost) or a dead peer abort the communicator and throw.
  void Synchronize(cudaStream_t stream, const char* call) {
    auto next_watch = std::chrono::steady_clock::now() + kWatchPeriod;
    for (;;) {
      const cudaError_t status = cudaStreamQuery(stream);
      if (status == cudaSuccess) return;
      if (status != cudaErrorNotReady) {
        Abort();
        CudaCheck(status, call);
      }
      ncclResult_t async = ncclSuccess;
      Check(ncclCommGetAsyncError(comm_, &async), "ncclCommGetAsyncError");
      Check(async, call);
      if (const auto now = std::chrono::steady_clock::now(); now >= next_watch) {
        if (!world_.DeadPeers().empty()) {
          Abort();
          CheckPeersAlive(world_, call);
        }
        next_watch = now + kWatchPeriod;
      }
      std::this_thread::yield();
    }
  }

 private:
  void Abort() {
    if (comm_ != nullptr) ncclCommAbort(comm_);
    comm_ = nullptr;
  }

  const MpiWorld& world_;
  ncclComm_t comm_ = nullptr;
  int rank_ = 0;
  int size_ = 1;
  const int uncaught_at_start_ = std::uncaught_exceptions();
};

// Members are destroyed in reverse order: the communicator first, so that an abort has stopped
// its kernels before the stream and the buffers they use are freed.
class NcclGroup final : public GroupCommunicator {
 public:
  NcclGroup(const MpiComm& members, const MpiWorld& world) : comm_(members, world) {}
  int rank() const override { return comm_.rank(); }
  int size() const override { return comm_.size(); }

  void AllGather(std::span<const std::byte> send, std::span<std::byte> recv) override {
    const std::size_t total = send.size() * static_cast<std::size_t>(size());
    if (recv.size() != total)
      Fail<CommError>("AllGather: receive buffer of {} bytes for {}", recv.size(), total);
    staging_.Reserve(total + send.size());
    std::byte* send_device = staging_.device() + total;
    std::memcpy(staging_.host(), send.data(), send.size());
    CudaCheck(cudaMemcpyAsync(send_device, staging_.host(), send.size(), cudaMemcpyHostToDevice,
                              stream_.get()),
              "cudaMemcpyAsync");
    comm_.Check(ncclAllGather(send_device, staging_.device(), send.size(), ncclUint8, comm_.get(),
                              stream_.get()),
                "ncclAllGather");
    CudaCheck(cudaMemcpyAsync(staging_.host(), staging_.device(), total, cudaMemcpyDeviceToHost,
                              stream_.get()),
              "cudaMemcpyAsync");
    comm_.Synchronize(stream_.get(), "ncclAllGather");
    std::memcpy(recv.data(), staging_.host(), total);
  }

 private:
  CudaStream stream_;
  StagingBuffers staging_;
  NcclComm comm_;
};

class NcclTransport final : public Transport {
 public:
  // `mpi` first: the world's NCCL communicator is made over it.
  explicit NcclTransport(const MpiWorld& world)
      : world_(world), mpi_(DuplicateWorld()), comm_(mpi_, world) {}
  std::string_view name() const override { return "nccl"; }

  std::unique_ptr<GroupCommunicator> CreateGroup(const std::vector<int>& members) override {
    // The MPI communicator only carries the NCCL id: freed once the group has its own.
    const MpiComm group = CreateGroupComm(mpi_, members);
    return std::make_unique<NcclGroup>(group, world_);
  }

  void Send(std::span<const std::byte> data, int dest) override {
    staging_.Reserve(data.size());
    std::memcpy(staging_.host(), data.data(), data.size());
    CudaCheck(cudaMemcpyAsync(staging_.device(), staging_.host(), data.size(),
                              cudaMemcpyHostToDevice, stream_.get()),
              "cudaMemcpyAsync");
    comm_.Check(
        ncclSend(staging_.device(), data.size(), ncclUint8, dest, comm_.get(), stream_.get()),
        "ncclSend");
    comm_.Synchronize(stream_.get(), "ncclSend");
  }

  void Recv(std::span<std::byte> data, int source) override {
    staging_.Reserve(data.size());
    comm_.Check(
        ncclRecv(staging_.device(), data.size(), ncclUint8, source, comm_.get(), stream_.get()),
        "ncclRecv");
    CudaCheck(cudaMemcpyAsync(staging_.host(), staging_.device(), data.size(),
                              cudaMemcpyDeviceToHost, stream_.get()),
              "cudaMemcpyAsync");
    comm_.Synchronize(stream_.get(), "ncclRecv");
    std::memcpy(data.data(), staging_.host(), data.size());
  }

 private:
  const MpiWorld& world_;
  MpiComm mpi_;
  CudaStream stream_;
  StagingBuffers staging_;
  NcclComm comm_;  // last: destroyed (or aborted) first, as in NcclGroup
};

}  // namespace

// MakeTransport chose `device` and checked that no other rank of the host drives it.
std::unique_ptr<Transport> MakeNcclTransport(const MpiWorld& world, int device) {
  CudaCheck(cudaSetDevice(device), "cudaSetDevice");
  return std::make_unique<NcclTransport>(world);
}

}  // namespace adapter_job::comm
