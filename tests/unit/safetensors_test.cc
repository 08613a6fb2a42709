#include "adapter_job/safetensors/safetensors.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "adapter_job/core/error.h"

namespace adapter_job::safetensors {
namespace {

using ::testing::HasSubstr;

TEST(SafetensorsWriter, SortsByDtypeDescendingThenNameAndPads) {
  std::vector<TensorSpec> tensors = {{"b.weight", DType::kBFloat16, {2}},
                                     {"layers.2", DType::kFloat32, {2}},
                                     {"layers.10", DType::kFloat32, {2}},
                                     {"z", DType::kInt64, {1}}};
  const std::string header = SerializeHeader(tensors, std::nullopt);
  EXPECT_EQ(header.size() % 8, 0u);
  EXPECT_EQ(header.substr(8), R"({"z":{"dtype":"I64","shape":[1],"data_offsets":[0,8]},)"
                              R"("layers.10":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},)"
                              R"("layers.2":{"dtype":"F32","shape":[2],"data_offsets":[16,24]},)"
                              R"("b.weight":{"dtype":"BF16","shape":[2],"data_offsets":[24,28]}})"
                              "       ");
  EXPECT_EQ(tensors[0].name, "z");
}

TEST(SafetensorsWriter, MetadataComesFirstAndNamesMustBeUnique) {
  std::vector<TensorSpec> tensors = {{"a", DType::kFloat32, {1}}};
  const std::string header =
      SerializeHeader(tensors, std::map<std::string, std::string>{{"format", "pt"}});
  EXPECT_EQ(header.substr(8, 30), R"({"__metadata__":{"format":"pt")");

  std::vector<TensorSpec> dup = {{"a", DType::kFloat32, {1}}, {"a", DType::kInt32, {1}}};
  EXPECT_THROW(SerializeHeader(dup, std::nullopt), FormatError);
  std::vector<TensorSpec> reserved = {{"__metadata__", DType::kFloat32, {1}}};
  EXPECT_THROW(SerializeHeader(reserved, std::nullopt), FormatError);
}

void ExpectHeaderError(const std::string& json, uint64_t data_bytes, const std::string& message) {
  try {
    ParseHeader(json, 8 + json.size() + data_bytes);
    FAIL() << "accepted " << json;
  } catch (const FormatError& e) {
    EXPECT_THAT(e.what(), HasSubstr(message)) << json;
  }
}

TEST(SafetensorsReader, ValidatesLikeTheReferenceAndStricter) {
  const std::string json = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  const Header ok = ParseHeader(json, 8 + json.size() + 8);
  ASSERT_EQ(ok.tensors.size(), 1u);
  EXPECT_EQ(ok.tensors[0].dtype, DType::kFloat32);

  ExpectHeaderError("[1]", 0, "not a JSON object");
  ExpectHeaderError("{", 0, "not valid JSON");
  ExpectHeaderError(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                    R"("a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
                    16, "names 'a' twice");
  ExpectHeaderError(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                    R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                    12, "gap or overlap");
  ExpectHeaderError(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", 16,
                    "gap or overlap");
  ExpectHeaderError(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8,
                    "needs 12 bytes");
  ExpectHeaderError(R"({"a":{"dtype":"bf16","shape":[2],"data_offsets":[0,4]}})", 4,
                    "unsupported dtype");
  ExpectHeaderError(R"({"__metadata__":{"n":1}})", 0, "not a string");
  ExpectHeaderError(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 9, "file has");
  ExpectHeaderError(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8,
                    "non-negative");
  ExpectHeaderError(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})",
                    8, "overflows");
}

}  // namespace
}  // namespace adapter_job::safetensors
