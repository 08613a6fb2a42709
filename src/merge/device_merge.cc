#include "device_merge.h"

#include <cuda_runtime_api.h>
#include <fmt/format.h>

#include <utility>

#include "adapter_job/core/error.h"
#include "device_merge_kernels.h"

namespace adapter_job::merge {
namespace {

static_assert(kernels::kThreads == kNormLanes, "one GPU thread per lane of the DoRA norm");
static_assert(kernels::kNaN32 == kFloat32NaN && kernels::kNaNBFloat16 == kBFloat16NaN &&
              kernels::kNaNFloat16 == kFloat16NaN);

kernels::Element ElementOf(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return kernels::Element::kFloat32;
    case DType::kBFloat16:
      return kernels::Element::kBFloat16;
    case DType::kFloat16:
      return kernels::Element::kFloat16;
    default:
      Fail("cannot merge {} weights: only float32, bfloat16 and float16 are merged",
           TorchName(dtype));
  }
}

// Device memory that grows to the largest size asked for, and is freed with its owner.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (data_) cudaFree(data_);
  }
  // The buffer, at least `bytes` long; its old contents are gone when it grew.
  cudaError_t Reserve(std::size_t bytes) {
    if (bytes <= bytes_) return cudaSuccess;
    if (data_) cudaFree(std::exchange(data_, nullptr));
    bytes_ = 0;
    const cudaError_t status = cudaMalloc(&data_, bytes);
    if (status == cudaSuccess) bytes_ = bytes;
    return status;
  }
  void* get() const { return data_; }
  std::size_t bytes() const { return bytes_; }
  float* floats() const { return static_cast<float*>(data_); }

 private:
  void* data_ = nullptr;
  std::size_t bytes_ = 0;
};

}  // namespace

struct DeviceMerger::State {
  int device = 0;
  std::string name;
  int max_blocks = 0;  // of the grid-stride kernels: a few per multiprocessor
  cudaStream_t stream = nullptr;
  DeviceBuffer in, out, scratch, a, b, magnitude;
  kernels::Update update;

  void Check(cudaError_t status, const char* call) const {
    if (status == cudaSuccess) return;
    cudaGetLastError();  // clear it, so that the unwinding's frees do not report it again
    throw CommError(fmt::format("{} on GPU {} ({}) failed while merging: {}", call, device, name,
                                cudaGetErrorString(status)));
  }

  const float* Upload(DeviceBuffer& buffer, const std::vector<float>& values) {
    const std::size_t bytes = values.size() * sizeof(float);
    Check(buffer.Reserve(bytes), "cudaMalloc");
    Check(cudaMemcpyAsync(buffer.get(), values.data(), bytes, cudaMemcpyHostToDevice, stream),
          "cudaMemcpyAsync");
    return buffer.floats();
  }

  ~State() {
    if (!stream) return;
    // Whatever is queued finishes before the buffers it uses are freed (the members after this).
    cudaStreamSynchronize(stream);
    cudaStreamDestroy(stream);
    cudaGetLastError();
  }
};

bool DeviceMergeBuilt() { return true; }

void HostBufferDeleter::operator()(std::byte* p) const noexcept {
  if (pinned) {
    cudaFreeHost(p);
  } else {
    delete[] p;
  }
}

DeviceMerger::DeviceMerger(int device) : state_(std::make_unique<State>()) {
  State& s = *state_;
  s.device = device;
  s.Check(cudaSetDevice(device), "cudaSetDevice");
  cudaDeviceProp properties{};
  s.Check(cudaGetDeviceProperties(&properties, device), "cudaGetDeviceProperties");
  s.name = properties.name;
  s.max_blocks = properties.multiProcessorCount * 8;
  s.Check(cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking), "cudaStreamCreate");
}

DeviceMerger::~DeviceMerger() = default;

int DeviceMerger::device() const { return state_->device; }

uint64_t DeviceMerger::device_bytes() const {
  const State& s = *state_;
  uint64_t bytes = 0;
  for (const DeviceBuffer* buffer : {&s.in, &s.out, &s.scratch, &s.a, &s.b, &s.magnitude})
    bytes += buffer->bytes();
  return bytes;
}

std::string DeviceMerger::name() const {
  return fmt::format("cuda:{} ({})", state_->device, state_->name);
}

void DeviceMerger::Load(const LowRankUpdate& update) {
  State& s = *state_;
  // The rows merged before use the buffers being replaced.
  s.Check(cudaStreamSynchronize(s.stream), "cudaStreamSynchronize");
  s.update.a = s.Upload(s.a, update.a);
  s.update.b = s.Upload(s.b, update.b);
  s.update.magnitude = update.magnitude.empty() ? nullptr : s.Upload(s.magnitude, update.magnitude);
  s.update.rank = update.rank;
  s.update.scale = static_cast<float>(update.scale);
}

void DeviceMerger::MergeRows(std::span<const std::byte> in, DType in_dtype,
                             std::span<std::byte> out, DType out_dtype, int64_t first_row,
                             int64_t rows, int64_t cols, bool with_update) {
  State& s = *state_;
  const kernels::Element in_type = ElementOf(in_dtype), out_type = ElementOf(out_dtype);
  if (rows * cols == 0) return;
  s.Check(s.in.Reserve(in.size()), "cudaMalloc");
  s.Check(s.out.Reserve(out.size()), "cudaMalloc");
  if (with_update && s.update.magnitude)
    s.Check(s.scratch.Reserve(rows * cols * sizeof(float)), "cudaMalloc");
  s.Check(cudaMemcpyAsync(s.in.get(), in.data(), in.size(), cudaMemcpyHostToDevice, s.stream),
          "cudaMemcpyAsync");
  s.Check(kernels::LaunchMerge(s.in.get(), in_type, s.out.get(), out_type, s.scratch.floats(),
                               first_row, rows, cols, with_update ? &s.update : nullptr,
                               s.max_blocks, s.stream),
          "the merge kernel");
  s.Check(cudaMemcpyAsync(out.data(), s.out.get(), out.size(), cudaMemcpyDeviceToHost, s.stream),
          "cudaMemcpyAsync");
  s.Check(cudaStreamSynchronize(s.stream), "cudaStreamSynchronize");
}

HostBuffer DeviceMerger::AllocateHost(std::size_t bytes) {
  void* p = nullptr;
  state_->Check(cudaHostAlloc(&p, bytes, cudaHostAllocDefault), "cudaHostAlloc");
  return HostBuffer(static_cast<std::byte*>(p), HostBufferDeleter{true});
}

}  // namespace adapter_job::merge
