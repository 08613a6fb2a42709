// Waiting for a checkpoint that training is still writing (`adapter_job export --wait`), and what
// identifies a complete one (the post-training hook's "already exported" check).
#pragma once

#include <filesystem>
#include <functional>
#include <string>
#include <string_view>

#include "adapter_job/checkpoint/checkpoint_resolver.h"
#include "adapter_job/core/error.h"

namespace adapter_job::checkpoint {

// The checkpoint was not complete within the wait: exit 4, as the README's table has it for the
// infrastructure (the training has not delivered), never 2 (nothing is wrong with the input yet).
class CheckpointNotReady : public Error {
 public:
  using Error::Error;
  ExitCode exit_code() const override { return ExitCode::kInfrastructure; }
};

struct WaitSettings {
  double timeout_seconds = 3600;
  double poll_seconds = 10;  // between looks while a file Megatron writes is missing
  // How long the iteration's files (names, sizes, modification times) must stay unchanged, seen
  // at least three times: a writer that pauses between shards looks finished for a second.
  double settle_seconds = 10;
  std::function<void(std::string_view why)> on_wait;  // each new reason to go on waiting
};

struct ReadyCheckpoint {
  CheckpointLocation location;
  double waited_seconds = 0;
};

// Waits until `given` resolves to an iteration whose .metadata and metadata.json exist (Megatron
// writes both last) and whose files have settled. Throws CheckpointNotReady naming what is still
// missing after the timeout, FormatError at once for what waiting cannot mend (a malformed
// latest_checkpointed_iteration.txt). integrity.json's digests are the export's to check.
ReadyCheckpoint WaitForCheckpoint(const std::filesystem::path& given, const WaitSettings& settings);

// What identifies an iteration's contents: the sha256 of its integrity.json when there is one
// (every byte is covered by it), else of .metadata's sha256 and the names and sizes of its files.
// Lower-case hex, as the post-training hook has always computed it.
std::string CheckpointFingerprint(const std::filesystem::path& iteration_dir);

}  // namespace adapter_job::checkpoint
