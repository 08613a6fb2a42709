// comm::GatherLayers moves bytes only: given a schedule and each rank's parts, rank 0 receives
// every layer, in order, assembled from its stage members' parts (padded parts cut back to their
// sizes), whoever leads the stage. Three ranks run in threads over an in-process transport.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <thread>

#include "adapter_job/comm/layer_gather.h"

namespace adapter_job::comm {
namespace {

// What the ranks share: mailboxes for Send/Recv and the rounds of each group's AllGather.
struct Fabric {
  std::mutex mutex;
  std::condition_variable changed;
  std::map<std::pair<int, int>, std::deque<std::vector<std::byte>>> mail;  // (from, to)
  struct Round {
    std::map<int, std::vector<std::byte>> sent;  // by member position
    std::size_t taken = 0;
  };
  std::map<std::pair<std::vector<int>, int>, Round> rounds;  // (members, call number)
};

class FakeGroup : public GroupCommunicator {
 public:
  FakeGroup(Fabric& fabric, std::vector<int> members, int me)
      : fabric_(fabric), members_(std::move(members)), me_(me) {}
  int rank() const override { return me_; }
  int size() const override { return static_cast<int>(members_.size()); }
  void AllGather(std::span<const std::byte> send, std::span<std::byte> recv) override {
    std::unique_lock lock(fabric_.mutex);
    const auto key = std::pair(members_, calls_++);
    fabric_.rounds[key].sent[me_].assign(send.begin(), send.end());
    fabric_.changed.notify_all();
    fabric_.changed.wait(lock, [&] { return fabric_.rounds[key].sent.size() == members_.size(); });
    auto& round = fabric_.rounds[key];
    ASSERT_EQ(recv.size(), send.size() * members_.size());
    for (const auto& [member, bytes] : round.sent) {
      ASSERT_EQ(bytes.size(), send.size()) << "every member sends one size";
      std::copy(bytes.begin(), bytes.end(), recv.begin() + member * send.size());
    }
    if (++round.taken == members_.size()) fabric_.rounds.erase(key);
  }

 private:
  Fabric& fabric_;
  std::vector<int> members_;
  int me_;
  int calls_ = 0;
};

class FakeTransport : public Transport {
 public:
  FakeTransport(Fabric& fabric, int rank) : fabric_(fabric), rank_(rank) {}
  std::string_view name() const override { return "fake"; }
  std::unique_ptr<GroupCommunicator> CreateGroup(const std::vector<int>& members) override {
    created.push_back(members);
    const auto me = std::find(members.begin(), members.end(), rank_) - members.begin();
    return std::make_unique<FakeGroup>(fabric_, members, static_cast<int>(me));
  }
  void Send(std::span<const std::byte> data, int dest) override {
    const std::lock_guard lock(fabric_.mutex);
    fabric_.mail[{rank_, dest}].emplace_back(data.begin(), data.end());
    fabric_.changed.notify_all();
  }
  void Recv(std::span<std::byte> data, int source) override {
    std::unique_lock lock(fabric_.mutex);
    auto& box = fabric_.mail[{source, rank_}];
    fabric_.changed.wait(lock, [&] { return !box.empty(); });
    ASSERT_EQ(box.front().size(), data.size());
    std::copy(box.front().begin(), box.front().end(), data.begin());
    box.pop_front();
  }
  std::vector<std::vector<int>> created;

