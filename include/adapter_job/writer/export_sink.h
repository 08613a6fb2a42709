// Where the export's tensors go. The pipeline (src/job/export.cc) plans, gathers and converts; a
// sink only writes what it is given, on rank 0, in this order:
//   Begin(announcement) once, Write(layer) for every layer in layer order, Finish(), then
//   Publish(accepted); or Abort() at any point (the destructor aborts too), which leaves nothing
//   at the outputs.
// A collective sink's Finish runs on every rank (each rank's sink then does its share of the
// work, as the merged model's does), with the same outcome agreed by all.
// Sinks: PeftDirectorySink (a PEFT adapter directory), SafetensorsFileSink (the `stream` file),
// merge::MergedModelSink (the base model with the adapter merged in, written by every rank).
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "adapter_job/core/dtype.h"
#include "adapter_job/writer/adapter_config.h"
#include "adapter_job/writer/output_guard.h"

namespace adapter_job::writer {

// Which weight of a module's adapter a tensor is (PEFT's lora_A, lora_B, lora_magnitude_vector).
enum class AdapterWeight { kLoraA, kLoraB, kMagnitude };

struct AnnouncedTensor {
  std::string name;    // the HF name, e.g. model.layers.0.self_attn.q_proj.lora_A.weight
  std::string module;  // e.g. model.layers.0.self_attn.q_proj
  AdapterWeight weight = AdapterWeight::kLoraA;
  int64_t layer = 0;
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
};

// Everything that will follow, known from the checkpoint's metadata before any data is read.
struct ExportAnnouncement {
  std::vector<AnnouncedTensor> tensors;  // in the order they are written, layer by layer
  AdapterConfigInputs config;            // ranks, alpha, dropout, DoRA or not, base model
  // The base model's local directory when there is one (--hf-model-id, resolved through the HF
  // cache, or run_config.yaml's model.hf_model_id when it is not given).
  std::optional<std::filesystem::path> base_model_dir;
  // Adapted modules stock PEFT refuses to load an adapter on, and why (Nemotron-H's Mamba
  // out_proj): a PEFT adapter directory cannot carry them, a merged model can.
  struct RefusedModule {
    std::string module;
    std::string why;
  };
  std::vector<RefusedModule> peft_refused;
};

// One tensor's bytes as consecutive pieces (the pipeline avoids copying them together); valid
// during Write only.
struct TensorBytes {
  std::size_t index = 0;  // into ExportAnnouncement::tensors
  std::vector<std::span<const std::byte>> pieces;
};

// One layer's tensors, all of them.
struct LayerTensors {
  int64_t layer = 0;
  std::vector<TensorBytes> tensors;
};

// What Finish leaves: complete, not yet visible under its name.
struct FinishedOutput {
  uint64_t file_bytes = 0;
  std::filesystem::path accepted_path;  // where Publish(true) puts it
  std::filesystem::path rejected_path;  // where Publish(false) puts it
  // A PEFT directory the verifier can read before it is published; empty when the output is not
  // one (it is then never verified).
  std::filesystem::path verifiable_directory;
  // A merged full-weight model, staged beside it, that verification reads as a variant of its own;
  // empty when the output is not one.
  std::filesystem::path merged_model_directory;
  // The sha256 (lower-case hex) of output files the sink hashed as it wrote them, by name in the
  // directory: the run report takes these rather than reading the files again.
  std::map<std::string, std::string> sha256;
};

// What a collective sink did on one rank, for the run report.
struct SinkStats {
  uint64_t bytes_read = 0;     // of inputs the sink reads itself (the merge: base weights)
  uint64_t bytes_written = 0;  // into its outputs
  double seconds = 0;          // in Finish
  int gpu = -1;                // the CUDA device that did the sink's work; -1: the CPU
  uint64_t gpu_bytes = 0;      // the device memory the sink's buffers held at their peak
};

// A file an export would write, as --dry-run lists it.
struct PlannedFile {
  std::filesystem::path path;
  std::optional<uint64_t> bytes;  // nullopt where only writing it tells
  std::string what;               // e.g. "adapter weights", "weights shard, written by rank 1"
};

// What a sink would write, known before the first layer (ExportSink::Preview).
struct SinkPreview {
  std::vector<PlannedFile> files;
  // adapter_config.json as it would be written, for a sink that writes one.
  std::optional<nlohmann::ordered_json> adapter_config;
  std::string tensor_name_prefix;  // what the file's names put before the HF names
  bool merged_model = false;       // verification would read a merged model as a variant too
  std::vector<std::string> notes;  // e.g. that an existing output would be replaced
};

class ExportSink {
 public:
  ExportSink() = default;
  ExportSink(const ExportSink&) = delete;
  ExportSink& operator=(const ExportSink&) = delete;
  virtual ~ExportSink() = default;

  // Where it writes, first the output itself: each is refused if it lies on an input.
  virtual std::vector<NamedPath> Outputs() const = 0;
  // Whether Finish gives a directory to verify (decided before any work).
  virtual bool verifiable() const = 0;
  // Whether Finish runs on every rank rather than on rank 0 alone.
  virtual bool collective() const { return false; }
  // This rank's share once Finish has run (collective sinks).
  virtual SinkStats stats() const { return {}; }

  // What Begin..Finish would write, with Begin's checks that need no writing (an output that may
  // not be replaced, a module the output cannot carry): --dry-run. Creates nothing. A sink that
  // does not say (this default) lists no files.
  virtual SinkPreview Preview(const ExportAnnouncement& announcement) const {
    static_cast<void>(announcement);
    return {};
  }

  virtual void Begin(const ExportAnnouncement& announcement) = 0;
  virtual void Write(const LayerTensors& layer) = 0;
  virtual FinishedOutput Finish() = 0;
  // Makes the finished output visible at FinishedOutput's accepted or rejected path.
  virtual void Publish(bool accepted) = 0;
  // Drops everything written; safe at any point and more than once.
  virtual void Abort() noexcept = 0;
};

}  // namespace adapter_job::writer
