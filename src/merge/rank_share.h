// One rank's share of a merged model: the output tensors the layout gives it, read from the base
// in blocks of whole rows, merged and written into their places in the shard files. Reading the
// next block, merging this one and writing the last overlap, so the disk and the cores are busy
// at once, and memory holds three blocks, never a tensor. A GPU, when given, merges each block
// (copied in and out of page-locked buffers); the CPU's threads otherwise.
#pragma once

#include <cstdint>
#include <filesystem>
#include <span>

#include "adapter_job/core/progress.h"
#include "adapter_job/merge/merged_layout.h"
#include "adapter_job/safetensors/model_weights.h"
#include "adapter_job/writer/export_sink.h"
#include "peft_file.h"

namespace adapter_job::merge {

struct ShareInputs {
  const MergedLayout& layout;
  const safetensors::ModelWeights& base;
  const PeftFile& adapter;
  std::filesystem::path staging;  // where the shard files are, headers written and sized
  int rank = 0;
  int threads = 1;        // CPU threads, when no GPU merges
  int gpu = -1;           // the CUDA device that merges (device_merge.h); -1: the CPU
  ProgressSink progress;  // after each tensor, when set
};

// Writes the rank's tensors and flushes its shard files; returns what it read and wrote.
writer::SinkStats WriteShare(const ShareInputs& in);

// pwrite(2) of all of `bytes` at `offset`; IoError naming `path`.
void WriteAllAt(int fd, uint64_t offset, std::span<const std::byte> bytes,
                const std::filesystem::path& path);

}  // namespace adapter_job::merge
