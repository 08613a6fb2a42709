// The run report: its JSON (--report) and text summary, and the report file's life.
#include "report.h"

#include <fmt/format.h>

#include <algorithm>
#include <system_error>

#include "adapter_job/checkpoint/integrity.h"
#include "adapter_job/core/error.h"
#include "adapter_job/export.h"

namespace adapter_job {

namespace fs = std::filesystem;

namespace {

std::string DeviceName(int gpu) { return gpu < 0 ? "cpu" : fmt::format("cuda:{}", gpu); }

}  // namespace

nlohmann::ordered_json ExportReport::ToJson() const {
  nlohmann::ordered_json j;
  j["output"] = output.string();
  j["backend"] = backend;
  j["ranks"] = ranks;
  j["tensor_model_parallel_size"] = tensor_parallel;
  j["pipeline_model_parallel_size"] = pipeline_parallel;
  j["virtual_pipeline_model_parallel_size"] = virtual_pipeline;
  j["adapter"] = adapter_kind;
  j["layers"] = layers;
  j["tensors"] = tensors;
  j["tensor_bytes"] = tensor_bytes;
  j["file_bytes"] = file_bytes;
  j["bytes_read_per_rank"] = bytes_read_per_rank;
  j["expected_bytes_per_rank"] = expected_bytes_per_rank;
  j["peak_rss_bytes_per_rank"] = peak_rss_bytes_per_rank;
  if (sink_per_rank) {
    nlohmann::ordered_json& per_rank = j["output_per_rank"];
    per_rank["bytes_read"] = nlohmann::ordered_json::array();
    per_rank["bytes_written"] = nlohmann::ordered_json::array();
    per_rank["seconds"] = nlohmann::ordered_json::array();
    per_rank["device"] = nlohmann::ordered_json::array();
    per_rank["gpu_bytes"] = nlohmann::ordered_json::array();
    for (const auto& rank : *sink_per_rank) {
      per_rank["bytes_read"].push_back(rank.bytes_read);
      per_rank["bytes_written"].push_back(rank.bytes_written);
      per_rank["seconds"].push_back(rank.seconds);
      per_rank["device"].push_back(DeviceName(rank.gpu));
      per_rank["gpu_bytes"].push_back(rank.gpu_bytes);
    }
  }
  j["seconds"] = {{"plan", seconds.plan},
                  {"read", seconds.read},
                  {"communicate", seconds.communicate},
                  {"convert_write", seconds.convert_write},
                  {"verify", seconds.verify},
                  {"total", seconds.total}};
  j["published"] = published.string();
  j["verified"] = verified();
  if (verification_skipped) j["verification_skipped"] = *verification_skipped;
  if (integrity_files) {
    j["integrity"] = {{"checked", true}, {"files", *integrity_files}};
  } else {
    j["integrity"] = {{"checked", false}, {"why", integrity_not_checked}};
  }
  j["excluded_adapter_tensors"] = excluded_adapters;
  if (!base_model_resolved.empty()) j["base_model_resolved"] = base_model_resolved;
  j["notes"] = notes;
  j["target"] = target;
  nlohmann::ordered_json files = nlohmann::ordered_json::array();
  for (const auto& f : provenance.output_files) {
    nlohmann::ordered_json file = {{"name", f.name}, {"bytes", f.bytes}};
    if (!f.sha256.empty()) file["sha256"] = f.sha256;
    files.push_back(std::move(file));
  }
  j["provenance"] = {
      {"tool_version", provenance.tool_version},
      {"git_commit", provenance.git_commit},
      {"command_line", provenance.command_line},
      {"checkpoint", provenance.checkpoint.string()},
      {"iteration_dir", provenance.iteration_dir.string()},
      {"iteration", provenance.iteration ? nlohmann::ordered_json(*provenance.iteration)
                                         : nlohmann::ordered_json()},
      {"run_config_sha256", provenance.run_config_sha256.empty()
                                ? nlohmann::ordered_json()
                                : nlohmann::ordered_json(provenance.run_config_sha256)},
      {"output_files", std::move(files)}};
  if (!target_note.empty()) j["target_note"] = target_note;
  if (verification) j["verification"] = verification->ToJson();
  return j;
}

std::string ExportReport::Summary() const {
  std::string read;
  for (std::size_t r = 0; r < bytes_read_per_rank.size(); ++r) {
    read += fmt::format("{}{}: {}", r ? ", " : "", r, bytes_read_per_rank[r]);
  }
  std::string output_lines;
  if (!base_model_resolved.empty()) output_lines += "base model: " + base_model_resolved + "\n";
  if (!target_note.empty()) output_lines += "--target " + target + ": " + target_note + "\n";
  for (const std::string& note : notes) output_lines += note + "\n";
  if (!excluded_adapters.empty()) {
    output_lines += fmt::format(
        "left out {} adapter tensors on purpose (MTP layers without --include-mtp-layers, "
        "--exclude-adapter-base-prefix), e.g. {}\n",
        excluded_adapters.size(), excluded_adapters.front());
  }
  if (sink_per_rank) {
    for (std::size_t r = 0; r < sink_per_rank->size(); ++r) {
      const writer::SinkStats& s = (*sink_per_rank)[r];
      output_lines +=
          fmt::format("output, rank {}: read {} bytes, wrote {} bytes in {:.3f} s on {}{}\n", r,
                      s.bytes_read, s.bytes_written, s.seconds, DeviceName(s.gpu),
                      s.gpu < 0 ? "" : fmt::format(" ({} bytes of GPU buffers)", s.gpu_bytes));
    }
  }
  return fmt::format(
             "exported {} adapter: {} layers, {} tensors, {} bytes -> {}\n"
             "ranks {} ({} backend) over TP {} x PP {}{}; bytes read per rank: {}\n"
             "seconds: plan {:.3f}, read {:.3f}, communicate {:.3f}, convert+write {:.3f}, total "
             "{:.3f}\n",
             adapter_kind, layers, tensors, tensor_bytes, output.string(), ranks, backend,
             tensor_parallel, pipeline_parallel,
             virtual_pipeline > 1 ? fmt::format(" (VPP {})", virtual_pipeline) : "", read,
             seconds.plan, seconds.read, seconds.communicate, seconds.convert_write,
             seconds.total) +
         output_lines;
}

namespace job {

void DescribePlan(const ExportPlan& plan, ExportReport& report) {
  report.tensor_parallel = plan.layout.tensor_parallel;
  report.pipeline_parallel = plan.layout.pipeline_parallel;
  report.virtual_pipeline = plan.layout.virtual_pipeline;
  report.adapter_kind = std::string(checkpoint::AdapterKindName(plan.settings.kind));
  report.layers = plan.layout.num_layers;
  report.integrity_files = plan.integrity_files;
  report.integrity_not_checked = plan.integrity_not_checked;
  report.excluded_adapters = plan.layout.excluded;
  report.base_model_resolved = plan.base.resolved_how;
  report.target = std::string(ServingTargetName(plan.target));
  report.target_note = plan.serving.note;
  Provenance& p = report.provenance;
  p.tool_version = std::string(ToolVersion());
  p.git_commit = std::string(ToolGitCommit());
  p.checkpoint = plan.run.given;
  p.iteration_dir = plan.run.iteration_dir;
  p.iteration = plan.run.iteration;
  if (plan.run.run_config_path)
    p.run_config_sha256 = checkpoint::Sha256File(*plan.run.run_config_path);
}

std::vector<Provenance::OutputFile> DescribeOutputFiles(
    const fs::path& dir, bool merged, const std::map<std::string, std::string>& known_sha256) {
  std::vector<Provenance::OutputFile> files;
  for (const auto& entry : fs::recursive_directory_iterator(dir)) {
    if (!entry.is_regular_file()) continue;
    Provenance::OutputFile file;
    file.name = entry.path().lexically_relative(dir).string();
    file.bytes = entry.file_size();
    if (const auto known = known_sha256.find(file.name); known != known_sha256.end())
      file.sha256 = known->second;
    else if (!(merged && entry.path().extension() == ".safetensors"))
      file.sha256 = checkpoint::Sha256File(entry.path());
    files.push_back(std::move(file));
  }
  std::sort(files.begin(), files.end(),
            [](const auto& a, const auto& b) { return a.name < b.name; });
  return files;
}

OutputFile OpenReportFile(const fs::path& path) {
  return OutputFile::CreateUnnamed(NearestExistingDirectory(path), fs::absolute(path));
}

void CommitReportFile(OutputFile file, const ExportReport& report, const fs::path& path) {
  file.Write(report.ToJson().dump(2) + "\n");
  const fs::path parent = fs::absolute(path).parent_path();
  std::error_code ec;
  fs::create_directories(parent, ec);
  if (ec) Fail<IoError>("cannot create '{}': {}", parent.string(), ec.message());
  std::move(file).CommitAs(path, /*overwrite=*/true);
}

void RemoveReportFile(const fs::path& path) noexcept {
  std::error_code ignored;
  fs::remove(path, ignored);
}

}  // namespace job
}  // namespace adapter_job
