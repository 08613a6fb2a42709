// Which iteration a checkpoint path names: the one answer used by the export, the verification
// plugin and the post-training hook (through `adapter_job export --wait`). Megatron-LM's layout is
// `<save>/iter_%07d` (or `<save>/release`), and `<save>/latest_checkpointed_iteration.txt` names
// the newest complete one; an `iter_*` directory may also be given directly.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace adapter_job::checkpoint {

struct CheckpointLocation {
  std::filesystem::path given;          // what the user passed
  std::filesystem::path iteration_dir;  // holds (or will hold) .metadata and the .distcp files
  std::optional<int64_t> iteration;     // from latest_checkpointed_iteration.txt or the dir name
  // As the checkpoint names it: the marker's text ("1", "release") or the directory's name.
  std::string label;
};

// The location, or why it cannot be resolved yet (a file or directory Megatron has not written
// yet): `not_yet` as a wait reports it, `error` as a checkpoint that will not change does. Both
// are empty when `location` is set.
struct Resolution {
  std::optional<CheckpointLocation> location;
  std::string not_yet;
  std::string error;
};

// Never throws for what a save still in progress lacks; throws FormatError (exit 2) for what no
// save makes valid: a marker that is not an iteration number (or 'release', or beyond int64), a
// path that is a file.
Resolution TryResolveCheckpoint(const std::filesystem::path& given);

// TryResolveCheckpoint, with what is missing as a FormatError (exit 2) naming it.
CheckpointLocation ResolveCheckpoint(const std::filesystem::path& given);

// The iteration directories (iter_*, release) a save directory holds, sorted by name.
std::vector<std::string> IterationsIn(const std::filesystem::path& save_dir);

// --iteration N: save_dir/iter_%07d. Throws FormatError when `save_dir` is an iteration
// directory itself (its .metadata, or its name) unless it is that iteration, and when the
// iteration is missing and `may_appear` is false (no --wait), listing the ones there are.
std::filesystem::path PickIteration(const std::filesystem::path& save_dir, int64_t iteration,
                                    bool may_appear);

}  // namespace adapter_job::checkpoint
