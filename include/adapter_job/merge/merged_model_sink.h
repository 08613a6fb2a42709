// The base model with the adapter merged in, as transformers' save_pretrained lays it out:
// config.json, generation_config.json and the tokenizer files copied, the weights in
// model-0000i-of-0000N.safetensors shards with model.safetensors.index.json (or one
// model.safetensors), in the base's names, shapes and dtypes.
//
// The pipeline writes the PEFT adapter through this sink first (a PeftDirectorySink inside it,
// staged and never published: it is what verification checks against the Megatron weights, and
// what every rank merges from). Finish is collective: rank 0 lays the shard files out in the
// staged output directory, then every rank reads the base tensors it owns (pread, one at a time),
// merges them in float32 and writes them into their places, so no merged byte passes through
// rank 0. The output directory must be on a file system every rank sees.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string_view>

#include "adapter_job/core/dtype.h"
#include "adapter_job/core/progress.h"
#include "adapter_job/writer/export_sink.h"

namespace adapter_job::comm {
class MpiWorld;
}

namespace adapter_job::merge {

// Where each rank merges: auto takes its GPU when the build has the CUDA kernels and the rank sees
// a GPU (host-local rank modulo the GPUs it sees), else the CPU; both write the same bytes.
enum class MergeDevice { kAuto, kCpu, kCuda };
MergeDevice ParseMergeDevice(std::string_view name);

struct MergeOptions {
  std::filesystem::path base_model;  // the local HF model directory
  std::filesystem::path target;      // the merged model's directory
  bool overwrite = false;
  std::optional<DType> dtype;  // nullopt: each tensor keeps the base's dtype
  uint64_t max_shard_bytes = 50'000'000'000;
  MergeDevice device = MergeDevice::kAuto;
  int threads = 0;        // merge threads per rank; 0: this host's cores shared by its ranks
  ProgressSink progress;  // on rank 0, after each of its tensors
};

class MergedModelSink final : public writer::ExportSink {
 public:
  MergedModelSink(MergeOptions options, const comm::MpiWorld& world);
  ~MergedModelSink() override;

  std::vector<writer::NamedPath> Outputs() const override;
  bool verifiable() const override { return true; }
  bool collective() const override { return true; }
  // Rank 0's: the files and which ranks write each shard.
  writer::SinkPreview Preview(const writer::ExportAnnouncement& announcement) const override;
  void Begin(const writer::ExportAnnouncement& announcement) override;
  void Write(const writer::LayerTensors& layer) override;
  writer::FinishedOutput Finish() override;
  void Publish(bool accepted) override;
  void Abort() noexcept override;
  writer::SinkStats stats() const override { return stats_; }

 private:
  struct Open;  // rank 0's staged output and adapter, from Begin on
  MergeOptions options_;
  const comm::MpiWorld& world_;
  std::unique_ptr<Open> open_;
  writer::SinkStats stats_;
  int gpu_ = -1;  // the CUDA device this rank merges on; -1: the CPU
};

}  // namespace adapter_job::merge
