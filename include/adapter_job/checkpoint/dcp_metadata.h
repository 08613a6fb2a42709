// The global index of a PyTorch Distributed Checkpoint: `.metadata`, a pickled
// torch.distributed.checkpoint.metadata.Metadata (see shared notes dcp-torch-dist-format.md §2).
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "adapter_job/core/dtype.h"

namespace adapter_job::checkpoint {

struct ChunkMeta {
  std::vector<int64_t> offsets;  // element offsets into the global tensor
  std::vector<int64_t> sizes;
};

struct TensorMeta {
  std::string fqn;
  DType dtype = DType::kFloat32;
  std::vector<int64_t> size;  // global shape
  std::vector<ChunkMeta> chunks;
  uint64_t nbytes() const;
};

// Where one stored item lives: bytes [offset, offset + length) of `relative_path`.
struct StorageLocation {
  std::string relative_path;
  uint64_t offset = 0;
  uint64_t length = 0;
  std::vector<std::string> transform_descriptors;  // e.g. "stream.zstd/1"; usually empty
};

struct DcpMetadata {
  std::vector<TensorMeta> tensors;      // in the order the checkpoint lists them
  std::vector<std::string> byte_items;  // non-tensor entries (pickled Python objects)
  std::map<std::pair<std::string, std::vector<int64_t>>, StorageLocation> tensor_storage;
  std::map<std::string, StorageLocation> bytes_storage;
  std::optional<std::string> version;  // "1.0.0" from torch ~2.9 on

  const TensorMeta* FindTensor(std::string_view fqn) const;
  // Throws FormatError when the chunk has no storage entry.
  const StorageLocation& Locate(const TensorMeta& tensor, const ChunkMeta& chunk) const;
};

// Interprets the unpickled Metadata. Tolerates the field differences between torch versions and
// Megatron's extras; checks every chunk lies inside its tensor and has exactly one storage entry.
DcpMetadata ParseDcpMetadata(std::span<const std::byte> pickle_bytes);
DcpMetadata ReadDcpMetadata(const std::filesystem::path& metadata_file);

// Checks that the chunks of `tensor` are disjoint and tile it exactly.
void ValidateChunkLayout(const TensorMeta& tensor);

}  // namespace adapter_job::checkpoint
