// Test tool: reads a safetensors file with our reader and writes its tensors with our writer.
//
//   safetensors_copy IN OUT [--metadata KEY=VALUE ...]
// Python then checks OUT against safetensors.torch (byte identity with save_file, load_file).
#include <cstdio>
#include <string>

#include "adapter_job/core/error.h"
#include "adapter_job/safetensors/safetensors.h"

using namespace adapter_job;

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: safetensors_copy IN OUT [--metadata KEY=VALUE ...]\n");
    return 2;
  }
  try {
    const auto in = safetensors::File::Open(argv[1]);
    std::optional<std::map<std::string, std::string>> metadata;
    for (int i = 3; i + 1 < argc; i += 2) {
      const std::string kv = argv[i + 1];
      const auto eq = kv.find('=');
      if (std::string(argv[i]) != "--metadata" || eq == std::string::npos) {
        std::fprintf(stderr, "safetensors_copy: expected --metadata KEY=VALUE\n");
        return 2;
      }
      if (!metadata) metadata.emplace();
      (*metadata)[kv.substr(0, eq)] = kv.substr(eq + 1);
    }
    std::vector<safetensors::TensorRef> refs;
    for (const auto& t : in.header().tensors)
      refs.push_back({t.name, t.dtype, t.shape, in.Data(t)});
    safetensors::Write(argv[2], std::move(refs), metadata, /*overwrite=*/false);
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "safetensors_copy: error: %s\n", e.what());
    return static_cast<int>(e.exit_code());
  }
}
