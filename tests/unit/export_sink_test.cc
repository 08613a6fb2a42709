// The export's sinks: what they write for a given announcement and layers (the bytes as given,
// pieces joined, under PEFT's or the bare HF names), that nothing is visible before Publish, and
// that Abort leaves nothing behind.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "adapter_job/core/error.h"
#include "adapter_job/safetensors/safetensors.h"
#include "adapter_job/writer/peft_directory_sink.h"
#include "adapter_job/writer/safetensors_file_sink.h"

namespace adapter_job::writer {
namespace {

namespace fs = std::filesystem;
using ::testing::ElementsAre;
using ::testing::UnorderedElementsAre;

std::vector<std::byte> Bytes(std::initializer_list<int> values) {
  std::vector<std::byte> bytes;
  for (int v : values) bytes.push_back(static_cast<std::byte>(v));
  return bytes;
}

std::vector<std::string> Entries(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir))
    names.push_back(entry.path().filename().string());
  return names;
}

std::vector<std::byte> DataOf(const safetensors::File& file, const std::string& name) {
  const auto data = file.Data(file.Get(name));
  return {data.begin(), data.end()};
}

class ExportSinkTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::temp_directory_path() /
            ("adapter_job_export_sink_test_" + std::to_string(::getpid()) + "_" +
             ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(root_);
    fs::create_directories(root_);
    // Two layers: a lora_A [2, 2] of uint8 in layer 0, a lora_B [3, 1] in layer 1.
    announcement_.tensors = {{"model.layers.0.mlp.down_proj.lora_A.weight",
                              "model.layers.0.mlp.down_proj",
                              AdapterWeight::kLoraA,
                              0,
                              DType::kUInt8,
                              {2, 2}},
                             {"model.layers.1.mlp.down_proj.lora_B.weight",
                              "model.layers.1.mlp.down_proj",
                              AdapterWeight::kLoraB,
                              1,
                              DType::kUInt8,
                              {3, 1}}};
    announcement_.config.base_model_name_or_path = "org/base";
    announcement_.config.r = 2;
    announcement_.config.lora_alpha = 4;
    announcement_.config.lora_dropout = 0.0;
    announcement_.config.modules = {{"model.layers.0.mlp.down_proj", "down_proj", 2, {}, ""},
                                    {"model.layers.1.mlp.down_proj", "down_proj", 2, {}, ""}};
  }
  void TearDown() override { fs::remove_all(root_); }

  // Layer 0's tensor in two pieces (the pipeline hands row ranges without joining them).
  void WriteLayers(ExportSink& sink) {
    sink.Write({0, {{0, {std::span(a_).first(1), std::span(a_).subspan(1)}}}});
    sink.Write({1, {{1, {std::span(b_)}}}});
  }

  fs::path root_;
  ExportAnnouncement announcement_;
  std::vector<std::byte> a_ = Bytes({1, 2, 3, 4});
  std::vector<std::byte> b_ = Bytes({7, 8, 9});
};

TEST_F(ExportSinkTest, PeftDirectoryHoldsPeftNamedTensorsAndConfigOnlyOncePublished) {
  const fs::path target = root_ / "out" / "adapter";
  PeftDirectorySink sink(target, /*overwrite=*/false);
  sink.Begin(announcement_);
  WriteLayers(sink);
  const FinishedOutput finished = sink.Finish();
  EXPECT_FALSE(fs::exists(target));
  EXPECT_EQ(finished.accepted_path, target);
  EXPECT_EQ(finished.rejected_path, root_ / "out" / "adapter.unverified");
  // Verifiable before publishing, at the staged place.
  ASSERT_TRUE(fs::is_directory(finished.verifiable_directory));
  EXPECT_THAT(Entries(finished.verifiable_directory),
              UnorderedElementsAre("adapter_model.safetensors", "adapter_config.json"));
  EXPECT_EQ(finished.file_bytes,
            fs::file_size(finished.verifiable_directory / "adapter_model.safetensors"));

  sink.Publish(/*accepted=*/true);
  const auto file = safetensors::File::Open(target / "adapter_model.safetensors");
  EXPECT_EQ(DataOf(file, "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"), a_);
  EXPECT_EQ(DataOf(file, "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"), b_);
  EXPECT_EQ(file.header().tensors.size(), 2U);
  std::ifstream config_file(target / "adapter_config.json");
  const auto config = nlohmann::json::parse(config_file);
  EXPECT_EQ(config["r"], 2);
  EXPECT_EQ(config["lora_alpha"], 4);
  EXPECT_EQ(config["base_model_name_or_path"], "org/base");
  EXPECT_EQ(config["use_dora"], false);
}

