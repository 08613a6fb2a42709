#include <boost/program_options.hpp>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <optional>

#include "adapter_job/comm/accelerator.h"
#include "adapter_job/export.h"
#include "adapter_job/verify/plugin.h"
#include "commands.h"
#include "config_dir.h"
#include "layered_options.h"

namespace adapter_job::cli {

namespace {

// Everything the text form says, as one JSON object (for schedulers and bug reports).
nlohmann::ordered_json VersionJson(const comm::AcceleratorInfo& info) {
  nlohmann::ordered_json j;
  j["version"] = std::string(ToolVersion());
  j["git_commit"] = std::string(ToolGitCommit());
  const std::optional<std::filesystem::path> config = ConfigDir();
  j["config_dir"] = config ? nlohmann::ordered_json(config->string()) : nlohmann::ordered_json();
  j["verification"] = {{"built", verify::VerificationBuilt()}};
  if (verify::VerificationBuilt()) {
    const auto plugin = verify::FindVerificationPlugin();
    j["verification"]["plugin"] =
        plugin ? nlohmann::ordered_json(plugin->string()) : nlohmann::ordered_json();
  }
  j["cuda"] = {{"built", info.built_with_cuda}, {"runtime", info.cuda_runtime_version},
               {"nccl", info.nccl_version},     {"driver", info.driver_version},
               {"gpus", info.device_count},     {"unavailable_reason", info.unavailable_reason}};
  return j;
}

}  // namespace

int RunVersion(const std::vector<std::string>& args) {
  namespace po = boost::program_options;
  po::options_description options("adapter_job version");
  options.add_options()("help,h", "show this help")(
      "json", po::bool_switch(),
      "print one JSON object (version, git commit, config, plugin, CUDA)");
  po::variables_map vm;
  po::store(ParseOptionsOnly(args, options), vm);
  if (vm.count("help")) {
    std::cout << options;
    return 0;
  }
  const comm::AcceleratorInfo info = comm::ProbeAccelerators();
  if (vm["json"].as<bool>()) {
    std::cout << VersionJson(info).dump(2) << "\n";
    return 0;
  }
  std::cout << "adapter_job " << ToolVersion() << "\ncommit: " << ToolGitCommit() << "\n";
  // Where this binary takes its defaults and its verification from (relative to where it lies).
  const std::optional<std::filesystem::path> config = ConfigDir();
  std::cout << "config: " << (config ? config->string() : "none (built-in defaults only)") << "\n";
  if (!verify::VerificationBuilt()) {
    std::cout << "verification: not built (-DADAPTER_JOB_VERIFY=OFF; export with --no-verify)\n";
  } else if (const auto plugin = verify::FindVerificationPlugin()) {
    std::cout << "verification plugin: " << plugin->string() << "\n";
  } else {
    std::cout << "verification plugin: not found (set ADAPTER_JOB_VERIFY_PLUGIN)\n";
  }
  if (!info.built_with_cuda) {
    std::cout << "CUDA/NCCL: not built in (" << info.unavailable_reason << ")\n";
    return 0;
  }
  std::cout << "CUDA runtime " << info.cuda_runtime_version << ", NCCL " << info.nccl_version
            << ", driver " << (info.driver_version.empty() ? "none" : info.driver_version) << "\n"
            << "GPUs: " << info.device_count;
  if (info.device_count == 0) std::cout << " (" << info.unavailable_reason << ")";
  std::cout << "\n";
  return 0;
}

}  // namespace adapter_job::cli
