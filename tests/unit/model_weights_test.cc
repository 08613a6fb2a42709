// safetensors::ModelWeights, the one reader of an HF model's weights (the merge's base, the
// verification's base and merged model): an index's shards as transformers reads them, and every
// way a weights directory can be wrong, named.
#include "adapter_job/safetensors/model_weights.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>

#include "adapter_job/core/error.h"
#include "adapter_job/core/tensor.h"
#include "scratch_directory.h"

namespace adapter_job::safetensors {
namespace {

using ::testing::HasSubstr;

class ModelWeightsTest : public testing::ScratchDirectoryTest {
 protected:
  // A float32 file of [2] tensors, tensor i holding {first + i, first + i + 0.5}.
  void Shard(const std::string& file, const std::vector<std::string>& names, float first) {
    std::vector<Tensor> storage;
    for (std::size_t i = 0; i < names.size(); ++i) {
      Tensor t = Tensor::Zeros(DType::kFloat32, {2});
      const float values[2] = {first + i, first + i + 0.5f};
      std::memcpy(t.data.data(), values, sizeof(values));
      storage.push_back(std::move(t));
    }
    std::vector<TensorRef> refs;
    for (std::size_t i = 0; i < names.size(); ++i) refs.push_back(Ref(names[i], storage[i]));
    Write(root_ / file, refs, std::nullopt, false);
  }
  std::string ErrorOf() {
    try {
      ModelWeights::Open(root_);
    } catch (const FormatError& e) {
      return e.what();
    }
    return "no error";
  }
  static std::vector<float> Values(const ModelWeights& weights, const std::string& name) {
    const ModelWeights::Tensor* tensor = weights.Find(name);
    if (!tensor) return {};
    std::vector<float> values(2);
    weights.Read(*tensor, 0, std::as_writable_bytes(std::span(values)));
    return values;
  }
};

TEST_F(ModelWeightsTest, ReadsTheShardsAnIndexNamesAndOnlyWhatItListsThere) {
  Shard("model-00001-of-00002.safetensors", {"a", "stale"}, 1);
  Shard("model-00002-of-00002.safetensors", {"b", "stale"}, 10);
  WriteFile(
      root_ / "model.safetensors.index.json",
      R"({"metadata": {"total_size": 24}, "weight_map": {"a": "model-00001-of-00002.safetensors",
               "b": "model-00002-of-00002.safetensors", "stale": "model-00002-of-00002.safetensors"}})");
  const ModelWeights weights = ModelWeights::Open(root_);
  const uint64_t headers = weights.bytes_read();
  EXPECT_EQ(weights.tensors().size(), 3u);
  EXPECT_EQ(Values(weights, "a"), (std::vector<float>{1, 1.5}));
  EXPECT_EQ(Values(weights, "b"), (std::vector<float>{10, 10.5}));
  // The copy the index points at, as transformers loads it; the other is a leftover.
  EXPECT_EQ(Values(weights, "stale"), (std::vector<float>{11, 11.5}));
  EXPECT_EQ(weights.PathOf(*weights.Find("a")).filename(), "model-00001-of-00002.safetensors");
  EXPECT_EQ(weights.Find("missing"), nullptr);
  std::vector<float> past(3);
  EXPECT_THROW(weights.Read(*weights.Find("a"), 0, std::as_writable_bytes(std::span(past))),
               FormatError);
  EXPECT_EQ(weights.bytes_read() - headers, 3 * 8u);  // the tensors' bytes and no more
}

TEST_F(ModelWeightsTest, OneFileWithoutAnIndex) {
  Shard("model.safetensors", {"w"}, 3);
  EXPECT_EQ(Values(ModelWeights::Open(root_), "w"), (std::vector<float>{3, 3.5}));
}

TEST_F(ModelWeightsTest, EveryBrokenDirectoryIsNamed) {
  EXPECT_THAT(ErrorOf(), HasSubstr("holds neither model.safetensors nor "
                                   "model.safetensors.index.json"));
  const std::string index = (root_ / "model.safetensors.index.json").string();
  Shard("model-00001-of-00001.safetensors", {"a"}, 1);
  const std::pair<std::string, std::string> cases[] = {
      {"{", index + ": not valid JSON"},
      {R"({"metadata": {}})", "has no \"weight_map\" object"},
      {R"({"weight_map": {"a": 7}})", "weight_map[\"a\"] is 7, expected a file name"},
      {R"({"weight_map": {"a": "../model-00001-of-00001.safetensors"}})",
       "expected a file name in the model directory"},
      {R"({"weight_map": {"a": "model-00001-of-00001.safetensors", "b":
         "model-00001-of-00001.safetensors"}})",
       "weight_map names 'b' in 'model-00001-of-00001.safetensors', which does not hold it"},
      {R"({"weight_map": {"a": "model-00002-of-00002.safetensors"}})",
       "model-00002-of-00002.safetensors"},
  };
  for (const auto& [text, message] : cases) {
    WriteFile(index, text);
    EXPECT_THAT(ErrorOf(), HasSubstr(message)) << text;
  }
}

}  // namespace
}  // namespace adapter_job::safetensors
