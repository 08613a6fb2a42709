// Removal of half-written outputs when the process is told to stop: SIGINT (Ctrl-C), SIGTERM
// (scancel, Slurm's time limit, mpirun passing either on). Without it a stopped export leaves a
// hidden staging directory with a complete but unverified adapter in it.
//
// Signal dispositions belong to the whole process, so this is process-wide state: main() blocks
// the two signals before any thread starts (MPI, libtorch), and one thread waits for them,
// removes what is registered, then lets the signal end the process as it would have.
#pragma once

#include <filesystem>
#include <mutex>

namespace adapter_job {

// Call once, first thing in main(), before any other thread exists.
void InstallSignalCleanup();

// While alive, `path` (a directory tree this process created) is removed if SIGINT or SIGTERM
// ends the process.
// Holds the removal off while alive: a stop signal that arrives meanwhile is acted on when it
// ends. Hold it across a step that creates, fills or publishes a registered tree, so the removal
// never runs beside the step (rmdir failing on a file linked in meanwhile, or a directory renamed
// into place while its files are being removed).
[[nodiscard]] std::unique_lock<std::recursive_mutex> DeferSignalCleanup();

class RemoveOnSignal {
 public:
  explicit RemoveOnSignal(std::filesystem::path path);
  RemoveOnSignal(RemoveOnSignal&& other) noexcept;
  RemoveOnSignal& operator=(RemoveOnSignal&&) = delete;
  ~RemoveOnSignal();

 private:
  std::filesystem::path path_;
};

}  // namespace adapter_job