 private:
  Fabric& fabric_;
  int rank_;
};

std::byte Mark(std::size_t layer, int rank) { return static_cast<std::byte>(16 * layer + rank); }

TEST(GatherBytes, RankZeroGetsEveryLayerInOrderAssembledFromItsStageMembersParts) {
  GatherSchedule schedule;
  // Stage 0 is led by rank 0, stage 1 by rank 1 (it sends to 0), stage 2 is rank 2 alone.
  schedule.stages = {{0, 1}, {1, 2}, {2}};
  schedule.layers = {{0, 8, {3, 5}}, {1, 6, {4, 2}}, {0, 8, {3, 5}}, {2, 7, {7}}, {1, 6, {4, 2}}};
  // Expected: member m's part is part_bytes[m] bytes marked with (layer, its rank), in order.
  std::vector<std::vector<std::byte>> expected;
  for (std::size_t l = 0; l < schedule.layers.size(); ++l) {
    const auto& layer = schedule.layers[l];
    std::vector<std::byte> bytes;
    for (std::size_t m = 0; m < layer.part_bytes.size(); ++m) {
      bytes.insert(bytes.end(), layer.part_bytes[m], Mark(l, schedule.stages[layer.stage][m]));
    }
    expected.push_back(bytes);
  }

  Fabric fabric;
  std::vector<std::vector<std::byte>> consumed;
  std::vector<std::size_t> consumed_layers;
  std::vector<std::vector<std::size_t>> read_by(3);
  std::vector<std::vector<std::vector<int>>> groups_of(3);
  std::vector<GatherStats> stats(3);
  std::vector<std::thread> ranks;
  for (int rank = 0; rank < 3; ++rank) {
    ranks.emplace_back([&, rank] {
      FakeTransport transport(fabric, rank);
      LayerParts parts;
      parts.read = [&, rank](std::size_t l, std::span<std::byte> out) {
        read_by[static_cast<std::size_t>(rank)].push_back(l);
        std::fill(out.begin(), out.end(), Mark(l, rank));
      };
      parts.place = [&](std::size_t l, std::size_t member, std::span<const std::byte> part,
                        std::span<std::byte> layer_bytes) {
        const auto& layer = schedule.layers[l];
        ASSERT_EQ(part.size(), layer.part_bytes[member]);
        uint64_t at = 0;
        for (std::size_t m = 0; m < member; ++m) at += layer.part_bytes[m];
        std::copy(part.begin(), part.end(), layer_bytes.begin() + static_cast<std::ptrdiff_t>(at));
      };
      stats[static_cast<std::size_t>(rank)] = GatherLayers(
          schedule, parts, transport, rank, [&](std::size_t l, std::span<const std::byte> bytes) {
            ASSERT_EQ(rank, 0) << "only rank 0 consumes";
            consumed_layers.push_back(l);
            consumed.emplace_back(bytes.begin(), bytes.end());
          });
      groups_of[static_cast<std::size_t>(rank)] = transport.created;
    });
  }
  for (auto& t : ranks) t.join();

  EXPECT_THAT(consumed_layers, ::testing::ElementsAre(0, 1, 2, 3, 4));
  EXPECT_EQ(consumed, expected);
  // Each rank reads only its stages' layers, and joins only its stages' groups (in stage order).
  EXPECT_THAT(read_by[0], ::testing::ElementsAre(0, 2));
  EXPECT_THAT(read_by[1], ::testing::ElementsAre(0, 1, 2, 4));
  EXPECT_THAT(read_by[2], ::testing::ElementsAre(1, 3, 4));
  EXPECT_EQ(groups_of[0], (std::vector<std::vector<int>>{{0, 1}}));
  EXPECT_EQ(groups_of[1], (std::vector<std::vector<int>>{{0, 1}, {1, 2}}));
  EXPECT_EQ(groups_of[2], (std::vector<std::vector<int>>{{1, 2}}));
  // Stage leaders other than 0 send their layers: rank 1 two (stage 1), rank 2 one (stage 2).
  EXPECT_EQ(stats[0].layers_sent, 0U);
  EXPECT_EQ(stats[1].layers_sent, 2U);
  EXPECT_EQ(stats[2].layers_sent, 1U);
}

TEST(ShardOwnership, AsManyRanksAsShardsOwnTheirOwnElseEvenBlocks) {
  EXPECT_THAT(ShardOwnership::Assign(4, 4).owner, ::testing::ElementsAre(0, 1, 2, 3));
  EXPECT_THAT(ShardOwnership::Assign(4, 6).owner, ::testing::ElementsAre(0, 1, 2, 3));
  EXPECT_THAT(ShardOwnership::Assign(4, 2).owner, ::testing::ElementsAre(0, 0, 1, 1));
  EXPECT_THAT(ShardOwnership::Assign(4, 2).ShardsOf(1), ::testing::ElementsAre(2, 3));
}

}  // namespace
}  // namespace adapter_job::comm
