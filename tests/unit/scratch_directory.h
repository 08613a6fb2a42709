// A fresh directory for each test under $TMPDIR, removed with everything in it, and small file
// helpers for tests about what lands on disk.
#pragma once

#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace adapter_job::testing {

class ScratchDirectoryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern =
        (std::filesystem::temp_directory_path() / "adapter_job_test-XXXXXX").string();
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr);
    root_ = pattern;
  }
  void TearDown() override { std::filesystem::remove_all(root_); }

  static void WriteFile(const std::filesystem::path& path, const std::string& text) {
    std::filesystem::create_directories(path.parent_path());
    std::ofstream(path) << text;
  }
  static std::string ReadFile(const std::filesystem::path& path) {
    std::ifstream in(path);
    std::stringstream text;
    text << in.rdbuf();
    return text.str();
  }
  // The names in `dir` (the scratch directory by default), sorted.
  std::vector<std::string> Entries(const std::filesystem::path& dir = {}) const {
    std::vector<std::string> names;
    for (const auto& entry : std::filesystem::directory_iterator(dir.empty() ? root_ : dir))
      names.push_back(entry.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
  }

  std::filesystem::path root_;
};

}  // namespace adapter_job::testing
