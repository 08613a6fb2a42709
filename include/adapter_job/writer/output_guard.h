// Outputs must never land on inputs: with --overwrite, an output directory equal to the
// checkpoint, the base model or a parent of either would be replaced (deleted) after the export.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

namespace adapter_job::writer {

struct NamedPath {
  std::string what;  // "--output-hf-path", "the checkpoint's iteration directory", ...
  std::filesystem::path path;
};

// Throws FormatError (exit 2) if an output equals, contains or lies inside an input, comparing
// the paths with symbolic links resolved, naming both. Empty paths are skipped.
void RefuseOutputsOverInputs(const std::vector<NamedPath>& outputs,
                             const std::vector<NamedPath>& inputs);

}  // namespace adapter_job::writer
