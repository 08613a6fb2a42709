// The run report's parts of the pipeline. The --report file: opened before the export starts (an
// unwritable one fails before any work), written before the output is published (an output is never
// published without the report that was asked for), removed again if publishing fails (it would
// describe an output that is not there).
#pragma once

#include <filesystem>
#include <map>
#include <string>

#include "adapter_job/core/file.h"
#include "adapter_job/export.h"
#include "export_plan.h"

namespace adapter_job::job {

// The report's figures that the plan gives: the training's parallelism, the adapter, integrity.
void DescribePlan(const ExportPlan& plan, ExportReport& report);

// The files of a finished output (the staged directory, before it is published), by name, with
// their sizes and sha256 (from `known_sha256` where the sink hashed a file as it wrote it); a
// merged model's *.safetensors weight shards (`merged`) by size only, as --result records them:
// re-reading a 140 GB model to hash it would take minutes.
std::vector<Provenance::OutputFile> DescribeOutputFiles(
    const std::filesystem::path& dir, bool merged,
    const std::map<std::string, std::string>& known_sha256);

// Unnamed in the nearest existing ancestor of its directory until it is written: missing
// directories are created only then, like the output's, so a failed run leaves none behind.
OutputFile OpenReportFile(const std::filesystem::path& path);
void CommitReportFile(OutputFile file, const ExportReport& report,
                      const std::filesystem::path& path);
void RemoveReportFile(const std::filesystem::path& path) noexcept;

}  // namespace adapter_job::job
