// The DCP .metadata model on arbitrary pickles (seeds: the checkpoints' .metadata files).
#include "adapter_job/checkpoint/dcp_metadata.h"
#include "fuzz_target.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return FuzzOne(data, size, [](std::span<const std::byte> bytes) {
    const auto metadata = adapter_job::checkpoint::ParseDcpMetadata(bytes);
    for (const auto& tensor : metadata.tensors)
      adapter_job::checkpoint::ValidateChunkLayout(tensor);
  });
}
