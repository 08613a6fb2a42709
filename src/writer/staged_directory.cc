#include "adapter_job/writer/staged_directory.h"

#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "adapter_job/core/error.h"
#include "adapter_job/core/file.h"

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
  const fs::path parent = absolute.parent_path();
  std::error_code ec;
  fs::create_directories(parent, ec);
  if (ec) Fail<IoError>("cannot create '{}': {}", parent.string(), ec.message());
  std::string pattern =
      (parent / ("." + absolute.filename().string() + ".partial-XXXXXX")).string();
  if (::mkdtemp(pattern.data()) == nullptr) {
    Fail<IoError>("cannot create a staging directory in '{}': {}", parent.string(),
                  std::strerror(errno));
  }
  // mkdtemp makes it private (0700); the output should get the permissions mkdir would give it.
  const mode_t mask = ::umask(0);
  ::umask(mask);
  ::chmod(pattern.c_str(), 0777 & ~mask);
  return StagedDirectory(absolute, pattern, overwrite);
}

StagedDirectory::StagedDirectory(StagedDirectory&& other) noexcept
    : target_(std::move(other.target_)),
      staging_(std::move(other.staging_)),
      overwrite_(other.overwrite_),
      committed_(std::exchange(other.committed_, true)) {}

StagedDirectory::~StagedDirectory() {
  if (!committed_ && !staging_.empty()) {
    std::error_code ignored;
    fs::remove_all(staging_, ignored);
  }
}

void StagedDirectory::Commit() && {
  FsyncDirectory(staging_);
  fs::path previous;
  if (fs::exists(target_)) {
    if (!overwrite_)
      Fail("output '{}' appeared while exporting; not replacing it", target_.string());
    previous = staging_;
    previous += ".previous";
    if (::rename(target_.c_str(), previous.c_str()) != 0) {
      Fail<IoError>("cannot move the existing '{}' aside: {}", target_.string(),
                    std::strerror(errno));
    }
  }
  // RENAME_NOREPLACE: never replace something that appeared at the target meanwhile.
  if (::renameat2(AT_FDCWD, staging_.c_str(), AT_FDCWD, target_.c_str(), RENAME_NOREPLACE) != 0) {
    const int saved = errno;
    if (!previous.empty()) ::rename(previous.c_str(), target_.c_str());
    Fail<IoError>("cannot rename '{}' to '{}': {}", staging_.string(), target_.string(),
                  std::strerror(saved));
  }
  committed_ = true;
  FsyncDirectory(target_.parent_path());
  if (!previous.empty()) {
    std::error_code ignored;
    fs::remove_all(previous, ignored);
  }
}

}  // namespace adapter_job::writer
