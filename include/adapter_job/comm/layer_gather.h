// The distribution stage: every rank reads its parts of the layers, the members of each pipeline
// stage all-gather each of the stage's layers, and the stage leader streams the assembled layer
// to rank 0, layer by layer in order. Rank 0 holds one layer at a time. The gather moves bytes
// only: what a part holds and where its bytes go in the layer are the caller's (LayerParts), so
// comm knows nothing of the checkpoint's layout.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "adapter_job/comm/transport.h"

namespace adapter_job::comm {

// Which world rank owns each of `shard_count` shards: with as many ranks as shards, rank r owns
// shard r (the rank that wrote it); otherwise whole shards go to ranks in even, contiguous blocks
// (extra ranks own nothing).
struct ShardOwnership {
  std::vector<int> owner;  // by shard index
  static ShardOwnership Assign(int shard_count, int world_size);
  std::vector<int> ShardsOf(int rank) const;
};

// Who takes part in which layer and how many bytes each part is; the same on every rank.
struct GatherSchedule {
  struct Layer {
    std::size_t stage = 0;  // into `stages`
    uint64_t nbytes = 0;    // the assembled layer
    // By stage member. A stage's only member reads the whole layer, assembled, as its one part.
    std::vector<uint64_t> part_bytes;
  };
  std::vector<std::vector<int>> stages;  // each stage's members: sorted world ranks, first leads
  std::vector<Layer> layers;             // in the order rank 0 consumes them
};

// This rank's side of the bytes.
struct LayerParts {
  // Fills `out` (part_bytes of this rank) with this rank's part of `layer`. Runs on a read-ahead
  // thread, one call at a time.
  std::function<void(std::size_t layer, std::span<std::byte> out)> read;
  // On a stage leader: copies member `member`'s part into the assembled layer `layer_bytes`.
  std::function<void(std::size_t layer, std::size_t member, std::span<const std::byte> part,
                     std::span<std::byte> layer_bytes)>
      place;
};

struct GatherStats {
  double read_seconds = 0;
  double communicate_seconds = 0;
  uint64_t layers_sent = 0;
};

using LayerConsumer = std::function<void(std::size_t layer, std::span<const std::byte> bytes)>;

// Collective over the world. `consume` runs on rank 0 only, once per layer, in schedule order.
GatherStats GatherLayers(const GatherSchedule& schedule, const LayerParts& parts,
                         Transport& transport, int world_rank, const LayerConsumer& consume);

}  // namespace adapter_job::comm
