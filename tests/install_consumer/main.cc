// Exports a checkpoint through the installed library API, in one process.
#include <adapter_job/comm/mpi_world.h>
#include <adapter_job/export.h>

#include <cstdio>

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: consumer HF_DIR CKPT OUT\n");
    return 2;
  }
  adapter_job::comm::MpiWorld world(argc, argv);
  adapter_job::ExportOptions options;
  options.hf_model_id = argv[1];
  options.checkpoint = argv[2];
  options.output = argv[3];
  const auto report = adapter_job::ExportAdapter(options, world);
  std::printf("%llu tensors\n", static_cast<unsigned long long>(report.tensors));
  return 0;
}
