// --dry-run: the export's plan, made and checked as the export makes it, described instead of run.
#include <fmt/format.h>

#include "adapter_job/comm/mpi_world.h"
#include "adapter_job/core/checked_math.h"
#include "adapter_job/core/error.h"
#include "adapter_job/core/file.h"
#include "adapter_job/core/human_bytes.h"
#include "adapter_job/core/tensor.h"
#include "adapter_job/export.h"
#include "adapter_job/verify/verify.h"
#include "export_plan.h"
#include "layer_parts.h"

namespace adapter_job {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;

std::string WeightName(writer::AdapterWeight weight) {
  switch (weight) {
    case writer::AdapterWeight::kLoraA:
      return "lora_A";
    case writer::AdapterWeight::kLoraB:
      return "lora_B";
    case writer::AdapterWeight::kMagnitude:
      return "magnitude";
  }
  return "?";
}

uint64_t TensorBytes(const writer::AnnouncedTensor& t) {
  return CheckedMul(CheckedNumel(t.shape, "tensor shape"), ItemSize(t.dtype), "tensor bytes");
}

std::string IntegrityOf(const job::ExportPlan& plan) {
  if (plan.integrity_files)
    return fmt::format("{} files checked against integrity.json's sha256 (each rank its share)",
                       *plan.integrity_files);
  return "not checked: " + plan.integrity_not_checked;
}

void Describe(const job::ExportPlan& plan, const ExportOptions& options, int world_size,
              ExportPreview& preview) {
  preview.checkpoint = fs::absolute(plan.run.given).lexically_normal();
  preview.iteration_dir = fs::absolute(plan.run.iteration_dir).lexically_normal();
  preview.iteration = plan.run.iteration;
  preview.adapter_kind = std::string(checkpoint::AdapterKindName(plan.settings.kind));
  preview.dim = plan.run.peft->dim;
  preview.alpha = plan.run.peft->alpha;
  preview.tensor_parallel = plan.layout.tensor_parallel;
  preview.pipeline_parallel = plan.layout.pipeline_parallel;
  preview.virtual_pipeline = plan.layout.virtual_pipeline;
  preview.layers = plan.layout.num_layers;
  preview.base_model = options.base_model_name_or_path.value_or(plan.base.name);
  preview.base_model_dir = plan.base.dir ? plan.base.dir->string() : "";
  preview.base_model_resolved = plan.base.resolved_how;
  preview.model_family = plan.settings.family.name;
  preview.integrity = IntegrityOf(plan);
  preview.ranks = world_size;
  preview.backend = std::string(comm::BackendName(options.backend));
  for (const auto& files :
       job::ReadsPerRank(plan.layout, plan.reader.metadata(), plan.owners, world_size)) {
    auto& reads = preview.reads_per_rank.emplace_back();
    for (const auto& [file, bytes] : files) reads.push_back({file, bytes});
  }
  preview.target = std::string(ServingTargetName(plan.target));
  preview.target_note = plan.serving.note;
  preview.excluded_adapters = plan.layout.excluded;
}

}  // namespace

ExportPreview PreviewExport(const ExportOptions& options, const writer::ExportSink& sink,
                            const comm::MpiWorld& world) {
  const bool rank0 = world.rank() == 0;
  const std::vector<writer::NamedPath> outputs = job::CheckedOutputs(sink, options);
  ExportPreview preview;
  // Every rank plans, as the export does: each checks its share of integrity.json and every
  // shard file's size, so a dry run fails where the export would, on any rank.
  comm::RunAgreed(world, [&] {
    const job::ExportPlan plan =
        job::PlanExport(options, options.verify.has_value(), outputs, world.size(), world.rank());
    if (!rank0) return;
    Describe(plan, options, world.size(), preview);
    const writer::ExportAnnouncement announcement = plan.Announce(options);
    preview.output = sink.Preview(announcement);
    for (auto& file : preview.output.files) file.path = fs::absolute(file.path).lexically_normal();
    preview.tensors = announcement.tensors;
    for (const auto& t : preview.tensors) preview.tensor_bytes += TensorBytes(t);
    if (options.report_path) {
      RequireWritableDirectory(NearestExistingDirectory(fs::absolute(*options.report_path)));
      preview.report_path = fs::absolute(*options.report_path).lexically_normal();
    }
    if (options.verify) {
      preview.verification =
          verify::PreviewVerificationWithPlugin(job::VerifyOptionsFor(options, plan));
      preview.top_k = options.verify->top_k;
    } else {
      preview.verification_skipped =
          sink.verifiable() ? "--no-verify was given" : "this output is never verified";
    }
  });
  if (options.backend == comm::Backend::kNccl && world.size() == 1)
    preview.notes.push_back("--backend nccl: with one process NCCL would not be used");
  return preview;
}

