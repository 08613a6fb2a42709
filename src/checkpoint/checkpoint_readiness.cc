#include "adapter_job/checkpoint/checkpoint_readiness.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <thread>
#include <vector>

#include "adapter_job/checkpoint/integrity.h"
#include "adapter_job/core/sha256.h"

namespace adapter_job::checkpoint {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

struct FileState {
  std::string name;
  std::uintmax_t size = 0;
  fs::file_time_type modified;
  bool operator==(const FileState&) const = default;
};

// The regular files directly in `dir`, by name (what `find -maxdepth 1 -type f` lists). A file
// that vanishes while listed is simply not there: the next look sees the directory again.
std::vector<FileState> ListFiles(const fs::path& dir) {
  std::vector<FileState> files;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    std::error_code file_ec;
    if (it->symlink_status(file_ec).type() != fs::file_type::regular) continue;
    FileState state{it->path().filename().string(), it->file_size(file_ec),
                    it->last_write_time(file_ec)};
    if (!file_ec) files.push_back(std::move(state));
  }
  std::sort(files.begin(), files.end(),
            [](const FileState& a, const FileState& b) { return a.name < b.name; });
  return files;
}

// What is missing before an iteration counts as written; empty when nothing is.
std::string Missing(const Resolution& resolution) {
  if (!resolution.location) return resolution.not_yet;
  const fs::path& dir = resolution.location->iteration_dir;
  std::error_code ec;
  for (const char* name : {".metadata", "metadata.json"}) {
    if (!fs::is_regular_file(dir / name, ec))
      return fmt::format("no {} yet", (dir / name).string());
  }
  return {};
}

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

}  // namespace

ReadyCheckpoint WaitForCheckpoint(const fs::path& given, const WaitSettings& settings) {
  for (const double value :
       {settings.timeout_seconds, settings.poll_seconds, settings.settle_seconds}) {
    if (!std::isfinite(value) || value < 0) Fail("wait times must be seconds >= 0, not {}", value);
  }
  const auto start = Clock::now();
  const auto deadline = start + std::chrono::duration_cast<Clock::duration>(
                                    std::chrono::duration<double>(settings.timeout_seconds));
  std::optional<std::pair<fs::path, std::vector<FileState>>> seen;  // the last listing
  Clock::time_point stable_since;
  int looks = 0;
  std::string said;
  while (true) {
    const Resolution resolution = TryResolveCheckpoint(given);
    std::string why = Missing(resolution);
    if (why.empty()) {
      const fs::path& dir = resolution.location->iteration_dir;
      auto listing = std::make_pair(dir, ListFiles(dir));
      const std::string confirming =
          fmt::format("confirming for {} s that nothing still writes to {}",
                      settings.settle_seconds, dir.string());
      if (!seen || *seen != listing) {
        why = seen ? fmt::format("files of {} still changing", dir.string()) : confirming;
        seen = std::move(listing);
        stable_since = Clock::now();
        looks = 1;
      } else if (++looks >= 3 && Seconds(Clock::now() - stable_since) >= settings.settle_seconds) {
        return {*resolution.location, Seconds(Clock::now() - start)};
      } else {
        why = confirming;
      }
    } else {
      seen.reset();
    }
    const auto now = Clock::now();
    if (now >= deadline) {
      throw CheckpointNotReady(
          fmt::format("checkpoint not complete after {} s: {}", settings.timeout_seconds, why));
    }
    if (why != said && settings.on_wait) settings.on_wait(why);
    said = why;
    // Three looks over the settle time while confirming; the poll interval while a file is
    // missing. The last look is at the deadline, not a poll interval past it.
    const double step = seen ? settings.settle_seconds / 3 : settings.poll_seconds;
    std::this_thread::sleep_until(std::min(
        deadline,
        now + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(step))));
  }
}

std::string CheckpointFingerprint(const fs::path& iteration_dir) {
  std::error_code ec;
  if (fs::exists(iteration_dir / "integrity.json", ec)) {
    return Sha256File(iteration_dir / "integrity.json");
  }
  // As `{ sha256sum .metadata | cut -d' ' -f1; find . -maxdepth 1 -type f -printf '%P %s\n' |
  // sort; } | sha256sum` did in the hook, so that its results still match.
  std::string text = Sha256File(iteration_dir / ".metadata") + "\n";
  for (const FileState& file : ListFiles(iteration_dir)) {
    text += fmt::format("{} {}\n", file.name, file.size);
  }
  return Sha256Hex(text);
}

}  // namespace adapter_job::checkpoint
