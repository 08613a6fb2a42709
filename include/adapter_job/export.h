// The library behind `adapter_job export` and `adapter_job stream`, mirroring Megatron-Bridge's
// programmatic API (AutoBridge.export_adapter_ckpt, save_hf_adapter, export_adapter_weights).
// Functions taking an MpiWorld are collective: every rank calls them with the same options.
// One pipeline serves them all: plan -> gather -> convert -> sink (writer/export_sink.h) ->
// verify -> publish; they differ only in the sink.
#pragma once

#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "adapter_job/comm/backend.h"
#include "adapter_job/core/parallel_sizes.h"
#include "adapter_job/core/progress.h"
#include "adapter_job/core/serving_target.h"
#include "adapter_job/core/tensor.h"
#include "adapter_job/report/report.h"
#include "adapter_job/verify/options.h"
#include "adapter_job/writer/adapter_config.h"
#include "adapter_job/writer/export_sink.h"
#include "adapter_job/writer/output_guard.h"
#include "adapter_job/writer/peft_directory_sink.h"

namespace adapter_job {

namespace comm {
class MpiWorld;
}

// A failed verification publishes the adapter under the output's name plus this suffix.
using writer::kUnverifiedSuffix;

struct ExportOptions {
  // A local HF model directory (its config.json gives the dims), a model id the local HF cache
  // holds at `revision` (convert::ResolveBaseModel; never downloaded), or a model id that is then
  // only recorded as base_model_name_or_path (dims come from run_config.yaml). Empty: the one
  // run_config.yaml's model.hf_model_id records, resolved alike.
  std::string hf_model_id;
  std::string revision = "main";
  // Megatron-Bridge's --tp/--pp/--ep/--etp: read from the checkpoint, so only checked against it.
  ParallelSizes stated_parallelism;
  // adapter_config.json's base_model_name_or_path; unset: the model id (for a model of the HF
  // cache, or a snapshot directory of it), else --hf-model-id as given.
  std::optional<std::string> base_model_name_or_path;
  // The top-level run directory or an iter_* directory.
  std::filesystem::path checkpoint;
  std::filesystem::path output = "./my_adapter";  // ExportAdapter's; a sink names its own
  std::optional<DType> dtype;  // nullopt: keep the checkpoint's dtype (as Megatron-Bridge does)
  bool overwrite = false;
  comm::Backend backend = comm::Backend::kAuto;
  // More model families (*.json, as config/models/) besides the built-in ones.
  std::vector<std::filesystem::path> model_family_dirs;
  // Adapter keys under these prefixes are left out deliberately (Megatron-Bridge's
  // --exclude-adapter-base-prefix).
  std::vector<std::string> excluded_adapter_prefixes;
  // The MTP layers' adapters (`mtp.layers.<i>.`), written as layers num_hidden_layers + i where
  // the HF checkpoints of DeepSeek-V3 and GLM-4.5 keep those layers; left out otherwise.
  bool include_mtp_layers = false;
  // The engine the adapter is laid out for (convert/serving_layout.h): PEFT's layout, or vLLM's
  // (one alpha / r for every module) or SGLang's; each refuses what its engine cannot serve.
  ServingTarget target = ServingTarget::kPeft;
  // The command line that asked for this export, recorded in the report's provenance.
  std::vector<std::string> command_line;
  // Verify on rank 0 before publishing (prompts, top-k, device; the paths are filled in). A
  // failed verification publishes the adapter as `<output>.unverified` instead.
  std::optional<verify::VerifyOptions> verify;
  // The run report as JSON (ExportReport::ToJson), opened before the export starts and written
  // before the adapter is published, so a report that cannot be written publishes nothing.
  std::optional<std::filesystem::path> report_path;
  // Check the files integrity.json lists against their sha256 (when there is one), each rank
  // hashing its share, before anything is read.
  bool check_integrity = true;
  ProgressSink progress;                  // on rank 0, after every layer written (and verified)
  std::string progress_stage = "export";  // the stage the layers written are reported as
};

struct StageTimes {
  double plan = 0;
  double read = 0;         // rank 0's own reads
  double communicate = 0;  // rank 0's waits on other ranks
  double convert_write = 0;
  double verify = 0;
  double total = 0;
};

// Where an output came from, for the report: the tool, how it was asked, the checkpoint read and
// the files written.
struct Provenance {
  std::string tool_version;
  std::string git_commit;
  std::vector<std::string> command_line;
  std::filesystem::path checkpoint;     // as given
  std::filesystem::path iteration_dir;  // the iteration read
  std::optional<int64_t> iteration;
  std::string run_config_sha256;  // empty without a run_config.yaml
  struct OutputFile {
    std::string name;  // relative to the output
    uint64_t bytes = 0;
    std::string sha256;  // empty for a merged model's weight shards: sizes only, as --result
  };
  std::vector<OutputFile> output_files;
};

struct ExportReport {
  std::filesystem::path output;
  std::string backend;
  int ranks = 1;
  int tensor_parallel = 1;
  int pipeline_parallel = 1;
  int virtual_pipeline = 1;
  std::string adapter_kind;
  int64_t layers = 0;
  uint64_t tensors = 0;
  uint64_t tensor_bytes = 0;
  uint64_t file_bytes = 0;
  std::vector<uint64_t> bytes_read_per_rank;
  std::vector<uint64_t> expected_bytes_per_rank;  // the rank's own shards' storage
  std::vector<uint64_t> peak_rss_bytes_per_rank;  // each process's peak resident memory
  // A collective sink's work on each rank (the merge: base bytes read, bytes written, seconds).
  std::optional<std::vector<writer::SinkStats>> sink_per_rank;
  StageTimes seconds;
  std::optional<verify::VerificationReport> verification;
  std::optional<std::string> verification_skipped;  // why it did not run (--no-verify)
  std::filesystem::path published;                  // output, or output.unverified
  std::optional<std::size_t> integrity_files;       // files checked against integrity.json
  std::string integrity_not_checked;                // why not, when integrity_files is empty
  std::vector<std::string> excluded_adapters;       // adapter tensors deliberately not exported
  std::string base_model_resolved;  // where the base model came from, when not a directory given
  std::string target = "peft";      // the serving target the adapter is laid out for
  std::string target_note;          // what that layout changed (ServingLayout::note)
  std::vector<std::string> notes;   // what was asked but did not apply, said in the summary
  Provenance provenance;

