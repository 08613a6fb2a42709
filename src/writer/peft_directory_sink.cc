#include "adapter_job/writer/peft_directory_sink.h"

#include <optional>

#include "adapter_job/core/error.h"
#include "adapter_job/safetensors/safetensors.h"
#include "adapter_job/writer/staged_directory.h"
#include "adapter_job/writer/written_file_digest.h"

namespace adapter_job::writer {

namespace fs = std::filesystem;

struct PeftDirectorySink::Open {
  StagedDirectory staged;
  std::optional<safetensors::StreamWriter> weights;  // writes into a file of `staged`
  std::optional<WrittenFileDigest> weights_digest;   // reads that file back as it is written
};

PeftDirectorySink::PeftDirectorySink(fs::path target, bool overwrite, bool digest_weights)
    : target_(std::move(target)), overwrite_(overwrite), digest_weights_(digest_weights) {}

PeftDirectorySink::~PeftDirectorySink() { Abort(); }

std::vector<NamedPath> PeftDirectorySink::Outputs() const {
  fs::path rejected = target_;
  rejected += kUnverifiedSuffix;
  return {{"--output-hf-path", target_}, {"the place of an unverified adapter", rejected}};
}

namespace {

// A module stock PEFT refuses to load an adapter on cannot go into a PEFT directory.
void RefusePeftRefusedModules(const ExportAnnouncement& announcement) {
  if (const auto& refused = announcement.peft_refused; !refused.empty()) {
    Fail(
        "'{}' has an adapter ({} module(s) like it), but {}: a PEFT adapter cannot carry it. "
        "`adapter_job merge` folds every adapter into the base weights (a model that vLLM and "
        "SGLang serve as it is); --exclude-adapter-base-prefix can leave such adapters out, "
        "which changes what the model computes",
        refused.front().module, refused.size(), refused.front().why);
  }
}

std::vector<safetensors::TensorSpec> WeightSpecs(const ExportAnnouncement& announcement) {
  std::vector<safetensors::TensorSpec> specs;
  for (const auto& t : announcement.tensors) specs.push_back({PeftName(t.name), t.dtype, t.shape});
  return specs;
}

}  // namespace

SinkPreview PeftDirectorySink::Preview(const ExportAnnouncement& announcement) const {
  RefusePeftRefusedModules(announcement);
  SinkPreview preview;
  if (StagedDirectory::CheckTarget(target_, overwrite_, {kAdapterWeightsFile, kAdapterConfigFile},
                                   kUnverifiedSuffix))
    preview.notes.push_back(
        fmt::format("--overwrite: the existing '{}' would be replaced", target_.string()));
  const nlohmann::ordered_json config = BuildAdapterConfig(announcement.config);
  preview.files = {
      {target_ / kAdapterWeightsFile,
       safetensors::FileSize(WeightSpecs(announcement), std::nullopt), "adapter weights"},
      {target_ / kAdapterConfigFile, ToPythonJson(config).size(), "adapter config"}};
  preview.adapter_config = config;
  preview.tensor_name_prefix = kPeftNamePrefix;
  return preview;
}

void PeftDirectorySink::Begin(const ExportAnnouncement& announcement) {
  RefusePeftRefusedModules(announcement);
  announcement_ = announcement;
  open_.reset(new Open{
      StagedDirectory::Create(target_, overwrite_, {kAdapterWeightsFile, kAdapterConfigFile},
                              kUnverifiedSuffix),
      std::nullopt, std::nullopt});
  OutputFile& weights_file = open_->staged.AddFile(kAdapterWeightsFile);
  open_->weights.emplace(weights_file, WeightSpecs(announcement_), std::nullopt);
  if (digest_weights_) {
    open_->weights_digest.emplace(weights_file);
    open_->weights_digest->Final(open_->weights->written_prefix());
  }
}

void PeftDirectorySink::Write(const LayerTensors& layer) {
  for (const auto& t : layer.tensors) {
    open_->weights->Write(PeftName(announcement_.tensors.at(t.index).name), t.pieces);
  }
  if (open_->weights_digest) open_->weights_digest->Final(open_->weights->written_prefix());
}

FinishedOutput PeftDirectorySink::Finish() {
  open_->weights->Finish();
  open_->staged.AddFile(kAdapterConfigFile)
      .Write(ToPythonJson(BuildAdapterConfig(announcement_.config)));
  FinishedOutput finished;
  finished.file_bytes = open_->weights->file_size();
  if (open_->weights_digest)
    finished.sha256[kAdapterWeightsFile] = open_->weights_digest->Finish(finished.file_bytes);
  finished.verifiable_directory = open_->staged.Stage();
  finished.accepted_path = open_->staged.target();
  finished.rejected_path = open_->staged.target();
  finished.rejected_path += kUnverifiedSuffix;
  return finished;
}

void PeftDirectorySink::Publish(bool accepted) {
  if (accepted) {
    open_->staged.Publish();
  } else {
    open_->staged.Reject();
  }
}

void PeftDirectorySink::Abort() noexcept {
  if (open_) {  // before the file they write into and read
    open_->weights_digest.reset();
    open_->weights.reset();
  }
  open_.reset();  // removes what was staged and not published
}

}  // namespace adapter_job::writer
