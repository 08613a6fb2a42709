// The data-only pickle machine on arbitrary bytes (seeds: the checkpoints' .metadata pickles).
#include "adapter_job/checkpoint/pickle.h"
#include "fuzz_target.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return FuzzOne(data, size, [](std::span<const std::byte> bytes) {
    const auto document = adapter_job::pickle::Unpickle(bytes);
    (void)adapter_job::pickle::Describe(document.root(), 8);
  });
}
