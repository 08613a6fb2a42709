#include "adapter_job/writer/staged_directory.h"

#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "adapter_job/core/error.h"

namespace adapter_job::writer {

namespace fs = std::filesystem;

StagedDirectory StagedDirectory::Create(const fs::path& target, bool overwrite) {
  const fs::path absolute = fs::absolute(target).lexically_normal();
  if (!overwrite && fs::exists(absolute)) {
    Fail("output '{}' already exists (pass --overwrite to replace it)", absolute.string());
  }
  if (fs::exists(absolute) && !fs::is_directory(absolute)) {
    Fail("output '{}' exists and is not a directory", absolute.string());
  }
  fs::path anchor = absolute.parent_path();
  while (!fs::exists(anchor) && anchor.has_parent_path() && anchor != anchor.parent_path()) {
    anchor = anchor.parent_path();
  }
  if (!fs::is_directory(anchor)) Fail("'{}' is not a directory", anchor.string());
  return StagedDirectory(absolute, anchor, overwrite);
}

OutputFile& StagedDirectory::AddFile(std::string name) {
  OutputFile file = OutputFile::CreateUnnamed(anchor_, target_ / name);
  files_.emplace_back(std::move(name), std::move(file));
  return files_.back().second;
}

const fs::path& StagedDirectory::Stage() {
  if (!staging_.empty()) return staging_;
  const fs::path parent = target_.parent_path();
  std::error_code ec;
  fs::create_directories(parent, ec);
  if (ec) Fail<IoError>("cannot create '{}': {}", parent.string(), ec.message());
  std::string staging = (parent / ("." + target_.filename().string() + ".partial-XXXXXX")).string();
  if (::mkdtemp(staging.data()) == nullptr) {
    Fail<IoError>("cannot create a staging directory in '{}': {}", parent.string(),
                  std::strerror(errno));
  }
  staging_ = staging;
  // mkdtemp makes it private (0700); the output gets the permissions mkdir would give it.
  const mode_t mask = ::umask(0);
  ::umask(mask);
  ::chmod(staging.c_str(), 0777 & ~mask);
  for (auto& [name, file] : files_) std::move(file).CommitAs(staging_ / name, false);
  FsyncDirectory(staging_);
  return staging_;
}

void StagedDirectory::MoveTo(const fs::path& destination, bool replace) {
  fs::path previous;
  if (fs::exists(destination)) {
    if (!replace)
      Fail("output '{}' appeared while exporting; not replacing it", destination.string());
    previous = staging_.string() + ".previous";
    if (::rename(destination.c_str(), previous.c_str()) != 0) {
      Fail<IoError>("cannot move the existing '{}' aside: {}", destination.string(),
                    std::strerror(errno));
    }
  }
  // RENAME_NOREPLACE: never replace something that appeared at the destination meanwhile.
  if (::renameat2(AT_FDCWD, staging_.c_str(), AT_FDCWD, destination.c_str(), RENAME_NOREPLACE) !=
      0) {
    const int saved = errno;
    if (!previous.empty()) ::rename(previous.c_str(), destination.c_str());
    Fail<IoError>("cannot rename '{}' to '{}': {}", staging_.string(), destination.string(),
                  std::strerror(saved));
  }
  staging_.clear();
  FsyncDirectory(destination.parent_path());
  if (!previous.empty()) fs::remove_all(previous);
}

void StagedDirectory::Publish() {
  Stage();
  MoveTo(target_, overwrite_);
}

fs::path StagedDirectory::Reject(std::string_view suffix) {
  Stage();
  fs::path destination = target_;
  destination += suffix;
  MoveTo(destination, /*replace=*/true);
  return destination;
}

StagedDirectory::StagedDirectory(StagedDirectory&& other) noexcept
    : target_(std::move(other.target_)),
      anchor_(std::move(other.anchor_)),
      overwrite_(other.overwrite_),
      files_(std::move(other.files_)),
      staging_(std::exchange(other.staging_, {})) {}

StagedDirectory::~StagedDirectory() {
  if (!staging_.empty()) {
    std::error_code ignored;
    fs::remove_all(staging_, ignored);
  }
}

}  // namespace adapter_job::writer
