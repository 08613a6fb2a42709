// The callback and in-memory forms of the library API: StreamAdapterWeights (the pipeline with a
// sink that hands each tensor to the caller) and SaveHfAdapter (a PEFT directory from tensors in
// memory, without the pipeline).
#include <utility>

#include "adapter_job/core/file.h"
#include "adapter_job/export.h"
#include "adapter_job/safetensors/safetensors.h"
#include "adapter_job/writer/export_sink.h"
#include "adapter_job/writer/staged_directory.h"

namespace adapter_job {
namespace {

namespace fs = std::filesystem;

class CallbackSink final : public writer::ExportSink {
 public:
  CallbackSink(std::vector<writer::NamedPath> outputs,
               const std::function<void(const std::vector<StreamedTensorInfo>&)>& announce,
               const std::function<void(const NamedTensor&)>& consume)
      : outputs_(std::move(outputs)), announce_(announce), consume_(consume) {}

  std::vector<writer::NamedPath> Outputs() const override { return outputs_; }
  bool verifiable() const override { return false; }
  void Begin(const writer::ExportAnnouncement& announcement) override {
    announced_ = announcement.tensors;
    std::vector<StreamedTensorInfo> infos;
    for (const auto& t : announced_) infos.push_back({t.name, t.dtype, t.shape});
    announce_(infos);
  }
  void Write(const writer::LayerTensors& layer) override {
    for (const auto& t : layer.tensors) {
      const auto& announced = announced_.at(t.index);
      NamedTensor named{announced.name, {announced.dtype, announced.shape, {}}};
      for (const auto& piece : t.pieces)
        named.tensor.data.insert(named.tensor.data.end(), piece.begin(), piece.end());
      consume_(named);
    }
  }
  writer::FinishedOutput Finish() override { return {}; }  // the caller owns what it was given
  void Publish(bool /*accepted*/) override {}
  void Abort() noexcept override {}

 private:
  std::vector<writer::NamedPath> outputs_;
  const std::function<void(const std::vector<StreamedTensorInfo>&)>& announce_;
  const std::function<void(const NamedTensor&)>& consume_;
  std::vector<writer::AnnouncedTensor> announced_;
};

}  // namespace

ExportReport StreamAdapterWeights(
    const ExportOptions& options, const std::vector<writer::NamedPath>& outputs,
    const comm::MpiWorld& world,
    const std::function<void(const std::vector<StreamedTensorInfo>&)>& announce,
    const std::function<void(const NamedTensor&)>& sink) {
  CallbackSink callbacks(outputs, announce, sink);
  return ExportToSink(options, callbacks, world);
}

void SaveHfAdapter(const std::vector<NamedTensor>& tensors,
                   const writer::AdapterConfigInputs& config, const fs::path& output,
                   bool overwrite) {
  writer::StagedDirectory staged = writer::StagedDirectory::Create(
      output, overwrite, {writer::kAdapterWeightsFile, writer::kAdapterConfigFile},
      writer::kUnverifiedSuffix);
  std::vector<safetensors::TensorSpec> specs;
  for (const auto& t : tensors) specs.push_back({t.name, t.tensor.dtype, t.tensor.shape});
  safetensors::StreamWriter weights(staged.AddFile(writer::kAdapterWeightsFile), std::move(specs),
                                    std::nullopt);
  for (const auto& t : tensors) weights.Write(t.name, t.tensor.data);
  weights.Finish();
  staged.AddFile(writer::kAdapterConfigFile)
      .Write(writer::ToPythonJson(writer::BuildAdapterConfig(config)));
  staged.Publish();
}

}  // namespace adapter_job
