#include <string_view>

#include "adapter_job/export.h"

namespace adapter_job {

std::string_view ToolVersion() { return ADAPTER_JOB_VERSION; }

std::string_view ToolGitCommit() {
  constexpr std::string_view kCommit = ADAPTER_JOB_GIT_COMMIT;
  return kCommit.empty() ? "unknown" : kCommit;
}

}  // namespace adapter_job
