// The merge stage's parts: the float32 merge against a float64 reference, transformers' shard
// sizes, and the output layout (huggingface_hub's shard split, save order, ranks, file offsets).
// tests/python/test_merge.py holds the whole merge to stock transformers and PEFT.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "adapter_job/core/error.h"
#include "adapter_job/merge/merge_math.h"
#include "adapter_job/merge/merged_layout.h"
#include "adapter_job/safetensors/model_weights.h"
#include "adapter_job/safetensors/safetensors.h"
#include "scratch_directory.h"

namespace adapter_job::merge {
namespace {

namespace fs = std::filesystem;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::vector<float> Random(std::size_t n, std::mt19937& gen) {
  std::normal_distribution<float> dist;
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

// W + s·B·A (then DoRA's row rescale) in float64.
std::vector<double> Reference(const std::vector<float>& w, int64_t out, int64_t in,
                              const LowRankUpdate& u) {
  std::vector<double> merged(w.begin(), w.end());
  for (int64_t o = 0; o < out; ++o) {
    double norm = 0;
    for (int64_t i = 0; i < in; ++i) {
      double delta = 0;
      for (int64_t k = 0; k < u.rank; ++k) delta += double{u.b[o * u.rank + k]} * u.a[k * in + i];
      merged[o * in + i] += u.scale * delta;
      norm += merged[o * in + i] * merged[o * in + i];
    }
    if (u.magnitude.empty()) continue;
    for (int64_t i = 0; i < in; ++i) merged[o * in + i] *= u.magnitude[o] / std::sqrt(norm);
  }
  return merged;
}

class MergeMath : public ::testing::TestWithParam<bool> {};

TEST_P(MergeMath, EqualsAFloat64MergeToFloat32RoundingAndDoesNotDependOnThreads) {
  const bool dora = GetParam();
  std::mt19937 gen(7);
  const int64_t out = 300, in = 257, rank = 16;
  LowRankUpdate u;
  u.rank = rank;
  u.a = Random(rank * in, gen);
  u.b = Random(out * rank, gen);
  u.scale = 32.0 / rank;
  if (dora) u.magnitude = Random(out, gen);
  const std::vector<float> w = Random(out * in, gen);
  const std::vector<double> expected = Reference(w, out, in, u);

  // In two blocks of rows, as a rank's pipeline merges a tensor, on 1 and on 3 threads.
  const auto merge = [&](int threads) {
    const auto bytes = std::as_bytes(std::span(w));
    std::vector<float> merged(w.size());
    const auto out_bytes = std::as_writable_bytes(std::span(merged));
    const int64_t split = 113;
    MergeRows(bytes.first(split * in * 4), DType::kFloat32, out_bytes.first(split * in * 4),
              DType::kFloat32, 0, split, in, &u, threads);
    MergeRows(bytes.subspan(split * in * 4), DType::kFloat32, out_bytes.subspan(split * in * 4),
              DType::kFloat32, split, out - split, in, &u, threads);
    return merged;
  };
  const std::vector<float> one = merge(1), three = merge(3);
  EXPECT_EQ(one, three);
  double worst = 0, scale = 0;
  for (std::size_t i = 0; i < one.size(); ++i) {
    worst = std::max(worst, std::abs(one[i] - expected[i]));
    scale = std::max(scale, std::abs(expected[i]));
  }
  // float32 sums of 16 terms: a few units in the last place of the largest value, far below any
  // fault (a dropped rescale or scale moves values by their own size).
  EXPECT_LT(worst / scale, 1e-6);
  EXPECT_GT(scale, 0.1);
}

INSTANTIATE_TEST_SUITE_P(LoraAndDora, MergeMath, ::testing::Bool());

TEST(MergeMath, RoundsToBFloat16AndFloat16OnceToNearestEven) {
  const std::vector<float> values = {1.0f, 1.00390625f, 1.01171875f, -2.5f, NAN};
  const auto in = std::as_bytes(std::span(values));
  std::vector<std::byte> bf16(values.size() * 2);
  MergeRows(in, DType::kFloat32, bf16, DType::kBFloat16, 0, 1, 5, nullptr, 1);
  // 1 + 2^-8 is half-way between bf16 neighbours 1 and 1 + 2^-7: to even (1); 1 + 3·2^-8 to 1 +
  // 2^-6.
  const std::vector<float> widened = ToFloat32(bf16, DType::kBFloat16);
  EXPECT_THAT(std::vector<float>(widened.begin(), widened.begin() + 4),
              ElementsAre(1.0f, 1.0f, 1.015625f, -2.5f));
  EXPECT_TRUE(std::isnan(widened[4]));
  std::vector<std::byte> fp16(values.size() * 2);
  MergeRows(in, DType::kFloat32, fp16, DType::kFloat16, 0, 1, 4, nullptr, 1);
  EXPECT_THAT(ToFloat32(std::span(fp16).first(8), DType::kFloat16),
              ElementsAre(1.0f, 1.00390625f, 1.01171875f, -2.5f));
  EXPECT_THROW(ToFloat32(bf16, DType::kInt16), FormatError);
  EXPECT_THROW(MergeRows(bf16, DType::kInt16, fp16, DType::kFloat16, 0, 1, 5, nullptr, 1),
               FormatError);
}

TEST(ShardSize, ReadsTransformersSizes) {
  EXPECT_EQ(ParseShardSize("5GB"), 5'000'000'000u);
  EXPECT_EQ(ParseShardSize("5GiB"), 5ull << 30);
  EXPECT_EQ(ParseShardSize("5Gb"), 625'000'000u);  // bits, as convert_file_size_to_int reads it
  EXPECT_EQ(ParseShardSize("500MB"), 500'000'000u);
  EXPECT_EQ(ParseShardSize("2mib"), 2u << 20);
  EXPECT_EQ(ParseShardSize("40KB"), 40'000u);
  EXPECT_EQ(ParseShardSize("12345"), 12345u);
  for (const char* bad : {"", "GB", "1.5GB", "-1", "5TB", "0", "five"})
    EXPECT_THROW(ParseShardSize(bad), FormatError) << bad;
}

class MergedLayoutTest : public testing::ScratchDirectoryTest {
 protected:
  // A base with `names`, each [rows, 4] float32.
  safetensors::ModelWeights Base(const std::vector<std::pair<std::string, int64_t>>& names) {
    std::vector<Tensor> storage;
    for (const auto& [name, rows] : names)
      storage.push_back(Tensor::Zeros(DType::kFloat32, {rows, 4}));
    std::vector<safetensors::TensorRef> refs;
    for (std::size_t i = 0; i < names.size(); ++i)
      refs.push_back(safetensors::Ref(names[i].first, storage[i]));
    safetensors::Write(root_ / "model.safetensors", refs, std::nullopt, false);
    return safetensors::ModelWeights::Open(root_);
  }
};

TEST_F(MergedLayoutTest, SplitsAsHuggingfaceHubInLayerOrderAndTilesEachFile) {
  // 16 bytes a row in float32, 8 in bf16: layers of 32 + 32 bytes, an embedding of 160, a norm of
  // 8, under a 170-byte limit.
  const safetensors::ModelWeights base = Base({{"model.embed_tokens.weight", 20},
                                               {"model.layers.10.mlp.weight", 4},
                                               {"model.layers.10.attn.weight", 4},
                                               {"model.layers.2.mlp.weight", 4},
                                               {"model.layers.2.attn.weight", 4},
                                               {"model.norm.weight", 1}});
  const MergedLayout layout =
      PlanMergedLayout(base, {"model.layers.2.attn"}, DType::kBFloat16, 170, 2);
  std::vector<std::string> order;
  for (const auto& t : layout.tensors) order.push_back(t.name);
  EXPECT_THAT(order, ElementsAre("model.embed_tokens.weight", "model.layers.2.attn.weight",
                                 "model.layers.2.mlp.weight", "model.layers.10.attn.weight",
                                 "model.layers.10.mlp.weight", "model.norm.weight"));
  // 160 + 32 would pass 170: the embedding alone, then 32 + 32 + 32 + 32 + 8.
  ASSERT_EQ(layout.shards.size(), 2u);
  EXPECT_EQ(layout.shards[0].file, "model-00001-of-00002.safetensors");
  EXPECT_EQ(layout.tensors[0].shard, 0u);
  for (std::size_t i = 1; i < 6; ++i) EXPECT_EQ(layout.tensors[i].shard, 1u);
  EXPECT_EQ(layout.tensors[1].module, "model.layers.2.attn");
  EXPECT_FALSE(layout.tensors[2].module);
  // Ranks take contiguous runs by bytes: the embedding's middle byte is in the first half of 296.
  EXPECT_EQ(layout.tensors[0].rank, 0);
  EXPECT_EQ(layout.tensors[5].rank, 1);
  for (std::size_t i = 1; i < 6; ++i) EXPECT_GE(layout.tensors[i].rank, layout.tensors[i - 1].rank);
  // Each file: the header, then its tensors back to back to its end.
  for (std::size_t s = 0; s < layout.shards.size(); ++s) {
    uint64_t bytes = layout.shards[s].header.size();
    for (const auto& t : layout.tensors) bytes += t.shard == s ? t.nbytes : 0;
    EXPECT_EQ(bytes, layout.shards[s].size);
    const safetensors::Header header = safetensors::ParseHeader(
        std::string_view(layout.shards[s].header).substr(8), layout.shards[s].size);
    for (const auto& entry : header.tensors) {
      const auto t =
          std::find_if(layout.tensors.begin(), layout.tensors.end(),
                       [&](const auto& candidate) { return candidate.name == entry.name; });
      EXPECT_EQ(t->offset, header.data_offset + entry.begin) << entry.name;
    }
  }
  const auto index = IndexJson(layout);
  EXPECT_EQ(index["metadata"]["total_size"], 296);
  EXPECT_EQ(index["metadata"]["total_parameters"], 148);
}

TEST_F(MergedLayoutTest, ATensorOverTheLimitGetsAShardBeforeTheOneBeingFilled) {
  const safetensors::ModelWeights base =
      Base({{"a.0.weight", 1}, {"a.1.weight", 10}, {"a.2.weight", 1}});
  const MergedLayout layout = PlanMergedLayout(base, {}, std::nullopt, 100, 1);
  // a.0 (16 bytes) opens shard 1; a.1 (160) is over 100 and is placed first; a.2 joins a.0.
  ASSERT_EQ(layout.shards.size(), 2u);
  EXPECT_EQ(layout.tensors[1].shard, 0u);
  EXPECT_EQ(layout.tensors[0].shard, 1u);
  EXPECT_EQ(layout.tensors[2].shard, 1u);
}

TEST_F(MergedLayoutTest, OneShardIsModelSafetensors) {
  const safetensors::ModelWeights base = Base({{"w.weight", 2}});
  EXPECT_EQ(PlanMergedLayout(base, {}, std::nullopt, kDefaultMaxShardBytes, 4).shards[0].file,
            "model.safetensors");
}

TEST_F(MergedLayoutTest, AModuleTheBaseLacksIsNamed) {
  const safetensors::ModelWeights base = Base({{"w.weight", 2}});
  try {
    PlanMergedLayout(base, {"model.layers.0.q_proj"}, std::nullopt, 100, 1);
    FAIL() << "planned a merge into a missing tensor";
  } catch (const FormatError& e) {
    EXPECT_THAT(e.what(), HasSubstr("model.layers.0.q_proj.weight"));
  }
}

}  // namespace
}  // namespace adapter_job::merge
