// `adapter_job export` (the default command), `adapter_job stream` and `adapter_job merge`.
#include <fmt/format.h>

#include <boost/program_options/errors.hpp>
#include <filesystem>
#include <functional>
#include <iostream>
#include <memory>
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

namespace {

// Parses the command line, and runs `publish` (which writes the output as `pinned` says, keeps
// its report and returns the exit code) under --wait and --result where the command has them;
// the result records a command line it could not parse too.
// Where a command's export goes.
using MakeSink = std::function<std::unique_ptr<writer::ExportSink>(const ExportCommandLine&,
                                                                   const ExportOptions&)>;

// --dry-run: the plan, printed by rank 0 on stdout as text or JSON; nothing is written, and --wait
// and --result are not acted on.
int DryRun(const comm::MpiWorld& world, const ExportCommandLine& cl, const ExportOptions& options,
           const MakeSink& make_sink) {
  const std::unique_ptr<writer::ExportSink> sink = make_sink(cl, options);
  ExportPreview preview = PreviewExport(options, *sink, world);
  if (world.rank() != 0) return 0;
  if (cl.wait)
    preview.notes.push_back(
        "--wait: not waited for (dry run): the plan is of the checkpoint as it is now");
  if (cl.result_path)
    preview.notes.push_back("--result: not written (dry run): " + *cl.result_path);
  if (*cl.dry_run == "json") {
    std::cout << preview.ToJson().dump(2) << '\n';
  } else {
    std::cout << preview.Text();
  }
  std::cout.flush();
  return 0;
}

int RunRecorded(const comm::MpiWorld& world, const std::vector<std::string>& args,
                ExportCommand command, const MakeSink& make_sink,
                const std::function<int(const ExportCommandLine&, Console&, writer::ExportSink&,
                                        const ExportOptions& pinned,
                                        std::optional<ExportReport>& kept)>& publish) {
  ExportCommandLine cl;
  try {
    cl = ParseExportCommandLine(args, command);
  } catch (const boost::program_options::error& e) {
    RecordUnparsed(world, command, args, static_cast<int>(ExitCode::kBadInput), e.what());
    throw;
  } catch (const Error& e) {
    RecordUnparsed(world, command, args, static_cast<int>(e.exit_code()), e.what());
    throw;
  }
  if (cl.record_failure || (cl.help && cl.result_path)) return RecordWithoutExport(world, cl);
  if (cl.help) {
    if (world.rank() == 0) std::cout << cl.help_text;
    return 0;
  }
  Console console = Console::FromOptions(cl.values, world.rank());
  ExportOptions options = cl.options;
  options.command_line = {"adapter_job", command == ExportCommand::kMerge    ? "merge"
                                         : command == ExportCommand::kStream ? "stream"
                                                                             : "export"};
  options.command_line.insert(options.command_line.end(), args.begin(), args.end());
  options.progress = console.Progress();
  if (command == ExportCommand::kStream) options.progress_stage = "stream";  // its log says so
  options.report_path = cl.report_path;  // written by the export, before it publishes
  if (cl.dry_run) return DryRun(world, cl, options, make_sink);
  // --wait and --result around the export (export_result.h); `options` is then pinned to the
  // iteration found.
  return RunRecordedExport(world, cl, console, options,
                           [&](const ExportOptions& pinned, std::optional<ExportReport>& kept) {
                             if (cl.values.count("verify-h5")) {
                               writer::RefuseOutputsOverInputs(
                                   {{"--verify-h5", cl.values["verify-h5"].as<std::string>()}},
                                   {{"--megatron-peft-checkpoint", options.checkpoint},
                                    {"--hf-model-id", options.hf_model_id}});
                             }
                             const std::unique_ptr<writer::ExportSink> sink = make_sink(cl, pinned);
                             return publish(cl, console, *sink, pinned, kept);
                           });
}

// What rank 0 says of a published (or rejected) output; the exit code.
int Conclude(const comm::MpiWorld& world, const ExportCommandLine& cl, Console& console,
             const ExportReport& report, const char* what) {
  if (world.rank() != 0) return 0;
  console.Result(report.Summary());
  if (!report.verification) {
    console.Log(LogLevel::kWarning, "not verified (" + report.verification_skipped.value_or("") +
                                        "): published " + report.published.string());
    return 0;
  }
  return ReportVerification(
      *report.verification, cl.values, console,
      fmt::format("; the {} was NOT published: it is in {}", what, report.published.string()));
}

}  // namespace

int RunExport(const comm::MpiWorld& world, const std::vector<std::string>& args) {
  return RunRecorded(
      world, args, ExportCommand::kExport,
      [](const ExportCommandLine&, const ExportOptions& options) {
        return std::make_unique<writer::PeftDirectorySink>(options.output, options.overwrite);
      },
      [&](const ExportCommandLine& cl, Console& console, writer::ExportSink& sink,
          const ExportOptions& pinned, std::optional<ExportReport>& kept) {
        return Conclude(world, cl, console, kept.emplace(ExportToSink(pinned, sink, world)),
                        "adapter");
      });
}

int RunStream(const comm::MpiWorld& world, const std::vector<std::string>& args) {
  return RunRecorded(
      world, args, ExportCommand::kStream,
      // Like stream_adapter_weights.py: raw HF names, one file, each tensor written as it arrives.
      [](const ExportCommandLine& cl, const ExportOptions& options) {
        return std::make_unique<writer::SafetensorsFileSink>(*cl.stream_output, options.overwrite);
      },
      [&](const ExportCommandLine&, Console& console, writer::ExportSink& sink,
          const ExportOptions& pinned, std::optional<ExportReport>& kept) {
        const ExportReport& report = kept.emplace(ExportToSink(pinned, sink, world));
        if (world.rank() == 0) console.Result(report.Summary());
        return 0;
      });
}

int RunMerge(const comm::MpiWorld& world, const std::vector<std::string>& args) {
  return RunRecorded(
      world, args, ExportCommand::kMerge,
      [&world](const ExportCommandLine& cl, const ExportOptions& options) {
        merge::MergeOptions merge = cl.merge;
        merge.progress = options.progress;
        return std::make_unique<merge::MergedModelSink>(merge, world);
      },
      [&](const ExportCommandLine& cl, Console& console, writer::ExportSink& sink,
          const ExportOptions& pinned, std::optional<ExportReport>& kept) {
        return Conclude(world, cl, console, kept.emplace(ExportToSink(pinned, sink, world)),
                        "merged model");
      });
}

}  // namespace adapter_job::cli
