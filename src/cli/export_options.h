// Options shared by `export` and `stream`: parsed with Boost.Program_options from the command
// line, an optional --config INI file, and the defaults in config/export.ini, in that priority.
#pragma once

#include <boost/program_options/variables_map.hpp>
#include <optional>
#include <string>
#include <vector>

#include "adapter_job/export.h"

namespace adapter_job::cli {

struct ExportCommandLine {
  ExportOptions options;
  std::optional<std::string> report_path;
  std::optional<std::string> stream_output;  // `stream --output`
  bool help = false;
  std::string help_text;
  boost::program_options::variables_map values;  // for the verification options
};

ExportCommandLine ParseExportCommandLine(const std::vector<std::string>& args, bool stream);

}  // namespace adapter_job::cli
