// Where the binary's defaults (config/export.ini) come from: the installed binary reads its own
// prefix's share/adapter_job/config/, a binary in the build tree the source tree's config/.
#pragma once

#include <filesystem>
#include <optional>

namespace adapter_job::cli {

// The first existing of: $ADAPTER_JOB_CONFIG_DIR; <bindir>/../share/adapter_job/config (the
// prefix this executable is installed in, wherever it was moved); the source tree's config/, for
// an executable inside this build tree only; the configured install prefix's. nullopt: no
// defaults.
std::optional<std::filesystem::path> ConfigDir();

}  // namespace adapter_job::cli
