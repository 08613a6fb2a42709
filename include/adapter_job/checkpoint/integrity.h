// The check of a checkpoint's integrity.json (Megatron core >= 0.18 writes one when asked to:
// {"algorithm": "sha256", "files": {name relative to the iteration directory: hex digest}}).
#pragma once

#include <cstddef>
#include <filesystem>
#include <string>
#include <string_view>

#include "adapter_job/checkpoint/run_directory.h"

namespace adapter_job::checkpoint {

// The sha256 of a whole file as lower-case hex. Throws IoError naming the file.
std::string Sha256File(const std::filesystem::path& file);

// Checks every `stride`-th listed file, starting at `first` (in name order), so that the ranks of
// a job share the reading. Throws FormatError (exit 2) for a manifest that is not sha256 with
// 64-hex digests, a name outside the iteration directory, a missing file, or a file whose digest
// differs (naming the file and both digests). Returns how many files it checked.
std::size_t CheckIntegrity(const IntegrityManifest& manifest,
                           const std::filesystem::path& iteration_dir, int first = 0,
                           int stride = 1);

}  // namespace adapter_job::checkpoint