  // Verified and passed: only then does the adapter go to `output`.
  bool verified() const { return verification && verification->passed(); }

  nlohmann::ordered_json ToJson() const;
  std::string Summary() const;  // human-readable, several lines
};

// What an export would do, found as the export finds it with nothing written (--dry-run): the
// same plan on every rank with the same checks before the first byte is written, then the files
// each rank would read, the tensors and files the output would hold, and what verification would
// run on.
struct ExportPreview {
  std::filesystem::path checkpoint;     // as given
  std::filesystem::path iteration_dir;  // the iteration that would be read
  std::optional<int64_t> iteration;
  std::string adapter_kind;
  int64_t dim = 0;
  nlohmann::json alpha;
  int tensor_parallel = 1;
  int pipeline_parallel = 1;
  int virtual_pipeline = 1;
  int64_t layers = 0;
  std::string base_model;           // what adapter_config.json would record
  std::string base_model_dir;       // empty when the base is only a recorded id
  std::string base_model_resolved;  // where the directory came from, when not given as one
  std::string model_family;
  std::string integrity;  // what integrity.json check was made, or why none
  int ranks = 1;
  std::string backend;
  struct FileRead {
    std::string file;  // relative to the iteration directory
    uint64_t bytes = 0;
  };
  std::vector<std::vector<FileRead>> reads_per_rank;
  std::string target = "peft";
  std::string target_note;
  std::vector<writer::AnnouncedTensor> tensors;  // as the sink is told of them, HF-named
  uint64_t tensor_bytes = 0;
  std::vector<std::string> excluded_adapters;
  writer::SinkPreview output;
  std::optional<std::filesystem::path> report_path;
  std::optional<verify::VerificationPreview> verification;
  int top_k = 0;
  std::optional<std::string> verification_skipped;
  std::vector<std::string> notes;

  nlohmann::ordered_json ToJson() const;
  std::string Text() const;  // for people: the plan, then every tensor
};

// Collective, like ExportToSink, with the same options and sink: plans and checks, writes nothing.
// Valid on rank 0 only.
ExportPreview PreviewExport(const ExportOptions& options, const writer::ExportSink& sink,
                            const comm::MpiWorld& world);

// The tool's version (the CMake project's) and the git commit it was built from ("unknown"
// outside a git checkout), for `adapter_job version` and the report's provenance.
std::string_view ToolVersion();
std::string_view ToolGitCommit();

// Exports the checkpoint's adapter into `sink` (used on rank 0 only; other ranks may pass any
// sink, which they never touch). Verification runs when `options.verify` is set, and is then
// required of the sink (ExportSink::verifiable). Valid on rank 0 only; other ranks get an empty
// report.
ExportReport ExportToSink(const ExportOptions& options, writer::ExportSink& sink,
                          const comm::MpiWorld& world);

// Exports the checkpoint's adapter as a PEFT directory (adapter_model.safetensors +
// adapter_config.json) at options.output: ExportToSink with a writer::PeftDirectorySink.
ExportReport ExportAdapter(const ExportOptions& options, const comm::MpiWorld& world);

// HF-named adapter tensors one at a time (names as HF modules have them, e.g.
// model.layers.0.self_attn.q_proj.lora_A.weight); `sink` runs on rank 0.
struct NamedTensor {
  std::string name;
  Tensor tensor;
};
struct StreamedTensorInfo {
  std::string name;
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
};
// `announce` runs on rank 0 once, before the first tensor, with everything that will follow.
// `outputs`: where the sink writes, refused if it lies on an input (writer/output_guard.h).
ExportReport StreamAdapterWeights(
    const ExportOptions& options, const std::vector<writer::NamedPath>& outputs,
    const comm::MpiWorld& world,
    const std::function<void(const std::vector<StreamedTensorInfo>&)>& announce,
    const std::function<void(const NamedTensor&)>& sink);

// Writes an in-memory adapter (PEFT-named tensors) as a PEFT directory.
void SaveHfAdapter(const std::vector<NamedTensor>& tensors,
                   const writer::AdapterConfigInputs& config, const std::filesystem::path& output,
                   bool overwrite);

}  // namespace adapter_job
