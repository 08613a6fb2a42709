#include <dlfcn.h>
#include <unistd.h>

#include <filesystem>
#include <vector>

#include "adapter_job/core/error.h"
#include "adapter_job/verify/verify.h"

namespace adapter_job::verify {
namespace {

namespace fs = std::filesystem;

constexpr const char* kPluginFile = "libadapter_job_verify.so";

std::vector<fs::path> Candidates() {
  std::vector<fs::path> paths;
  if (const char* explicit_path = std::getenv("ADAPTER_JOB_VERIFY_PLUGIN"))
    paths.emplace_back(explicit_path);
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    paths.push_back(exe.parent_path() / kPluginFile);
    paths.push_back(exe.parent_path().parent_path() / "lib" / "adapter_job" / kPluginFile);
  }
  return paths;
}

// Loaded once per process and never unloaded (libtorch does not support dlclose).
PluginEntry LoadEntry() {
  std::string tried;
  for (const auto& path : Candidates()) {
    if (!fs::exists(path)) {
      tried += " " + path.string();
      continue;
    }
    void* handle = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr)
      Fail<IoError>("cannot load the verification plugin '{}': {}", path.string(), ::dlerror());
    void* entry = ::dlsym(handle, kPluginEntry);
    if (entry == nullptr) Fail<IoError>("'{}' has no {}", path.string(), kPluginEntry);
    return reinterpret_cast<PluginEntry>(entry);
  }
  Fail<IoError>(
      "the verification plugin {} was not found (looked at:{}); set ADAPTER_JOB_VERIFY_PLUGIN",
      kPluginFile, tried);
}

}  // namespace

VerificationReport VerifyWithPlugin(const VerifyOptions& options) {
  static const PluginEntry entry = LoadEntry();
  VerificationReport report;
  std::string error;
  const int code = entry(&options, &report, &error);
  if (code != 0) throw CodedError(error, static_cast<ExitCode>(code));
  return report;
}

}  // namespace adapter_job::verify
