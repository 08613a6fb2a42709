// An output directory that appears complete or not at all: files go into a hidden staging
// directory beside the target, which Commit() renames into place.
#pragma once

#include <filesystem>

namespace adapter_job::writer {

class StagedDirectory {
 public:
  // Fails at once (FormatError) if `target` exists and `overwrite` is false, so no work is wasted.
  static StagedDirectory Create(const std::filesystem::path& target, bool overwrite);
  StagedDirectory(StagedDirectory&& other) noexcept;
  StagedDirectory& operator=(StagedDirectory&&) = delete;
  ~StagedDirectory();  // removes the staging directory unless committed

  const std::filesystem::path& path() const { return staging_; }
  const std::filesystem::path& target() const { return target_; }

  // Renames the staging directory to the target; an existing target (allowed by `overwrite`) is
  // moved aside first and removed only once the new one is in place.
  void Commit() &&;

 private:
  StagedDirectory(std::filesystem::path target, std::filesystem::path staging, bool overwrite)
      : target_(std::move(target)), staging_(std::move(staging)), overwrite_(overwrite) {}

  std::filesystem::path target_;
  std::filesystem::path staging_;
  bool overwrite_ = false;
  bool committed_ = false;
};

}  // namespace adapter_job::writer
