// A build without the CUDA toolkit: every merge runs on the CPU.
#include "adapter_job/core/error.h"
#include "device_merge.h"

namespace adapter_job::merge {

bool DeviceMergeBuilt() { return false; }

void HostBufferDeleter::operator()(std::byte* p) const noexcept { delete[] p; }

struct DeviceMerger::State {};

DeviceMerger::DeviceMerger(int) {
  Fail("this adapter_job was built without CUDA: merge on the CPU");
}
DeviceMerger::~DeviceMerger() = default;
int DeviceMerger::device() const { return -1; }
std::string DeviceMerger::name() const { return {}; }
uint64_t DeviceMerger::device_bytes() const { return 0; }
void DeviceMerger::Load(const LowRankUpdate&) {}
void DeviceMerger::MergeRows(std::span<const std::byte>, DType, std::span<std::byte>, DType,
                             int64_t, int64_t, int64_t, bool) {}
HostBuffer DeviceMerger::AllocateHost(std::size_t bytes) {
  return HostBuffer(new std::byte[bytes], HostBufferDeleter{false});
}

}  // namespace adapter_job::merge
