#include "adapter_job/writer/safetensors_file_sink.h"

#include <fmt/format.h>

#include <optional>

#include "adapter_job/core/file.h"
#include "adapter_job/safetensors/safetensors.h"

namespace adapter_job::writer {

namespace fs = std::filesystem;

struct SafetensorsFileSink::Open {
  OutputFile file;
  std::optional<safetensors::StreamWriter> writer;  // writes into `file`
};

SafetensorsFileSink::SafetensorsFileSink(fs::path path, bool overwrite)
    : path_(std::move(path)), overwrite_(overwrite) {}

SafetensorsFileSink::~SafetensorsFileSink() { Abort(); }

std::vector<NamedPath> SafetensorsFileSink::Outputs() const { return {{"--output", path_}}; }

namespace {

std::vector<safetensors::TensorSpec> TensorSpecs(const ExportAnnouncement& announcement) {
  std::vector<safetensors::TensorSpec> specs;
  for (const auto& t : announcement.tensors) specs.push_back({t.name, t.dtype, t.shape});
  return specs;
}

}  // namespace

SinkPreview SafetensorsFileSink::Preview(const ExportAnnouncement& announcement) const {
  OutputFile::CheckCreate(path_, overwrite_);
  SinkPreview preview;
  preview.files = {
      {path_, safetensors::FileSize(TensorSpecs(announcement), std::nullopt), "adapter tensors"}};
  std::error_code ec;
  if (fs::exists(path_, ec))
    preview.notes.push_back(
        fmt::format("--overwrite: the existing '{}' would be replaced", path_.string()));
  return preview;
}

void SafetensorsFileSink::Begin(const ExportAnnouncement& announcement) {
  announcement_ = announcement;
  open_.reset(new Open{OutputFile::Create(path_, overwrite_), std::nullopt});
  open_->writer.emplace(open_->file, TensorSpecs(announcement_), std::nullopt);
}

void SafetensorsFileSink::Write(const LayerTensors& layer) {
  for (const auto& t : layer.tensors) {
    open_->writer->Write(announcement_.tensors.at(t.index).name, t.pieces);
  }
}

FinishedOutput SafetensorsFileSink::Finish() {
  open_->writer->Finish();
  FinishedOutput finished;
  finished.file_bytes = open_->writer->file_size();
  finished.accepted_path = path_;
  finished.rejected_path = path_;  // never rejected: it is not verified
  return finished;
}

void SafetensorsFileSink::Publish(bool /*accepted*/) {
  open_->writer.reset();
  std::move(open_->file).Commit();
  open_.reset();
}

void SafetensorsFileSink::Abort() noexcept {
  if (open_) open_->writer.reset();  // before the file it writes into
  open_.reset();                     // an uncommitted file is removed
}

}  // namespace adapter_job::writer