Json ExportPreview::ToJson() const {
  Json j;
  j["dry_run"] = true;
  j["checkpoint"] = {{"path", checkpoint.string()},
                     {"iteration_dir", iteration_dir.string()},
                     {"iteration", iteration ? Json(*iteration) : Json()},
                     {"integrity", integrity}};
  j["adapter"] = {{"kind", adapter_kind},
                  {"dim", dim},
                  {"alpha", alpha},
                  {"tensor_parallel", tensor_parallel},
                  {"pipeline_parallel", pipeline_parallel},
                  {"virtual_pipeline", virtual_pipeline},
                  {"layers", layers},
                  {"excluded_adapters", excluded_adapters}};
  j["base_model"] = {{"name", base_model},
                     {"dir", base_model_dir.empty() ? Json() : Json(base_model_dir)},
                     {"resolved", base_model_resolved},
                     {"family", model_family}};
  Json ranks_json = Json::array();
  for (std::size_t r = 0; r < reads_per_rank.size(); ++r) {
    Json files = Json::array();
    uint64_t total = 0;
    for (const auto& read : reads_per_rank[r]) {
      files.push_back({{"file", read.file}, {"bytes", read.bytes}});
      total += read.bytes;
    }
    ranks_json.push_back({{"rank", r}, {"bytes", total}, {"files", files}});
  }
  j["ranks"] = {{"count", ranks}, {"backend", backend}, {"reads", ranks_json}};
  Json files = Json::array();
  for (const auto& f : output.files) {
    files.push_back({{"path", f.path.string()},
                     {"bytes", f.bytes ? Json(*f.bytes) : Json()},
                     {"what", f.what}});
  }
  Json tensors_json = Json::array();
  for (const auto& t : tensors) {
    tensors_json.push_back({{"name", output.tensor_name_prefix + t.name},
                            {"module", t.module},
                            {"weight", WeightName(t.weight)},
                            {"layer", t.layer},
                            {"dtype", std::string(TorchName(t.dtype))},
                            {"shape", t.shape}});
  }
  j["output"] = {{"target", target},
                 {"target_note", target_note},
                 {"files", files},
                 {"report", report_path ? Json(report_path->string()) : Json()},
                 {"adapter_config", output.adapter_config ? *output.adapter_config : Json()},
                 {"tensor_bytes", tensor_bytes},
                 {"tensors", tensors_json}};
  if (verification) {
    Json prompts = Json::array();
    for (const auto& p : verification->prompts) {
      prompts.push_back(
          {{"prompt", p.prompt}, {"token_ids", p.token_ids}, {"synthetic", p.synthetic}});
    }
    j["verification"] = {{"device", verification->device},
                         {"top_k", top_k},
                         {"merged_model", output.merged_model},
                         {"prompts", prompts}};
  } else {
    j["verification"] = nullptr;
    if (verification_skipped) j["verification_skipped"] = *verification_skipped;
  }
  std::vector<std::string> all_notes = output.notes;
  all_notes.insert(all_notes.end(), notes.begin(), notes.end());
  j["notes"] = all_notes;
  return j;
}

std::string ExportPreview::Text() const {
  std::string text = "dry run: nothing was written\n";
  text += fmt::format("checkpoint: {}{}\n", iteration_dir.string(),
                      iteration ? fmt::format(" (iteration {})", *iteration) : "");
  text += fmt::format("adapter: {} dim {} alpha {}, {} layers, trained at TP {} x PP {}{}\n",
                      adapter_kind, dim, alpha.dump(), layers, tensor_parallel, pipeline_parallel,
                      virtual_pipeline > 1 ? fmt::format(" (VPP {})", virtual_pipeline) : "");
  text += fmt::format(
      "base model: {} ({} family{}{})\n", base_model, model_family,
      base_model_dir.empty() || base_model_dir == base_model ? "" : ", " + base_model_dir,
      base_model_resolved.empty() ? "" : "; " + base_model_resolved);
  text += "integrity: " + integrity + "\n";
  text += fmt::format("ranks: {} ({} backend)\n", ranks, backend);
  for (std::size_t r = 0; r < reads_per_rank.size(); ++r) {
    uint64_t total = 0;
    std::vector<std::string> files;
    for (const auto& read : reads_per_rank[r]) {
      total += read.bytes;
      files.push_back(fmt::format("{} ({})", read.file, HumanBytes(read.bytes)));
    }
    text += fmt::format("  rank {} reads {}{}{}\n", r, HumanBytes(total), files.empty() ? "" : ": ",
                        fmt::join(files, ", "));
  }
  text += output.merged_model ? std::string("output (the merged model):\n")
                              : fmt::format("output ({} layout{}):\n", target,
                                            target_note.empty() ? "" : "; " + target_note);
  for (const auto& f : output.files) {
    text += fmt::format("  {}  {}  {}\n", f.path.string(), f.bytes ? HumanBytes(*f.bytes) : "?",
                        f.what);
  }
  if (report_path) text += fmt::format("  {}  (the run report)\n", report_path->string());
  if (verification) {
    text += fmt::format("verification: on {}, top-{}{}\n", verification->device, top_k,
                        output.merged_model ? ", the merged model read back too" : "");
    for (const auto& p : verification->prompts) {
      text += fmt::format("  prompt {}: {} tokens {}\n",
                          p.synthetic        ? std::string("(synthetic token ids)")
                          : p.prompt.empty() ? std::string("(token ids)")
                                             : "'" + p.prompt + "'",
                          p.token_ids.size(), ShapeToString(p.token_ids));
    }
  } else {
    text += "verification: none" +
            (verification_skipped ? " (" + *verification_skipped + ")" : std::string()) + "\n";
  }
  for (const auto& note : output.notes) text += "note: " + note + "\n";
  for (const auto& note : notes) text += "note: " + note + "\n";
  text +=
      fmt::format("{}: {} ({})\n", output.merged_model ? "adapter tensors merged in" : "tensors",
                  tensors.size(), HumanBytes(tensor_bytes));
  for (const auto& t : tensors) {
    text += fmt::format("  {}  {}  {}\n", output.tensor_name_prefix + t.name, TorchName(t.dtype),
                        ShapeToString(t.shape));
  }
  return text;
}

}  // namespace adapter_job
