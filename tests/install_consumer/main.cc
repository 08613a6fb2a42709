// Exports a checkpoint through the installed library API, in one process; with --verify, also
// verifies it through the verification plugin the installed library finds on its own.
#include <adapter_job/comm/mpi_world.h>
#include <adapter_job/export.h>
#include <adapter_job/verify/plugin.h>

#include <cstdio>
#include <string>

int main(int argc, char** argv) {
  const bool verify = argc == 5 && std::string(argv[4]) == "--verify";
  if (argc != 4 && !verify) {
    std::fprintf(stderr, "usage: consumer HF_DIR CKPT OUT [--verify]\n");
    return 2;
  }
  adapter_job::comm::MpiWorld world(argc, argv);
  adapter_job::ExportOptions options;
  options.hf_model_id = argv[1];
  options.checkpoint = argv[2];
  options.output = argv[3];
  if (verify) {
    const auto plugin = adapter_job::verify::FindVerificationPlugin();
    std::printf("plugin: %s\n", plugin ? plugin->c_str() : "none");
    adapter_job::verify::VerifyOptions v;
    v.prompts = {adapter_job::verify::kDefaultPrompt};
    v.device = "cpu";
    options.verify = v;
  }
  const auto report = adapter_job::ExportAdapter(options, world);
  std::printf("%llu tensors\n", static_cast<unsigned long long>(report.tensors));
  if (verify) {
    std::printf("verification: %s\n", report.verified() ? "passed" : "failed");
    return report.verified() ? 0 : 3;
  }
  return 0;
}
