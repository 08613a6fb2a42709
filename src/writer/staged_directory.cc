#include "adapter_job/writer/staged_directory.h"

#include <unistd.h>

#include <climits>
#include <fstream>
#include <sstream>

#include "adapter_job/core/error.h"

namespace adapter_job::writer {
namespace {

namespace fs = std::filesystem;

constexpr std::string_view kPartial = ".partial-";
// PEFT's save_pretrained writes a model card beside the adapter; an earlier output may hold one.
constexpr std::string_view kModelCard = "README.md";

std::string HostName() {
  char name[HOST_NAME_MAX + 1] = {};
  if (::gethostname(name, sizeof name - 1) != 0) return "unknown";
  std::string host = name;
  for (char& c : host) {
    const bool plain = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                       c == '.' || c == '_';
    if (!plain) c = '_';  // '-' separates the tag's fields
  }
  return host;
}

// A live process's start time in clock ticks since boot (/proc/<pid>/stat, field 22): with the
// pid it names one process, even after the pid is reused. None for no process or a zombie.
std::optional<unsigned long long> StartTime(long pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const auto close = stat.rfind(')');  // the command name may hold spaces and parentheses
  if (close == std::string::npos || close + 2 > stat.size()) return std::nullopt;
  std::istringstream fields(stat.substr(close + 2));
  std::string field;
  for (int i = 3; i <= 22 && fields >> field; ++i) {
    // A zombie has ended (killed, its exit not yet collected: where the reaper is a container's
    // PID 1 that never reaps, for ever) and will not remove its staging.
    if (i == 3 && (field == "Z" || field == "X")) return std::nullopt;
    if (i == 22) return std::stoull(field);
  }
  return std::nullopt;
}

std::string OwnerTag() {
  const long pid = ::getpid();
  return fmt::format("{}-{}-{}", HostName(), pid, StartTime(pid).value_or(0));
}

// What is in `dir` that this tool did not write ("" when it holds only `owned` regular files).
std::string ForeignEntry(const fs::path& dir, const std::set<std::string>& owned,
                         bool temporaries_are_ours = false) {
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    const bool own_name = owned.count(name) > 0 || name == kModelCard ||
                          (temporaries_are_ours && IsOutputTemporary(name));
    if (!own_name || !fs::is_regular_file(it->symlink_status())) return name;
  }
  if (ec) return fmt::format("(unreadable: {})", ec.message());
  return "";
}

// An existing output may be replaced only with --overwrite, and only if it is one of ours.
void CheckReplaceable(const fs::path& path, bool overwrite, const std::set<std::string>& owned) {
  std::error_code ec;
  const auto status = fs::symlink_status(path, ec);
  if (!fs::exists(status)) return;
  if (!overwrite)
    Fail("output '{}' already exists (pass --overwrite to replace it)", path.string());
  if (!fs::is_directory(status))
    Fail("output '{}' exists and is not a directory; not replacing it", path.string());
  if (const std::string foreign = ForeignEntry(path, owned); !foreign.empty()) {
    Fail(
        "output '{}' holds '{}', which is not part of an output this tool writes; not "
        "replacing it, even with --overwrite (choose another --output-hf-path)",
        path.string(), foreign);
  }
}

// Staging directories of runs on this host that were killed (SIGKILL, a node reboot): their
// owner is gone, so no one else will ever remove them. A live run's are left alone.
void RemoveDeadStaging(const fs::path& parent, const std::string& target_name,
                       const std::set<std::string>& owned) {
  const std::string prefix = "." + target_name + std::string(kPartial);
  const std::string host = HostName();
  std::error_code ec;
  for (fs::directory_iterator it(parent, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (!name.starts_with(prefix) || !it->is_directory()) continue;
    // <host>-<pid>-<start>-<random>; the host has no '-' (HostName replaces it).
    std::istringstream tag(name.substr(prefix.size()));
    std::string owner_host, pid, start, random;
    if (!std::getline(tag, owner_host, '-') || !std::getline(tag, pid, '-') ||
        !std::getline(tag, start, '-') || !std::getline(tag, random) || random.size() != 6 ||
        owner_host != host)
      continue;
    try {
      const auto alive = StartTime(std::stol(pid));
      if (alive && *alive == std::stoull(start)) continue;
    } catch (const std::exception&) {
      continue;  // not a tag of ours
    }
    // A run killed while staging a file leaves that file's temporary name behind too.
    if (!ForeignEntry(it->path(), owned, /*temporaries_are_ours=*/true).empty()) continue;
    std::error_code ignored;
    fs::remove_all(it->path(), ignored);
  }
}

// The output's absolute path, once Create's checks pass.
fs::path CheckedTarget(const fs::path& target, bool overwrite, const std::set<std::string>& owned,
                       const std::string& reject_suffix) {
  const fs::path absolute = fs::absolute(target).lexically_normal();
  if (absolute.filename().empty()) Fail("output '{}' names no directory", target.string());
  CheckReplaceable(absolute, overwrite, owned);
  fs::path rejected = absolute;
  rejected += reject_suffix;
  CheckReplaceable(rejected, overwrite, owned);
  return absolute;
}

}  // namespace

bool StagedDirectory::CheckTarget(const fs::path& target, bool overwrite,
                                  const std::set<std::string>& owned_names,
                                  const std::string& reject_suffix) {
  const fs::path absolute = CheckedTarget(target, overwrite, owned_names, reject_suffix);
  RequireWritableDirectory(NearestExistingDirectory(absolute));
  std::error_code ec;
  return fs::exists(fs::symlink_status(absolute, ec));
}

StagedDirectory StagedDirectory::Create(const fs::path& target, bool overwrite,
                                        std::set<std::string> owned_names,
                                        std::string reject_suffix) {
  const fs::path absolute = CheckedTarget(target, overwrite, owned_names, reject_suffix);
  const fs::path anchor = NearestExistingDirectory(absolute);
  if (anchor == absolute.parent_path())
    RemoveDeadStaging(anchor, absolute.filename().string(), owned_names);
  return StagedDirectory(absolute, anchor, overwrite, std::move(owned_names),
                         std::move(reject_suffix));
}

OutputFile& StagedDirectory::AddFile(std::string name) {
  OutputFile file = OutputFile::CreateUnnamed(anchor_, target_ / name);
  files_.emplace_back(std::move(name), std::move(file));
  return files_.back().second;
}

const fs::path& StagedDirectory::Stage() {
  if (staging_) return staging_->path();
  const fs::path parent = target_.parent_path();
  std::error_code ec;
  fs::create_directories(parent, ec);
  if (ec) Fail<IoError>("cannot create '{}': {}", parent.string(), ec.message());
  // A stop signal waits until the directory is registered and filled: removed mid-way, it would
  // stay behind holding the files linked in after the removal had passed them.
  const auto defer = DeferSignalCleanup();
  staging_.emplace(PendingPath::Directory(
      parent, "." + target_.filename().string() + std::string(kPartial) + OwnerTag() + "-",
      target_));
  cleanup_.emplace(staging_->path());
  for (auto& [name, file] : files_) std::move(file).CommitAs(staging_->path() / name, false);
  return staging_->path();
}

void StagedDirectory::MoveTo(const fs::path& destination) {
  std::error_code ec;
  if (fs::exists(fs::symlink_status(destination, ec))) {
    if (!overwrite_)
      Fail("output '{}' appeared while exporting; not replacing it", destination.string());
    CheckReplaceable(destination, overwrite_, owned_names_);
  }
  // Exchanged with an existing output in one step, so the destination always holds a complete
  // adapter, old or new; the old one goes with the staging. A stop signal waits until the rename
  // is done and the path unregistered, so it never removes files from the published output.
  const auto defer = DeferSignalCleanup();
  std::move(*staging_).Publish(destination, overwrite_);
  staging_.reset();
  cleanup_.reset();
}

void StagedDirectory::Publish() {
  Stage();
  MoveTo(target_);
}

fs::path StagedDirectory::Reject() {
  Stage();
  fs::path destination = target_;
  destination += reject_suffix_;
  MoveTo(destination);
  return destination;
}

StagedDirectory::StagedDirectory(StagedDirectory&& other) noexcept
    : target_(std::move(other.target_)),
      anchor_(std::move(other.anchor_)),
      overwrite_(other.overwrite_),
      owned_names_(std::move(other.owned_names_)),
      reject_suffix_(std::move(other.reject_suffix_)),
      files_(std::move(other.files_)),
      staging_(std::exchange(other.staging_, std::nullopt)),
      cleanup_(std::exchange(other.cleanup_, std::nullopt)) {}

// A staging directory that was neither published nor rejected goes with staging_, whole: a stop
// signal meanwhile waits rather than leave the process to die half-way through the removal.
StagedDirectory::~StagedDirectory() {
  if (!staging_) return;
  const auto defer = DeferSignalCleanup();
  staging_.reset();
  cleanup_.reset();
}

}  // namespace adapter_job::writer
