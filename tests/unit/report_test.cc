// The verdict, JSON and table of a VerificationReport, and how WriteHdf5 fails. The HDF5
// contents are checked with h5py in tests/python/test_report.py.
#include "adapter_job/report/report.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <fstream>
#include <iterator>
#include <sstream>

#include "adapter_job/core/error.h"
#include "adapter_job/report/hdf5_writer.h"

namespace adapter_job::verify {
namespace {

namespace fs = std::filesystem;
using ::testing::EndsWith;
using ::testing::HasSubstr;
using ::testing::Not;

CheckResult Check(std::string name, bool passed) {
  return {std::move(name), passed, 0.5, 1.0, "<=", "detail"};
}

TopToken Token(int64_t id, std::string text, float probability) {
  return {id, std::move(text), 2.0f, probability};
}

VerificationReport SmallReport() {
  VerificationReport report;
  report.base_model = "org/base";
  report.adapter_path = "/runs/adapter";
  report.device = "cpu";
  report.compute_dtype = "float32";
  report.top_k = 2;
  report.seconds = 3.5;
  PromptResult prompt{"Hi", {1, 2}, {}, {}, false};
  prompt.logits.push_back({"base", {2, 3}, {0, 1, 2, 3, 4, 5}});
  prompt.top_k.push_back({"base", {Token(5, " Paris", 0.75f), Token(3, "\n", 0.125f)}});
  prompt.top_k.push_back({"peft", {Token(5, " Paris", 0.5f), Token(4, "end ", 0.25f)}});
  report.prompts.push_back(std::move(prompt));
  report.checks = {{"max_abs_logit_diff", true, 1e-5, 1e-3, "<=", "prompt 0, position 1"},
                   {"top1_agreement", false, 0.5, 1.0, ">=", "token '\n' differs"}};
  report.adapter_tensors = {{"layers.0.lora_A.weight", {4, 8}, "float32", 0.1, 0.2, 0.3, 0.4}};
  return report;
}

TEST(VerificationReport, PassesOnlyWithChecksThatAllPass) {
  VerificationReport report;
  EXPECT_FALSE(report.passed()) << "no checks prove nothing";
  report.checks = {Check("a", true), Check("b", true)};
  EXPECT_TRUE(report.passed());
  report.checks.push_back(Check("c", false));
  EXPECT_FALSE(report.passed());
}

TEST(VerificationReport, JsonHasTheDocumentedFieldsInOrderAndNoFullLogits) {
  const auto json = SmallReport().ToJson();
  std::vector<std::string> keys;
  for (const auto& item : json.items()) keys.push_back(item.key());
  EXPECT_EQ(keys, (std::vector<std::string>{"base_model", "adapter_path", "device", "compute_dtype",
                                            "top_k", "passed", "seconds", "checks", "prompts",
                                            "adapter_tensors"}));
  EXPECT_EQ(json["top_k"], 2);
  EXPECT_EQ(json["passed"], false);
  EXPECT_EQ(json["seconds"], 3.5);

  ASSERT_EQ(json["checks"].size(), 2u);
  EXPECT_EQ(json["checks"][1].dump(),
            R"({"name":"top1_agreement","passed":false,"figure":0.5,"threshold":1.0,)"
            R"("relation":">=","detail":"token '\n' differs"})");

  ASSERT_EQ(json["prompts"].size(), 1u);
  const auto& prompt = json["prompts"][0];
  EXPECT_EQ(prompt.dump(), R"({"prompt":"Hi","token_ids":[1,2],"top_k":{"base":[)"
                           R"({"id":5,"text":" Paris","logit":2.0,"probability":0.75},)"
                           R"({"id":3,"text":"\n","logit":2.0,"probability":0.125}],"peft":[)"
                           R"({"id":5,"text":" Paris","logit":2.0,"probability":0.5},)"
                           R"({"id":4,"text":"end ","logit":2.0,"probability":0.25}]}})");

  EXPECT_EQ(json["adapter_tensors"].dump(),
            R"([{"name":"layers.0.lora_A.weight","shape":[4,8],"dtype":"float32","mean":0.1,)"
            R"("std":0.2,"max_abs":0.3,"frobenius_norm":0.4}])");
}

TEST(VerificationReport, JsonOfAnEmptyReportHasEmptyLists) {
  const auto json = VerificationReport{}.ToJson();
  EXPECT_TRUE(json["checks"].is_array() && json["checks"].empty());
  EXPECT_TRUE(json["prompts"].is_array() && json["prompts"].empty());
  EXPECT_TRUE(json["adapter_tensors"].is_array() && json["adapter_tensors"].empty());
}

TEST(VerificationReport, JsonReplacesBytesThatAreNotUtf8) {
  VerificationReport report;
  report.adapter_path = "/data/mod\xE8le";  // Latin-1
  const auto json = report.ToJson();
  EXPECT_EQ(json["adapter_path"], "/data/mod\xEF\xBF\xBDle");
  EXPECT_NO_THROW(json.dump());
}

std::vector<std::string> Lines(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

TEST(VerificationReport, TableEscapesTokenTexts) {
  VerificationReport report = SmallReport();
  report.prompts[0].top_k[1].tokens = {
      Token(1, "", 0.1f),          Token(2, "\x01\x7f", 0.1f), Token(3, "a\\b\tc", 0.1f),
      Token(4, "  ", 0.1f),        Token(5, "\xFF", 0.1f),     Token(6, "\xE2\x80\x8B", 0.1f),
      Token(7, "a b", 0.1f),       Token(8, "\r\n", 0.1f),     Token(9, std::string(30, '-'), 0.1f),
      Token(10, "\xCC\x81", 0.1f), Token(11, "end ", 0.1f),    Token(12, "\n\xCC\x81", 0.1f)};
  const std::string table = report.Table();
  EXPECT_THAT(table, HasSubstr("\u2420Paris"));
  EXPECT_THAT(table, HasSubstr("end\u2420"));
  EXPECT_THAT(table, HasSubstr("\\n "));
  EXPECT_THAT(table, HasSubstr("\"\" "));
  EXPECT_THAT(table, HasSubstr("\\x01\\x7f"));
  EXPECT_THAT(table, HasSubstr("a\\\\b\\tc"));
  EXPECT_THAT(table, HasSubstr("\u2420\u2420 "));
  EXPECT_THAT(table, HasSubstr("\\xff"));
  EXPECT_THAT(table, HasSubstr("\\u200b"));
  EXPECT_THAT(table, HasSubstr("a b "));
  EXPECT_THAT(table, HasSubstr("\\r\\n"));
  EXPECT_THAT(table, HasSubstr(std::string(19, '-') + "\u2026"));
  EXPECT_THAT(table, Not(HasSubstr(std::string(20, '-'))));
  EXPECT_THAT(table, HasSubstr(" \\u0301 "));
  EXPECT_THAT(table, HasSubstr(" \\n\\u0301 "));
  // The check's detail quotes a newline token: still one line.
  EXPECT_THAT(table, HasSubstr("token '\\n' differs"));
  for (const auto& line : Lines(table)) {
    for (char c : line) EXPECT_FALSE(c == '\t' || c == '\r' || c == '\x01') << line;
  }
}

// The terminal column where `needle` starts in `line` (after `from`), counting code points.
std::size_t Column(const std::string& line, const std::string& needle, std::size_t from = 0) {
  const std::size_t at = line.find(needle, from);
  EXPECT_NE(at, std::string::npos) << needle << " in " << line;
  return static_cast<std::size_t>(std::count_if(line.begin(), line.begin() + at, [](char c) {
    return (static_cast<unsigned char>(c) & 0xC0) != 0x80;
  }));
}

TEST(VerificationReport, TableLinesUpRanksAndChecks) {
  const std::vector<std::string> lines = Lines(SmallReport().Table());
  EXPECT_THAT(lines[0], HasSubstr("base model: org/base"));
  EXPECT_THAT(lines[0], HasSubstr("adapter: /runs/adapter"));
  EXPECT_THAT(lines[0], HasSubstr("device: cpu"));
  EXPECT_THAT(lines[0], HasSubstr("dtype: float32"));
  const auto header = std::find_if(lines.begin(), lines.end(),
                                   [](const auto& l) { return l.starts_with("  rank"); });
  ASSERT_NE(header, lines.end());
  // Each variant's probabilities are in the same terminal column on every rank, under its name.
  const std::string& rank1 = header[1];
  const std::string& rank2 = header[2];
  EXPECT_EQ(Column(rank1, "0.7500"), Column(rank2, "0.1250"));
  EXPECT_EQ(Column(rank1, "0.5000"), Column(rank2, "0.2500"));
  EXPECT_EQ(Column(*header, "peft"), Column(rank1, "\u2420Paris", rank1.find("0.7500")));
  EXPECT_EQ(Column(rank1, "0.5000") + 6, rank1.size() - (sizeof("\u2420") - 2) * 2);

  const auto pass = std::find_if(lines.begin(), lines.end(),
                                 [](const auto& l) { return l.starts_with("  PASS"); });
  ASSERT_NE(pass, lines.end());
  EXPECT_EQ(*pass, "  PASS  max_abs_logit_diff  1e-05  <=  0.001  prompt 0, position 1");
  EXPECT_EQ(pass[1], "  FAIL  top1_agreement        0.5  >=  1      token '\\n' differs");
  EXPECT_EQ(lines.back(), "verification FAILED (1 of 2 checks)");
}

TEST(VerificationReport, TableVerdicts) {
  VerificationReport report;
  EXPECT_THAT(report.Table(), EndsWith("checks: none\nverification FAILED (no checks were run)\n"));
  report.checks = {Check("a", true)};
  EXPECT_THAT(report.Table(), EndsWith("\nverification PASSED\n"));
  report.checks = {Check("a", false), Check("b", false), Check("c", true)};
  EXPECT_THAT(report.Table(), EndsWith("\nverification FAILED (2 of 3 checks)\n"));
}

TEST(VerificationReport, TablePrintsEnoughDigitsToTellAFigureFromItsThreshold) {
  VerificationReport report;
  report.checks = {{"peft_vs_merged_min_cosine", false, 0.9999988675117493, 1.0 - 1e-6, ">=", ""},
                   {"peft_vs_merged_max_abs_diff", true, 1.5e-5, 1e-3, "<=", ""}};
  const std::string table = report.Table();
  // Six digits would print "0.999999 >= 0.999999", which hides why it failed.
  EXPECT_THAT(table, HasSubstr("0.9999989  >=  0.999999"));
  EXPECT_THAT(table, HasSubstr("1.5e-05  <=  0.001"));
}

TEST(VerificationReport, FailureLineNamesEachFailedCheckWithItsFigures) {
  VerificationReport report;
  report.checks = {{"adapter_changes_logits", true, 0.5, 1e-4, ">=", ""},
                   {"peft_vs_merged_min_cosine", false, 0.9999988675117493, 1.0 - 1e-6,
                    ">=", "lowest over positions"},
                   {"peft_vs_merged_topk", false, 0, 1, "==", "prompt 0: rank 1"}};
  EXPECT_EQ(report.FailureLine(),
            "verification FAILED: peft_vs_merged_min_cosine 0.9999989 (must be >= 0.999999: "
            "lowest over positions); peft_vs_merged_topk 0 (must be == 1: prompt 0: rank 1)");
  report.checks = {{"adapter_changes_logits", true, 0.5, 1e-4, ">=", ""}};
  EXPECT_EQ(report.FailureLine(), "");
  report.checks.clear();
  EXPECT_EQ(report.FailureLine(), "verification FAILED: no checks were run");
}

TEST(VerificationReport, TableShowsPromptsGivenAsIds) {
  VerificationReport report = SmallReport();
  report.prompts[0].prompt = "";
  EXPECT_THAT(report.Table(), HasSubstr("prompt 0 (2 tokens): (token ids: 1 2)"));
  report.prompts[0].prompt = " two\nlines";
  EXPECT_THAT(report.Table(), HasSubstr("prompt 0 (2 tokens): \u2420two\\nlines\n"));
}

// A fresh directory under $TMPDIR, removed with everything in it.
class Hdf5Test : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = (fs::temp_directory_path() / "report_test-XXXXXX").string();
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::vector<std::string> Entries(const fs::path& dir) const {
    std::vector<std::string> names;
    for (const auto& entry : fs::directory_iterator(dir)) {
      names.push_back(entry.path().filename().string());
    }
    std::sort(names.begin(), names.end());
    return names;
  }

  fs::path dir_;
};

std::string ReadFile(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

TEST_F(Hdf5Test, WritesAnHdf5FileAndReplacesAnOldOne) {
  const fs::path path = dir_ / "verification.h5";
  { std::ofstream(path) << "old"; }
  WriteHdf5(SmallReport(), path);
  EXPECT_EQ(ReadFile(path).substr(0, 8), "\x89HDF\r\n\x1a\n");
  EXPECT_EQ(Entries(dir_), std::vector<std::string>{"verification.h5"});
  WriteHdf5(VerificationReport{}, dir_ / "empty.h5");
  EXPECT_EQ(Entries(dir_), (std::vector<std::string>{"empty.h5", "verification.h5"}));
}

TEST_F(Hdf5Test, FailsInAMissingDirectoryNamingThePathAndLeavesNothing) {
  const fs::path path = dir_ / "missing" / "verification.h5";
  try {
    WriteHdf5(SmallReport(), path);
    FAIL() << "wrote into a missing directory";
  } catch (const IoError& e) {
    EXPECT_THAT(e.what(), HasSubstr(path.string()));
    EXPECT_THAT(e.what(), HasSubstr("No such file or directory"));
  }
  EXPECT_TRUE(Entries(dir_).empty());
}

TEST_F(Hdf5Test, FailureAfterWritingRemovesTheTemporaryFile) {
  // rename() cannot replace a non-empty directory: the write itself succeeds, the commit fails.
  const fs::path path = dir_ / "verification.h5";
  fs::create_directories(path / "occupied");
  try {
    WriteHdf5(SmallReport(), path);
    FAIL() << "replaced a directory";
  } catch (const IoError& e) {
    EXPECT_THAT(e.what(), HasSubstr(path.string()));
    EXPECT_THAT(e.what(), HasSubstr("rename"));
  }
  EXPECT_EQ(Entries(dir_), std::vector<std::string>{"verification.h5"});
  EXPECT_TRUE(fs::is_directory(path / "occupied"));
}

TEST_F(Hdf5Test, RejectsAnInconsistentReportBeforeCreatingAnything) {
  const fs::path path = dir_ / "verification.h5";
  VerificationReport report = SmallReport();
  report.prompts[0].logits[0].shape = {2, 4};
  try {
    WriteHdf5(report, path);
    FAIL() << "accepted 6 values for shape [2, 4]";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(path.string()));
    EXPECT_THAT(e.what(), HasSubstr("shape [2, 4] but 6 values"));
  }
  report = SmallReport();
  report.prompts[0].top_k[1].variant = "a/b";
  EXPECT_THROW(WriteHdf5(report, path), Error);
  report = SmallReport();
  report.prompts[0].top_k[1].variant = "base";
  EXPECT_THROW(WriteHdf5(report, path), Error);
  EXPECT_TRUE(Entries(dir_).empty());
}

}  // namespace
}  // namespace adapter_job::verify
