// What rank 0 tells the person or the log watching it: on a terminal, a bar per stage redrawn in
// place with rate and ETA; elsewhere (CI, Slurm logs) plain timestamped lines, a few per stage.
// Other ranks say nothing but their errors, which main() prefixes with the rank.
#pragma once

#include <boost/program_options.hpp>
#include <chrono>
#include <cstdio>
#include <string>
#include <string_view>

#include "adapter_job/core/progress.h"

namespace adapter_job::cli {

enum class LogLevel { kError, kWarning, kInfo, kDebug };

// --progress: a bar redrawn in place, timestamped lines, one JSON object per step (for
// schedulers), or nothing; auto is the bar on a terminal and lines elsewhere. Under mpirun or
// srun stderr is a pipe even when it ends on a terminal: `bar` forces it.
enum class ProgressStyle { kBar, kLines, kJson, kNone };

void AddConsoleOptions(boost::program_options::options_description& options);

class Console {
 public:
  // From --log-level and --quiet; `rank` other than 0 keeps only errors.
  static Console FromOptions(const boost::program_options::variables_map& vm, int rank);
  Console(LogLevel level, bool terminal, std::FILE* out,
          ProgressStyle style = ProgressStyle::kLines);

  bool Shows(LogLevel level) const { return level <= level_; }
  // A message at `level`, timestamped unless on a terminal.
  void Log(LogLevel level, std::string_view message);
  // Results (the summary, the verification table): shown at info level, on stdout, as is.
  void Result(std::string_view text) const;
  // A sink for the library's progress reports; empty when progress is not shown.
  ProgressSink Progress();

 private:
  using Clock = std::chrono::steady_clock;
  void Show(const adapter_job::Progress& p);
  void ShowJson(const adapter_job::Progress& p, double elapsed);

  LogLevel level_;
  bool terminal_;
  ProgressStyle style_;
  std::FILE* out_;
  std::string stage_;  // the stage being shown
  Clock::time_point stage_start_;
  Clock::time_point last_shown_;
  uint64_t last_quarter_ = 0;  // plain lines: the last quarter of the stage reported
};

}  // namespace adapter_job::cli
