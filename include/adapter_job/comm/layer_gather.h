// The distribution stage: each rank reads the chunks of the training shards it owns, every
// pipeline stage's ranks all-gather each of its layers, and the stage leader streams the
// assembled layer to rank 0, layer by layer in global order. Rank 0 holds one layer at a time.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "adapter_job/checkpoint/adapter_layout.h"
#include "adapter_job/checkpoint/checkpoint_reader.h"
#include "adapter_job/comm/transport.h"

namespace adapter_job::comm {

// Which world rank owns each training shard (slot, pp): with as many ranks as shards, rank r owns
// shard r (the rank that wrote it, pp x slots + slot); otherwise whole shards go to ranks in even,
// contiguous blocks (extra ranks own nothing).
struct ShardOwnership {
  std::vector<int> owner;  // by shard index
  static ShardOwnership Assign(int shard_count, int world_size);
  std::vector<int> ShardsOf(int rank) const;
};

// The world ranks that own some shard of stage `pp`, sorted; the first is the stage leader.
std::vector<int> StageMembers(const checkpoint::AdapterLayout& layout, const ShardOwnership& owners,
                              int pp);

// Bytes of `.distcp` storage each rank must read (what the byte counters are checked against).
std::vector<uint64_t> ExpectedBytesPerRank(const checkpoint::AdapterLayout& layout,
                                           const checkpoint::DcpMetadata& metadata,
                                           const ShardOwnership& owners, int world_size);

struct GatherStats {
  double read_seconds = 0;
  double communicate_seconds = 0;
  uint64_t layers_sent = 0;
};

using LayerConsumer =
    std::function<void(const checkpoint::LayerLayout& layer, std::span<const std::byte> buffer)>;

// Collective over the world. `consume` runs on rank 0 only, once per layer, in layer order, with
// the layer's Megatron tensors back to back (LayerTensor::offset_in_layer).
GatherStats GatherLayers(const checkpoint::AdapterLayout& layout,
                         const checkpoint::CheckpointReader& reader, const ShardOwnership& owners,
                         Transport& transport, int world_rank, const LayerConsumer& consume);

}  // namespace adapter_job::comm
