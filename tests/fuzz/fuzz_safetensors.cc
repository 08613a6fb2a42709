// The safetensors header parser on arbitrary files (seeds: adapter and model files).
#include "adapter_job/safetensors/safetensors.h"
#include "fuzz_target.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return FuzzOne(data, size, [](std::span<const std::byte> bytes) {
    (void)adapter_job::safetensors::ParseFileHeader(bytes);
  });
}
