#include "config_dir.h"

#include <cstdlib>
#include <vector>

namespace adapter_job::cli {
namespace {

namespace fs = std::filesystem;

// Whether `path` lies inside the directory `dir` (both absolute and normal).
bool Inside(const fs::path& path, const fs::path& dir) {
  const fs::path relative = path.lexically_relative(dir);
  return !relative.empty() && *relative.begin() != "..";
}

}  // namespace

std::optional<fs::path> ConfigDir() {
  std::vector<fs::path> candidates;
  if (const char* dir = std::getenv("ADAPTER_JOB_CONFIG_DIR")) candidates.emplace_back(dir);
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    candidates.push_back(
        (exe.parent_path() / ADAPTER_JOB_CONFIG_DIR_FROM_BINDIR).lexically_normal());
    // The source tree is only trusted by the binary built from it: an installed copy never reads
    // a checkout that happens to still exist.
    // /proc/self/exe is a real path: compare it with the build directory's.
    const fs::path build_dir = fs::weakly_canonical(ADAPTER_JOB_BUILD_DIR, ec);
    if (!ec && Inside(exe.lexically_normal(), build_dir))
      candidates.emplace_back(ADAPTER_JOB_SOURCE_CONFIG_DIR);
  }
  candidates.emplace_back(ADAPTER_JOB_INSTALLED_CONFIG_DIR);
  for (const auto& dir : candidates) {
    if (fs::exists(dir / "export.ini")) return dir;
  }
  return std::nullopt;
}

}  // namespace adapter_job::cli
