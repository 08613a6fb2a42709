// `adapter_job export` (the default command), `adapter_job stream` and `adapter_job merge`.
#include <fmt/format.h>

#include <boost/program_options/errors.hpp>
#include <filesystem>
#include <iostream>
#include <optional>

#include "adapter_job/comm/mpi_world.h"
#include "adapter_job/core/error.h"
#include "adapter_job/merge/merged_model_sink.h"
#include "adapter_job/writer/output_guard.h"
#include "adapter_job/writer/safetensors_file_sink.h"
#include "commands.h"
#include "console.h"
#include "export_options.h"
#include "export_result.h"
#include "verify_options.h"

namespace adapter_job::cli {

int RunExport(const comm::MpiWorld& world, const std::vector<std::string>& args) {
  ExportCommandLine cl;
  try {
    cl = ParseExportCommandLine(args, ExportCommand::kExport);
  } catch (const boost::program_options::error& e) {
    RecordUnparsed(world, args, static_cast<int>(ExitCode::kBadInput), e.what());
    throw;
  } catch (const Error& e) {
    RecordUnparsed(world, args, static_cast<int>(e.exit_code()), e.what());
    throw;
  }
  if (cl.record_failure || (cl.help && cl.result_path)) return RecordWithoutExport(world, cl);
  if (cl.help) {
    if (world.rank() == 0) std::cout << cl.help_text;
    return 0;
  }
  Console console = Console::FromOptions(cl.values, world.rank());
  ExportOptions options = cl.options;
  options.progress = console.Progress();
  options.report_path = cl.report_path;  // written by the export, before it publishes
  // --wait and --result around the export (export_result.h); `options` is then pinned to the
  // iteration found.
  return RunRecordedExport(
      world, cl, console, options,
      [&](const ExportOptions& pinned, std::optional<ExportReport>& kept) {
        if (cl.values.count("verify-h5")) {
          writer::RefuseOutputsOverInputs(
              {{"--verify-h5", cl.values["verify-h5"].as<std::string>()}},
              {{"--megatron-peft-checkpoint", options.checkpoint},
               {"--hf-model-id", options.hf_model_id}});
        }
        const ExportReport& report = kept.emplace(ExportAdapter(pinned, world));
        if (world.rank() != 0) return 0;
        console.Result(report.Summary());
        if (!report.verification) {
          console.Log(LogLevel::kWarning, "not verified (" +
                                              report.verification_skipped.value_or("") +
                                              "): published " + report.published.string());
          return 0;
        }
        return ReportVerification(
            *report.verification, cl.values, console,
            "; the adapter was NOT published: it is in " + report.published.string());
      });
}

int RunStream(const comm::MpiWorld& world, const std::vector<std::string>& args) {
  const ExportCommandLine cl = ParseExportCommandLine(args, ExportCommand::kStream);
  if (cl.help) {
    if (world.rank() == 0) std::cout << cl.help_text;
    return 0;
  }
  Console console = Console::FromOptions(cl.values, world.rank());
  ExportOptions options = cl.options;
  options.progress = console.Progress();
  options.report_path = cl.report_path;  // written by the export, before it publishes
  // Like stream_adapter_weights.py: raw HF names, one file, each tensor written as it arrives.
  writer::SafetensorsFileSink sink(*cl.stream_output, options.overwrite);
  const ExportReport report = ExportToSink(options, sink, world);
  if (world.rank() == 0) console.Result(report.Summary());
  return 0;
}

int RunMerge(const comm::MpiWorld& world, const std::vector<std::string>& args) {
  const ExportCommandLine cl = ParseExportCommandLine(args, ExportCommand::kMerge);
  if (cl.help) {
    if (world.rank() == 0) std::cout << cl.help_text;
    return 0;
  }
  Console console = Console::FromOptions(cl.values, world.rank());
  ExportOptions options = cl.options;
  options.progress = console.Progress();
  options.report_path = cl.report_path;
  merge::MergeOptions merge = cl.merge;
  merge.progress = options.progress;
  merge::MergedModelSink sink(merge, world);
  const ExportReport report = ExportToSink(options, sink, world);
  if (world.rank() != 0) return 0;
  console.Result(report.Summary());
  if (!report.verification) {
    console.Log(LogLevel::kWarning, "not verified (" + report.verification_skipped.value_or("") +
                                        "): published " + report.published.string());
    return 0;
  }
  return ReportVerification(
      *report.verification, cl.values, console,
      "; the merged model was NOT published: it is in " + report.published.string());
}

}  // namespace adapter_job::cli
