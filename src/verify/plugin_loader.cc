// The exporter's side of verification: finds the plugin relative to the code that loads it (the
// installed libadapter_job.so or the executable), loads it on first use and calls its entry
// points. No libtorch and no HDF5 here.
#include <dlfcn.h>

#include <cstdlib>
#include <filesystem>
#include <vector>

#include "adapter_job/core/error.h"
#include "adapter_job/verify/plugin.h"
#include "adapter_job/verify/verify.h"

// Set by src/verify/CMakeLists.txt: whether the plugin is built, and the installed plugin folder
// relative to the installed executable (bin/ -> lib/adapter_job with GNUInstallDirs' defaults).
#ifndef ADAPTER_JOB_WITH_VERIFY
#error "ADAPTER_JOB_WITH_VERIFY must be defined by the build"
#endif
#ifndef ADAPTER_JOB_PLUGIN_DIR_FROM_BINDIR
#define ADAPTER_JOB_PLUGIN_DIR_FROM_BINDIR "../lib/adapter_job"
#endif

namespace adapter_job::verify {
namespace {

namespace fs = std::filesystem;

constexpr const char* kPluginFile = "libadapter_job_verify.so";

// The file of the loaded object (shared library or executable) that holds this function.
fs::path ThisObjectFile() {
  Dl_info info{};
  if (::dladdr(reinterpret_cast<void*>(&ThisObjectFile), &info) != 0 && info.dli_fname != nullptr &&
      info.dli_fname[0] != '\0') {
    std::error_code ec;
    fs::path path = fs::canonical(info.dli_fname, ec);
    if (!ec) return path;
  }
  return {};
}

std::vector<fs::path> Candidates() {
  std::vector<fs::path> paths;
  if (const char* explicit_path = std::getenv("ADAPTER_JOB_VERIFY_PLUGIN"))
    paths.emplace_back(explicit_path);
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  for (const fs::path& object : {ThisObjectFile(), ec ? fs::path() : exe}) {
    if (object.empty()) continue;
    const fs::path dir = object.parent_path();
    // Beside it (the build tree, where the plugin is built next to the binary), in its
    // adapter_job/ folder (the installed library: <libdir>/adapter_job/), and the installed
    // layout seen from <bindir>.
    for (fs::path candidate : {dir / kPluginFile, dir / "adapter_job" / kPluginFile,
                               dir / ADAPTER_JOB_PLUGIN_DIR_FROM_BINDIR / kPluginFile}) {
      candidate = candidate.lexically_normal();
      bool seen = false;
      for (const auto& path : paths) seen = seen || path == candidate;
      if (!seen) paths.push_back(std::move(candidate));
    }
  }
  return paths;
}

[[noreturn]] void FailNotBuilt() {
  throw CodedError(
      "verification is not built into this adapter_job (it was configured with "
      "-DADAPTER_JOB_VERIFY=OFF): export with --no-verify, or build with -DADAPTER_JOB_VERIFY=ON "
      "(needs libtorch from the torch wheel, HDF5 and PCRE2; see scripts/install.sh)",
      ExitCode::kBadInput);
}

// Loaded once per process and never unloaded (libtorch does not support dlclose).
void* LoadPlugin() {
  RequireVerificationBuilt();
  std::string tried;
  const std::optional<fs::path> path = FindVerificationPlugin(&tried);
  if (!path) {
    Fail<IoError>(
        "the verification plugin {} was not found (looked at:{}); set ADAPTER_JOB_VERIFY_PLUGIN",
        kPluginFile, tried);
  }
  void* handle = ::dlopen(path->c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr)
    Fail<IoError>("cannot load the verification plugin '{}': {}", path->string(), ::dlerror());
  return handle;
}

void* Plugin() {
  static void* const handle = LoadPlugin();
  return handle;
}

template <typename Entry>
Entry Symbol(const char* name) {
  void* const handle = Plugin();
  void* entry = ::dlsym(handle, name);
  if (entry == nullptr) Fail<IoError>("the verification plugin has no {}", name);
  return reinterpret_cast<Entry>(entry);
}

}  // namespace

bool VerificationBuilt() { return ADAPTER_JOB_WITH_VERIFY != 0; }

void RequireVerificationBuilt() {
  if (!VerificationBuilt()) FailNotBuilt();
}

std::optional<fs::path> FindVerificationPlugin(std::string* tried) {
  for (const auto& path : Candidates()) {
    if (fs::exists(path)) return path;
    if (tried != nullptr) *tried += " " + path.string();
  }
  return std::nullopt;
}

VerificationReport VerifyWithPlugin(const VerifyOptions& options) {
  static const PluginEntry entry = Symbol<PluginEntry>(kPluginEntry);
  VerificationReport report;
  std::string error;
  const int code = entry(&options, &report, &error);
  if (code != 0) throw CodedError(error, static_cast<ExitCode>(code));
  return report;
}

VerificationPreview PreviewVerificationWithPlugin(const VerifyOptions& options) {
  static const PreviewEntry entry = Symbol<PreviewEntry>(kPreviewEntry);
  VerificationPreview preview;
  std::string error;
  const int code = entry(&options, &preview, &error);
  if (code != 0) throw CodedError(error, static_cast<ExitCode>(code));
  return preview;
}

void WriteHdf5WithPlugin(const VerificationReport& report, const fs::path& path) {
  static const Hdf5Entry entry = Symbol<Hdf5Entry>(kHdf5Entry);
  std::string error;
  const int code = entry(&report, &path, &error);
  if (code != 0) throw CodedError(error, static_cast<ExitCode>(code));
}

}  // namespace adapter_job::verify
