// The gather's view of the checkpoint (comm/layer_gather.h moves bytes only): which ranks hold
// which part of each layer, how a rank reads its part and how the stage leader places the parts
// in the assembled layer (its Megatron tensors back to back, LayerTensor::offset_in_layer).
// A rank's part of a layer is the chunks of the shards it owns in the layer's stage, in layout
// order, back to back; a stage's only member reads the layer whole, assembled in place.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "adapter_job/checkpoint/adapter_layout.h"
#include "adapter_job/checkpoint/checkpoint_reader.h"
#include "adapter_job/comm/layer_gather.h"

namespace adapter_job::job {

// The world ranks that own some shard of stage `pp`, sorted; the first is the stage leader.
std::vector<int> StageMembers(const checkpoint::AdapterLayout& layout,
                              const comm::ShardOwnership& owners, int pp);

comm::GatherSchedule ScheduleOf(const checkpoint::AdapterLayout& layout,
                                const comm::ShardOwnership& owners);

// `layout`, `reader` and `owners` must outlive what is returned.
comm::LayerParts PartsOf(const checkpoint::AdapterLayout& layout,
                         const checkpoint::CheckpointReader& reader,
                         const comm::ShardOwnership& owners, int world_rank);

// The `.distcp` files each rank reads, by name, with the bytes it reads of each.
std::vector<std::map<std::string, uint64_t>> ReadsPerRank(const checkpoint::AdapterLayout& layout,
                                                          const checkpoint::DcpMetadata& metadata,
                                                          const comm::ShardOwnership& owners,
                                                          int world_size);

// Bytes of `.distcp` storage each rank must read (what the byte counters are checked against).
std::vector<uint64_t> ExpectedBytesPerRank(const checkpoint::AdapterLayout& layout,
                                           const checkpoint::DcpMetadata& metadata,
                                           const comm::ShardOwnership& owners, int world_size);

}  // namespace adapter_job::job
