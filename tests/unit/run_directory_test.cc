// OpenRunDirectory: the top-level save directory (latest_checkpointed_iteration.txt names
// iter_%07d or "release") versus an iteration directory given directly, malformed markers, and
// the files found beside the checkpoint (run_config.yaml, metadata.json, integrity.json).
#include "adapter_job/checkpoint/run_directory.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "adapter_job/core/error.h"
#include "scratch_directory.h"

namespace adapter_job::checkpoint {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

class RunDirectoryTest : public testing::ScratchDirectoryTest {
 protected:
  // An iteration directory with a (contentless) .metadata.
  fs::path Iteration(const std::string& name) {
    WriteFile(root_ / name / ".metadata", "");
    return root_ / name;
  }
  std::string ErrorOf(const fs::path& path) {
    try {
      OpenRunDirectory(path);
    } catch (const FormatError& e) {
      return e.what();
    }
    return "(no error)";
  }
};

TEST_F(RunDirectoryTest, TopLevelDirectoryFollowsTheLatestIterationMarker) {
  Iteration("iter_0000010");
  const fs::path latest = Iteration("iter_0000042");
  WriteFile(root_ / "latest_checkpointed_iteration.txt", "42\n");
  const RunDirectory run = OpenRunDirectory(root_);
  EXPECT_EQ(run.given, root_);
  EXPECT_EQ(run.iteration_dir, latest);
  EXPECT_EQ(run.iteration, 42);
  EXPECT_FALSE(run.run_config_path.has_value());
  EXPECT_TRUE(run.metadata_json.is_null());
  EXPECT_FALSE(run.integrity.has_value());
}

TEST_F(RunDirectoryTest, ReleaseMarkerNamesTheReleaseDirectory) {
  const fs::path release = Iteration("release");
  WriteFile(root_ / "latest_checkpointed_iteration.txt", "  release \n");
  const RunDirectory run = OpenRunDirectory(root_);
  EXPECT_EQ(run.iteration_dir, release);
  EXPECT_FALSE(run.iteration.has_value());
}

TEST_F(RunDirectoryTest, AnIterationDirectoryIsUsedAsGiven) {
  const fs::path dir = Iteration("iter_0000007");
  WriteFile(root_ / "latest_checkpointed_iteration.txt",
            "99");  // the marker one level up is ignored
  const RunDirectory run = OpenRunDirectory(dir);
  EXPECT_EQ(run.iteration_dir, dir);
  EXPECT_EQ(run.iteration, 7);

  // A directory holding .metadata is the checkpoint even beside a marker.
  WriteFile(root_ / ".metadata", "");
  EXPECT_EQ(OpenRunDirectory(root_).iteration_dir, root_);
  EXPECT_EQ(OpenRunDirectory(Iteration("checkpoint")).iteration, std::nullopt);
}

TEST_F(RunDirectoryTest, MalformedMarkersAreRefusedNamingTheFile) {
  Iteration("iter_0000003");
  for (const char* text : {"", "abc", "-3", "3abc", "3.0", "0x3", "99999999999999999999"}) {
    WriteFile(root_ / "latest_checkpointed_iteration.txt", text);
    const std::string error = ErrorOf(root_);
    EXPECT_THAT(error, HasSubstr("expected an iteration number")) << text;
    EXPECT_THAT(error, HasSubstr("or 'release', found '" + std::string(text) + "'")) << text;
    EXPECT_THAT(error, HasSubstr("latest_checkpointed_iteration.txt")) << text;
  }
  WriteFile(root_ / "latest_checkpointed_iteration.txt", "4");
  EXPECT_THAT(ErrorOf(root_), HasSubstr("names iteration 4, but"));
  EXPECT_THAT(ErrorOf(root_), HasSubstr("iter_0000004' does not exist"));
  WriteFile(root_ / "latest_checkpointed_iteration.txt", "3");
  EXPECT_EQ(ErrorOf(root_), "(no error)");
}

TEST_F(RunDirectoryTest, RefusesWhatIsNotACheckpoint) {
  EXPECT_THAT(ErrorOf(root_ / "missing"), HasSubstr("does not exist"));
  WriteFile(root_ / "file", "x");
  EXPECT_THAT(ErrorOf(root_ / "file"), HasSubstr("is not a directory"));
  fs::create_directories(root_ / "iter_0000001");
  EXPECT_THAT(ErrorOf(root_ / "iter_0000001"), HasSubstr("has no .metadata"));
  WriteFile(root_ / "latest_checkpointed_iteration.txt", "1");
  EXPECT_THAT(ErrorOf(root_), HasSubstr("has no .metadata"));
}

TEST_F(RunDirectoryTest, RunConfigInTheIterationDirectoryWinsOverTheOneAbove) {
  const fs::path dir = Iteration("iter_0000001");
  WriteFile(root_ / "run_config.yaml", "model:\n  tensor_model_parallel_size: 4\n");
  RunDirectory run = OpenRunDirectory(dir);
  EXPECT_EQ(run.run_config_path, root_ / "run_config.yaml");
  EXPECT_EQ(run.model.tensor_parallel, 4);
  EXPECT_EQ(run.model.expert_tensor_parallel, 4) << "defaults to the TP size";
  EXPECT_FALSE(run.peft.has_value());

  WriteFile(dir / "run_config.yaml",
            "model:\n  tensor_model_parallel_size: 2\n  pipeline_model_parallel_size: 3\n"
            "  num_layers: 12\npeft:\n  _target_: megatron.bridge.peft.dora.DoRA\n  dim: 8\n");
  run = OpenRunDirectory(dir);
  EXPECT_EQ(run.run_config_path, dir / "run_config.yaml");
  EXPECT_EQ(run.model.tensor_parallel, 2);
  EXPECT_EQ(run.model.pipeline_parallel, 3);
  EXPECT_EQ(run.model.num_layers, 12);
  ASSERT_TRUE(run.peft.has_value());
  EXPECT_EQ(run.peft->kind, AdapterKind::kDoRA);
  EXPECT_EQ(run.peft->dim, 8);
  EXPECT_EQ(run.peft->alpha, 64) << "DoRA's own default alpha";
}

TEST_F(RunDirectoryTest, MalformedRunConfigValuesAreRefused) {
  const fs::path dir = Iteration("iter_0000001");
  for (const char* yaml :
       {"model:\n  tensor_model_parallel_size: 0\n", "model:\n  tensor_model_parallel_size: ~\n",
        "model:\n  tensor_model_parallel_size: two\n", "model: [1, 2]\n", "- a list\n",
        "peft:\n  _target_: megatron.bridge.peft.ia3.IA3\n", "model: {num_layers: 1.5}\n"}) {
    WriteFile(dir / "run_config.yaml", yaml);
    EXPECT_THAT(ErrorOf(dir), HasSubstr("run_config.yaml")) << yaml;
  }
}

TEST_F(RunDirectoryTest, MetadataJsonMustBeATorchDistCheckpoint) {
  const fs::path dir = Iteration("iter_0000001");
  WriteFile(dir / "metadata.json", R"({"sharded_backend": "torch_dist", "multiproc": true})");
  EXPECT_EQ(OpenRunDirectory(dir).metadata_json["multiproc"], true);
  WriteFile(dir / "metadata.json", R"({"sharded_backend": "zarr"})");
  EXPECT_THAT(ErrorOf(dir), HasSubstr("only torch_dist checkpoints are supported"));
  WriteFile(dir / "metadata.json", "{not json");
  EXPECT_THAT(ErrorOf(dir), HasSubstr("not valid JSON"));
  WriteFile(dir / "metadata.json", "[]");
  EXPECT_THAT(ErrorOf(dir), HasSubstr("expected a JSON object"));
}

TEST_F(RunDirectoryTest, IntegrityIsKnownBeforeAnythingElseIsParsed) {
  const fs::path dir = Iteration("iter_0000001");
  WriteFile(dir / "integrity.json",
            R"({"algorithm": "sha256", "files": {"__0_0.distcp": "ab12"}})");
  WriteFile(dir / "run_config.yaml", "model: [unparsable");
  WriteFile(dir / "metadata.json", "{not json");
  std::optional<IntegrityManifest> seen;
  struct Stop {};
  EXPECT_THROW(OpenRunDirectory(dir,
                                [&](const RunDirectory& run) {
                                  seen = run.integrity;
                                  throw Stop{};
                                }),
               Stop);
  ASSERT_TRUE(seen.has_value());
  EXPECT_EQ(seen->algorithm, "sha256");
  EXPECT_EQ(seen->files.at("__0_0.distcp"), "ab12");

  WriteFile(dir / "integrity.json", R"({"algorithm": "sha256", "files": {"a": 1}})");
  EXPECT_THAT(ErrorOf(dir), HasSubstr("files.a should be a hex digest string"));
}

}  // namespace
}  // namespace adapter_job::checkpoint
