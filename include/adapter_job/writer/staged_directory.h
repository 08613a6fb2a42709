// An output directory that appears complete or not at all. Its files are written unnamed (see
// OutputFile) in the nearest existing ancestor of the target; Stage() creates the missing
// parents, names the files inside a fresh hidden directory, and Publish() renames that into
// place, so a run that fails, is stopped (SIGINT/SIGTERM) or killed leaves no directory behind at
// the target. A killed run's staging directory carries its owner (host, pid, start time) in its
// name, so a later run can tell it from a live run's and remove it.
#pragma once

#include <deque>
#include <filesystem>
#include <optional>
#include <set>
#include <string>
#include <utility>

#include "adapter_job/core/file.h"
#include "adapter_job/core/signal_cleanup.h"

namespace adapter_job::writer {

class StagedDirectory {
 public:
  // Fails at once (FormatError) if `target` or `<target><reject_suffix>` exists and `overwrite`
  // is false, or if what is there holds anything but regular files named in `owned_names`
  // (this tool's own output): --overwrite replaces an earlier output, never anything else.
  static StagedDirectory Create(const std::filesystem::path& target, bool overwrite,
                                std::set<std::string> owned_names,
                                std::string reject_suffix = ".unverified");

  // Create's checks, creating nothing, and that the directory the files would wait in takes new
  // files (--dry-run). True when an existing output would be replaced.
  static bool CheckTarget(const std::filesystem::path& target, bool overwrite,
                          const std::set<std::string>& owned_names,
                          const std::string& reject_suffix = ".unverified");

  const std::filesystem::path& target() const { return target_; }

  // A new file that will be `target/name`; it stays valid until Stage.
  OutputFile& AddFile(std::string name);

  // Names the files inside a fresh hidden directory beside the target and returns its path, so
  // the complete output can be checked before anyone sees it.
  const std::filesystem::path& Stage();
  // Stages if needed and moves into place (PendingPath::Publish). An existing target (allowed by
  // `overwrite`) is exchanged with the new one in one step where the file system can (renameat2
  // RENAME_EXCHANGE), so the target path is never empty, then removed.
  void Publish();
  // Stages if needed and moves to `<target><reject_suffix>` instead, as Publish does.
  std::filesystem::path Reject();

  StagedDirectory(StagedDirectory&& other) noexcept;
  ~StagedDirectory();  // removes a staged directory that was neither published nor rejected

 private:
  StagedDirectory(std::filesystem::path target, std::filesystem::path anchor, bool overwrite,
                  std::set<std::string> owned_names, std::string reject_suffix)
      : target_(std::move(target)),
        anchor_(std::move(anchor)),
        overwrite_(overwrite),
        owned_names_(std::move(owned_names)),
        reject_suffix_(std::move(reject_suffix)) {}
  void MoveTo(const std::filesystem::path& destination);

  std::filesystem::path target_;
  std::filesystem::path anchor_;  // the nearest existing ancestor: files wait there, unnamed
  bool overwrite_ = false;
  std::set<std::string> owned_names_;
  std::string reject_suffix_;

  std::deque<std::pair<std::string, OutputFile>> files_;
  std::optional<PendingPath> staging_;
  std::optional<RemoveOnSignal> cleanup_;
};

}  // namespace adapter_job::writer
