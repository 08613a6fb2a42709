// The zip reader and the torch.save decoder behind it, on arbitrary archives (seeds: the
// checkpoints' .distcp blobs, each a run of torch.save archives; a single archive works too).
#include "adapter_job/checkpoint/torch_save.h"
#include "adapter_job/checkpoint/zip_reader.h"
#include "fuzz_target.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return FuzzOne(data, size, [](std::span<const std::byte> bytes) {
    const auto archive = adapter_job::checkpoint::ZipArchive::Parse(bytes);
    for (const auto& member : archive.members()) (void)archive.Data(member);
    (void)adapter_job::checkpoint::ReadTorchSaveTensor(bytes);
  });
}
