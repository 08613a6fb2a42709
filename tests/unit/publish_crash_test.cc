// Crash safety of the outputs, with real processes: a writer SIGKILLed mid-write never leaves a
// partial file or directory under the final name, an existing output survives a killed
// replacement, a reader watching an output that is replaced again and again always finds a
// complete one (RENAME_EXCHANGE), and the staging of a killed run is removed by the next while
// a live run's is not. (writer_test.cc covers the single-process contract.)
#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <functional>

#include "adapter_job/core/error.h"
#include "adapter_job/core/file.h"
#include "adapter_job/core/signal_cleanup.h"
#include "adapter_job/writer/staged_directory.h"
#include "scratch_directory.h"

namespace adapter_job::writer {
namespace {

namespace fs = std::filesystem;
using ::testing::Each;
using ::testing::IsEmpty;
using ::testing::StartsWith;
using ::testing::UnorderedElementsAre;

const std::set<std::string> kOwned = {"adapter_model.safetensors", "adapter_config.json"};

// A child process that runs `body`, which calls `ready()` at the point where the parent is to
// kill it: ready() reports through a pipe and waits, so the child's stack, with its open outputs,
// is never unwound. The child never returns into the test framework.
class Child {
 public:
  using Ready = std::function<void()>;
  explicit Child(const std::function<void(const Ready&)>& body) {
    int fds[2];
    if (::pipe(fds) != 0) throw std::runtime_error("pipe");
    pid_ = ::fork();
    if (pid_ < 0) throw std::runtime_error("fork");
    if (pid_ == 0) {
      ::close(fds[0]);
      const Ready ready = [&] {
        if (::write(fds[1], "k", 1) != 1) ::_exit(3);
        for (;;) ::pause();  // until killed
      };
      try {
        body(ready);
      } catch (...) {
      }
      ::_exit(2);  // ended without reaching ready()
    }
    ::close(fds[1]);
    char byte = 0;
    reached_ = ::read(fds[0], &byte, 1) == 1;
    ::close(fds[0]);
  }
  ~Child() {
    if (pid_ > 0) Kill(SIGKILL);
  }
  // Whether `body` called ready().
  bool reached() const { return reached_; }
  // Kills the child with `signal` and waits for it; returns the signal that ended it (0 if none).
  int Kill(int signal) {
    ::kill(pid_, signal);
    int status = 0;
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
    return WIFSIGNALED(status) ? WTERMSIG(status) : 0;
  }

