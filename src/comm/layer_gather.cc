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
#include <optional>

#include "adapter_job/core/error.h"

namespace adapter_job::comm {
namespace {

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

GatherStats GatherLayers(const GatherSchedule& schedule, const LayerParts& parts,
                         Transport& transport, int world_rank, const LayerConsumer& consume) {
  GatherStats stats;
  BufferPool pool;  // before the read-ahead future, which must finish first
  // Per stage: my place among its members (none: not one), and (when shared) its communicator.
  struct Stage {
    std::optional<std::size_t> me;
    std::unique_ptr<GroupCommunicator> group;
  };
  std::vector<Stage> stages(schedule.stages.size());
  for (std::size_t s = 0; s < schedule.stages.size(); ++s) {
    const std::vector<int>& members = schedule.stages[s];
    const auto it = std::find(members.begin(), members.end(), world_rank);
    if (it == members.end()) continue;
    stages[s].me = static_cast<std::size_t>(it - members.begin());
    // Groups are created in stage order on every member, as CreateGroup requires.
    if (members.size() > 1) stages[s].group = transport.CreateGroup(members);
  }

  struct Prepared {
    Buffer bytes;
    double seconds = 0;
  };
  const auto read = [&](std::size_t l) {
    const auto start = std::chrono::steady_clock::now();
    const auto& layer = schedule.layers[l];
    Prepared prepared;
    prepared.bytes = pool.Take(layer.part_bytes.at(*stages[layer.stage].me));
    parts.read(l, prepared.bytes.span());
    prepared.seconds = Seconds(start);
    return prepared;
  };

  // The layers this rank reads, in order; the next one is read while the current one travels.
  std::vector<std::size_t> mine;
  for (std::size_t l = 0; l < schedule.layers.size(); ++l) {
    if (stages[schedule.layers[l].stage].me) mine.push_back(l);
  }
  std::size_t next_read = 0;
  std::future<Prepared> prefetch;
  if (!mine.empty()) prefetch = std::async(std::launch::async, read, mine[next_read++]);

  const std::optional<int64_t> kill_at = KillAtLayer(world_rank);
  for (std::size_t l = 0; l < schedule.layers.size(); ++l) {
    if (kill_at == static_cast<int64_t>(l)) std::raise(SIGKILL);
    const auto& layer = schedule.layers[l];
    Stage& stage = stages[layer.stage];
    const std::vector<int>& members = schedule.stages[layer.stage];
    const int leader = members.front();
    if (!stage.me && world_rank != 0) continue;

    Buffer layer_buffer;
    if (stage.me) {
      Prepared prepared = prefetch.get();
      stats.read_seconds += prepared.seconds;
      if (next_read < mine.size())
        prefetch = std::async(std::launch::async, read, mine[next_read++]);

      const auto start = std::chrono::steady_clock::now();
      if (stage.group == nullptr) {
        layer_buffer = std::move(prepared.bytes);
      } else {
        // Parts differ in size (replicated tensors live on slot 0): pad to the largest.
        const uint64_t widest = *std::max_element(layer.part_bytes.begin(), layer.part_bytes.end());
        Buffer send = pool.Take(widest);
        std::copy_n(prepared.bytes.data(), prepared.bytes.size(), send.data());
        std::fill(send.data() + prepared.bytes.size(), send.data() + widest, std::byte{0});
        Buffer gathered = pool.Take(widest * members.size());
        stage.group->AllGather(send.span(), gathered.span());
        if (world_rank == leader) {
          layer_buffer = pool.Take(layer.nbytes);
          for (std::size_t m = 0; m < members.size(); ++m) {
            parts.place(l, m, gathered.span().subspan(m * widest, layer.part_bytes[m]),
                        layer_buffer.span());
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
      consume(l, layer_buffer.span());
    }
    pool.Give(std::move(layer_buffer));
  }
  return stats;
}

}  // namespace adapter_job::comm
