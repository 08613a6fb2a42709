#include "adapter_job/writer/peft_directory_sink.h"

#include <optional>

#include "adapter_job/core/error.h"
#include "adapter_job/safetensors/safetensors.h"
#include "adapter_job/writer/staged_directory.h"

namespace adapter_job::writer {

namespace fs = std::filesystem;

struct PeftDirectorySink::Open {
  StagedDirectory staged;
  std::optional<safetensors::StreamWriter> weights;  // writes into a file of `staged`
};

PeftDirectorySink::PeftDirectorySink(fs::path target, bool overwrite)
    : target_(std::move(target)), overwrite_(overwrite) {}

PeftDirectorySink::~PeftDirectorySink() { Abort(); }

std::vector<NamedPath> PeftDirectorySink::Outputs() const {
  fs::path rejected = target_;
  rejected += kUnverifiedSuffix;
  return {{"--output-hf-path", target_}, {"the place of an unverified adapter", rejected}};
}

void PeftDirectorySink::Begin(const ExportAnnouncement& announcement) {
  if (const auto& refused = announcement.peft_refused; !refused.empty()) {
    Fail(
        "'{}' has an adapter ({} module(s) like it), but {}: a PEFT adapter cannot carry it. "
        "`adapter_job merge` folds every adapter into the base weights (a model that vLLM and "
        "SGLang serve as it is); --exclude-adapter-base-prefix can leave such adapters out, "
        "which changes what the model computes",
        refused.front().module, refused.size(), refused.front().why);
  }
  announcement_ = announcement;
  open_.reset(new Open{
      StagedDirectory::Create(target_, overwrite_, {kAdapterWeightsFile, kAdapterConfigFile},
                              kUnverifiedSuffix),
      std::nullopt});
  std::vector<safetensors::TensorSpec> specs;
  for (const auto& t : announcement_.tensors) specs.push_back({PeftName(t.name), t.dtype, t.shape});
  open_->weights.emplace(open_->staged.AddFile(kAdapterWeightsFile), std::move(specs),
                         std::nullopt);
}

void PeftDirectorySink::Write(const LayerTensors& layer) {
  for (const auto& t : layer.tensors) {
    open_->weights->Write(PeftName(announcement_.tensors.at(t.index).name), t.pieces);
  }
}

FinishedOutput PeftDirectorySink::Finish() {
  open_->weights->Finish();
  open_->staged.AddFile(kAdapterConfigFile)
      .Write(ToPythonJson(BuildAdapterConfig(announcement_.config)));
  FinishedOutput finished;
  finished.file_bytes = open_->weights->file_size();
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
  if (open_) open_->weights.reset();  // before the file it writes into
  open_.reset();                      // removes what was staged and not published
}

}  // namespace adapter_job::writer
