// Every rank walks the layers in global order and joins only the steps that involve it. Since
// each group's collectives and each leader's sends to rank 0 happen in that one order, the
// schedule cannot deadlock, and a sender blocks until rank 0 takes its layer, which bounds how
// many layers are in flight.
#include "adapter_job/comm/layer_gather.h"

#include <algorithm>
#include <charconv>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <future>
#include <map>
#include <memory>
#include <mutex>

#include "adapter_job/core/error.h"

namespace adapter_job::comm {
namespace {

using checkpoint::AdapterLayout;
using checkpoint::LayerChunk;
using checkpoint::LayerLayout;

// Uninitialized bytes: every byte of a layer buffer is written by exactly one chunk (chunks tile
// their tensors), so zero-filling megabytes per layer would be wasted work.
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(std::size_t size)
      : data_(std::make_unique_for_overwrite<std::byte[]>(size)), size_(size), capacity_(size) {}
  std::byte* data() const { return data_.get(); }
  std::size_t size() const { return size_; }
  std::size_t capacity() const { return capacity_; }
  std::span<std::byte> span() const { return {data_.get(), size_}; }
  void Resize(std::size_t size) { size_ = size; }  // within capacity()

 private:
  std::unique_ptr<std::byte[]> data_;
  std::size_t size_ = 0;
  std::size_t capacity_ = 0;
};

// Layer-sized buffers, reused from layer to layer: a fresh allocation's pages each cost a page
// fault when first written, which was 43% of rank 0's time in a 2-rank export of a 1.2 GB MoE
// adapter (perf). Holds only what was given back, a few layers' worth. Thread-safe: the read-ahead
// thread takes buffers too.
class BufferPool {
 public:
  Buffer Take(std::size_t size) {
    {
      const std::lock_guard lock(mutex_);
      // The smallest free buffer that fits.
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->capacity() >= size && (best == free_.end() || it->capacity() < best->capacity()))
          best = it;
      }
      if (best != free_.end()) {
        Buffer buffer = std::move(*best);
        free_.erase(best);
        buffer.Resize(size);
        return buffer;
      }
    }
    return Buffer(size);
  }
  void Give(Buffer buffer) {
    if (buffer.data() == nullptr) return;
    const std::lock_guard lock(mutex_);
    free_.push_back(std::move(buffer));
  }

 private:
  std::mutex mutex_;
  std::vector<Buffer> free_;
};

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
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

// What this rank contributes to one layer: the chunks of the shards it owns in the layer's stage,
// in layout order, back to back.
struct Contribution {
  std::vector<const LayerChunk*> chunks;
  uint64_t nbytes = 0;
};

Contribution ContributionOf(const LayerLayout& layer, const std::vector<int>& my_slots) {
  Contribution c;
  for (const auto& chunk : layer.chunks) {
    if (std::find(my_slots.begin(), my_slots.end(), chunk.slot) != my_slots.end()) {
      c.chunks.push_back(&chunk);
      c.nbytes += chunk.nbytes;
    }
  }
  return c;
}

Buffer ReadContribution(const LayerLayout& layer, const Contribution& contribution,
                        const checkpoint::CheckpointReader& reader, BufferPool& pool) {
  Buffer packed = pool.Take(contribution.nbytes);
  uint64_t at = 0;
  for (const LayerChunk* chunk : contribution.chunks) {
    const std::vector<int64_t> origin(chunk->sizes_in_layer.size(), 0);
    reader.ReadChunkInto(layer, *chunk, packed.data() + at, chunk->sizes_in_layer, origin);
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
  for (int slot = 0; slot < layout.slots; ++slot) {
    members.push_back(owners.owner[static_cast<std::size_t>(layout.ShardOf(slot, pp))]);
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
      const int shard = layout.ShardOf(chunk.slot, layer.pp_stage);
      const auto& tensor = checkpoint::MetaOf(metadata, layer.tensors[chunk.tensor_index]);
      bytes[static_cast<std::size_t>(owners.owner[static_cast<std::size_t>(shard)])] +=
          metadata.Locate(tensor, checkpoint::MetaOf(metadata, layer, chunk)).length;
    }
  }
  return bytes;
}

