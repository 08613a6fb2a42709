// The checkpoint resolver and the readiness wait, on directories laid out as Megatron writes them.
#include "adapter_job/checkpoint/checkpoint_readiness.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <fstream>

#include "adapter_job/checkpoint/checkpoint_resolver.h"
#include "adapter_job/checkpoint/integrity.h"
#include "adapter_job/core/error.h"
#include "adapter_job/core/sha256.h"

namespace adapter_job::checkpoint {
namespace {

namespace fs = std::filesystem;

class SaveDirectory : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::temp_directory_path() /
            fmt::format("readiness-{}-{}", ::getpid(),
                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(root_);
    fs::create_directories(root_);
  }
  void TearDown() override { fs::remove_all(root_); }

  static void Write(const fs::path& file, const std::string& text) {
    fs::create_directories(file.parent_path());
    std::ofstream(file, std::ios::binary) << text;
  }
  // An iteration as Megatron leaves it once the save is finalised.
  fs::path Iteration(const std::string& name) {
    const fs::path dir = root_ / name;
    Write(dir / ".metadata", "pickled metadata");
    Write(dir / "__0_0.distcp", "shard");
    Write(dir / "metadata.json", R"({"sharded_backend": "torch_dist"})");
    return dir;
  }

  fs::path root_;
};

TEST_F(SaveDirectory, TheMarkerNamesTheIteration) {
  const fs::path dir = Iteration("iter_0000012");
  Write(root_ / "latest_checkpointed_iteration.txt", " 12\n");
  const CheckpointLocation location = ResolveCheckpoint(root_);
  EXPECT_EQ(location.iteration_dir, dir);
  EXPECT_EQ(location.iteration, 12);
  EXPECT_EQ(location.label, "12");

  Iteration("release");
  Write(root_ / "latest_checkpointed_iteration.txt", "release");
  EXPECT_EQ(ResolveCheckpoint(root_).iteration_dir, root_ / "release");
  EXPECT_FALSE(ResolveCheckpoint(root_).iteration.has_value());
}

TEST_F(SaveDirectory, AnIterationDirectoryIsItself) {
  const fs::path dir = Iteration("iter_0000007");
  Write(dir / "latest_checkpointed_iteration.txt", "99");  // beside .metadata: not a save directory
  const CheckpointLocation location = ResolveCheckpoint(dir);
  EXPECT_EQ(location.iteration_dir, dir);
  EXPECT_EQ(location.iteration, 7);
  EXPECT_EQ(location.label, "iter_0000007");
}

TEST_F(SaveDirectory, WhatASaveInProgressLacksIsNotYetThere) {
  Resolution r = TryResolveCheckpoint(root_);
  EXPECT_FALSE(r.location);
  EXPECT_EQ(r.not_yet,
            fmt::format("no {} yet", (root_ / "latest_checkpointed_iteration.txt").string()));

  Write(root_ / "latest_checkpointed_iteration.txt", "");  // being rewritten
  EXPECT_NE(TryResolveCheckpoint(root_).not_yet.find("is empty"), std::string::npos);

  Write(root_ / "latest_checkpointed_iteration.txt", "3");
  r = TryResolveCheckpoint(root_);
  EXPECT_NE(r.not_yet.find("no " + (root_ / "iter_0000003").string() + " yet"), std::string::npos);
  try {
    ResolveCheckpoint(root_);
    FAIL() << "a missing iteration resolved";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("does not exist"), std::string::npos) << e.what();
  }

  const fs::path half = root_ / "iter_0000004";
  fs::create_directories(half);
  EXPECT_EQ(TryResolveCheckpoint(half).not_yet,
            fmt::format("no {} yet", (half / ".metadata").string()));
}

TEST_F(SaveDirectory, AMarkerThatIsNoIterationIsAnErrorAtOnce) {
  for (const char* text : {"abc", "-3", "+3", "9223372036854775808", "1 2"}) {
    Write(root_ / "latest_checkpointed_iteration.txt", text);
    EXPECT_THROW(TryResolveCheckpoint(root_), FormatError) << text;
  }
  Write(root_ / "file", "x");
  EXPECT_THROW(TryResolveCheckpoint(root_ / "file"), FormatError);
}

TEST_F(SaveDirectory, TheWaitEndsWithExit4NamingWhatIsMissing) {
  const fs::path dir = Iteration("iter_0000001");
  fs::remove(dir / "metadata.json");
  Write(root_ / "latest_checkpointed_iteration.txt", "1");
  WaitSettings settings;
  settings.timeout_seconds = 0;
  std::vector<std::string> said;
  settings.on_wait = [&](std::string_view why) { said.emplace_back(why); };
  try {
    WaitForCheckpoint(root_, settings);
    FAIL() << "an incomplete checkpoint was ready";
  } catch (const CheckpointNotReady& e) {
    EXPECT_EQ(e.exit_code(), ExitCode::kInfrastructure);
    EXPECT_EQ(std::string(e.what()), fmt::format("checkpoint not complete after 0 s: no {} yet",
                                                 (dir / "metadata.json").string()));
  }
  EXPECT_TRUE(said.empty());  // it gave up at the first look
}

TEST_F(SaveDirectory, ACompleteCheckpointIsReadyOnceSettled) {
  const fs::path dir = Iteration("iter_0000001");
  Write(root_ / "latest_checkpointed_iteration.txt", "1");
  WaitSettings settings;
  settings.timeout_seconds = 60;
  settings.poll_seconds = 0;
  settings.settle_seconds = 0;
  std::vector<std::string> said;
  settings.on_wait = [&](std::string_view why) { said.emplace_back(why); };
  const ReadyCheckpoint ready = WaitForCheckpoint(root_, settings);
  EXPECT_EQ(ready.location.iteration_dir, dir);
  ASSERT_FALSE(said.empty());  // three looks, however short the settle time
  EXPECT_NE(said[0].find("confirming"), std::string::npos) << said[0];
}

TEST_F(SaveDirectory, TheFingerprintIsTheManifestsDigestWhenThereIsOne) {
  const fs::path dir = Iteration("iter_0000001");
  EXPECT_EQ(Sha256Hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  // Without integrity.json: .metadata's digest, then "name size" lines in name order.
  EXPECT_EQ(CheckpointFingerprint(dir),
            Sha256Hex(Sha256Hex("pickled metadata") +
                      "\n.metadata 16\n__0_0.distcp 5\nmetadata.json 33\n"));
  Write(dir / "integrity.json", R"({"algorithm": "sha256", "files": {}})");
  EXPECT_EQ(CheckpointFingerprint(dir), Sha256File(dir / "integrity.json"));
}

}  // namespace
}  // namespace adapter_job::checkpoint
