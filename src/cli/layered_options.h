// Options from several places, in priority order (the command line, then --config FILE, then the
// installed defaults, then each option's built-in default), remembering where each value came from
// so that --print-config can say so.
#pragma once

#include <boost/program_options.hpp>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "adapter_job/core/parallel_sizes.h"

namespace adapter_job::cli {

struct OptionLayer {
  std::string source;  // "command line", "--config FILE", "defaults FILE"
  boost::program_options::variables_map values;
};

struct LayeredOptions {
  std::vector<OptionLayer> layers;               // highest priority first
  boost::program_options::variables_map merged;  // what the command uses
};

// Parses a command line that takes options only: an argument that is not an option (`export
// stray --hf-model-id ...`) is a usage error naming it, never silently dropped.
boost::program_options::parsed_options ParseOptionsOnly(
    const std::vector<std::string>& args,
    const boost::program_options::options_description& options);

// The value of option `name`, or of `alias`, the same option under Megatron-Bridge's spelling
// (its examples/conversion/adapter/*.py); both given is a usage error. A default (built in, or
// from a defaults file of `layered`) counts as not given.
std::optional<std::string> EitherSpelling(const boost::program_options::variables_map& vm,
                                          const char* name, const char* alias,
                                          const LayeredOptions* layered = nullptr);

// Megatron-Bridge's --tp/--pp/--ep/--etp: the sizes stated (the checkpoint's are used).
ParallelSizes StatedParallelSizes(const boost::program_options::variables_map& vm);

// Adds those four to `options`.
void AddParallelSizeOptions(boost::program_options::options_description& options, bool expert_tp);

// Parses `args`, then the --config file they name (if any), then `defaults_file` (if any).
LayeredOptions ParseLayered(const std::vector<std::string>& args,
                            const boost::program_options::options_description& options,
                            const std::vector<std::filesystem::path>& defaults_files);

// The effective settings as an INI file that --config accepts, each with its source in a comment;
// options in `skip` (like help) are left out.
std::string PrintConfig(const LayeredOptions& layered,
                        const boost::program_options::options_description& options,
                        const std::vector<std::string>& skip);

}  // namespace adapter_job::cli
