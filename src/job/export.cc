// The export pipeline, top to bottom:
//   plan     every rank, from the checkpoint's metadata alone (export_plan.h);
//   gather   each rank reads the shards it owns, layers travel to rank 0 one at a time;
//   convert  rank 0 turns each layer, as it arrives, into its HF tensors;
//   sink     writes them (writer/export_sink.h: a PEFT directory, a stream file, ...);
//   verify   the finished output, before anyone can see it;
//   publish  the report first, then the output, under its name or as rejected.
// What is exported differs only in the sink; this is the one pipeline.
#include "adapter_job/export.h"

#include <fmt/format.h>

#include <chrono>

#include "adapter_job/comm/layer_gather.h"
#include "adapter_job/comm/mpi_world.h"
#include "adapter_job/core/error.h"
#include "adapter_job/core/process_memory.h"
#include "adapter_job/verify/verify.h"
#include "adapter_job/writer/export_sink.h"
#include "export_plan.h"
#include "layer_parts.h"
#include "report.h"

namespace adapter_job {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double Since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Aborts the sink unless the export got as far as publishing it.
struct AbortOnFailure {
  writer::ExportSink& sink;
  bool published = false;
  ~AbortOnFailure() {
    if (!published) sink.Abort();
  }
};

struct Gathered {
  comm::GatherStats stats;
  double convert_write_seconds = 0;
  uint64_t tensors = 0;
  uint64_t tensor_bytes = 0;
};

// Gathers every layer to rank 0, which converts it and hands it to the sink.
Gathered GatherConvertWrite(const job::ExportPlan& plan, comm::Transport& transport, int rank,
                            writer::ExportSink& sink, const ExportOptions& options) {
  Gathered done;
  std::size_t next_index = 0;  // the announcement lists the tensors in layer order, as they come
  uint64_t layers_done = 0;
  uint64_t bytes_gathered = 0;
  const auto write_layer = [&](std::size_t l, std::span<const std::byte> buffer) {
    const auto start = Clock::now();
    const checkpoint::LayerLayout& layer = plan.layout.layers[l];
    const auto& outputs = plan.outputs[l];
    writer::LayerTensors tensors{layer.layer, {}};
    // Outputs are spans of the layer buffer, or of a copy when the dtype or layout changes.
    std::vector<Tensor> casts;
    casts.reserve(outputs.size());  // the spans point into them: no reallocation
    for (const auto& out : outputs) {
      writer::TensorBytes bytes{next_index++, {}};
      if (convert::NeedsCopy(out, layer)) {
        casts.push_back(convert::MaterializeOutput(out, layer, buffer));
        bytes.pieces = {casts.back().data};
      } else {
        bytes.pieces = convert::OutputPieces(out, layer, buffer);
      }
      for (const auto& piece : bytes.pieces) done.tensor_bytes += piece.size();
      ++done.tensors;
      tensors.tensors.push_back(std::move(bytes));
    }
    sink.Write(tensors);
    done.convert_write_seconds += Since(start);
    bytes_gathered += buffer.size();
    if (options.progress) {
      options.progress({options.progress_stage, ++layers_done,
                        static_cast<uint64_t>(plan.layout.layers.size()), bytes_gathered,
                        done.tensors, done.tensor_bytes});
    }
  };
  // Past this point ranks wait on each other: a failure must take every rank down (main aborts).
  try {
    done.stats = comm::GatherLayers(job::ScheduleOf(plan.layout, plan.owners),
                                    job::PartsOf(plan.layout, plan.reader, plan.owners, rank),
                                    transport, rank, write_layer);
  } catch (Error& e) {
    e.MarkAbortPeers();
    throw;
  } catch (const std::exception& e) {
    Error error(fmt::format("while gathering layers: {}", e.what()));
    error.MarkAbortPeers();
    throw error;
  }
  return done;
}

std::vector<writer::SinkStats> GatherSinkStats(const comm::MpiWorld& world,
                                               const writer::SinkStats& mine) {
  const auto read = comm::GatherToRoot(world, mine.bytes_read);
  const auto written = comm::GatherToRoot(world, mine.bytes_written);
  const auto micros = comm::GatherToRoot(world, static_cast<uint64_t>(mine.seconds * 1e6));
  const auto gpus = comm::GatherToRoot(world, static_cast<uint64_t>(mine.gpu + 1));
  const auto gpu_bytes = comm::GatherToRoot(world, mine.gpu_bytes);
  std::vector<writer::SinkStats> all(read.size());
  for (std::size_t r = 0; r < all.size(); ++r)
    all[r] = {read[r], written[r], micros[r] / 1e6, static_cast<int>(gpus[r]) - 1, gpu_bytes[r]};
  return all;
}

verify::VerificationReport VerifyOutput(const ExportOptions& options, const job::ExportPlan& plan,
                                        const writer::FinishedOutput& finished) {
  verify::VerifyOptions v = job::VerifyOptionsFor(options, plan);
  v.adapter = finished.verifiable_directory;
  if (!finished.merged_model_directory.empty()) v.merged_model = finished.merged_model_directory;
  verify::VerificationReport report = verify::VerifyWithPlugin(v);
  report.adapter_path = finished.accepted_path.string();
  return report;
}

}  // namespace

