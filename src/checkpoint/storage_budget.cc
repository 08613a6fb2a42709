// CheckpointReader::CheckDeclaredBytes: what .metadata declares, held to what the shard files hold.
#include <algorithm>
#include <map>
#include <system_error>
#include <vector>

#include "adapter_job/checkpoint/checkpoint_reader.h"
#include "adapter_job/core/error.h"
#include "adapter_job/core/tensor.h"

namespace adapter_job::checkpoint {
namespace {

struct Range {
  const StorageLocation* location;
  const TensorMeta* tensor;
  const ChunkMeta* chunk;
};

}  // namespace

void CheckpointReader::CheckDeclaredBytes(const AdapterLayout& layout) const {
  const DcpMetadata& metadata = metadata_;
  const std::filesystem::path& dir = dir_;
  std::map<std::string, uint64_t> file_sizes;
  std::vector<Range> ranges;
  for (const auto& layer : layout.layers) {
    for (const auto& chunk : layer.chunks) {
      const TensorMeta& tensor = TensorMetaOf(metadata, chunk);
      const ChunkMeta& chunk_meta = MetaOf(metadata, chunk);
      const StorageLocation& location = metadata.Locate(tensor, chunk_meta);
      const std::filesystem::path file = dir / location.relative_path;
      if (chunk.nbytes > location.length) {
        Fail(
            "'{}': the chunk at {} declares {} bytes, but its storage in '{}' is only {} bytes "
            "long",
            tensor.fqn, ShapeToString(chunk_meta.offsets), chunk.nbytes, file.string(),
            location.length);
      }
      auto size = file_sizes.find(location.relative_path);
      if (size == file_sizes.end()) {
        std::error_code ec;
        const auto status = std::filesystem::status(file, ec);
        if (!std::filesystem::exists(status)) {
          Fail("shard file '{}' (holding '{}') named by the checkpoint's .metadata is missing",
               file.string(), tensor.fqn);
        }
        if (!std::filesystem::is_regular_file(status)) {
          Fail("shard file '{}' (holding '{}') is not a regular file", file.string(), tensor.fqn);
        }
        const uint64_t bytes = std::filesystem::file_size(file, ec);
        if (ec) {
          Fail<IoError>("shard file '{}' (holding '{}') cannot be read: {}", file.string(),
                        tensor.fqn, ec.message());
        }
        size = file_sizes.emplace(location.relative_path, bytes).first;
      }
      // Offset and length come from a pickle: add without wrapping.
      if (location.offset > size->second || location.length > size->second - location.offset) {
        Fail("shard file '{}' is truncated: '{}' needs bytes [{}, +{}) but the file has {}",
             file.string(), tensor.fqn, location.offset, location.length, size->second);
      }
      ranges.push_back({&location, &tensor, &chunk_meta});
    }
  }
  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) {
    return std::tie(a.location->relative_path, a.location->offset) <
           std::tie(b.location->relative_path, b.location->offset);
  });
  for (std::size_t i = 1; i < ranges.size(); ++i) {
    const Range& a = ranges[i - 1];
    const Range& b = ranges[i];
    if (a.location->relative_path == b.location->relative_path &&
        a.location->offset + a.location->length > b.location->offset) {
      Fail("'{}' chunk {} and '{}' chunk {} share bytes of '{}' ([{}, +{}) and [{}, +{}))",
           a.tensor->fqn, ShapeToString(a.chunk->offsets), b.tensor->fqn,
           ShapeToString(b.chunk->offsets), (dir / a.location->relative_path).string(),
           a.location->offset, a.location->length, b.location->offset, b.location->length);
    }
  }
}

}  // namespace adapter_job::checkpoint
