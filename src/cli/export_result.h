// `adapter_job export|merge --wait` and `--result`: what jobs/export_hook.sh did in bash and
// Python, around the export itself. Waits for the checkpoint, pins the export to the iteration
// found, skips an adapter that --result records as made from that iteration, and records the
// outcome, whatever it is, in the hook's result schema:
//   {"status": "exported" | "skipped" | "failed", "exit_code", "message", "verified",
//    ["verification_skipped"], "checkpoint": {"path", "iteration_dir", "iteration", "integrity",
//    "fingerprint"}, "output", "files": {name: sha256}, ["weights": {name: {"bytes",
//    "modified_ns"}}, a merged model's shards (output_files.h)], "seconds": {"wait", "export",
//    "total"}, "export": the export's report or null}
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "adapter_job/comm/mpi_world.h"
#include "adapter_job/export.h"
#include "console.h"
#include "export_options.h"

namespace adapter_job::cli {

// Runs `export_body` (which exports with the options given, keeps the report it got and returns
// the exit code) as --wait and --result ask. Collective. Without either, it only calls the body.
int RunRecordedExport(
    const comm::MpiWorld& world, const ExportCommandLine& cl, Console& console,
    const ExportOptions& options,
    const std::function<int(const ExportOptions&, std::optional<ExportReport>&)>& export_body);

// `--record-failure`, or a command line that asked --result for help or print-config: writes the
// failure (rank 0) and returns its exit code.
int RecordWithoutExport(const comm::MpiWorld& world, const ExportCommandLine& cl);

// A command line that could not be parsed: when it names --result, the failure goes there too.
void RecordUnparsed(const comm::MpiWorld& world, ExportCommand command,
                    const std::vector<std::string>& args, int code, const std::string& message);

}  // namespace adapter_job::cli
