// Options shared by `export`, `stream` and `merge`: parsed with Boost.Program_options from the
// command line, an optional --config INI file, and the defaults in config/export.ini, in that
// priority.
#pragma once

#include <boost/program_options/variables_map.hpp>
#include <optional>
#include <string>
#include <vector>

#include "adapter_job/checkpoint/checkpoint_readiness.h"
#include "adapter_job/export.h"
#include "adapter_job/merge/merged_model_sink.h"

namespace adapter_job::cli {

enum class ExportCommand { kExport, kStream, kMerge };

struct ExportCommandLine {
  ExportCommand command = ExportCommand::kExport;
  ExportOptions options;
  merge::MergeOptions merge;  // `merge`: the merged model's settings (its --dtype, shards, ...)
  std::optional<std::string> report_path;
  std::optional<std::string> stream_output;  // `stream --output`
  // `--wait SECONDS` (> 0): wait for a complete, settled iteration first.
  std::optional<checkpoint::WaitSettings> wait;
  std::optional<std::string> result_path;  // `--result FILE`: the hook's result JSON
  // `--record-failure MESSAGE`: only write MESSAGE to --result as a failure with this code
  // (how jobs/export_hook.sh records settings it refuses, or a launcher that died).
  std::optional<std::string> record_failure;
  int record_failure_code = 2;
  // How the refusal of an existing output tells the caller to replace it (--overwrite-hint).
  std::string overwrite_hint = "pass --overwrite";
  // `--dry-run[=text|json]`: print the plan instead of exporting.
  std::optional<std::string> dry_run;
  bool help = false;
  std::string help_text;
  boost::program_options::variables_map values;  // for the verification options
};

ExportCommandLine ParseExportCommandLine(const std::vector<std::string>& args,
                                         ExportCommand command);

}  // namespace adapter_job::cli
