// PlanAdapterLayout: which training shard (pipeline stage, slot) holds each chunk, for TP, PP,
// virtual PP and expert-parallel layouts, and the errors for metadata that contradicts the run's
// parallel sizes. Expectations are worked out by hand from Megatron's layout rules (even layer
// split over PP x VPP, interleaved; TP shard i holds rows [i * n / tp, (i + 1) * n / tp);
// SwiGLU fc1 stores rank i's [gate_i; up_i] as chunks i and i + tp of 2 tp).
#include "adapter_job/checkpoint/adapter_layout.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <map>
#include <tuple>

#include "adapter_job/core/error.h"

namespace adapter_job::checkpoint {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr std::string_view kQkvIn = "self_attention.linear_qkv.adapter.linear_in.weight";
constexpr std::string_view kQkvOut = "self_attention.linear_qkv.adapter.linear_out.weight";

std::string PerLayer(int layer, std::string_view rest) {
  return "decoder.layers." + std::to_string(layer) + "." + std::string(rest);
}

// A tensor of `size` cut into chunks of `chunk` (an exact tiling, row-major order).
TensorMeta Tiled(std::string fqn, std::vector<int64_t> size, std::vector<int64_t> chunk) {
  TensorMeta meta{std::move(fqn), DType::kBFloat16, size, {}};
  std::vector<int64_t> offsets(size.size(), 0);
  while (true) {
    meta.chunks.push_back({offsets, chunk});
    std::size_t d = size.size();
    while (d > 0) {
      --d;
      offsets[d] += chunk[d];
      if (offsets[d] < size[d]) break;
      offsets[d] = 0;
      if (d == 0) return meta;
    }
    if (size.empty()) return meta;
  }
}

ModelSettings Parallel(int64_t tp, int64_t pp, std::optional<int64_t> vpp = std::nullopt,
                       int64_t ep = 1, int64_t etp = 1) {
  ModelSettings m;
  m.tensor_parallel = tp;
  m.pipeline_parallel = pp;
  m.virtual_pipeline_parallel = vpp;
  m.expert_parallel = ep;
  m.expert_tensor_parallel = etp;
  return m;
}

// (slot, fqn, offsets) of every chunk of a layer, in the layout's order.
using Placement = std::tuple<int, std::string, std::vector<int64_t>>;
std::vector<Placement> Placements(const LayerLayout& layer) {
  std::vector<Placement> out;
  for (const auto& c : layer.chunks)
    out.emplace_back(c.slot, layer.tensors[c.tensor_index].fqn, c.offsets_in_layer);
  return out;
}

std::string ErrorOf(const DcpMetadata& metadata, const ModelSettings& model) {
  try {
    PlanAdapterLayout(metadata, model);
  } catch (const FormatError& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(AdapterLayout, TensorParallelRowsGoToTheirRankAndReplicatedToRankZero) {
  DcpMetadata md;
  // lora_A [r=4, hidden=8] is replicated (one chunk); lora_B [12, 4] is split by rows over TP 2.
  md.tensors.push_back(Tiled(PerLayer(0, kQkvIn), {4, 8}, {4, 8}));
  md.tensors.push_back(Tiled(PerLayer(0, kQkvOut), {12, 4}, {6, 4}));
  md.tensors.push_back({"decoder.layers.0.self_attention.linear_qkv.weight",
                        DType::kBFloat16,
                        {12, 8},
                        {{{0, 0}, {12, 8}}}});  // a base weight: not an adapter
  const AdapterLayout layout = PlanAdapterLayout(md, Parallel(2, 1));
  EXPECT_EQ(layout.slots, 2);
  EXPECT_EQ(layout.shard_count(), 2);
  ASSERT_EQ(layout.num_layers, 1);
  const LayerLayout& layer = layout.layers[0];
  EXPECT_EQ(layer.pp_stage, 0);
  ASSERT_EQ(layer.tensors.size(), 2u);
  EXPECT_EQ(layer.tensors[0].key.param, AdapterParam::kLinearIn);
  EXPECT_EQ(layer.tensors[0].offset_in_layer, 0u);
  EXPECT_EQ(layer.tensors[1].offset_in_layer, 4u * 8 * 2) << "after lora_A's bf16 bytes";
  EXPECT_EQ(layer.nbytes, (4u * 8 + 12 * 4) * 2);
  EXPECT_THAT(Placements(layer), ElementsAre(Placement{0, PerLayer(0, kQkvIn), {0, 0}},
                                             Placement{0, PerLayer(0, kQkvOut), {0, 0}},
                                             Placement{1, PerLayer(0, kQkvOut), {6, 0}}));
  EXPECT_EQ(layer.chunks[2].nbytes, 6u * 4 * 2);
}

TEST(AdapterLayout, SwigluFc1ChunksIAndIPlusTpBelongToRankI) {
  DcpMetadata md;
  const std::string fc1_in = PerLayer(0, "mlp.linear_fc1.adapter.linear_in.weight");
  const std::string fc1_out = PerLayer(0, "mlp.linear_fc1.adapter.linear_out.weight");
  md.tensors.push_back(Tiled(fc1_in, {2, 8}, {2, 8}));
  md.tensors.push_back(Tiled(fc1_out, {16, 2}, {4, 2}));  // 2 x TP chunks of 4 rows
  const AdapterLayout layout = PlanAdapterLayout(md, Parallel(2, 1));
  EXPECT_THAT(Placements(layout.layers[0]),
              ElementsAre(Placement{0, fc1_in, {0, 0}}, Placement{0, fc1_out, {0, 0}},
                          Placement{0, fc1_out, {8, 0}}, Placement{1, fc1_out, {4, 0}},
                          Placement{1, fc1_out, {12, 0}}));
}

TEST(AdapterLayout, StackedLayersSplitEvenlyOverPipelineStages) {
  DcpMetadata md;
  // Stacked keys: [layers, ...], one chunk per layer.
  const std::string in = "decoder.layers.self_attention.linear_proj.adapter.linear_in.weight";
  const std::string out = "decoder.layers.self_attention.linear_proj.adapter.linear_out.weight";
  md.tensors.push_back(Tiled(in, {4, 2, 6}, {1, 2, 6}));
  md.tensors.push_back(Tiled(out, {4, 6, 2}, {1, 6, 2}));
  const AdapterLayout layout = PlanAdapterLayout(md, Parallel(1, 2));
  ASSERT_EQ(layout.num_layers, 4);
  std::vector<int> stages;
  for (const auto& layer : layout.layers) {
    stages.push_back(layer.pp_stage);
    ASSERT_EQ(layer.chunks.size(), 2u);
    EXPECT_EQ(layer.tensors[0].shape, (std::vector<int64_t>{2, 6})) << "the layer axis is removed";
    EXPECT_THAT(MetaOf(md, layer.chunks[0]).offsets, ElementsAre(layer.layer, 0, 0));
    EXPECT_THAT(layer.chunks[0].offsets_in_layer, ElementsAre(0, 0));
  }
  EXPECT_THAT(stages, ElementsAre(0, 0, 1, 1));
  EXPECT_EQ(layout.ShardOf(0, 1), 1);
}

TEST(AdapterLayout, VirtualPipelineInterleavesStages) {
  DcpMetadata md;
  for (int l = 0; l < 8; ++l) {
    md.tensors.push_back(Tiled(PerLayer(l, kQkvIn), {2, 4}, {2, 4}));
    md.tensors.push_back(Tiled(PerLayer(l, kQkvOut), {6, 2}, {6, 2}));
  }
  // 8 layers over PP 2 x VPP 2: model chunks of 2 layers, dealt to stages 0, 1, 0, 1.
  ModelSettings model = Parallel(1, 2, 2);
  model.num_layers = 8;
  const AdapterLayout layout = PlanAdapterLayout(md, model);
  std::vector<int> stages;
  for (const auto& layer : layout.layers) stages.push_back(layer.pp_stage);
  EXPECT_THAT(stages, ElementsAre(0, 0, 1, 1, 0, 0, 1, 1));
  EXPECT_EQ(StageOfLayer(5, 8, 2, 2), 0);
  EXPECT_EQ(StageOfLayer(7, 12, 3, 2), 0) << "chunks of 2 layers: chunk 3 is stage 0";
}

TEST(AdapterLayout, AdaptersOnSomeLayersLeaveTheOthersEmpty) {
  DcpMetadata md;
  md.tensors.push_back(Tiled(PerLayer(2, kQkvIn), {2, 4}, {2, 4}));
  md.tensors.push_back(Tiled(PerLayer(2, kQkvOut), {6, 2}, {6, 2}));
  ModelSettings model = Parallel(1, 2);
  model.num_layers = 4;
  const AdapterLayout layout = PlanAdapterLayout(md, model);
  ASSERT_EQ(layout.layers.size(), 4u);
  EXPECT_TRUE(layout.layers[0].tensors.empty());
  EXPECT_EQ(layout.layers[2].tensors.size(), 2u);
  EXPECT_EQ(layout.layers[2].pp_stage, 1);
}

TEST(AdapterLayout, ExpertChunksGoToTheirExpertParallelRank) {
  DcpMetadata md;
  // 4 experts over EP 2 (2 per rank), expert TP 2 splitting lora_B's rows; TP 1.
  const std::string in = PerLayer(0, "mlp.experts.experts.linear_fc2.adapter.linear_in.weight");
  const std::string out = PerLayer(0, "mlp.experts.experts.linear_fc2.adapter.linear_out.weight");
  md.tensors.push_back(Tiled(in, {4, 2, 6}, {1, 2, 6}));
  md.tensors.push_back(Tiled(out, {4, 8, 2}, {1, 4, 2}));
  const AdapterLayout layout = PlanAdapterLayout(md, Parallel(1, 1, std::nullopt, 2, 2));
  EXPECT_EQ(layout.slots, 4) << "max(TP 1, EP 2 x ETP 2)";
  const LayerLayout& layer = layout.layers[0];
  EXPECT_EQ(layer.tensors[0].experts, 4);
  // slot = ep * ETP + etp: experts 0, 1 are ep 0; rows [4, 8) are etp 1.
  std::map<std::pair<std::string, std::vector<int64_t>>, int> slot;
  for (const auto& [s, fqn, offsets] : Placements(layer)) slot[{fqn, offsets}] = s;
  EXPECT_EQ(slot.at({in, {0, 0, 0}}), 0);
  EXPECT_EQ(slot.at({in, {1, 0, 0}}), 0);
  EXPECT_EQ(slot.at({in, {2, 0, 0}}), 2);
  EXPECT_EQ(slot.at({in, {3, 0, 0}}), 2);
  EXPECT_EQ(slot.at({out, {0, 0, 0}}), 0);
  EXPECT_EQ(slot.at({out, {0, 4, 0}}), 1);
  EXPECT_EQ(slot.at({out, {3, 0, 0}}), 2);
  EXPECT_EQ(slot.at({out, {3, 4, 0}}), 3);
  EXPECT_EQ(slot.size(), 12u);
}

TEST(AdapterLayout, RefusesAChunkAcrossExpertParallelRanks) {
  DcpMetadata md;
  const std::string in = PerLayer(0, "mlp.experts.experts.linear_fc2.adapter.linear_in.weight");
  md.tensors.push_back(Tiled(in, {4, 2, 6}, {2, 2, 6}));
  md.tensors.back().chunks = {
      {{0, 0, 0}, {1, 2, 6}}, {{1, 0, 0}, {2, 2, 6}}, {{3, 0, 0}, {1, 2, 6}}};
  // Experts 1 and 2 in one chunk, but EP 2 puts them on different ranks.
  EXPECT_THAT(ErrorOf(md, Parallel(1, 1, std::nullopt, 2, 1)),
              HasSubstr("across expert-parallel ranks"));
  EXPECT_THAT(ErrorOf(md, Parallel(1, 1, std::nullopt, 3, 1)),
              HasSubstr("do not split over expert_model_parallel_size 3"));
}

TEST(AdapterLayout, RefusesChunksThatContradictTheParallelSizes) {
  DcpMetadata md;
  md.tensors.push_back(Tiled(PerLayer(0, kQkvIn), {4, 8}, {4, 8}));
  md.tensors.push_back(Tiled(PerLayer(0, kQkvOut), {12, 4}, {4, 4}));  // 3 pieces
  EXPECT_THAT(ErrorOf(md, Parallel(2, 1)),
              HasSubstr("does not match tensor_model_parallel_size 2"));
  EXPECT_THAT(ErrorOf(md, Parallel(3, 1)), HasSubstr("(no error)"));

  md.tensors[1] = Tiled(PerLayer(0, kQkvOut), {12, 4}, {6, 2});  // rows and columns
  EXPECT_THAT(ErrorOf(md, Parallel(2, 1)), HasSubstr("split more than one dimension"));
}

TEST(AdapterLayout, RefusesInconsistentLayerCounts) {
  const std::string in = "decoder.layers.self_attention.linear_proj.adapter.linear_in.weight";
  const std::string out = "decoder.layers.self_attention.linear_proj.adapter.linear_out.weight";
  DcpMetadata md;
  md.tensors.push_back(Tiled(in, {4, 2, 6}, {1, 2, 6}));
  md.tensors.push_back(Tiled(out, {3, 6, 2}, {1, 6, 2}));
  EXPECT_THAT(ErrorOf(md, Parallel(1, 1)), HasSubstr("has 3 layers but others have 4"));

  md.tensors[1] = Tiled(out, {4, 6, 2}, {1, 6, 2});
  ModelSettings model = Parallel(1, 1);
  model.num_layers = 6;
  EXPECT_THAT(
      ErrorOf(md, model),
      HasSubstr("stacked adapters have 4 layers but run_config.yaml model.num_layers is 6"));
  EXPECT_THAT(ErrorOf(md, Parallel(1, 3)),
              HasSubstr("4 layers do not split evenly over pipeline_model_parallel_size 3"));
  EXPECT_THAT(ErrorOf(md, Parallel(1, 2, 4)), HasSubstr("virtual 4"));

  md.tensors[1] = Tiled(out, {4, 6, 2}, {2, 6, 2});
  EXPECT_THAT(ErrorOf(md, Parallel(1, 1)), HasSubstr("spans 2 layers"));

  DcpMetadata per_layer;
  per_layer.tensors.push_back(Tiled(PerLayer(5, kQkvIn), {2, 4}, {2, 4}));
  model.num_layers = 4;
  EXPECT_THAT(ErrorOf(per_layer, model),
              HasSubstr("an adapter names layer 5 but run_config.yaml model.num_layers is 4"));
}

TEST(AdapterLayout, RefusesLayersWithDifferentAdapters) {
  DcpMetadata md;
  md.tensors.push_back(Tiled(PerLayer(0, kQkvIn), {2, 4}, {2, 4}));
  md.tensors.push_back(Tiled(PerLayer(0, kQkvOut), {6, 2}, {6, 2}));
  md.tensors.push_back(Tiled(PerLayer(1, kQkvIn), {2, 4}, {2, 4}));
  EXPECT_THAT(
      ErrorOf(md, Parallel(1, 1)),
      HasSubstr(
          "layer 1 (self_attention) has 1 adapter tensors but layer 0 (self_attention) has 2"));
}

// A Mamba in_proj's linear_out is saved as five global tensors (z, x, B, C, dt), each split over
// TP by rows: the layer holds them as one tensor, the parts' rows one after the other in that
// order, whatever order the keys sort in; each chunk still belongs to its part's TP rank.
TEST(AdapterLayout, SplitPartsMakeOneTensorInTheirOrder) {
  constexpr std::string_view kOut = "mixer.in_proj.adapter.linear_out.weight";
  const std::map<std::string, int64_t> rows = {{"z", 8}, {"x", 8}, {"B", 4}, {"C", 4}, {"dt", 2}};
  DcpMetadata md;
  md.tensors.push_back(
      Tiled(PerLayer(0, "mixer.in_proj.adapter.linear_in.weight"), {2, 6}, {1, 6}));
  for (const auto& [part, n] : rows)
    md.tensors.push_back(Tiled(PerLayer(0, std::string(kOut) + "." + part), {n, 2}, {n / 2, 2}));
  const AdapterLayout layout = PlanAdapterLayout(md, Parallel(2, 1));
  const LayerLayout& layer = layout.layers.at(0);
  ASSERT_EQ(layer.tensors.size(), 2u);
  const LayerTensor& out = layer.tensors[1];
  EXPECT_EQ(out.fqn, PerLayer(0, kOut));
  EXPECT_TRUE(out.key.split.empty());
  EXPECT_THAT(out.shape, ElementsAre(26, 2));
  EXPECT_EQ(out.nbytes, 26u * 2 * 2);
  // Rank 1's chunks, after its linear_in rows: z rows 4.., x 12.., B 18.., C 22.., dt 25.
  std::vector<std::pair<std::string, int64_t>> rank1;
  for (const auto& c : layer.chunks) {
    if (c.slot == 1 && c.tensor_index == 1) {
      const std::string& part = md.tensors.at(c.meta_index).fqn;
      rank1.emplace_back(part.substr(part.rfind('.') + 1), c.offsets_in_layer[0]);
      EXPECT_EQ(&MetaOf(md, c), &md.tensors.at(c.meta_index).chunks.at(c.chunk_index));
    }
  }
  EXPECT_THAT(rank1, ::testing::UnorderedElementsAre(std::pair<std::string, int64_t>{"z", 4},
                                                     std::pair<std::string, int64_t>{"x", 12},
                                                     std::pair<std::string, int64_t>{"B", 18},
                                                     std::pair<std::string, int64_t>{"C", 22},
                                                     std::pair<std::string, int64_t>{"dt", 25}));
}

TEST(AdapterLayout, RefusesIncompleteOrMismatchedSplitParts) {
  constexpr std::string_view kOut = "mixer.in_proj.adapter.linear_out.weight";
  DcpMetadata md;
  for (const char* part : {"z", "x", "B", "C"})
    md.tensors.push_back(Tiled(PerLayer(0, std::string(kOut) + "." + part), {4, 2}, {4, 2}));
  EXPECT_THAT(ErrorOf(md, Parallel(1, 1)), HasSubstr("has no '" + PerLayer(0, kOut) + ".dt'"));
  md.tensors.push_back(Tiled(PerLayer(0, std::string(kOut) + ".dt"), {2, 3}, {2, 3}));
  EXPECT_THAT(ErrorOf(md, Parallel(1, 1)), HasSubstr("differ only in rows"));
  EXPECT_THROW(ParseAdapterKey(PerLayer(0, std::string(kOut) + ".q")), FormatError);
  EXPECT_THROW(ParseAdapterKey(PerLayer(0, "mixer.in_proj.adapter.linear_in.weight.z")),
               FormatError);
}

TEST(AdapterLayout, RefusesMetadataWithoutAdaptersOrWithUnknownKeys) {
  DcpMetadata md;
  md.tensors.push_back({"decoder.layers.0.mlp.linear_fc1.weight", DType::kBFloat16, {4}, {}});
  EXPECT_THAT(ErrorOf(md, Parallel(1, 1)), HasSubstr("holds no adapter tensors"));
  EXPECT_THROW(ParseAdapterKey("decoder.layers.0.mlp.adapter.linear_mid.weight"), FormatError);
  EXPECT_THROW(ParseAdapterKey("embedding.adapter.linear_in.weight"), FormatError);
  EXPECT_EQ(ParseAdapterKey("optimizer.state.decoder.layers.0.x.adapter.linear_in.weight"),
            std::nullopt);
  const auto canonical = ParseAdapterKey(
      "decoder.layers.3.self_attention.linear_qkv.adapter.adapter_k.linear_in.weight");
  ASSERT_TRUE(canonical.has_value());
  EXPECT_EQ(canonical->layer, 3);
  EXPECT_EQ(canonical->module, "self_attention.linear_qkv");
  EXPECT_EQ(canonical->canonical, "adapter_k");
  EXPECT_EQ(canonical->param, AdapterParam::kLinearIn);
}

// DeepSeek-V3's MTP layers (mtp.layers.<i>.mtp_model_layer...) have no HF module: left out, listed.
// A prefix the user excludes leaves out its keys too; one that matches nothing is an error.
TEST(AdapterLayout, MtpLayersAndExcludedPrefixesAreLeftOutAndListed) {
  DcpMetadata md;
  md.tensors.push_back(Tiled(PerLayer(0, kQkvIn), {4, 8}, {4, 8}));
  md.tensors.push_back(Tiled(PerLayer(0, kQkvOut), {12, 4}, {12, 4}));
  const std::string mtp = "mtp.layers.0.mtp_model_layer.self_attention.linear_proj.adapter.";
  md.tensors.push_back(Tiled(mtp + "linear_in.weight", {4, 8}, {4, 8}));
  md.tensors.push_back(Tiled(mtp + "linear_out.weight", {8, 4}, {8, 4}));
  const std::string fc2 = "mlp.linear_fc2.adapter.linear_in.weight";
  md.tensors.push_back(Tiled(PerLayer(0, fc2), {4, 16}, {4, 16}));

  const AdapterLayout layout = PlanAdapterLayout(md, Parallel(1, 1));
  EXPECT_THAT(layout.excluded, ElementsAre(mtp + "linear_in.weight", mtp + "linear_out.weight"));
  EXPECT_EQ(layout.layers.at(0).tensors.size(), 3u);

  const AdapterLayout narrowed = PlanAdapterLayout(md, Parallel(1, 1), {{"decoder.layers.0.mlp"}});
  EXPECT_THAT(narrowed.excluded,
              ElementsAre(mtp + "linear_in.weight", mtp + "linear_out.weight", PerLayer(0, fc2)));
  EXPECT_EQ(narrowed.layers.at(0).tensors.size(), 2u);
  try {
    PlanAdapterLayout(md, Parallel(1, 1), {{"decoder.layer.0"}});
    FAIL() << "a prefix that matches nothing";
  } catch (const FormatError& e) {
    EXPECT_THAT(e.what(), HasSubstr("'decoder.layer.0' matches no adapter tensor"));
  }
}

// Asked for, an MTP layer's adapters become the layer after the decoder's, as DeepSeek-V3's HF
// checkpoint numbers it (model.layers.61 after 61 layers), owned by the last pipeline stage; an
// adapter on the MTP block outside its transformer layer has no PEFT target and is named.
TEST(AdapterLayout, MtpLayersFollowTheDecoderOnTheLastStageWhenAsked) {
  DcpMetadata md;
  for (int layer : {0, 1}) {
    md.tensors.push_back(Tiled(PerLayer(layer, kQkvIn), {4, 8}, {4, 8}));
    md.tensors.push_back(Tiled(PerLayer(layer, kQkvOut), {12, 4}, {6, 4}));
  }
  for (const char* name : {"mtp_model_layer", "transformer_layer"}) {
    DcpMetadata with_mtp = md;
    const std::string mtp = fmt::format("mtp.layers.0.{}.self_attention.linear_qkv.adapter.", name);
    with_mtp.tensors.push_back(Tiled(mtp + "linear_in.weight", {4, 8}, {4, 8}));
    with_mtp.tensors.push_back(Tiled(mtp + "linear_out.weight", {12, 4}, {6, 4}));
    const AdapterLayout layout = PlanAdapterLayout(with_mtp, Parallel(2, 2), {{}, true});
    EXPECT_TRUE(layout.excluded.empty());
    EXPECT_EQ(layout.num_layers, 2);
    EXPECT_EQ(layout.mtp_layers, 1);
    ASSERT_EQ(layout.layers.size(), 3u);
    EXPECT_EQ(layout.layers[0].pp_stage, 0);
    EXPECT_EQ(layout.layers[1].pp_stage, 1);
    const LayerLayout& last = layout.layers[2];
    EXPECT_EQ(last.layer, 2);
    EXPECT_EQ(last.pp_stage, 1);
    EXPECT_THAT(Placements(last), ElementsAre(Placement{0, mtp + "linear_in.weight", {0, 0}},
                                              Placement{0, mtp + "linear_out.weight", {0, 0}},
                                              Placement{1, mtp + "linear_out.weight", {6, 0}}));
    EXPECT_EQ(last.tensors.at(0).key.module, "self_attention.linear_qkv");
  }
  try {
    PlanAdapterLayout(md, Parallel(2, 2), {{}, true});
    FAIL() << "asked for MTP layers the checkpoint lacks";
  } catch (const FormatError& e) {
    EXPECT_THAT(e.what(), HasSubstr("no MTP layer adapters"));
  }
  EXPECT_THROW(ParseAdapterKey("mtp.layers.0.eh_proj.adapter.linear_in.weight"), FormatError);
  EXPECT_THROW(ParseAdapterKey("mtp.layers.x.mtp_model_layer.mlp.adapter.linear_in.weight"),
               FormatError);
}

}  // namespace
}  // namespace adapter_job::checkpoint
