#include "adapter_job/checkpoint/checkpoint_reader.h"

#include <memory>

#include "adapter_job/checkpoint/torch_save.h"
#include "adapter_job/core/error.h"

namespace adapter_job::checkpoint {

CheckpointReader CheckpointReader::Open(const std::filesystem::path& dcp_dir) {
  const auto metadata_file = dcp_dir / ".metadata";
  if (!std::filesystem::exists(metadata_file)) {
    Fail("'{}' is not a torch_dist checkpoint: it has no .metadata file", dcp_dir.string());
  }
  return CheckpointReader(dcp_dir, ReadDcpMetadata(metadata_file));
}

const ReadOnlyFile& CheckpointReader::File(const std::string& relative_path) const {
  const std::lock_guard lock(files_mutex_);
  auto it = files_.find(relative_path);
  if (it == files_.end()) {
    const auto path = dir_ / relative_path;
    if (!std::filesystem::exists(path)) {
      Fail("shard file '{}' named by the checkpoint's .metadata is missing", path.string());
    }
    it = files_.emplace(relative_path, ReadOnlyFile::Open(path)).first;
  }
  return it->second;
}

void CheckpointReader::ReadChunkInto(const TensorMeta& tensor, const ChunkMeta& chunk, Tensor& dest,
                                     std::span<const int64_t> dest_offsets) const {
  ReadChunkInto(tensor, chunk, dest.data.data(), dest.shape, dest_offsets);
}

void CheckpointReader::ReadChunkInto(const LayerChunk& chunk, std::byte* dest,
                                     std::span<const int64_t> dest_shape,
                                     std::span<const int64_t> dest_offsets) const {
  ReadChunkInto(TensorMetaOf(metadata_, chunk), MetaOf(metadata_, chunk), dest, dest_shape,
                dest_offsets);
}

void CheckpointReader::ReadChunkInto(const TensorMeta& tensor, const ChunkMeta& chunk,
                                     std::byte* dest, std::span<const int64_t> dest_shape,
                                     std::span<const int64_t> dest_offsets) const {
  const StorageLocation& location = metadata_.Locate(tensor, chunk);
  const ReadOnlyFile& file = File(location.relative_path);
  WithContext(
      [&] {
        return fmt::format("{} bytes [{}, +{}) holding '{}' chunk {}", file.path().string(),
                           location.offset, location.length, tensor.fqn,
                           ShapeToString(chunk.offsets));
      },
      [&] {
        if (!location.transform_descriptors.empty()) {
          Fail("stream transform '{}' is not supported", location.transform_descriptors.front());
        }
        // Uninitialized: pread fills every byte, and zero-filling first would double the cost.
        if (location.length > file.size()) {
          Fail("'{}' is truncated: need {} bytes at offset {} but the file has {} bytes",
               file.path().string(), location.length, location.offset, file.size());
        }
        const auto blob = std::make_unique_for_overwrite<std::byte[]>(location.length);
        const std::span<std::byte> bytes(blob.get(), location.length);
        file.ReadExact(location.offset, bytes);
        const TorchSaveArchive archive = OpenTorchSave(bytes);
        const DecodedTensor decoded = DecodeTorchSaveTensor(archive);
        if (decoded.view.dtype != tensor.dtype) {
          Fail("stored as {}, but .metadata says {}", TorchName(decoded.view.dtype),
               TorchName(tensor.dtype));
        }
        if (decoded.view.shape != chunk.sizes) {
          Fail("stored with shape {}, but .metadata says {}", ShapeToString(decoded.view.shape),
               ShapeToString(chunk.sizes));
        }
        // Callers may drop the stacked layer axis: the chunk's shape then loses its leading 1.
        StridedView view = decoded.view;
        while (view.shape.size() > dest_shape.size() && view.shape.front() == 1) {
          view.shape.erase(view.shape.begin());
          view.strides.erase(view.strides.begin());
        }
        if (decoded.big_endian) {
          Tensor swapped = ToContiguous(decoded.view);
          SwapByteOrder(swapped);
          view.base = swapped.data.data();
          view.strides = ContiguousStrides(view.shape);
          CopyIntoBlock(view, dest, dest_shape, dest_offsets);
        } else {
          CopyIntoBlock(view, dest, dest_shape, dest_offsets);
        }
      });
}

Tensor CheckpointReader::ReadChunk(const TensorMeta& tensor, const ChunkMeta& chunk) const {
  Tensor out = Tensor::Zeros(tensor.dtype, chunk.sizes);
  const std::vector<int64_t> origin(chunk.sizes.size(), 0);
  ReadChunkInto(tensor, chunk, out, origin);
  return out;
}

Tensor CheckpointReader::ReadTensor(const TensorMeta& tensor) const {
  ValidateChunkLayout(tensor);
  Tensor out = Tensor::Zeros(tensor.dtype, tensor.size);
  for (const auto& chunk : tensor.chunks) ReadChunkInto(tensor, chunk, out, chunk.offsets);
  return out;
}

uint64_t CheckpointReader::bytes_read() const {
  uint64_t total = 0;
  for (const auto& [name, file] : files_) total += file.bytes_read();
  return total;
}

}  // namespace adapter_job::checkpoint
