#include "adapter_job/checkpoint/checkpoint_resolver.h"

#include <fmt/format.h>

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
        fmt::format("'{}' is not a torch_dist checkpoint: it has no .metadata (pass the save "
                    "directory or an iter_* directory)",
                    given.string()));
  }
  location.iteration_dir = given;
  location.label = name;
  if (name.rfind("iter_", 0) == 0) location.iteration = ParseIteration(name.substr(5));
  return {std::move(location), {}, {}};
}

CheckpointLocation ResolveCheckpoint(const fs::path& given) {
  std::error_code ec;
  if (!fs::exists(given, ec)) Fail("checkpoint path '{}' does not exist", given.string());
  Resolution resolution = TryResolveCheckpoint(given);
  if (!resolution.location) Fail("{}", resolution.error);
  return std::move(*resolution.location);
}

}  // namespace adapter_job::checkpoint
