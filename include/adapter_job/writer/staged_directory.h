// An output directory that appears complete or not at all. Its files are written unnamed (see
// OutputFile) beside the target; Commit() names them inside a fresh hidden directory and renames
// that into place, so a run that fails or is killed leaves no directory behind.
#pragma once

#include <deque>
#include <filesystem>
#include <string>
#include <utility>

#include "adapter_job/core/file.h"

namespace adapter_job::writer {

class StagedDirectory {
 public:
  // Fails at once (FormatError) if `target` exists and `overwrite` is false, so no work is wasted.
  static StagedDirectory Create(const std::filesystem::path& target, bool overwrite);

  const std::filesystem::path& target() const { return target_; }

  // A new file that will be `target/name`; it stays valid until Commit.
  OutputFile& AddFile(std::string name);

  // An existing target (allowed by `overwrite`) is moved aside first and removed only once the
  // new one is in place.
  void Commit() &&;

 private:
  StagedDirectory(std::filesystem::path target, bool overwrite)
      : target_(std::move(target)), overwrite_(overwrite) {}

  std::filesystem::path target_;
  bool overwrite_ = false;
  std::deque<std::pair<std::string, OutputFile>> files_;
};

}  // namespace adapter_job::writer
