// An output directory that appears complete or not at all. Its files are written unnamed (see
// OutputFile) in the nearest existing ancestor of the target; Commit() creates the missing
// parents, names the files inside a fresh hidden directory and renames that into place, so a run
// that fails or is killed leaves no directory behind, not even a parent.
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
  StagedDirectory(std::filesystem::path target, std::filesystem::path anchor, bool overwrite)
      : target_(std::move(target)), anchor_(std::move(anchor)), overwrite_(overwrite) {}

  std::filesystem::path target_;
  std::filesystem::path anchor_;  // the nearest existing ancestor: files wait there, unnamed
  bool overwrite_ = false;
  std::deque<std::pair<std::string, OutputFile>> files_;
};

}  // namespace adapter_job::writer
