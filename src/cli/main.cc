#include <boost/program_options/errors.hpp>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "adapter_job/core/error.h"
#include "commands.h"

namespace {

constexpr const char* kUsage = R"(usage: adapter_job <command> [options]

commands:
  inspect CKPT   list the tensors, shards and PEFT settings of a Megatron torch_dist checkpoint
  version        print versions and the GPUs this process can use

Run 'adapter_job <command> --help' for the options of a command.
)";

}  // namespace

int main(int argc, char** argv) {
  using adapter_job::ExitCode;
  if (argc < 2 || std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0) {
    std::fputs(kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? static_cast<int>(ExitCode::kBadInput) : 0;
  }
  const std::string command = argv[1];
  const std::vector<std::string> args(argv + 2, argv + argc);
  try {
    if (command == "inspect") return adapter_job::cli::RunInspect(args);
    if (command == "version" || command == "--version") return adapter_job::cli::RunVersion(args);
    std::fprintf(stderr, "adapter_job: unknown command '%s'\n\n%s", command.c_str(), kUsage);
    return static_cast<int>(ExitCode::kBadInput);
  } catch (const boost::program_options::error& e) {
    std::fprintf(stderr, "adapter_job %s: %s\n", command.c_str(), e.what());
    return static_cast<int>(ExitCode::kBadInput);
  } catch (const adapter_job::Error& e) {
    std::fprintf(stderr, "adapter_job %s: error: %s\n", command.c_str(), e.what());
    return static_cast<int>(e.exit_code());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "adapter_job %s: internal error: %s\n", command.c_str(), e.what());
    return static_cast<int>(ExitCode::kInternal);
  }
}
