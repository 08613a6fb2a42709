#include "adapter_job/core/signal_cleanup.h"

#include <pthread.h>

#include <csignal>
#include <mutex>
#include <set>
#include <thread>
#include <utility>

namespace adapter_job {
namespace {

namespace fs = std::filesystem;

struct Registry {
  std::recursive_mutex mutex;  // DeferSignalCleanup's holder may register and unregister paths
  std::multiset<fs::path> paths;
};

// Process-wide by nature (see the header); reached only through the functions below.
Registry& TheRegistry() {
  static Registry registry;
  return registry;
}

sigset_t StopSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  return set;
}

[[noreturn]] void WaitAndClean() {
  const sigset_t set = StopSignals();
  int signal = 0;
  while (sigwait(&set, &signal) != 0) {
  }
  {
    Registry& registry = TheRegistry();
    std::lock_guard lock(registry.mutex);  // held to the end: nothing registers meanwhile
    for (const auto& path : registry.paths) {
      std::error_code ignored;
      fs::remove_all(path, ignored);
    }
    // End as the signal would have: the default action, so the parent sees "killed by SIGTERM".
    std::signal(signal, SIG_DFL);
    pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
    std::raise(signal);
  }
  std::_Exit(128 + signal);  // not reached: the default action ends the process
}

}  // namespace

std::unique_lock<std::recursive_mutex> DeferSignalCleanup() {
  return std::unique_lock(TheRegistry().mutex);
}

void InstallSignalCleanup() {
  const sigset_t set = StopSignals();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);  // inherited by every thread started from now on
  std::thread(WaitAndClean).detach();
}

RemoveOnSignal::RemoveOnSignal(fs::path path) : path_(std::move(path)) {
  Registry& registry = TheRegistry();
  std::lock_guard lock(registry.mutex);
  registry.paths.insert(path_);
}

RemoveOnSignal::RemoveOnSignal(RemoveOnSignal&& other) noexcept
    : path_(std::exchange(other.path_, {})) {}

RemoveOnSignal::~RemoveOnSignal() {
  if (path_.empty()) return;
  Registry& registry = TheRegistry();
  std::lock_guard lock(registry.mutex);
  if (const auto it = registry.paths.find(path_); it != registry.paths.end())
    registry.paths.erase(it);
}

}  // namespace adapter_job
