// Finding and loading the verification plugin (libadapter_job_verify.so), the only part of the
// project that links libtorch and HDF5. A build configured with -DADAPTER_JOB_VERIFY=OFF has no
// plugin: it exports with --no-verify only, and says so instead of skipping verification.
#pragma once

#include <filesystem>
#include <optional>
#include <string>

#include "adapter_job/report/report.h"

namespace adapter_job::verify {

// Whether this build has the verification plugin (-DADAPTER_JOB_VERIFY=ON, the default).
bool VerificationBuilt();

// Throws CodedError with exit code 2 (kBadInput), naming --no-verify and how to build with
// verification, when this build has none. Callers check before doing any work.
void RequireVerificationBuilt();

// Where the plugin is loaded from: $ADAPTER_JOB_VERIFY_PLUGIN when set; else beside the library
// or executable that holds this code, in its adapter_job/ folder (<prefix>/lib/adapter_job/ for
// the installed libadapter_job.so), or in the installed layout relative to the executable
// (<prefix>/bin/../lib/adapter_job/). nullopt when none exists; `tried` (if given) lists every
// candidate looked at.
std::optional<std::filesystem::path> FindVerificationPlugin(std::string* tried = nullptr);

// verification.h5 (report/hdf5_writer.h) written by the plugin, so that nothing outside it links
// HDF5.
void WriteHdf5WithPlugin(const VerificationReport& report, const std::filesystem::path& path);

}  // namespace adapter_job::verify
