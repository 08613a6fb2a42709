#include <cuda_runtime_api.h>
#include <nccl.h>

#include "adapter_job/comm/accelerator.h"

namespace adapter_job::comm {

namespace {

std::string FormatCudaVersion(int version) {
  return std::to_string(version / 1000) + "." + std::to_string((version % 1000) / 10);
}

}  // namespace

std::string DeviceUuid(int device) {
  cudaDeviceProp properties{};
  if (cudaGetDeviceProperties(&properties, device) != cudaSuccess) {
    cudaGetLastError();
    return {};
  }
  const auto* bytes = reinterpret_cast<const unsigned char*>(properties.uuid.bytes);
  std::string text = "GPU-";
  constexpr char kHex[] = "0123456789abcdef";
  for (int i = 0; i < 16; ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) text += '-';
    text += kHex[bytes[i] >> 4];
    text += kHex[bytes[i] & 0xf];
  }
  return text;
}

AcceleratorInfo ProbeAccelerators() {
  AcceleratorInfo info;
  info.built_with_cuda = true;
  int version = 0;
  if (cudaRuntimeGetVersion(&version) == cudaSuccess)
    info.cuda_runtime_version = FormatCudaVersion(version);
  if (cudaDriverGetVersion(&version) == cudaSuccess && version > 0) {
    info.driver_version = FormatCudaVersion(version);
  }
  int nccl = 0;
  if (ncclGetVersion(&nccl) == ncclSuccess) {
    info.nccl_version = std::to_string(nccl / 10000) + "." + std::to_string((nccl / 100) % 100) +
                        "." + std::to_string(nccl % 100);
  }
  const cudaError_t status = cudaGetDeviceCount(&info.device_count);
  if (status != cudaSuccess) {
    info.device_count = 0;
    info.unavailable_reason = cudaGetErrorString(status);
    cudaGetLastError();  // clear the sticky error so later probes start clean
  }
  return info;
}

}  // namespace adapter_job::comm
