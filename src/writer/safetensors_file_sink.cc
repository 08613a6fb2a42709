#include "adapter_job/writer/safetensors_file_sink.h"

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

void SafetensorsFileSink::Begin(const ExportAnnouncement& announcement) {
  announcement_ = announcement;
  std::vector<safetensors::TensorSpec> specs;
  for (const auto& t : announcement_.tensors) specs.push_back({t.name, t.dtype, t.shape});
  open_.reset(new Open{OutputFile::Create(path_, overwrite_), std::nullopt});
  open_->writer.emplace(open_->file, std::move(specs), std::nullopt);
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