ExportReport ExportToSink(const ExportOptions& options, writer::ExportSink& sink,
                          const comm::MpiWorld& world) {
  const auto start = Clock::now();
  const bool rank0 = world.rank() == 0;
  AbortOnFailure abort_on_failure{sink};

  // Plan. Rank 0 opens its outputs now, so that one it cannot write fails before any work.
  const std::vector<writer::NamedPath> outputs = job::CheckedOutputs(sink, options);
  const fs::path output = outputs.size() == 1 ? options.output : outputs.front().path;
  std::optional<job::ExportPlan> plan;
  std::optional<OutputFile> report_file;
  comm::RunAgreed(world, [&] {
    plan.emplace(
        job::PlanExport(options, options.verify.has_value(), outputs, world.size(), world.rank()));
    if (!rank0) return;
    sink.Begin(plan->Announce(options));
    if (options.report_path) report_file.emplace(job::OpenReportFile(*options.report_path));
  });
  ExportReport report;
  report.seconds.plan = Since(start);

  // Gather, convert, write.
  std::unique_ptr<comm::Transport> transport;
  comm::RunAgreed(world, [&] { transport = comm::MakeTransport(world, options.backend); });
  const Gathered gathered = GatherConvertWrite(*plan, *transport, world.rank(), sink, options);

  // Collective, so gathered while every rank still takes part (rank 0 then verifies and publishes
  // alone); peak memory once the sink has finished, which a collective sink does on every rank.
  report.bytes_read_per_rank = comm::GatherToRoot(world, plan->reader.bytes_read());
  report.expected_bytes_per_rank =
      job::ExpectedBytesPerRank(plan->layout, plan->reader.metadata(), plan->owners, world.size());
  writer::FinishedOutput finished;
  comm::RunAgreed(world, [&] {
    if (rank0 || sink.collective()) finished = sink.Finish();
  });
  report.peak_rss_bytes_per_rank = comm::GatherToRoot(world, PeakResidentBytes());
  if (sink.collective()) report.sink_per_rank = GatherSinkStats(world, sink.stats());

  report.output = fs::absolute(output).lexically_normal();
  report.backend = std::string(transport->name());
  if (options.backend == comm::Backend::kNccl && world.size() == 1) {
    report.notes.push_back(
        "--backend nccl: one process moves nothing between ranks, so NCCL was not used (start "
        "the export under mpirun or srun with several ranks to use it)");
  }
  report.ranks = world.size();
  job::DescribePlan(*plan, report);
  report.tensors = gathered.tensors;
  report.tensor_bytes = gathered.tensor_bytes;
  report.seconds.read = gathered.stats.read_seconds;
  report.seconds.communicate = gathered.stats.communicate_seconds;
  report.seconds.convert_write = gathered.convert_write_seconds;
  report.seconds.total = Since(start);
  // Rank 0 went on alone (finishing the output): its own peak is read again now.
  if (!report.peak_rss_bytes_per_rank.empty())
    report.peak_rss_bytes_per_rank[0] = PeakResidentBytes();
  if (!rank0) return report;
  report.file_bytes = finished.file_bytes;
  report.provenance.command_line = options.command_line;
  const bool merged = !finished.merged_model_directory.empty();
  if (const fs::path& dir =
          merged ? finished.merged_model_directory : finished.verifiable_directory;
      !dir.empty())
    report.provenance.output_files = job::DescribeOutputFiles(dir, merged, finished.sha256);

  // Verify the output as written, before anyone can see it.
  if (options.verify) {
    const auto verify_start = Clock::now();
    report.verification = VerifyOutput(options, *plan, finished);
    report.seconds.verify = Since(verify_start);
  } else if (sink.verifiable()) {
    report.verification_skipped = "--no-verify was given";
  }
  const bool accepted = !report.verification || report.verification->passed();
  report.published = accepted ? finished.accepted_path : finished.rejected_path;
  report.seconds.total += report.seconds.verify;

  // Publish, the report first: an output is never published without the report asked for.
  if (report_file) job::CommitReportFile(std::move(*report_file), report, *options.report_path);
  try {
    sink.Publish(accepted);
  } catch (...) {
    if (options.report_path) job::RemoveReportFile(*options.report_path);
    throw;
  }
  abort_on_failure.published = true;
  return report;
}

ExportReport ExportAdapter(const ExportOptions& options, const comm::MpiWorld& world) {
  writer::PeftDirectorySink sink(options.output, options.overwrite);
  return ExportToSink(options, sink, world);
}

}  // namespace adapter_job
