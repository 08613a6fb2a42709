// Every rank walks the layers in global order and joins only the steps that involve it. Since
// each group's collectives and each leader's sends to rank 0 happen in that one order, the
// schedule cannot deadlock, and a sender blocks until rank 0 takes its layer, which bounds how
// many layers are in flight.
#include "adapter_job/dist/layer_gather.h"

#include <algorithm>
#include <charconv>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <future>
#include <map>
#include <memory>

#include "adapter_job/core/error.h"

namespace adapter_job::dist {
namespace {

using checkpoint::AdapterLayout;
using checkpoint::LayerChunk;
using checkpoint::LayerLayout;

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

// Copies a chunk's bytes (shape sizes_in_layer) into the layer buffer at its place.
void PlaceChunk(const LayerLayout& layer, const LayerChunk& chunk, std::span<const std::byte> bytes,
                std::span<std::byte> layer_buffer) {
  const auto& tensor = layer.tensors[chunk.tensor_index];
  const StridedView view{tensor.meta->dtype, chunk.sizes_in_layer,
                         ContiguousStrides(chunk.sizes_in_layer), bytes.data()};
  CopyIntoBlock(view, layer_buffer.data() + tensor.offset_in_layer, tensor.shape,
                chunk.offsets_in_layer);
}

// What this rank contributes to one layer: the chunks of the shards it owns in the layer's stage,
// in layout order, back to back.
struct Contribution {
  std::vector<const LayerChunk*> chunks;
  uint64_t nbytes = 0;
};

Contribution ContributionOf(const LayerLayout& layer, const std::vector<int>& my_tps) {
  Contribution c;
  for (const auto& chunk : layer.chunks) {
    if (std::find(my_tps.begin(), my_tps.end(), chunk.tp) != my_tps.end()) {
      c.chunks.push_back(&chunk);
      c.nbytes += chunk.nbytes;
    }
  }
  return c;
}

std::vector<std::byte> ReadContribution(const LayerLayout& layer, const Contribution& contribution,
                                        const checkpoint::CheckpointReader& reader) {
  std::vector<std::byte> packed(contribution.nbytes);
  uint64_t at = 0;
  for (const LayerChunk* chunk : contribution.chunks) {
    const auto& tensor = layer.tensors[chunk->tensor_index];
    const std::vector<int64_t> origin(chunk->sizes_in_layer.size(), 0);
    reader.ReadChunkInto(*tensor.meta, *chunk->chunk, packed.data() + at, chunk->sizes_in_layer,
                         origin);
    at += chunk->nbytes;
  }
  return packed;
}

// Test hook for fault tests: ADAPTER_JOB_TEST_KILL_RANK=<rank>:<layer> makes that rank die by
// SIGKILL on reaching that layer, as a node failure would.
std::optional<int64_t> KillAtLayer(int world_rank) {
  const char* spec = std::getenv("ADAPTER_JOB_TEST_KILL_RANK");
  if (spec == nullptr) return std::nullopt;
  const std::string_view text(spec);
  const auto colon = text.find(':');
  int rank = -1;
  int64_t layer = -1;
  if (colon == std::string_view::npos ||
      std::from_chars(text.data(), text.data() + colon, rank).ec != std::errc() ||
      std::from_chars(text.data() + colon + 1, text.data() + text.size(), layer).ec !=
          std::errc()) {
    return std::nullopt;
  }
  return rank == world_rank ? std::optional(layer) : std::nullopt;
}

}  // namespace

ShardOwnership ShardOwnership::Assign(int shard_count, int world_size) {
  ShardOwnership o;
  o.owner.resize(static_cast<std::size_t>(shard_count));
  for (int s = 0; s < shard_count; ++s) {
    o.owner[static_cast<std::size_t>(s)] =
        world_size >= shard_count ? s : static_cast<int>(int64_t{s} * world_size / shard_count);
  }
  return o;
}

std::vector<int> ShardOwnership::ShardsOf(int rank) const {
  std::vector<int> shards;
  for (std::size_t s = 0; s < owner.size(); ++s) {
    if (owner[s] == rank) shards.push_back(static_cast<int>(s));
  }
  return shards;
}

std::vector<int> StageMembers(const AdapterLayout& layout, const ShardOwnership& owners, int pp) {
  std::vector<int> members;
  for (int tp = 0; tp < layout.tensor_parallel; ++tp) {
    members.push_back(owners.owner[static_cast<std::size_t>(layout.ShardOf(tp, pp))]);
  }
  std::sort(members.begin(), members.end());
  members.erase(std::unique(members.begin(), members.end()), members.end());
  return members;
}

std::vector<uint64_t> ExpectedBytesPerRank(const AdapterLayout& layout,
                                           const checkpoint::DcpMetadata& metadata,
                                           const ShardOwnership& owners, int world_size) {
  std::vector<uint64_t> bytes(static_cast<std::size_t>(world_size), 0);
  for (const auto& layer : layout.layers) {
    for (const auto& chunk : layer.chunks) {
      const int shard = layout.ShardOf(chunk.tp, layer.pp_stage);
      const auto& tensor = *layer.tensors[chunk.tensor_index].meta;
      bytes[static_cast<std::size_t>(owners.owner[static_cast<std::size_t>(shard)])] +=
          metadata.Locate(tensor, *chunk.chunk).length;
    }
  }
  return bytes;
}

GatherStats GatherLayers(const AdapterLayout& layout, const checkpoint::CheckpointReader& reader,
                         const ShardOwnership& owners, Transport& transport, int world_rank,
                         const LayerConsumer& consume) {
  GatherStats stats;
  // Per stage: members, my tp ranks in it, and (when shared) the group communicator.
  struct Stage {
    std::vector<int> members;
    std::vector<int> my_tps;
    std::unique_ptr<GroupCommunicator> group;
  };
  std::vector<Stage> stages(static_cast<std::size_t>(layout.pipeline_parallel));
  for (int pp = 0; pp < layout.pipeline_parallel; ++pp) {
    Stage& stage = stages[static_cast<std::size_t>(pp)];
    stage.members = StageMembers(layout, owners, pp);
    for (int tp = 0; tp < layout.tensor_parallel; ++tp) {
      if (owners.owner[static_cast<std::size_t>(layout.ShardOf(tp, pp))] == world_rank) {
        stage.my_tps.push_back(tp);
      }
    }
    // Groups are created in stage order on every member, as CreateGroup requires.
    if (!stage.my_tps.empty() && stage.members.size() > 1)
      stage.group = transport.CreateGroup(stage.members);
  }

  // The layers this rank reads, in order; the next one is read while the current one travels.
  std::vector<const LayerLayout*> mine;
  for (const auto& layer : layout.layers) {
    if (!stages[static_cast<std::size_t>(layer.pp_stage)].my_tps.empty()) mine.push_back(&layer);
  }
  const auto read = [&](const LayerLayout* layer) {
    const auto start = std::chrono::steady_clock::now();
    auto packed = ReadContribution(
        *layer, ContributionOf(*layer, stages[static_cast<std::size_t>(layer->pp_stage)].my_tps),
        reader);
    return std::pair(std::move(packed), Seconds(start));
  };
  std::size_t next_read = 0;
  std::future<std::pair<std::vector<std::byte>, double>> prefetch;
  if (!mine.empty()) prefetch = std::async(std::launch::async, read, mine[next_read++]);

  const std::optional<int64_t> kill_at = KillAtLayer(world_rank);
  std::vector<std::byte> layer_buffer;
  for (const auto& layer : layout.layers) {
    if (kill_at == layer.layer) std::raise(SIGKILL);
    Stage& stage = stages[static_cast<std::size_t>(layer.pp_stage)];
    const int leader = stage.members.front();
    const bool member = !stage.my_tps.empty();
    if (!member && world_rank != 0) continue;

    layer_buffer.assign(layer.nbytes, std::byte{0});
    if (member) {
      auto [packed, read_seconds] = prefetch.get();
      stats.read_seconds += read_seconds;
      if (next_read < mine.size())
        prefetch = std::async(std::launch::async, read, mine[next_read++]);

      const auto start = std::chrono::steady_clock::now();
      // Each member's contribution, in group-rank order (members are sorted world ranks).
      std::vector<std::vector<int>> tps_of_member(stage.members.size());
      for (int tp = 0; tp < layout.tensor_parallel; ++tp) {
        const int owner =
            owners.owner[static_cast<std::size_t>(layout.ShardOf(tp, layer.pp_stage))];
        const auto pos =
            std::find(stage.members.begin(), stage.members.end(), owner) - stage.members.begin();
        tps_of_member[static_cast<std::size_t>(pos)].push_back(tp);
      }
      std::vector<std::vector<std::byte>> contributions;
      if (stage.group) {
        // Contributions differ in size (replicated tensors live on tp 0): pad to the largest.
        uint64_t widest = 0;
        for (const auto& tps : tps_of_member)
          widest = std::max(widest, ContributionOf(layer, tps).nbytes);
        packed.resize(widest);
        std::vector<std::byte> gathered(widest * stage.members.size());
        stage.group->AllGather(packed, gathered);
        for (std::size_t m = 0; m < stage.members.size(); ++m) {
          contributions.emplace_back(
              gathered.begin() + static_cast<std::ptrdiff_t>(m * widest),
              gathered.begin() + static_cast<std::ptrdiff_t>((m + 1) * widest));
        }
      } else {
        contributions.push_back(std::move(packed));
      }
      if (world_rank == leader) {
        for (std::size_t m = 0; m < contributions.size(); ++m) {
          const Contribution c = ContributionOf(layer, tps_of_member[m]);
          uint64_t at = 0;
          for (const LayerChunk* chunk : c.chunks) {
            PlaceChunk(layer, *chunk, std::span(contributions[m]).subspan(at, chunk->nbytes),
                       layer_buffer);
            at += chunk->nbytes;
          }
        }
        if (leader != 0) {
          transport.Send(layer_buffer, 0);
          ++stats.layers_sent;
        }
      }
      stats.communicate_seconds += Seconds(start);
    }
    if (world_rank == 0) {
      if (leader != 0) {
        const auto start = std::chrono::steady_clock::now();
        transport.Recv(layer_buffer, leader);
        stats.communicate_seconds += Seconds(start);
      }
      consume(layer, layer_buffer);
    }
  }
  return stats;
}

}  // namespace adapter_job::dist
