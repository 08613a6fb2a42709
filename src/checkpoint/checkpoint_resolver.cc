#include "adapter_job/checkpoint/checkpoint_resolver.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cctype>
#include <charconv>

#include "adapter_job/core/error.h"
#include "adapter_job/core/file.h"

namespace adapter_job::checkpoint {
namespace {

namespace fs = std::filesystem;

constexpr std::string_view kLatestIterationFile = "latest_checkpointed_iteration.txt";

std::string Trim(std::string s) {
  const auto not_space = [](unsigned char c) { return !std::isspace(c); };
  s.erase(s.begin(), std::find_if(s.begin(), s.end(), not_space));
  s.erase(std::find_if(s.rbegin(), s.rend(), not_space).base(), s.end());
  return s;
}

// Digits only: from_chars also takes a sign, and fails (rather than wraps) past int64.
std::optional<int64_t> ParseIteration(std::string_view text) {
  if (text.empty() ||
      !std::all_of(text.begin(), text.end(), [](unsigned char c) { return std::isdigit(c); })) {
    return std::nullopt;
  }
  int64_t value = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size()) return std::nullopt;
  return value;
}

Resolution NotYet(std::string why, std::string error) {
  return {std::nullopt, std::move(why), std::move(error)};
}

// "; it holds iter_0000100, iter_0000200" for a message, or "" when it holds none.
std::string Holding(const fs::path& save_dir) {
  const auto found = IterationsIn(save_dir);
  return found.empty() ? "" : fmt::format("; it holds {}", fmt::join(found, ", "));
}

}  // namespace

Resolution TryResolveCheckpoint(const fs::path& given) {
  std::error_code ec;
  if (fs::exists(given, ec) && !fs::is_directory(given, ec)) {
    Fail("checkpoint path '{}' is not a directory", given.string());
  }
  CheckpointLocation location;
  location.given = given;
  const fs::path marker = given / kLatestIterationFile;
  // A directory with .metadata is an iteration itself, whatever marker lies beside its files.
  if (!fs::exists(given / ".metadata", ec) && fs::exists(marker, ec)) {
    location.label = Trim(ReadTextFile(marker, 4096));
    const std::string malformed = fmt::format(
        "{}: expected an iteration number (at most 9223372036854775807) or 'release', found '{}'",
        marker.string(), location.label);
    // Megatron rewrites the marker in place: empty is a moment of that, not a damaged file.
    if (location.label.empty())
      return NotYet(fmt::format("{} is empty", marker.string()), malformed);
    if (location.label == "release") {
      location.iteration_dir = given / "release";
    } else {
      location.iteration = ParseIteration(location.label);
      if (!location.iteration) Fail("{}", malformed);
      location.iteration_dir = given / fmt::format("iter_{:07d}", *location.iteration);
    }
    if (!fs::is_directory(location.iteration_dir, ec)) {
      return NotYet(
          fmt::format("no {} yet (named by {})", location.iteration_dir.string(), marker.string()),
          fmt::format("{} names iteration {}, but '{}' does not exist", marker.string(),
                      location.label, location.iteration_dir.string()));
    }
    return {std::move(location), {}, {}};
  }
  const std::string name = given.filename().string();
  const bool iteration_dir = name.rfind("iter_", 0) == 0 || name == "release";
  if (!fs::exists(given / ".metadata", ec)) {
    // A top-level save directory gets its marker last; an iteration directory its .metadata.
    return NotYet(
        fmt::format("no {} yet", (iteration_dir ? given / ".metadata" : marker).string()),
        fmt::format("'{}' is not a torch_dist checkpoint: it has no .metadata and no {} (pass the "
                    "save directory, an iter_* directory, or --iteration N){}",
                    given.string(), kLatestIterationFile, Holding(given)));
  }
  location.iteration_dir = given;
  location.label = name;
  if (name.rfind("iter_", 0) == 0) location.iteration = ParseIteration(name.substr(5));
  return {std::move(location), {}, {}};
}

std::vector<std::string> IterationsIn(const fs::path& save_dir) {
  std::vector<std::string> found;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(save_dir, ec)) {
    const std::string name = entry.path().filename().string();
    const bool iteration =
        name == "release" || (name.starts_with("iter_") && ParseIteration(name.substr(5)));
    if (iteration && entry.is_directory(ec)) found.push_back(name);
  }
  std::sort(found.begin(), found.end());
  return found;
}

fs::path PickIteration(const fs::path& save_dir, int64_t iteration, bool may_appear) {
  if (iteration < 0) Fail("--iteration must be >= 0, not {}", iteration);
  const std::string name = fmt::format("iter_{:07d}", iteration);
  std::error_code ec;
  const std::string given = save_dir.filename().string();
  if (fs::exists(save_dir / ".metadata", ec) || given.starts_with("iter_") || given == "release") {
    if (given == name) return save_dir;
    Fail(
        "--iteration {} picks an iteration of a save directory, but '{}' is an iteration "
        "directory itself: pass its save directory",
        iteration, save_dir.string());
  }
  const fs::path dir = save_dir / name;
  if (!may_appear && !fs::is_directory(dir, ec)) {
    Fail("--iteration {}: '{}' does not exist{}", iteration, dir.string(), Holding(save_dir));
  }
  return dir;
}

CheckpointLocation ResolveCheckpoint(const fs::path& given) {
  std::error_code ec;
  if (!fs::exists(given, ec)) Fail("checkpoint path '{}' does not exist", given.string());
  Resolution resolution = TryResolveCheckpoint(given);
  if (!resolution.location) Fail("{}", resolution.error);
  return std::move(*resolution.location);
}

}  // namespace adapter_job::checkpoint
