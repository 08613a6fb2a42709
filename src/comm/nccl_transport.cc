// The NCCL backend: one communicator per group (ids broadcast over MPI, as nccl-tests does),
// one CUDA stream each, and pinned host buffers staging the host-side adapter bytes.
#include <cuda_runtime_api.h>
#include <mpi.h>
#include <nccl.h>

#include <cstring>

#include "adapter_job/comm/mpi_world.h"
#include "adapter_job/comm/transport.h"

namespace adapter_job::comm {
namespace {

void CudaCheck(cudaError_t rc, const char* call) {
  if (rc != cudaSuccess) Fail<DistError>("{} failed: {}", call, cudaGetErrorString(rc));
}

void NcclCheck(ncclResult_t rc, const char* call) {
  if (rc != ncclSuccess) {
    Fail<DistError>("{} failed: {} ({})", call, ncclGetErrorString(rc), ncclGetLastError(nullptr));
  }
}

void MpiCheck(int rc, const char* call) {
  if (rc != MPI_SUCCESS) Fail<DistError>("{} failed with MPI error {}", call, rc);
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
  void Synchronize() const { CudaCheck(cudaStreamSynchronize(stream_), "cudaStreamSynchronize"); }

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

class NcclComm {
 public:
  // Collective over `mpi_comm`: its rank 0 makes the id, everyone joins.
  explicit NcclComm(MPI_Comm mpi_comm) {
    int rank = 0, size = 1;
    MpiCheck(MPI_Comm_rank(mpi_comm, &rank), "MPI_Comm_rank");
    MpiCheck(MPI_Comm_size(mpi_comm, &size), "MPI_Comm_size");
    ncclUniqueId id;
    if (rank == 0) NcclCheck(ncclGetUniqueId(&id), "ncclGetUniqueId");
    MpiCheck(MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, mpi_comm), "MPI_Bcast");
    NcclCheck(ncclCommInitRank(&comm_, size, id, rank), "ncclCommInitRank");
    rank_ = rank;
    size_ = size;
  }
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;
  ~NcclComm() {
    if (comm_) ncclCommDestroy(comm_);
  }
  ncclComm_t get() const { return comm_; }
  int rank() const { return rank_; }
  int size() const { return size_; }

 private:
  ncclComm_t comm_ = nullptr;
  int rank_ = 0;
  int size_ = 1;
};

class NcclGroup final : public GroupCommunicator {
 public:
  explicit NcclGroup(MPI_Comm mpi_comm) : comm_(mpi_comm) { MPI_Comm_free(&mpi_comm); }
  int rank() const override { return comm_.rank(); }
  int size() const override { return comm_.size(); }

  void AllGather(std::span<const std::byte> send, std::span<std::byte> recv) override {
    const std::size_t total = send.size() * static_cast<std::size_t>(size());
    if (recv.size() != total)
      Fail<DistError>("AllGather: receive buffer of {} bytes for {}", recv.size(), total);
    staging_.Reserve(total + send.size());
    std::byte* send_device = staging_.device() + total;
    std::memcpy(staging_.host(), send.data(), send.size());
    CudaCheck(cudaMemcpyAsync(send_device, staging_.host(), send.size(), cudaMemcpyHostToDevice,
                              stream_.get()),
              "cudaMemcpyAsync");
    NcclCheck(ncclAllGather(send_device, staging_.device(), send.size(), ncclUint8, comm_.get(),
                            stream_.get()),
              "ncclAllGather");
    CudaCheck(cudaMemcpyAsync(staging_.host(), staging_.device(), total, cudaMemcpyDeviceToHost,
                              stream_.get()),
              "cudaMemcpyAsync");
    stream_.Synchronize();
    std::memcpy(recv.data(), staging_.host(), total);
  }

 private:
  NcclComm comm_;
  CudaStream stream_;
  StagingBuffers staging_;
};

class NcclTransport final : public Transport {
 public:
  explicit NcclTransport(MPI_Comm world) : world_(world) {}
  std::string_view name() const override { return "nccl"; }

  std::unique_ptr<GroupCommunicator> CreateGroup(const std::vector<int>& members) override {
    MPI_Group world_group, group;
    MpiCheck(MPI_Comm_group(MPI_COMM_WORLD, &world_group), "MPI_Comm_group");
    MpiCheck(MPI_Group_incl(world_group, static_cast<int>(members.size()), members.data(), &group),
             "MPI_Group_incl");
    MPI_Comm comm;
    const int rc = MPI_Comm_create_group(MPI_COMM_WORLD, group, members.front(), &comm);
    MPI_Group_free(&group);
    MPI_Group_free(&world_group);
    MpiCheck(rc, "MPI_Comm_create_group");
    return std::make_unique<NcclGroup>(comm);
  }

  void Send(std::span<const std::byte> data, int dest) override {
    staging_.Reserve(data.size());
    std::memcpy(staging_.host(), data.data(), data.size());
    CudaCheck(cudaMemcpyAsync(staging_.device(), staging_.host(), data.size(),
                              cudaMemcpyHostToDevice, stream_.get()),
              "cudaMemcpyAsync");
    NcclCheck(
        ncclSend(staging_.device(), data.size(), ncclUint8, dest, world_.get(), stream_.get()),
        "ncclSend");
    stream_.Synchronize();
  }

  void Recv(std::span<std::byte> data, int source) override {
    staging_.Reserve(data.size());
    NcclCheck(
        ncclRecv(staging_.device(), data.size(), ncclUint8, source, world_.get(), stream_.get()),
        "ncclRecv");
    CudaCheck(cudaMemcpyAsync(staging_.host(), staging_.device(), data.size(),
                              cudaMemcpyDeviceToHost, stream_.get()),
              "cudaMemcpyAsync");
    stream_.Synchronize();
    std::memcpy(data.data(), staging_.host(), data.size());
  }

 private:
  NcclComm world_;
  CudaStream stream_;
  StagingBuffers staging_;
};

}  // namespace

// MakeTransport chose `device` and checked that no other rank of the host drives it.
std::unique_ptr<Transport> MakeNcclTransport(const MpiWorld&, int device) {
  CudaCheck(cudaSetDevice(device), "cudaSetDevice");
  return std::make_unique<NcclTransport>(MPI_COMM_WORLD);
}

}  // namespace adapter_job::comm