GatherStats GatherLayers(const AdapterLayout& layout, const checkpoint::CheckpointReader& reader,
                         const ShardOwnership& owners, Transport& transport, int world_rank,
                         const LayerConsumer& consume) {
  GatherStats stats;
  BufferPool pool;  // before the read-ahead future, which must finish first
  // Per stage: members, my slots in it, and (when shared) the group communicator.
  struct Stage {
    std::vector<int> members;
    std::vector<int> my_slots;
    std::unique_ptr<GroupCommunicator> group;
  };
  std::vector<Stage> stages(static_cast<std::size_t>(layout.pipeline_parallel));
  for (int pp = 0; pp < layout.pipeline_parallel; ++pp) {
    Stage& stage = stages[static_cast<std::size_t>(pp)];
    stage.members = StageMembers(layout, owners, pp);
    for (int slot = 0; slot < layout.slots; ++slot) {
      if (owners.owner[static_cast<std::size_t>(layout.ShardOf(slot, pp))] == world_rank) {
        stage.my_slots.push_back(slot);
      }
    }
    // Groups are created in stage order on every member, as CreateGroup requires.
    if (!stage.my_slots.empty() && stage.members.size() > 1)
      stage.group = transport.CreateGroup(stage.members);
  }

  // Which slots each stage member holds, in group-rank order (members are sorted world ranks).
  const auto slots_by_member = [&](const Stage& stage, int pp) {
    std::vector<std::vector<int>> slots(stage.members.size());
    for (int slot = 0; slot < layout.slots; ++slot) {
      const int owner = owners.owner[static_cast<std::size_t>(layout.ShardOf(slot, pp))];
      const auto pos =
          std::find(stage.members.begin(), stage.members.end(), owner) - stage.members.begin();
      slots[static_cast<std::size_t>(pos)].push_back(slot);
    }
    return slots;
  };

  // What this rank reads for a layer: the whole layer, assembled in place, when it owns the
  // stage alone; otherwise its packed contribution to the stage's all-gather.
  struct Prepared {
    Buffer bytes;
    double seconds = 0;
  };
  const auto read = [&](const LayerLayout* layer) {
    const auto start = std::chrono::steady_clock::now();
    const Stage& stage = stages[static_cast<std::size_t>(layer->pp_stage)];
    Prepared prepared;
    if (stage.group == nullptr) {
      prepared.bytes = pool.Take(layer->nbytes);
      for (const auto& chunk : layer->chunks) {
        const auto& tensor = layer->tensors[chunk.tensor_index];
        reader.ReadChunkInto(*layer, chunk, prepared.bytes.data() + tensor.offset_in_layer,
                             tensor.shape, chunk.offsets_in_layer);
      }
    } else {
      prepared.bytes =
          ReadContribution(*layer, ContributionOf(*layer, stage.my_slots), reader, pool);
    }
    prepared.seconds = Seconds(start);
    return prepared;
  };

  // The layers this rank reads, in order; the next one is read while the current one travels.
  std::vector<const LayerLayout*> mine;
  for (const auto& layer : layout.layers) {
    if (!stages[static_cast<std::size_t>(layer.pp_stage)].my_slots.empty()) mine.push_back(&layer);
  }
  std::size_t next_read = 0;
  std::future<Prepared> prefetch;
  if (!mine.empty()) prefetch = std::async(std::launch::async, read, mine[next_read++]);

  const std::optional<int64_t> kill_at = KillAtLayer(world_rank);
  for (const auto& layer : layout.layers) {
    if (kill_at == layer.layer) std::raise(SIGKILL);
    Stage& stage = stages[static_cast<std::size_t>(layer.pp_stage)];
    const int leader = stage.members.front();
    const bool member = !stage.my_slots.empty();
    if (!member && world_rank != 0) continue;

    Buffer layer_buffer;
    if (member) {
      Prepared prepared = prefetch.get();
      stats.read_seconds += prepared.seconds;
      if (next_read < mine.size())
        prefetch = std::async(std::launch::async, read, mine[next_read++]);

      const auto start = std::chrono::steady_clock::now();
      if (stage.group == nullptr) {
        layer_buffer = std::move(prepared.bytes);
      } else {
        // Contributions differ in size (replicated tensors live on slot 0): pad to the largest.
        const auto slots = slots_by_member(stage, layer.pp_stage);
        uint64_t widest = 0;
        for (const auto& member_slots : slots)
          widest = std::max(widest, ContributionOf(layer, member_slots).nbytes);
        Buffer send = pool.Take(widest);
        std::copy_n(prepared.bytes.data(), prepared.bytes.size(), send.data());
        std::fill(send.data() + prepared.bytes.size(), send.data() + widest, std::byte{0});
        Buffer gathered = pool.Take(widest * stage.members.size());
        stage.group->AllGather(send.span(), gathered.span());
        if (world_rank == leader) {
          layer_buffer = pool.Take(layer.nbytes);
          for (std::size_t m = 0; m < slots.size(); ++m) {
            uint64_t at = m * widest;
            for (const LayerChunk* chunk : ContributionOf(layer, slots[m]).chunks) {
              PlaceChunk(layer, *chunk, gathered.span().subspan(at, chunk->nbytes),
                         layer_buffer.span());
              at += chunk->nbytes;
            }
          }
        }
        pool.Give(std::move(send));
        pool.Give(std::move(gathered));
        pool.Give(std::move(prepared.bytes));
      }
      if (world_rank == leader && leader != 0) {
        transport.Send(layer_buffer.span(), 0);
        ++stats.layers_sent;
      }
      stats.communicate_seconds += Seconds(start);
    }
    if (world_rank == 0) {
      if (leader != 0) {
        const auto start = std::chrono::steady_clock::now();
        layer_buffer = pool.Take(layer.nbytes);
        transport.Recv(layer_buffer.span(), leader);
        stats.communicate_seconds += Seconds(start);
      }
      consume(layer, layer_buffer.span());
    }
    pool.Give(std::move(layer_buffer));
  }
  return stats;
}

}  // namespace adapter_job::comm
