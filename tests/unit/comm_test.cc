// The distribution stage without MPI: shard ownership and stage membership by hand-worked
// examples, and GatherLayers run by N threads, one per rank, over an in-process Transport: on a
// made-up schedule whose every byte is known, and on Megatron-Bridge's TP2 x PP2 checkpoint
// through job's schedule and parts, where rank 0 must receive what one rank reading the whole
// checkpoint assembles and each rank must read exactly the bytes of the shards it owns.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <thread>
#include <vector>

#include "adapter_job/checkpoint/adapter_layout.h"
#include "adapter_job/checkpoint/checkpoint_reader.h"
#include "adapter_job/checkpoint/run_directory.h"
#include "adapter_job/comm/layer_gather.h"
#include "adapter_job/comm/transport.h"
#include "adapter_job/core/tensor.h"
#include "job/layer_parts.h"

namespace adapter_job::comm {
namespace {

namespace fs = std::filesystem;
using Bytes = std::vector<std::byte>;
using job::ExpectedBytesPerRank;
using job::StageMembers;

TEST(ShardOwnership, AsManyRanksAsShardsGivesEachRankTheShardItWrote) {
  const ShardOwnership owners = ShardOwnership::Assign(4, 4);
  EXPECT_EQ(owners.owner, (std::vector<int>{0, 1, 2, 3}));
  EXPECT_EQ(owners.ShardsOf(2), (std::vector<int>{2}));
}

TEST(ShardOwnership, FewerRanksOwnEvenContiguousBlocks) {
  // 8 shards over 3 ranks: floor(s * 3 / 8).
  const ShardOwnership owners = ShardOwnership::Assign(8, 3);
  EXPECT_EQ(owners.owner, (std::vector<int>{0, 0, 0, 1, 1, 1, 2, 2}));
  EXPECT_EQ(owners.ShardsOf(0), (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(owners.ShardsOf(2), (std::vector<int>{6, 7}));
  EXPECT_EQ(ShardOwnership::Assign(4, 1).owner, (std::vector<int>{0, 0, 0, 0}));
}

TEST(ShardOwnership, ExtraRanksOwnNothing) {
  const ShardOwnership owners = ShardOwnership::Assign(2, 5);
  EXPECT_EQ(owners.owner, (std::vector<int>{0, 1}));
  EXPECT_TRUE(owners.ShardsOf(2).empty());
  EXPECT_TRUE(owners.ShardsOf(4).empty());
}

checkpoint::AdapterLayout Layout(int slots, int pipeline_parallel) {
  checkpoint::AdapterLayout layout;
  layout.slots = slots;
  layout.tensor_parallel = slots;
  layout.pipeline_parallel = pipeline_parallel;
  return layout;
}

TEST(StageMembers, SortedUniqueOwnersOfTheStagesShards) {
  // TP4 x PP2 on 3 ranks: shards 0-3 are stage 0 (owners 0,0,0,1), 4-7 stage 1 (1,1,2,2).
  const auto layout = Layout(4, 2);
  const auto owners = ShardOwnership::Assign(8, 3);
  EXPECT_EQ(StageMembers(layout, owners, 0), (std::vector<int>{0, 1}));
  EXPECT_EQ(StageMembers(layout, owners, 1), (std::vector<int>{1, 2}));
}

TEST(StageMembers, OneRankPerShardMakesEveryStageItsOwnRanks) {
  const auto layout = Layout(2, 3);
  const auto owners = ShardOwnership::Assign(6, 6);
  EXPECT_EQ(StageMembers(layout, owners, 0), (std::vector<int>{0, 1}));
  EXPECT_EQ(StageMembers(layout, owners, 2), (std::vector<int>{4, 5}));
  // One rank for everything: a stage of one, its leader rank 0.
  EXPECT_EQ(StageMembers(layout, ShardOwnership::Assign(6, 1), 1), (std::vector<int>{0}));
}

// The in-process world: mailboxes for Send/Recv and one rendezvous per group for AllGather.
class Hub {
 public:
  void Send(int from, int to, std::span<const std::byte> data) {
    const std::lock_guard lock(mutex_);
    mail_[{from, to}].emplace_back(data.begin(), data.end());
    changed_.notify_all();
  }
  void Recv(int from, int to, std::span<std::byte> data) {
    std::unique_lock lock(mutex_);
    auto& box = mail_[{from, to}];
    changed_.wait(lock, [&] { return !box.empty(); });
    ASSERT_EQ(box.front().size(), data.size()) << "message from rank " << from << " to " << to;
    std::memcpy(data.data(), box.front().data(), data.size());
    box.erase(box.begin());
  }

  // Round `round` of group `key`: every member deposits, then each takes all contributions.
  void AllGather(const std::string& key, int round, int member, int size,
                 std::span<const std::byte> send, std::span<std::byte> recv) {
    std::unique_lock lock(mutex_);
    Round& r = rounds_[{key, round}];
    r.contributions.resize(static_cast<std::size_t>(size));
    r.contributions[static_cast<std::size_t>(member)].assign(send.begin(), send.end());
    ++r.arrived;
    changed_.notify_all();
    changed_.wait(lock, [&] { return r.arrived == size; });
    std::size_t at = 0;
    for (const Bytes& contribution : r.contributions) {
      ASSERT_EQ(contribution.size(), send.size()) << "members sent different sizes";
      std::memcpy(recv.data() + at, contribution.data(), contribution.size());
      at += contribution.size();
    }
    if (++r.left == size) rounds_.erase({key, round});
  }

 private:
  struct Round {
    std::vector<Bytes> contributions;
    int arrived = 0;
    int left = 0;
  };
  std::mutex mutex_;
  std::condition_variable changed_;
  std::map<std::pair<int, int>, std::vector<Bytes>> mail_;
  std::map<std::pair<std::string, int>, Round> rounds_;
};

class FakeGroup final : public GroupCommunicator {
 public:
  FakeGroup(Hub& hub, std::string key, int rank, int size)
      : hub_(hub), key_(std::move(key)), rank_(rank), size_(size) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void AllGather(std::span<const std::byte> send, std::span<std::byte> recv) override {
    EXPECT_EQ(recv.size(), send.size() * static_cast<std::size_t>(size_));
    hub_.AllGather(key_, round_++, rank_, size_, send, recv);
    ++gathers;
  }
  static inline std::atomic<int> gathers = 0;

 private:
  Hub& hub_;
  std::string key_;
  int rank_;
  int size_;
  int round_ = 0;
};

class FakeTransport final : public Transport {
 public:
  FakeTransport(Hub& hub, int rank) : hub_(hub), rank_(rank) {}
  std::string_view name() const override { return "fake"; }
  std::unique_ptr<GroupCommunicator> CreateGroup(const std::vector<int>& members) override {
    EXPECT_TRUE(std::is_sorted(members.begin(), members.end()));
    const auto me = std::find(members.begin(), members.end(), rank_);
    EXPECT_NE(me, members.end()) << "rank " << rank_ << " joins a group it is not in";
    // Every member creates its groups in the same order, so the n-th group of these members is
    // the same group on all of them.
    std::string key;
    for (const int member : members) key += std::to_string(member) + ",";
    key += "#" + std::to_string(created_[key]++);
    return std::make_unique<FakeGroup>(hub_, key, static_cast<int>(me - members.begin()),
                                       static_cast<int>(members.size()));
  }
  void Send(std::span<const std::byte> data, int dest) override {
    EXPECT_EQ(dest, 0) << "leaders send to rank 0 only";
    hub_.Send(rank_, dest, data);
  }
  void Recv(std::span<std::byte> data, int source) override { hub_.Recv(source, rank_, data); }

 private:
  Hub& hub_;
  int rank_;
  std::map<std::string, int> created_;
};

fs::path FixtureCheckpoint(const std::string& layout) {
  return fs::path(ADAPTER_JOB_FIXTURES) / layout / "lora" / "megatron_ckpt";
}

struct RankResult {
  std::map<std::size_t, Bytes> layers;  // what rank 0 consumed
  std::vector<std::size_t> order;
  uint64_t bytes_read = 0;
  GatherStats stats;
};

// Runs GatherLayers as `world_size` ranks in threads, `parts_of(rank)` giving each rank's parts;
// returns each rank's result.
std::vector<RankResult> GatherInThreads(const GatherSchedule& schedule, int world_size,
                                        const std::function<LayerParts(int rank)>& parts_of,
                                        const std::function<uint64_t(int rank)>& bytes_read = {}) {
  Hub hub;
  std::vector<RankResult> results(static_cast<std::size_t>(world_size));
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(world_size));
  std::vector<std::thread> ranks;
  for (int rank = 0; rank < world_size; ++rank) {
    ranks.emplace_back([&, rank] {
      try {
        FakeTransport transport(hub, rank);
        RankResult& result = results[static_cast<std::size_t>(rank)];
        result.stats = GatherLayers(schedule, parts_of(rank), transport, rank,
                                    [&](std::size_t layer, std::span<const std::byte> bytes) {
                                      EXPECT_EQ(rank, 0) << "consume runs on rank 0 only";
                                      EXPECT_EQ(bytes.size(), schedule.layers[layer].nbytes);
                                      result.layers[layer] = Bytes(bytes.begin(), bytes.end());
                                      result.order.push_back(layer);
                                    });
        if (bytes_read) result.bytes_read = bytes_read(rank);
      } catch (...) {
        errors[static_cast<std::size_t>(rank)] = std::current_exception();
      }
    });
  }
  for (auto& thread : ranks) thread.join();
  for (const auto& error : errors) {
    if (error) std::rethrow_exception(error);
  }
  return results;
}

std::byte PartByte(std::size_t layer, std::size_t member, std::size_t i) {
  return static_cast<std::byte>((layer * 67 + member * 13 + i * 3 + 1) & 0xff);
}

TEST(GatherLayers, MovesEveryPartOfAMadeUpScheduleToItsPlace) {
  // Three ranks; stage 0: rank 0 alone; stage 1: ranks 1 and 2 (rank 0 receives from leader 1);
  // stage 2: all three, parts of unequal size, one empty. A layer is its members' parts in member
  // order, each byte a function of (layer, member, index).
  GatherSchedule schedule;
  schedule.stages = {{0}, {1, 2}, {0, 1, 2}};
  schedule.layers = {{0, 6, {6}}, {1, 8, {3, 5}}, {2, 6, {4, 0, 2}}, {1, 2, {1, 1}}};
  const auto parts_of = [&](int rank) {
    LayerParts parts;
    parts.read = [&schedule, rank](std::size_t layer, std::span<std::byte> out) {
      const auto& members = schedule.stages[schedule.layers[layer].stage];
      const auto member = static_cast<std::size_t>(std::find(members.begin(), members.end(), rank) -
                                                   members.begin());
      ASSERT_LT(member, members.size()) << "rank " << rank << " reads a layer not of its stage";
      ASSERT_EQ(out.size(), schedule.layers[layer].part_bytes[member]);
      for (std::size_t i = 0; i < out.size(); ++i) out[i] = PartByte(layer, member, i);
    };
    parts.place = [&schedule](std::size_t layer, std::size_t member,
                              std::span<const std::byte> part, std::span<std::byte> layer_bytes) {
      const auto& sizes = schedule.layers[layer].part_bytes;
      ASSERT_EQ(part.size(), sizes[member]);
      uint64_t at = 0;
      for (std::size_t m = 0; m < member; ++m) at += sizes[m];
      std::copy(part.begin(), part.end(), layer_bytes.begin() + static_cast<std::ptrdiff_t>(at));
    };
    return parts;
  };
  FakeGroup::gathers = 0;
  const auto results = GatherInThreads(schedule, 3, parts_of);
  const RankResult& root = results.front();
  EXPECT_EQ(root.order, (std::vector<std::size_t>{0, 1, 2, 3}));
  for (std::size_t layer = 0; layer < schedule.layers.size(); ++layer) {
    Bytes expected;
    const auto& sizes = schedule.layers[layer].part_bytes;
    for (std::size_t member = 0; member < sizes.size(); ++member) {
      for (std::size_t i = 0; i < sizes[member]; ++i)
        expected.push_back(PartByte(layer, member, i));
    }
    EXPECT_EQ(root.layers.at(layer), expected) << "layer " << layer;
  }
  // Rank 1 leads stage 1 and sends its two layers; stage 2's leader is rank 0 itself.
  EXPECT_EQ(results[1].stats.layers_sent, 2u);
  EXPECT_EQ(results[2].stats.layers_sent, 0u);
  EXPECT_EQ(root.stats.layers_sent, 0u);
  // Each member of a shared stage joins each of its layers' all-gathers: layers 1 and 3 (2 members
  // each) and 2 (3); rank 0 reads layer 0 whole, alone.
  EXPECT_EQ(FakeGroup::gathers.load(), 7);
}

// The real checkpoint through job's schedule and parts.
std::vector<RankResult> Gather(const fs::path& checkpoint, int world_size) {
  const checkpoint::RunDirectory run = checkpoint::OpenRunDirectory(checkpoint);
  const auto reader = checkpoint::CheckpointReader::Open(run.iteration_dir);
  const auto layout = checkpoint::PlanAdapterLayout(reader.metadata(), run.model);
  const auto owners = ShardOwnership::Assign(layout.shard_count(), world_size);
  // A reader per rank, as every process has its own: its byte counter is that rank's.
  std::vector<std::unique_ptr<checkpoint::CheckpointReader>> readers;
  for (int rank = 0; rank < world_size; ++rank) {
    readers.push_back(std::make_unique<checkpoint::CheckpointReader>(
        checkpoint::CheckpointReader::Open(run.iteration_dir)));
  }
  return GatherInThreads(
      job::ScheduleOf(layout, owners), world_size,
      [&](int rank) {
        return job::PartsOf(layout, *readers[static_cast<std::size_t>(rank)], owners, rank);
      },
      [&](int rank) { return readers[static_cast<std::size_t>(rank)]->bytes_read(); });
}

class GatherLayersTest : public ::testing::TestWithParam<int> {};

TEST_P(GatherLayersTest, RankZeroGetsWhatOneRankAssemblesAndEachRankReadsItsShards) {
  const int world_size = GetParam();
  const fs::path checkpoint = FixtureCheckpoint("tp2pp2");
  const auto reference = Gather(checkpoint, 1).front();
  ASSERT_FALSE(reference.layers.empty());
  const checkpoint::RunDirectory run = checkpoint::OpenRunDirectory(checkpoint);
  const auto reader = checkpoint::CheckpointReader::Open(run.iteration_dir);
  const auto layout = checkpoint::PlanAdapterLayout(reader.metadata(), run.model);
  ASSERT_EQ(layout.shard_count(), 4);
  ASSERT_EQ(reference.layers.size(), layout.layers.size());
  // The one-rank assembly itself, tensor by tensor, against the whole global tensor (ReadTensor
  // assembles it from all chunks by another path): a layer's tensor is the whole tensor, or its
  // slice `layer` along a leading stacked axis of all layers.
  int checked = 0;
  for (std::size_t l = 0; l < layout.layers.size(); ++l) {
    const auto& layer = layout.layers[l];
    const Bytes& assembled = reference.layers.at(l);
    for (const auto& tensor : layer.tensors) {
      const Tensor global = reader.ReadTensor(reader.metadata().tensors[tensor.meta_index]);
      std::size_t offset = 0;
      if (global.shape.size() == tensor.shape.size() + 1 && global.shape[0] == layout.num_layers &&
          std::equal(tensor.shape.begin(), tensor.shape.end(), global.shape.begin() + 1)) {
        offset = static_cast<std::size_t>(layer.layer) * tensor.nbytes;
      } else if (global.shape != tensor.shape) {
        continue;
      }
      ASSERT_LE(offset + tensor.nbytes, global.nbytes());
      EXPECT_EQ(std::memcmp(assembled.data() + tensor.offset_in_layer, global.data.data() + offset,
                            tensor.nbytes),
                0)
          << tensor.fqn << " in layer " << layer.layer;
      ++checked;
    }
  }
  EXPECT_GT(checked, 0) << "no tensor of the fixture could be checked against ReadTensor";

  FakeGroup::gathers = 0;
  const auto results = Gather(checkpoint, world_size);
  const RankResult& root = results.front();
  std::vector<std::size_t> in_order(layout.layers.size());
  std::iota(in_order.begin(), in_order.end(), std::size_t{0});
  EXPECT_EQ(root.order, in_order) << "layers consumed out of order";
  for (const auto& [layer, bytes] : reference.layers) {
    ASSERT_TRUE(root.layers.count(layer)) << "layer " << layer << " never reached rank 0";
    EXPECT_TRUE(root.layers.at(layer) == bytes) << "layer " << layer << " differs";
  }
  const auto owners = ShardOwnership::Assign(layout.shard_count(), world_size);
  const auto expected = ExpectedBytesPerRank(layout, reader.metadata(), owners, world_size);
  uint64_t total = 0;
  for (int rank = 0; rank < world_size; ++rank) {
    EXPECT_EQ(results[static_cast<std::size_t>(rank)].bytes_read,
              expected[static_cast<std::size_t>(rank)])
        << "rank " << rank;
    total += results[static_cast<std::size_t>(rank)].bytes_read;
  }
  EXPECT_EQ(total, reference.bytes_read) << "the shards are read once in all";
  // TP2 x PP2, shards (slot, stage) 0-3: with 2 ranks each holds one whole stage (no all-gather)
  // and rank 1 sends stage 1 to rank 0; with 3 (owners 0,0,1,2) stage 1 is all-gathered; with 4 or
  // more both stages are.
  uint64_t sent = 0;
  for (const auto& result : results) sent += result.stats.layers_sent;
  EXPECT_EQ(FakeGroup::gathers.load() > 0, world_size >= 3);
  EXPECT_EQ(sent > 0, world_size >= 2);
}

// 1: alone; 2 and 3: fewer ranks than shards; 4: one per shard; 6: ranks that own nothing.
INSTANTIATE_TEST_SUITE_P(WorldSizes, GatherLayersTest, ::testing::Values(1, 2, 3, 4, 6));

}  // namespace
}  // namespace adapter_job::comm
