// Reads tensors out of a DCP directory, one chunk at a time, touching only the bytes each chunk
// occupies in its `.distcp` file.
#pragma once

#include <filesystem>
#include <map>
#include <mutex>
#include <span>
#include <string>

#include "adapter_job/checkpoint/adapter_layout.h"
#include "adapter_job/checkpoint/dcp_metadata.h"
#include "adapter_job/core/file.h"
#include "adapter_job/core/tensor.h"

namespace adapter_job::checkpoint {

class CheckpointReader {
 public:
  // `dcp_dir` holds `.metadata` and the `.distcp` files (a Megatron `iter_*` directory).
  static CheckpointReader Open(const std::filesystem::path& dcp_dir);

  const std::filesystem::path& directory() const { return dir_; }
  const DcpMetadata& metadata() const { return metadata_; }

  // Reads and decodes one chunk; its shape equals `chunk.sizes`.
  Tensor ReadChunk(const TensorMeta& tensor, const ChunkMeta& chunk) const;
  // Reads one chunk into `dest` (a tensor of `tensor.dtype`) at `dest_offsets`.
  void ReadChunkInto(const TensorMeta& tensor, const ChunkMeta& chunk, Tensor& dest,
                     std::span<const int64_t> dest_offsets) const;
  // The same into a contiguous buffer of `dest_shape` that the caller owns.
  void ReadChunkInto(const TensorMeta& tensor, const ChunkMeta& chunk, std::byte* dest,
                     std::span<const int64_t> dest_shape,
                     std::span<const int64_t> dest_offsets) const;
  // One chunk of a layout planned from this reader's metadata, into a buffer of `dest_shape`.
  void ReadChunkInto(const LayerChunk& chunk, std::byte* dest, std::span<const int64_t> dest_shape,
                     std::span<const int64_t> dest_offsets) const;
  // Assembles the whole global tensor from all of its chunks.
  Tensor ReadTensor(const TensorMeta& tensor) const;

  // The shard-file preflight, before any buffer is sized from `.metadata`: throws FormatError
  // naming the key and the file unless every adapter chunk of `layout`
  // - declares no more bytes than its storage range holds (torch.save stores a chunk's elements
  //   uncompressed, so its payload is at least that long),
  // - lies inside its shard file (which must exist), and
  // - owns its range: no two chunks share bytes of a file, as torch's DCP writer never writes them.
  // Together these bound the bytes that the layout's buffers take by the shard files' sizes: a
  // few hostile bytes of .metadata must not make the export allocate terabytes.
  void CheckDeclaredBytes(const AdapterLayout& layout) const;

  // Bytes read so far from `.distcp` files (not counting `.metadata`).
  uint64_t bytes_read() const;

 private:
  CheckpointReader(std::filesystem::path dir, DcpMetadata metadata)
      : dir_(std::move(dir)), metadata_(std::move(metadata)) {}

 public:
  CheckpointReader(CheckpointReader&& other) noexcept
      : dir_(std::move(other.dir_)),
        metadata_(std::move(other.metadata_)),
        files_(std::move(other.files_)) {}

 private:
  const ReadOnlyFile& File(const std::string& relative_path) const;

  std::filesystem::path dir_;
  DcpMetadata metadata_;
  mutable std::mutex files_mutex_;  // reads may run on a prefetch thread
  mutable std::map<std::string, ReadOnlyFile> files_;
};

}  // namespace adapter_job::checkpoint
