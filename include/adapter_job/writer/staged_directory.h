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

  // Names the files inside a fresh hidden directory beside the target and returns its path, so
  // the complete output can be checked before anyone sees it.
  const std::filesystem::path& Stage();
  // Stages if needed and renames into place. An existing target (allowed by `overwrite`) is moved
  // aside first and removed only once the new one is in place.
  void Publish();
  // Stages if needed and renames to `<target><suffix>` instead (replacing an older one there).
  std::filesystem::path Reject(std::string_view suffix);

  StagedDirectory(StagedDirectory&& other) noexcept;
  ~StagedDirectory();  // removes a staged directory that was neither published nor rejected

 private:
  StagedDirectory(std::filesystem::path target, std::filesystem::path anchor, bool overwrite)
      : target_(std::move(target)), anchor_(std::move(anchor)), overwrite_(overwrite) {}

  std::filesystem::path target_;
  std::filesystem::path anchor_;  // the nearest existing ancestor: files wait there, unnamed
  bool overwrite_ = false;
  void MoveTo(const std::filesystem::path& destination, bool replace);

  std::deque<std::pair<std::string, OutputFile>> files_;
  std::filesystem::path staging_;
};

}  // namespace adapter_job::writer
