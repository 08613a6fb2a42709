// One safetensors file of HF-named adapter tensors, each written as it arrives (what `adapter_job
// stream` writes, like Megatron-Bridge's stream_adapter_weights). The file stays unnamed until
// Publish.
#pragma once

#include <filesystem>
#include <memory>

#include "adapter_job/writer/export_sink.h"

namespace adapter_job::writer {

class SafetensorsFileSink final : public ExportSink {
 public:
  // Begin fails (FormatError) if `path` exists and `overwrite` is false.
  SafetensorsFileSink(std::filesystem::path path, bool overwrite);
  ~SafetensorsFileSink() override;

  std::vector<NamedPath> Outputs() const override;
  bool verifiable() const override { return false; }
  SinkPreview Preview(const ExportAnnouncement& announcement) const override;
  void Begin(const ExportAnnouncement& announcement) override;
  void Write(const LayerTensors& layer) override;
  FinishedOutput Finish() override;
  void Publish(bool accepted) override;
  void Abort() noexcept override;

 private:
  struct Open;
  std::filesystem::path path_;
  bool overwrite_ = false;
  ExportAnnouncement announcement_;
  std::unique_ptr<Open> open_;
};

}  // namespace adapter_job::writer
