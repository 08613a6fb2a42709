// A PEFT adapter directory (adapter_model.safetensors + adapter_config.json), as Megatron-Bridge's
// export_adapter_ckpt writes it: staged unnamed beside the target, verifiable there, and published
// whole or not at all (a rejected one goes to `<target>.unverified`).
#pragma once

#include <filesystem>
#include <memory>

#include "adapter_job/writer/export_sink.h"

namespace adapter_job::writer {

// A failed verification publishes the adapter under the output's name plus this suffix.
inline constexpr const char* kUnverifiedSuffix = ".unverified";

class PeftDirectorySink final : public ExportSink {
 public:
  // Nothing is created before Begin, which fails (FormatError) if `target` or its .unverified
  // place exists and `overwrite` is false. With `digest_weights`, Finish gives the sha256 of
  // adapter_model.safetensors (FinishedOutput::sha256), taken on a thread of its own while the
  // file is written; an adapter that is no one's output (the merge's scratch copy) needs none.
  PeftDirectorySink(std::filesystem::path target, bool overwrite, bool digest_weights = true);
  ~PeftDirectorySink() override;

  std::vector<NamedPath> Outputs() const override;
  bool verifiable() const override { return true; }
  SinkPreview Preview(const ExportAnnouncement& announcement) const override;
  void Begin(const ExportAnnouncement& announcement) override;
  void Write(const LayerTensors& layer) override;
  FinishedOutput Finish() override;
  void Publish(bool accepted) override;
  void Abort() noexcept override;

 private:
  struct Open;  // the staged directory and the weights writer, from Begin on
  std::filesystem::path target_;
  bool overwrite_ = false;
  bool digest_weights_ = true;
  ExportAnnouncement announcement_;
  std::unique_ptr<Open> open_;
};

}  // namespace adapter_job::writer
