// Subcommands of the adapter_job binary; each parses its own options and returns an exit code.
#pragma once

#include <string>
#include <vector>

namespace adapter_job::comm {
class MpiWorld;
}

namespace adapter_job::cli {

int RunExport(const comm::MpiWorld& world, const std::vector<std::string>& args);
int RunStream(const comm::MpiWorld& world, const std::vector<std::string>& args);
int RunMerge(const comm::MpiWorld& world, const std::vector<std::string>& args);
int RunVerify(const std::vector<std::string>& args);
int RunInspect(const std::vector<std::string>& args);
int RunVersion(const std::vector<std::string>& args);

}  // namespace adapter_job::cli
