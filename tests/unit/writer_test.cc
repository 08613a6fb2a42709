// The output directory's contract: it appears whole or not at all, --overwrite replaces only an
// earlier output of ours and never leaves the target empty, a killed run's staging is removed by
// the next run and a live one's is not, and an output is never written over an input.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <sstream>

#include "adapter_job/core/error.h"
#include "adapter_job/writer/output_guard.h"
#include "adapter_job/writer/staged_directory.h"
#include "scratch_directory.h"

namespace adapter_job::writer {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using ::testing::UnorderedElementsAre;

const std::set<std::string> kOwned = {"adapter_model.safetensors", "adapter_config.json"};

class WriterTest : public testing::ScratchDirectoryTest {
 protected:
  // A new adapter whose config says `text`, published to root_/out.
  void Publish(const std::string& text, bool overwrite) {
    StagedDirectory staged = StagedDirectory::Create(root_ / "out", overwrite, kOwned);
    staged.AddFile("adapter_config.json").Write(text);
    staged.AddFile("adapter_model.safetensors").Write(std::string_view("weights"));
    staged.Publish();
  }
};

TEST_F(WriterTest, PublishesWholeAndLeavesNothingBeside) {
  Publish("first", false);
  EXPECT_EQ(ReadFile(root_ / "out" / "adapter_config.json"), "first");
  EXPECT_THAT(Entries(), UnorderedElementsAre("out"));
}

TEST_F(WriterTest, OverwriteReplacesAnEarlierOutputInPlace) {
  Publish("first", false);
  WriteFile(root_ / "out" / "README.md", "model card");  // PEFT writes one beside an adapter
  EXPECT_THROW(Publish("second", false), FormatError);
  Publish("second", true);
  EXPECT_EQ(ReadFile(root_ / "out" / "adapter_config.json"), "second");
  EXPECT_FALSE(fs::exists(root_ / "out" / "README.md")) << "the old output went as a whole";
  EXPECT_THAT(Entries(), UnorderedElementsAre("out")) << "no staging or previous copy left";
}

TEST_F(WriterTest, OverwriteNeverReplacesWhatIsNotAnAdapter) {
  WriteFile(root_ / "out" / "thesis.tex", "mine");
  try {
    Publish("new", true);
    FAIL() << "replaced a directory holding a foreign file";
  } catch (const FormatError& e) {
    EXPECT_THAT(e.what(), HasSubstr("thesis.tex"));
  }
  EXPECT_EQ(ReadFile(root_ / "out" / "thesis.tex"), "mine");
  WriteFile(root_ / "file", "a file");
  EXPECT_THROW(StagedDirectory::Create(root_ / "file", true, kOwned), FormatError);
}

TEST_F(WriterTest, AnOldRejectedOutputNeedsOverwrite) {
  WriteFile(root_ / "out.unverified" / "adapter_config.json", "old");
  EXPECT_THROW(StagedDirectory::Create(root_ / "out", false, kOwned), FormatError);
  StagedDirectory staged = StagedDirectory::Create(root_ / "out", true, kOwned);
  staged.AddFile("adapter_config.json").Write(std::string_view("rejected"));
  EXPECT_EQ(staged.Reject(), root_ / "out.unverified");
  EXPECT_EQ(ReadFile(root_ / "out.unverified" / "adapter_config.json"), "rejected");
  EXPECT_THAT(Entries(), UnorderedElementsAre("out.unverified"));
}

TEST_F(WriterTest, UnpublishedStagingIsRemoved) {
  {
    StagedDirectory staged = StagedDirectory::Create(root_ / "out", false, kOwned);
    staged.AddFile("adapter_config.json").Write(std::string_view("x"));
    ASSERT_TRUE(fs::exists(staged.Stage()));
  }
  EXPECT_TRUE(Entries().empty());
}

TEST_F(WriterTest, StagingNamesItsOwnerAndADeadOwnersIsRemoved) {
  StagedDirectory staged = StagedDirectory::Create(root_ / "out", false, kOwned);
  const std::string live = staged.Stage().filename().string();
  // .out.partial-<host>-<pid>-<start>-XXXXXX, this process being the owner.
  EXPECT_THAT(live, HasSubstr(".out.partial-"));
  EXPECT_THAT(live, HasSubstr("-" + std::to_string(::getpid()) + "-"));
  // The same tag with another start time is a dead process whose pid was reused.
  const std::string dead = live.substr(0, live.rfind('-', live.rfind('-') - 1)) + "-1-abcdef";
  WriteFile(root_ / dead / "adapter_config.json", "left by a killed run");
  StagedDirectory::Create(root_ / "out", false, kOwned);
  EXPECT_FALSE(fs::exists(root_ / dead));
  EXPECT_TRUE(fs::exists(root_ / live)) << "a live run's staging is not ours to remove";
}

// A rank killed by mpirun's SIGKILL stays a zombie until its parent reaps it, for ever where that
// is a container's PID 1: its staging (with the temporary name of the file it was writing) is a
// dead run's all the same.
TEST_F(WriterTest, AZombiesStagingIsADeadRunsAndIsRemoved) {
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) ::_exit(0);
  std::string stat;
  for (int tries = 0; tries < 1000; ++tries) {  // until it has exited and not been reaped
    stat = ReadFile("/proc/" + std::to_string(child) + "/stat");
    if (stat.find(") Z ") != std::string::npos) break;
    ::usleep(1000);
  }
  ASSERT_NE(stat.find(") Z "), std::string::npos) << stat;
  std::istringstream fields(stat.substr(stat.rfind(')') + 2));
  std::string field, start;
  for (int i = 3; i <= 22 && fields >> field; ++i) start = field;
  StagedDirectory staged = StagedDirectory::Create(root_ / "out", false, kOwned);
  const std::string live = staged.Stage().filename().string();
  const std::string host = live.substr(
      std::string(".out.partial-").size(),
      live.find('-', std::string(".out.partial-").size()) - std::string(".out.partial-").size());
  const std::string zombie =
      ".out.partial-" + host + "-" + std::to_string(child) + "-" + start + "-abcdef";
  WriteFile(root_ / zombie / "adapter_config.json", "left by a killed run");
  WriteFile(root_ / zombie / ".adapter_job.tmp-Qx7Zp2", "the file it was writing");
  StagedDirectory::Create(root_ / "out", false, kOwned);
  EXPECT_FALSE(fs::exists(root_ / zombie));
  ::waitpid(child, nullptr, 0);
}

TEST(OutputGuard, RefusesAnOutputOnAnInputComponentWise) {
  const std::vector<NamedPath> inputs = {{"the checkpoint", "/data/run/ckpt"}};
  for (const char* out : {"/data/run/ckpt", "/data/run", "/data/run/ckpt/iter_0000001/out"}) {
    EXPECT_THROW(RefuseOutputsOverInputs({{"--output-hf-path", out}}, inputs), FormatError) << out;
  }
  for (const char* out : {"/data/run/ckpt2", "/data/run/adapter", "/data/ru"}) {
    EXPECT_NO_THROW(RefuseOutputsOverInputs({{"--output-hf-path", out}}, inputs)) << out;
  }
  EXPECT_NO_THROW(RefuseOutputsOverInputs({{"--report", ""}}, inputs)) << "an unset output";
}

}  // namespace
}  // namespace adapter_job::writer
