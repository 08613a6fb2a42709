#include "layer_parts.h"

#include <algorithm>

namespace adapter_job::job {
namespace {

using checkpoint::AdapterLayout;
using checkpoint::LayerChunk;
using checkpoint::LayerLayout;

// The slots of stage `pp` whose shard `rank` owns.
std::vector<int> SlotsOf(const AdapterLayout& layout, const comm::ShardOwnership& owners, int pp,
                         int rank) {
  std::vector<int> slots;
  for (int slot = 0; slot < layout.slots; ++slot) {
    if (owners.owner[static_cast<std::size_t>(layout.ShardOf(slot, pp))] == rank)
      slots.push_back(slot);
  }
  return slots;
}

// The chunks of a layer that `slots` hold, in layout order: one member's part.
std::vector<const LayerChunk*> PartOf(const LayerLayout& layer, const std::vector<int>& slots) {
  std::vector<const LayerChunk*> chunks;
  for (const auto& chunk : layer.chunks) {
    if (std::find(slots.begin(), slots.end(), chunk.slot) != slots.end()) chunks.push_back(&chunk);
  }
  return chunks;
}

// Copies a chunk's bytes (shape sizes_in_layer) into the layer buffer at its place.
void PlaceChunk(const LayerLayout& layer, const LayerChunk& chunk, std::span<const std::byte> bytes,
                std::span<std::byte> layer_buffer) {
  const auto& tensor = layer.tensors[chunk.tensor_index];
  const StridedView view{tensor.dtype, chunk.sizes_in_layer,
                         ContiguousStrides(chunk.sizes_in_layer), bytes.data()};
  CopyIntoBlock(view, layer_buffer.data() + tensor.offset_in_layer, tensor.shape,
                chunk.offsets_in_layer);
}

}  // namespace

std::vector<int> StageMembers(const AdapterLayout& layout, const comm::ShardOwnership& owners,
                              int pp) {
  std::vector<int> members;
  for (int slot = 0; slot < layout.slots; ++slot) {
    members.push_back(owners.owner[static_cast<std::size_t>(layout.ShardOf(slot, pp))]);
  }
  std::sort(members.begin(), members.end());
  members.erase(std::unique(members.begin(), members.end()), members.end());
  return members;
}

comm::GatherSchedule ScheduleOf(const AdapterLayout& layout, const comm::ShardOwnership& owners) {
  comm::GatherSchedule schedule;
  for (int pp = 0; pp < layout.pipeline_parallel; ++pp)
    schedule.stages.push_back(StageMembers(layout, owners, pp));
  for (const auto& layer : layout.layers) {
    const auto& members = schedule.stages[static_cast<std::size_t>(layer.pp_stage)];
    comm::GatherSchedule::Layer scheduled{
        static_cast<std::size_t>(layer.pp_stage), layer.nbytes, {}};
    if (members.size() == 1) {
      scheduled.part_bytes = {layer.nbytes};
    } else {
      for (const int member : members) {
        uint64_t bytes = 0;
        for (const LayerChunk* chunk :
             PartOf(layer, SlotsOf(layout, owners, layer.pp_stage, member)))
          bytes += chunk->nbytes;
        scheduled.part_bytes.push_back(bytes);
      }
    }
    schedule.layers.push_back(std::move(scheduled));
  }
  return schedule;
}

comm::LayerParts PartsOf(const AdapterLayout& layout, const checkpoint::CheckpointReader& reader,
                         const comm::ShardOwnership& owners, int world_rank) {
  comm::LayerParts parts;
  parts.read = [&layout, &reader, &owners, world_rank](std::size_t l, std::span<std::byte> out) {
    const LayerLayout& layer = layout.layers[l];
    if (StageMembers(layout, owners, layer.pp_stage).size() == 1) {
      for (const auto& chunk : layer.chunks) {
        const auto& tensor = layer.tensors[chunk.tensor_index];
        reader.ReadChunkInto(chunk, out.data() + tensor.offset_in_layer, tensor.shape,
                             chunk.offsets_in_layer);
      }
      return;
    }
    uint64_t at = 0;
    for (const LayerChunk* chunk :
         PartOf(layer, SlotsOf(layout, owners, layer.pp_stage, world_rank))) {
      const std::vector<int64_t> origin(chunk->sizes_in_layer.size(), 0);
      reader.ReadChunkInto(*chunk, out.data() + at, chunk->sizes_in_layer, origin);
      at += chunk->nbytes;
    }
  };
  parts.place = [&layout, &owners](std::size_t l, std::size_t member,
                                   std::span<const std::byte> part, std::span<std::byte> bytes) {
    const LayerLayout& layer = layout.layers[l];
    const int rank = StageMembers(layout, owners, layer.pp_stage)[member];
    uint64_t at = 0;
    for (const LayerChunk* chunk : PartOf(layer, SlotsOf(layout, owners, layer.pp_stage, rank))) {
      PlaceChunk(layer, *chunk, part.subspan(at, chunk->nbytes), bytes);
      at += chunk->nbytes;
    }
  };
  return parts;
}

std::vector<std::map<std::string, uint64_t>> ReadsPerRank(const AdapterLayout& layout,
                                                          const checkpoint::DcpMetadata& metadata,
                                                          const comm::ShardOwnership& owners,
                                                          int world_size) {
  std::vector<std::map<std::string, uint64_t>> reads(static_cast<std::size_t>(world_size));
  for (const auto& layer : layout.layers) {
    for (const auto& chunk : layer.chunks) {
      const int shard = layout.ShardOf(chunk.slot, layer.pp_stage);
      const auto& where = metadata.Locate(checkpoint::TensorMetaOf(metadata, chunk),
                                          checkpoint::MetaOf(metadata, chunk));
      reads[static_cast<std::size_t>(owners.owner[static_cast<std::size_t>(shard)])]
           [where.relative_path] += where.length;
    }
  }
  return reads;
}

std::vector<uint64_t> ExpectedBytesPerRank(const AdapterLayout& layout,
                                           const checkpoint::DcpMetadata& metadata,
                                           const comm::ShardOwnership& owners, int world_size) {
  std::vector<uint64_t> bytes;
  for (const auto& files : ReadsPerRank(layout, metadata, owners, world_size)) {
    uint64_t total = 0;
    for (const auto& [file, length] : files) total += length;
    bytes.push_back(total);
  }
  return bytes;
}

}  // namespace adapter_job::job
