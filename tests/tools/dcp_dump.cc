// Test tool: reads a torch_dist checkpoint with our reader and writes what it decoded as a
// safetensors file, so Python can compare it with torch's own reading of the same bytes.
//
//   dcp_dump CKPT OUT.safetensors            every tensor, assembled to its global shape
//   dcp_dump CKPT OUT.safetensors --chunks   every chunk alone, named "<key>@<o0>,<o1>,..."
#include <cstdio>
#include <cstring>
#include <deque>
#include <string>

#include "adapter_job/checkpoint/checkpoint_reader.h"
#include "adapter_job/checkpoint/run_directory.h"
#include "adapter_job/core/error.h"
#include "adapter_job/safetensors/safetensors.h"

using namespace adapter_job;

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: dcp_dump CKPT OUT.safetensors [--chunks]\n");
    return 2;
  }
  const bool chunks = argc > 3 && std::strcmp(argv[3], "--chunks") == 0;
  try {
    const auto run = checkpoint::OpenRunDirectory(argv[1]);
    const auto reader = checkpoint::CheckpointReader::Open(run.iteration_dir);
    std::deque<Tensor> storage;
    std::vector<safetensors::TensorRef> refs;
    for (const auto& meta : reader.metadata().tensors) {
      if (!chunks) {
        refs.push_back(safetensors::Ref(meta.fqn, storage.emplace_back(reader.ReadTensor(meta))));
        continue;
      }
      for (const auto& chunk : meta.chunks) {
        std::string name = meta.fqn + "@";
        for (std::size_t i = 0; i < chunk.offsets.size(); ++i) {
          name += (i ? "," : "") + std::to_string(chunk.offsets[i]);
        }
        refs.push_back(safetensors::Ref(name, storage.emplace_back(reader.ReadChunk(meta, chunk))));
      }
    }
    safetensors::Write(argv[2], std::move(refs), std::nullopt, /*overwrite=*/true);
    std::printf("%llu bytes read\n", static_cast<unsigned long long>(reader.bytes_read()));
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "dcp_dump: error: %s\n", e.what());
    return static_cast<int>(e.exit_code());
  }
}
