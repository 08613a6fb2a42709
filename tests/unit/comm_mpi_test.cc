// The MPI transport and the world collectives for real, under `mpiexec -n 2` (ctest label mpi):
// every rank runs every test, in the same order, so each collective has its partner.
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "adapter_job/comm/mpi_world.h"
#include "adapter_job/comm/transport.h"

namespace adapter_job::comm {
namespace {

MpiWorld* the_world = nullptr;

const MpiWorld& World() { return *the_world; }

std::vector<std::byte> Pattern(int rank, std::size_t size) {
  std::vector<std::byte> bytes(size);
  for (std::size_t i = 0; i < size; ++i)
    bytes[i] = static_cast<std::byte>((rank * 131 + static_cast<int>(i) * 7) & 0xff);
  return bytes;
}

TEST(MpiWorld, TwoRanksThatSeeEachOtherAlive) {
  ASSERT_TRUE(World().uses_mpi());
  ASSERT_EQ(World().size(), 2);
  EXPECT_EQ(World().HostOf(World().rank()), World().host());
  EXPECT_FALSE(World().HostOf(1 - World().rank()).empty());
  EXPECT_TRUE(World().DeadPeers().empty());
}

TEST(MpiTransport, AllGatherInAGroupOfBothRanksConcatenatesInRankOrder) {
  const auto transport = MakeTransport(World(), Backend::kMpi);
  EXPECT_EQ(transport->name(), "mpi");
  const auto group = transport->CreateGroup({0, 1});
  EXPECT_EQ(group->rank(), World().rank());
  EXPECT_EQ(group->size(), 2);
  for (const std::size_t size : {std::size_t{1}, std::size_t{4096}, std::size_t{3} << 20}) {
    const auto send = Pattern(World().rank(), size);
    std::vector<std::byte> recv(2 * size);
    group->AllGather(send, recv);
    EXPECT_TRUE(std::equal(recv.begin(), recv.begin() + static_cast<std::ptrdiff_t>(size),
                           Pattern(0, size).begin()))
        << size;
    EXPECT_TRUE(std::equal(recv.begin() + static_cast<std::ptrdiff_t>(size), recv.end(),
                           Pattern(1, size).begin()))
        << size;
  }
  std::vector<std::byte> wrong(3);
  EXPECT_THROW(group->AllGather(Pattern(0, 2), wrong), CommError);
}

TEST(MpiTransport, DisjointGroupsCreatedAtOnceStayApart) {
  // Each rank alone in its own group, created concurrently: the groups must not pair up.
  const auto transport = MakeTransport(World(), Backend::kMpi);
  const auto group = transport->CreateGroup({World().rank()});
  EXPECT_EQ(group->size(), 1);
  EXPECT_EQ(group->rank(), 0);
  const auto send = Pattern(World().rank(), 64);
  std::vector<std::byte> recv(64);
  group->AllGather(send, recv);
  EXPECT_EQ(recv, send);
  // Two groups of the same members, in the same order on both: each keeps its own traffic.
  const auto first = transport->CreateGroup({0, 1});
  const auto second = transport->CreateGroup({0, 1});
  std::vector<std::byte> a(2), b(2);
  second->AllGather(std::vector<std::byte>{std::byte{2}}, b);
  first->AllGather(std::vector<std::byte>{std::byte{1}}, a);
  EXPECT_EQ(a, (std::vector<std::byte>{std::byte{1}, std::byte{1}}));
  EXPECT_EQ(b, (std::vector<std::byte>{std::byte{2}, std::byte{2}}));
}

TEST(MpiTransport, SendToRankZeroArrivesWhole) {
  const auto transport = MakeTransport(World(), Backend::kMpi);
  const std::size_t size = (std::size_t{5} << 20) + 3;
  if (World().rank() == 1) {
    transport->Send(Pattern(1, size), 0);
  } else {
    std::vector<std::byte> recv(size);
    transport->Recv(recv, 1);
    EXPECT_EQ(recv, Pattern(1, size));
  }
}

TEST(WorldCollectives, AgreeOnValuesAndCounts) {
  EXPECT_EQ(FirstNonEmpty(World(), World().rank() == 1 ? "from 1" : ""), "from 1");
  EXPECT_EQ(FirstNonEmpty(World(), "rank " + std::to_string(World().rank())), "rank 0");
  EXPECT_EQ(FirstNonEmpty(World(), ""), "");
  const auto gathered = GatherToRoot(World(), 10 + static_cast<uint64_t>(World().rank()));
  if (World().rank() == 0) {
    EXPECT_EQ(gathered, (std::vector<uint64_t>{10, 11}));
  } else {
    EXPECT_TRUE(gathered.empty());
  }
  // mpiexec -n 2 on one machine: both ranks share the host.
  const HostPlacement placement = PlaceOnHost(World());
  EXPECT_EQ(placement.local_size, 2);
  EXPECT_EQ(placement.local_rank, World().rank());
  EXPECT_EQ(AllGatherOnHost(World(), std::string(static_cast<std::size_t>(World().rank()), 'x')),
            (std::vector<std::string>{"", "x"}));
  Barrier(World());
}

TEST(WorldCollectives, RunAgreedEndsEveryRankWithTheFailingRanksCode) {
  EXPECT_NO_THROW(RunAgreed(World(), [] {}));
  const auto fail_on_1 = [] {
    if (World().rank() == 1) throw FormatError("bad input on rank 1");
  };
  if (World().rank() == 1) {
    EXPECT_THROW(RunAgreed(World(), fail_on_1), FormatError);
  } else {
    try {
      RunAgreed(World(), fail_on_1);
      ADD_FAILURE() << "rank 0 went on although rank 1 failed";
    } catch (const PeerFailure& e) {
      EXPECT_EQ(e.exit_code(), ExitCode::kBadInput);
      EXPECT_STREQ(e.what(), "rank 1 failed");
    }
  }
  // Both fail: the lowest rank speaks, with its own error.
  const auto fail_everywhere = [] { throw IoError("rank " + std::to_string(World().rank())); };
  if (World().rank() == 0) {
    EXPECT_THROW(RunAgreed(World(), fail_everywhere), IoError);
  } else {
    EXPECT_THROW(RunAgreed(World(), fail_everywhere), PeerFailure);
  }
}

TEST(CommError, NamesTheRankAndHost) {
  const CommError placed("MPI_Send failed: x", "node7", 3);
  EXPECT_STREQ(placed.what(), "rank 3 on node7: MPI_Send failed: x");
  EXPECT_EQ(placed.rank(), 3);
  EXPECT_EQ(placed.host(), "node7");
  EXPECT_EQ(placed.exit_code(), ExitCode::kInfrastructure);
  EXPECT_EQ(CommError("no GPU").rank(), -1);
}

}  // namespace
}  // namespace adapter_job::comm

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  adapter_job::comm::MpiWorld world(argc, argv);
  adapter_job::comm::the_world = &world;
  // One report is enough: rank 1's listener prints only failures.
  if (world.rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  const int result = RUN_ALL_TESTS();
  return result;
}