 private:
  pid_t pid_ = -1;
  bool reached_ = false;
};

class PublishCrashTest : public testing::ScratchDirectoryTest {
 protected:
  // A run that stages an adapter whose config says `text`, then waits to be killed.
  std::function<void(const Child::Ready&)> StageThenWait(std::string text) const {
    return [this, text](const Child::Ready& ready) {
      StagedDirectory staged = StagedDirectory::Create(root_ / "out", false, kOwned);
      staged.AddFile("adapter_config.json").Write(text);
      staged.Stage();
      ready();
    };
  }
  void Publish(const std::string& text, bool overwrite = false) {
    StagedDirectory staged = StagedDirectory::Create(root_ / "out", overwrite, kOwned);
    staged.AddFile("adapter_config.json").Write(text);
    staged.AddFile("adapter_model.safetensors").Write(std::string_view("weights"));
    staged.Publish();
  }
};

const std::string kMegabyte(1 << 20, 'x');

TEST_F(PublishCrashTest, OutputFileKilledMidWriteLeavesNoFinalFile) {
  Child child([&](const Child::Ready& ready) {
    OutputFile out = OutputFile::Create(root_ / "adapter.safetensors", false);
    for (int i = 0; i < 4; ++i) out.Write(kMegabyte);
    ready();
  });
  ASSERT_TRUE(child.reached());
  EXPECT_EQ(child.Kill(SIGKILL), SIGKILL);
  EXPECT_FALSE(fs::exists(root_ / "adapter.safetensors"));
  // Unnamed (O_TMPFILE) where the file system allows, else a hidden temporary: never the name.
  EXPECT_THAT(Entries(), Each(StartsWith(".")));
}

TEST_F(PublishCrashTest, OutputFileKilledBeforeCommitKeepsTheOldFile) {
  WriteFile(root_ / "report.json", "old");
  Child child([&](const Child::Ready& ready) {
    OutputFile out = OutputFile::Create(root_ / "report.json", true);
    out.Write(std::string_view("new but unfinished"));
    ready();
  });
  ASSERT_TRUE(child.reached());
  child.Kill(SIGKILL);
  EXPECT_EQ(ReadFile(root_ / "report.json"), "old");

  OutputFile out = OutputFile::Create(root_ / "report.json", true);
  out.Write(std::string_view("new"));
  EXPECT_EQ(ReadFile(root_ / "report.json"), "old") << "nothing is visible before the commit";
  std::move(out).Commit();
  EXPECT_EQ(ReadFile(root_ / "report.json"), "new");
  EXPECT_THAT(Entries(), UnorderedElementsAre("report.json")) << "no temporary left beside it";
}

TEST_F(PublishCrashTest, OutputFileRefusesToReplaceUnlessAskedEvenIfTheTargetAppearsLate) {
  WriteFile(root_ / "report.json", "theirs");
  EXPECT_THROW(OutputFile::Create(root_ / "report.json", false), FormatError);
  OutputFile out = OutputFile::Create(root_ / "late.json", false);
  out.Write(std::string_view("ours"));
  WriteFile(root_ / "late.json", "appeared meanwhile");
  EXPECT_THROW(std::move(out).Commit(), IoError);
  EXPECT_EQ(ReadFile(root_ / "late.json"), "appeared meanwhile");
  EXPECT_THAT(Entries(), UnorderedElementsAre("report.json", "late.json"));
}

TEST_F(PublishCrashTest, AFailedCommitLeavesNoTemporary) {
  {
    OutputFile out = OutputFile::CreateUnnamed(root_, root_ / "missing" / "file");
    out.Write(std::string_view("data"));
    EXPECT_THROW(std::move(out).CommitAs(root_ / "missing" / "file", true), IoError);
  }
  EXPECT_THAT(Entries(), IsEmpty());
}

TEST_F(PublishCrashTest, StagedDirectoryKilledMidWriteLeavesTheOldOutputWhole) {
  Publish("old");
  Child child([&](const Child::Ready& ready) {
    StagedDirectory staged = StagedDirectory::Create(root_ / "out", true, kOwned);
    staged.AddFile("adapter_config.json").Write(std::string_view("new"));
    staged.AddFile("adapter_model.safetensors").Write(kMegabyte);
    ready();
  });
  ASSERT_TRUE(child.reached());
  child.Kill(SIGKILL);
  EXPECT_EQ(ReadFile(root_ / "out" / "adapter_config.json"), "old");
  EXPECT_THAT(Entries(), UnorderedElementsAre("out")) << "unstaged files are unnamed";
}

TEST_F(PublishCrashTest, AKilledRunsStagingIsRemovedAndALiveRunsIsKept) {
  // A run killed after staging: its directory stays behind, complete but never published.
  Child killed(StageThenWait("killed"));
  ASSERT_TRUE(killed.reached());
  killed.Kill(SIGKILL);
  const std::vector<std::string> left = Entries();
  ASSERT_EQ(left.size(), 1u);
  EXPECT_THAT(left[0], StartsWith(".out.partial-"));
  EXPECT_FALSE(fs::exists(root_ / "out"));

  // The next run removes it as it starts, and stages its own.
  Child live(StageThenWait("live"));
  ASSERT_TRUE(live.reached());
  const std::vector<std::string> staged = Entries();
  ASSERT_EQ(staged.size(), 1u);
  EXPECT_NE(staged[0], left[0]) << "the killed run's staging is gone";
  EXPECT_EQ(ReadFile(root_ / staged[0] / "adapter_config.json"), "live");

  // A third run leaves the live one's alone...
  StagedDirectory::Create(root_ / "out", false, kOwned);
  EXPECT_THAT(Entries(), UnorderedElementsAre(staged[0]));
  // ...until its owner is dead.
  live.Kill(SIGKILL);
  StagedDirectory::Create(root_ / "out", false, kOwned);
  EXPECT_THAT(Entries(), IsEmpty());
}

TEST_F(PublishCrashTest, AStoppedRunRemovesItsStaging) {
  Child stopped([&](const Child::Ready& ready) {
    InstallSignalCleanup();
    StagedDirectory staged = StagedDirectory::Create(root_ / "out", false, kOwned);
    staged.AddFile("adapter_config.json").Write(std::string_view("stopped"));
    staged.Stage();
    ready();
  });
  ASSERT_TRUE(stopped.reached());
  ASSERT_EQ(Entries().size(), 1u);
  EXPECT_EQ(stopped.Kill(SIGTERM), SIGTERM) << "as a scheduler stops a job";
  EXPECT_THAT(Entries(), IsEmpty());
}

// The stop arrives while a file is being linked into the staging (the race scancel hit in
// test_trust): the removal waits for the step, so it neither fails on the late file nor leaves
// the directory behind.
TEST_F(PublishCrashTest, AStopDuringADeferredStepRemovesWhatTheStepAdded) {
  const fs::path staging = root_ / ".out.partial-test";
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    try {
      InstallSignalCleanup();
      fs::create_directory(staging);
      const RemoveOnSignal cleanup(staging);
      {
        const auto defer = DeferSignalCleanup();
        ::kill(::getpid(), SIGTERM);
        ::usleep(200'000);  // ample time for the cleanup thread to act, were it not held off
        if (!fs::exists(staging)) ::_exit(4);
        WriteFile(staging / "adapter_config.json", "linked in late");
        WriteFile(root_ / "step-finished", "");  // the signal did not end the step
      }
      ::sleep(10);
      ::_exit(5);  // the signal never ended the process
    } catch (...) {
      ::_exit(6);
    }
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFSIGNALED(status))
      << "exit status " << WEXITSTATUS(status)
      << " (4: removed while held off; 5: the signal was lost; 6: threw)";
  EXPECT_EQ(WTERMSIG(status), SIGTERM);
  EXPECT_THAT(Entries(), UnorderedElementsAre("step-finished"))
      << "the staging went after the step";
}

TEST_F(PublishCrashTest, AReaderAlwaysFindsACompleteOutputWhileItIsReplaced) {
  Publish("0");
  // The reader counts the times it found no output; it stops when `stop` appears.
  const fs::path stop = root_ / "stop";
  const pid_t reader = ::fork();
  ASSERT_GE(reader, 0);
  if (reader == 0) {
    int missing = 0;
    for (int i = 0; !fs::exists(stop); ++i) {
      std::ifstream in(root_ / "out" / "adapter_config.json");
      std::string text;
      if (!(in >> text)) ++missing;
    }
    ::_exit(missing == 0 ? 0 : 1);
  }
  for (int i = 1; i <= 100; ++i) Publish(std::to_string(i), true);
  WriteFile(stop, "");
  int status = 0;
  ASSERT_EQ(::waitpid(reader, &status, 0), reader);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "the reader once found the output missing or empty";
  EXPECT_EQ(ReadFile(root_ / "out" / "adapter_config.json"), "100");
  EXPECT_THAT(Entries(), UnorderedElementsAre("out", "stop"));
}

TEST_F(PublishCrashTest, PendingPathAppearsOnlyWhenPublished) {
  UniqueFd fd;
  PendingPath file = PendingPath::File(root_, ".x.tmp-", root_ / "x", &fd);
  ASSERT_EQ(::write(fd.get(), "data", 4), 4);
  fd.Close(file.path());
  EXPECT_THAT(Entries(), UnorderedElementsAre(file.path().filename().string()));
  EXPECT_THAT(file.path().filename().string(), StartsWith(".x.tmp-"));
  const mode_t mask = ::umask(0);
  ::umask(mask);
  EXPECT_EQ(fs::status(file.path()).permissions(), fs::perms(0644 & ~mask)) << "not mkstemp's 0600";
  std::move(file).Publish(root_ / "x", false);
  EXPECT_EQ(ReadFile(root_ / "x"), "data");
  EXPECT_THAT(Entries(), UnorderedElementsAre("x"));

  {
    PendingPath again = PendingPath::File(root_, ".x.tmp-", root_ / "x");
    EXPECT_THROW(std::move(again).Publish(root_ / "x", false), IoError);
  }
  EXPECT_EQ(ReadFile(root_ / "x"), "data");
  EXPECT_THAT(Entries(), UnorderedElementsAre("x")) << "the refused temporary is removed";
}

TEST_F(PublishCrashTest, PendingDirectoryIsExchangedWithTheOldOne) {
  PendingPath first = PendingPath::Directory(root_, ".d.tmp-", root_ / "d");
  WriteFile(first.path() / "a", "first");
  std::move(first).Publish(root_ / "d", false);
  PendingPath second = PendingPath::Directory(root_, ".d.tmp-", root_ / "d");
  WriteFile(second.path() / "b", "second");
  EXPECT_THROW(PendingPath(std::move(second)).Publish(root_ / "d", false), IoError);
  EXPECT_THAT(Entries(), UnorderedElementsAre("d")) << "refused, and removed";

  PendingPath third = PendingPath::Directory(root_, ".d.tmp-", root_ / "d");
  WriteFile(third.path() / "c", "third");
  std::move(third).Publish(root_ / "d", true);
  EXPECT_THAT(Entries(root_ / "d"), UnorderedElementsAre("c"));
  EXPECT_THAT(Entries(), UnorderedElementsAre("d")) << "the previous output is gone";
}

TEST_F(PublishCrashTest, APendingFileNeverReplacesADirectory) {
  WriteFile(root_ / "d" / "keep", "kept");
  {
    PendingPath file = PendingPath::File(root_, ".d.tmp-", root_ / "d");
    try {
      std::move(file).Publish(root_ / "d", true);
      FAIL() << "a file replaced a directory";
    } catch (const IoError& e) {
      EXPECT_THAT(e.what(), ::testing::HasSubstr((root_ / "d").string()));
    }
  }
  EXPECT_EQ(ReadFile(root_ / "d" / "keep"), "kept");
  EXPECT_THAT(Entries(), UnorderedElementsAre("d"));
}

}  // namespace
}  // namespace adapter_job::writer