TEST_F(ExportSinkTest, PeftDirectoryRejectedGoesToUnverified) {
  const fs::path target = root_ / "adapter";
  PeftDirectorySink sink(target, /*overwrite=*/false);
  sink.Begin(announcement_);
  WriteLayers(sink);
  sink.Finish();
  sink.Publish(/*accepted=*/false);
  EXPECT_FALSE(fs::exists(target));
  EXPECT_THAT(Entries(root_ / "adapter.unverified"),
              UnorderedElementsAre("adapter_model.safetensors", "adapter_config.json"));
}

TEST_F(ExportSinkTest, PeftDirectoryAbortLeavesNothing) {
  {
    PeftDirectorySink sink(root_ / "adapter", /*overwrite=*/false);
    sink.Begin(announcement_);
    sink.Write({0, {{0, {std::span(a_)}}}});
    sink.Abort();
    sink.Abort();  // more than once is fine, and so is the destructor's
  }
  {
    PeftDirectorySink finished_but_not_published(root_ / "adapter", /*overwrite=*/false);
    finished_but_not_published.Begin(announcement_);
    WriteLayers(finished_but_not_published);
    finished_but_not_published.Finish();
  }
  EXPECT_THAT(Entries(root_), ElementsAre());
}

TEST_F(ExportSinkTest, PeftDirectoryRefusesAnExistingTargetAtBegin) {
  fs::create_directories(root_ / "adapter");
  PeftDirectorySink sink(root_ / "adapter", /*overwrite=*/false);
  EXPECT_THROW(sink.Begin(announcement_), FormatError);
}

TEST_F(ExportSinkTest, SafetensorsFileHoldsHfNamedTensorsOnlyOncePublished) {
  const fs::path path = root_ / "x.safetensors";
  SafetensorsFileSink sink(path, /*overwrite=*/false);
  EXPECT_EQ(sink.Outputs().front().path, path);
  EXPECT_FALSE(sink.verifiable());
  sink.Begin(announcement_);
  WriteLayers(sink);
  const FinishedOutput finished = sink.Finish();
  EXPECT_FALSE(fs::exists(path));
  EXPECT_TRUE(finished.verifiable_directory.empty());
  sink.Publish(/*accepted=*/true);
  EXPECT_THAT(Entries(root_), ElementsAre("x.safetensors"));
  EXPECT_EQ(finished.file_bytes, fs::file_size(path));
  const auto file = safetensors::File::Open(path);
  EXPECT_EQ(DataOf(file, "model.layers.0.mlp.down_proj.lora_A.weight"), a_);
  EXPECT_EQ(DataOf(file, "model.layers.1.mlp.down_proj.lora_B.weight"), b_);
}

TEST_F(ExportSinkTest, SafetensorsFileAbortLeavesNothing) {
  {
    SafetensorsFileSink sink(root_ / "x.safetensors", /*overwrite=*/false);
    sink.Begin(announcement_);
    sink.Write({0, {{0, {std::span(a_)}}}});
  }  // destroyed unpublished: aborts
  EXPECT_THAT(Entries(root_), ElementsAre());
}

}  // namespace
}  // namespace adapter_job::writer
