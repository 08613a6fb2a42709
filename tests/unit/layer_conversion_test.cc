// The row splits of fused Megatron adapters into HF PEFT modules: QKV per query group, SwiGLU
// gate/up halves, the DoRA fc1 magnitude stored TP-interleaved, CanonicalLoRA's SwiGLU-sharded
// gate/up, and per-expert slices. Each source row holds its own index, so an output's values
// name the source rows it took; the expected rows are worked out by hand from Megatron's layouts
// (Megatron-Bridge param_mapping.py split_qkv_weights, peft_bridge.py), not from the code.
#include "adapter_job/convert/layer_conversion.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>
#include <map>

#include "adapter_job/core/error.h"

namespace adapter_job::convert {
namespace {

using checkpoint::AdapterKey;
using checkpoint::AdapterKind;
using checkpoint::AdapterParam;
using checkpoint::LayerLayout;
using checkpoint::LayerTensor;
using checkpoint::TensorMeta;
using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;

const ModelFamily& Family(const std::string& architecture) {
  static const std::vector<ModelFamily> families = LoadModelFamilies();
  return FamilyFor(families, architecture, "");
}

// A layer whose tensors are float32 and whose every element holds its row's index (rows counted
// over all leading dimensions), so an output row tells which source row it came from.
class Layer {
 public:
  void Add(const std::string& module, AdapterParam param, std::vector<int64_t> shape,
           std::string canonical = "", int64_t experts = 0) {
    int64_t numel = 1;
    for (int64_t d : shape) numel *= d;
    const int64_t cols = shape.size() < 2 ? 1 : shape.back();
    for (int64_t i = 0; i < numel; ++i) Push(static_cast<float>(i / cols));
    LayerTensor t;
    t.meta_index = layout_.tensors.size();
    t.fqn = "decoder.layers.0." + module + ".adapter." +
            (canonical.empty() ? "" : canonical + ".") +
            std::string(checkpoint::AdapterParamName(param));
    t.dtype = DType::kFloat32;
    t.key = AdapterKey{module, canonical, param, 0, std::nullopt, {}};
    t.experts = experts;
    t.shape = std::move(shape);
    t.nbytes = static_cast<uint64_t>(numel) * 4;
    t.offset_in_layer = layout_.nbytes;
    layout_.nbytes += t.nbytes;
    layout_.tensors.push_back(std::move(t));
  }

  std::map<std::string, OutputTensor> Plan(const ConversionSettings& s) const {
    std::map<std::string, OutputTensor> by_name;
    for (auto& out : PlanLayerConversion(layout_, s)) by_name.emplace(out.name, std::move(out));
    return by_name;
  }

  // The source row of every element of an output, in order.
  std::vector<int64_t> ValuesOf(const OutputTensor& out) const {
    const Tensor t = MaterializeOutput(out, layout_, buffer_);
    std::vector<int64_t> values;
    for (std::size_t i = 0; i < t.data.size(); i += 4) {
      float v = 0;
      std::memcpy(&v, t.data.data() + i, 4);
      values.push_back(static_cast<int64_t>(v));
    }
    return values;
  }

  // The source rows an output took, one per output row.
  std::vector<int64_t> RowsOf(const OutputTensor& out) const {
    const auto cols = static_cast<std::size_t>(out.shape.size() < 2 ? 1 : out.shape.back());
    const std::vector<int64_t> values = ValuesOf(out);
    std::vector<int64_t> rows;
    for (std::size_t i = 0; i < values.size(); i += cols) rows.push_back(values[i]);
    return rows;
  }

 private:
  void Push(float v) {
    const auto* p = reinterpret_cast<const std::byte*>(&v);
    buffer_.insert(buffer_.end(), p, p + 4);
  }
  LayerLayout layout_;
  std::vector<std::byte> buffer_;
};

// Llama-shaped: hidden 8, 4 query heads in 2 groups (2 kv heads), head_dim 2, ffn 4.
ConversionSettings Llama(AdapterKind kind = AdapterKind::kLoRA, int tp = 1) {
  ConversionSettings s;
  s.family = Family("LlamaForCausalLM");
  s.model.hidden_size = 8;
  s.model.num_attention_heads = 4;
  s.model.num_key_value_heads = 2;
  s.model.head_dim = 2;
  s.model.intermediate_size = 4;
  s.kind = kind;
  s.training_tensor_parallel = tp;
  return s;
}

constexpr int64_t kRank = 3;
const std::string kPrefix = "model.layers.0.";

TEST(RowSplits, QkvSplitsPerQueryGroup) {
  Layer layer;
  // Per group g: [q heads of g (2 x 2 rows); k_g (2 rows); v_g (2 rows)]: 8 rows, 16 in all.
  layer.Add("self_attention.linear_qkv", AdapterParam::kLinearIn, {kRank, 8});
  layer.Add("self_attention.linear_qkv", AdapterParam::kLinearOut, {16, kRank});
  const auto out = layer.Plan(Llama());
  ASSERT_EQ(out.size(), 6u);
  const auto& q = out.at(kPrefix + "self_attn.q_proj.lora_B.weight");
  EXPECT_THAT(q.shape, ElementsAre(8, kRank));
  EXPECT_THAT(layer.RowsOf(q), ElementsAre(0, 1, 2, 3, 8, 9, 10, 11));
  EXPECT_THAT(layer.RowsOf(out.at(kPrefix + "self_attn.k_proj.lora_B.weight")),
              ElementsAre(4, 5, 12, 13));
  EXPECT_THAT(layer.RowsOf(out.at(kPrefix + "self_attn.v_proj.lora_B.weight")),
              ElementsAre(6, 7, 14, 15));
  // lora_A is shared: every projection gets all of it.
  for (const char* leaf : {"q_proj", "k_proj", "v_proj"}) {
    const auto& a = out.at(kPrefix + "self_attn." + leaf + ".lora_A.weight");
    EXPECT_THAT(a.shape, ElementsAre(kRank, 8)) << leaf;
    EXPECT_THAT(layer.RowsOf(a), ElementsAre(0, 1, 2)) << leaf;
  }
}

TEST(RowSplits, QkvWithOneQueryGroupIsContiguous) {
  Layer layer;
  ConversionSettings s = Llama();
  s.model.num_key_value_heads = 1;  // multi-query: [q0..q3; k; v]
  layer.Add("self_attention.linear_qkv", AdapterParam::kLinearIn, {kRank, 8});
  layer.Add("self_attention.linear_qkv", AdapterParam::kLinearOut, {12, kRank});
  const auto out = layer.Plan(s);
  EXPECT_THAT(layer.RowsOf(out.at(kPrefix + "self_attn.q_proj.lora_B.weight")),
              ElementsAre(0, 1, 2, 3, 4, 5, 6, 7));
  EXPECT_THAT(layer.RowsOf(out.at(kPrefix + "self_attn.k_proj.lora_B.weight")), ElementsAre(8, 9));
  EXPECT_THAT(layer.RowsOf(out.at(kPrefix + "self_attn.v_proj.lora_B.weight")),
              ElementsAre(10, 11));
}

TEST(RowSplits, Fc1SplitsIntoGateThenUp) {
  for (int tp : {1, 2}) {  // the training TP does not matter for lora_B (gathered whole)
    Layer layer;
    layer.Add("mlp.linear_fc1", AdapterParam::kLinearIn, {kRank, 8});
    layer.Add("mlp.linear_fc1", AdapterParam::kLinearOut, {8, kRank});
    const auto out = layer.Plan(Llama(AdapterKind::kLoRA, tp));
    EXPECT_THAT(layer.RowsOf(out.at(kPrefix + "mlp.gate_proj.lora_B.weight")),
                ElementsAre(0, 1, 2, 3));
    EXPECT_THAT(layer.RowsOf(out.at(kPrefix + "mlp.up_proj.lora_B.weight")),
                ElementsAre(4, 5, 6, 7));
  }
}

TEST(RowSplits, DoraMagnitudeFollowsItsProjection) {
  Layer layer;
  for (const char* module : {"self_attention.linear_qkv", "mlp.linear_fc1"}) {
    layer.Add(module, AdapterParam::kLinearIn, {kRank, 8});
  }
  layer.Add("self_attention.linear_qkv", AdapterParam::kLinearOut, {16, kRank});
  layer.Add("self_attention.linear_qkv", AdapterParam::kMagnitude, {16});
  layer.Add("mlp.linear_fc1", AdapterParam::kLinearOut, {8, kRank});
  // The fc1 magnitude is stored TP-interleaved: with TP 2 and ffn 4, [g0 g1 | u0 u1 | g2 g3 | u2
  // u3] (each TP rank's [gate slice; up slice]).
  layer.Add("mlp.linear_fc1", AdapterParam::kMagnitude, {8});
  const auto out = layer.Plan(Llama(AdapterKind::kDoRA, 2));
  EXPECT_THAT(layer.RowsOf(out.at(kPrefix + "self_attn.q_proj.lora_magnitude_vector")),
              ElementsAre(0, 1, 2, 3, 8, 9, 10, 11));
  EXPECT_THAT(layer.RowsOf(out.at(kPrefix + "self_attn.v_proj.lora_magnitude_vector")),
              ElementsAre(6, 7, 14, 15));
  const auto& gate = out.at(kPrefix + "mlp.gate_proj.lora_magnitude_vector");
  EXPECT_THAT(gate.shape, ElementsAre(4));
  EXPECT_THAT(layer.RowsOf(gate), ElementsAre(0, 1, 4, 5));
  EXPECT_THAT(layer.RowsOf(out.at(kPrefix + "mlp.up_proj.lora_magnitude_vector")),
              ElementsAre(2, 3, 6, 7));
  // lora_B of the same fc1 is not interleaved.
  EXPECT_THAT(layer.RowsOf(out.at(kPrefix + "mlp.gate_proj.lora_B.weight")),
              ElementsAre(0, 1, 2, 3));

  Layer tp1;
  tp1.Add("mlp.linear_fc1", AdapterParam::kLinearIn, {kRank, 8});
  tp1.Add("mlp.linear_fc1", AdapterParam::kLinearOut, {8, kRank});
  tp1.Add("mlp.linear_fc1", AdapterParam::kMagnitude, {8});
  const auto plain = tp1.Plan(Llama(AdapterKind::kDoRA, 1));
  EXPECT_THAT(tp1.RowsOf(plain.at(kPrefix + "mlp.gate_proj.lora_magnitude_vector")),
              ElementsAre(0, 1, 2, 3));
}

TEST(RowSplits, DoraMagnitudeNeedsDoraAndATpThatDividesTheFfn) {
  Layer layer;
  layer.Add("mlp.linear_fc1", AdapterParam::kLinearIn, {kRank, 8});
  layer.Add("mlp.linear_fc1", AdapterParam::kLinearOut, {8, kRank});
  layer.Add("mlp.linear_fc1", AdapterParam::kMagnitude, {8});
  EXPECT_THROW(layer.Plan(Llama(AdapterKind::kLoRA)), FormatError);
  try {
    layer.Plan(Llama(AdapterKind::kDoRA, 3));
    FAIL() << "ffn 4 over TP 3";
  } catch (const FormatError& e) {
    EXPECT_THAT(e.what(), HasSubstr("not divisible by the training TP 3"));
  }
}

TEST(RowSplits, CanonicalGateUndoesSwigluShardingAtTp2) {
  ConversionSettings s = Llama(AdapterKind::kCanonicalLoRA, 2);
  s.model.intermediate_size = 8;
  Layer layer;
  layer.Add("mlp.linear_fc1", AdapterParam::kLinearIn, {kRank, 8}, "adapter_gate");
  layer.Add("mlp.linear_fc1", AdapterParam::kLinearOut, {8, kRank}, "adapter_gate");
  // Stored: [rank 0's first half; rank 1's first half; rank 0's second; rank 1's second], each a
  // quarter (2 rows): true rows 0-3 are rank 0's, 4-7 rank 1's.
  const auto out = layer.Plan(s);
  EXPECT_THAT(layer.RowsOf(out.at(kPrefix + "mlp.gate_proj.lora_B.weight")),
              ElementsAre(0, 1, 4, 5, 2, 3, 6, 7));
  s.training_tensor_parallel = 1;  // one rank: the halves are its own, in order
  EXPECT_THAT(layer.RowsOf(layer.Plan(s).at(kPrefix + "mlp.gate_proj.lora_B.weight")),
              ElementsAre(0, 1, 2, 3, 4, 5, 6, 7));
}

// Two experts of ffn 3 in a Llama-shaped layer.
ConversionSettings TwoExperts(const std::string& architecture) {
  ConversionSettings s = Llama();
  s.family = Family(architecture);
  s.model.num_experts = 2;
  s.model.expert_intermediate_size = 3;
  return s;
}

TEST(RowSplits, ExpertsTakeTheirOwnSlice) {
  const ConversionSettings s = TwoExperts("Qwen3MoeForCausalLM");
  Layer layer;
  const std::string fc1 = "mlp.experts.experts.linear_fc1";
  layer.Add(fc1, AdapterParam::kLinearIn, {2, kRank, 8}, "", 2);
  layer.Add(fc1, AdapterParam::kLinearOut, {2, 6, kRank}, "", 2);
  const auto out = layer.Plan(s);
  // Rows count over [expert, row]: expert e's [gate; up] are rows [6e, 6e + 3) and [6e + 3, 6e +
  // 6).
  EXPECT_THAT(layer.RowsOf(out.at(kPrefix + "mlp.experts.0.gate_proj.lora_B.weight")),
              ElementsAre(0, 1, 2));
  EXPECT_THAT(layer.RowsOf(out.at(kPrefix + "mlp.experts.1.gate_proj.lora_B.weight")),
              ElementsAre(6, 7, 8));
  EXPECT_THAT(layer.RowsOf(out.at(kPrefix + "mlp.experts.1.up_proj.lora_B.weight")),
              ElementsAre(9, 10, 11));
  const auto& a1 = out.at(kPrefix + "mlp.experts.1.up_proj.lora_A.weight");
  EXPECT_THAT(a1.shape, ElementsAre(kRank, 8));
  EXPECT_THAT(layer.RowsOf(a1), ElementsAre(3, 4, 5));
}

// GPT-OSS stores its experts fused: the adapters go out as PEFT's ParamWrapper holds them
// (tuners/lora/layer.py: lora_A [experts x r, in] read as "e r i", lora_B [out, r x experts] read
// as "o r e"), with Megatron's [gate; up] rows interleaved as gate_up_proj's columns, and
// down_proj's wrapper outermost.
TEST(RowSplits, FusedExpertsPackAsPeftsParamWrapper) {
  const ConversionSettings s = TwoExperts("GptOssForCausalLM");
  Layer layer;
  const std::string fc1 = "mlp.experts.experts.linear_fc1";
  const std::string fc2 = "mlp.experts.experts.linear_fc2";
  layer.Add(fc1, AdapterParam::kLinearIn, {2, kRank, 8}, "", 2);
  layer.Add(fc1, AdapterParam::kLinearOut, {2, 6, kRank}, "", 2);
  layer.Add(fc2, AdapterParam::kLinearIn, {2, kRank, 3}, "", 2);
  layer.Add(fc2, AdapterParam::kLinearOut, {2, 8, kRank}, "", 2);
  const auto out = layer.Plan(s);
  ASSERT_EQ(out.size(), 4U);
  const OutputTensor& a = out.at(kPrefix + "mlp.experts.base_layer.lora_A.weight");
  EXPECT_EQ(a.parameter, "mlp.experts.gate_up_proj");
  EXPECT_THAT(a.shape, ElementsAre(2 * kRank, 8));
  EXPECT_THAT(layer.RowsOf(a), ElementsAre(0, 1, 2, 3, 4, 5));  // expert-major, as stored
  const OutputTensor& b = out.at(kPrefix + "mlp.experts.base_layer.lora_B.weight");
  EXPECT_THAT(b.shape, ElementsAre(6, kRank * 2));
  // Each element holds its source row (expert x 6 + row): out row o is gate o/2 (even o) or up o/2
  // (odd o), each rank's two experts side by side.
  EXPECT_THAT(layer.ValuesOf(b), ElementsAreArray<int64_t>(
                                     {0, 6,  0, 6,  0, 6,  3, 9, 3, 9, 3, 9, 1, 7,  1, 7,  1, 7,
                                      4, 10, 4, 10, 4, 10, 2, 8, 2, 8, 2, 8, 5, 11, 5, 11, 5, 11}));
  EXPECT_EQ(out.at(kPrefix + "mlp.experts.lora_B.weight").parameter, "mlp.experts.down_proj");
  EXPECT_THAT(out.at(kPrefix + "mlp.experts.lora_B.weight").shape, ElementsAre(8, kRank * 2));

  // Only fc1 adapted: its wrapper is then the only one, outermost.
  Layer fc1_only;
  fc1_only.Add(fc1, AdapterParam::kLinearIn, {2, kRank, 8}, "", 2);
  fc1_only.Add(fc1, AdapterParam::kLinearOut, {2, 6, kRank}, "", 2);
  EXPECT_TRUE(fc1_only.Plan(s).contains(kPrefix + "mlp.experts.lora_B.weight"));
}

TEST(RowSplits, ShapesMustAgreeWithTheConfig) {
  Layer layer;
  layer.Add("self_attention.linear_qkv", AdapterParam::kLinearIn, {kRank, 8});
  layer.Add("self_attention.linear_qkv", AdapterParam::kLinearOut, {14, kRank});
  try {
    layer.Plan(Llama());
    FAIL() << "14 rows for q 8 + k 4 + v 4";
  } catch (const FormatError& e) {
    EXPECT_THAT(e.what(), HasSubstr("[16, 3]"));
  }
  Layer no_b;
  no_b.Add("self_attention.linear_proj", AdapterParam::kLinearIn, {kRank, 8});
  EXPECT_THROW(no_b.Plan(Llama()), FormatError);
}

// DeepSeek-V3-shaped: hidden 8, 2 heads, MLA q_lora_rank 6, kv_lora_rank 4, qk nope 3 + rope 2,
// v_head_dim 5; expert and shared-expert ffn 4, 2 routed experts.
ConversionSettings DeepSeekV3() {
  ConversionSettings s;
  s.family = Family("DeepseekV3ForCausalLM");
  s.model.path = "deepseek/config.json";
  s.model.hidden_size = 8;
  s.model.num_attention_heads = 2;
  s.model.intermediate_size = 12;
  s.model.num_experts = 2;
  s.model.expert_intermediate_size = 4;
  s.model.raw = {{"num_attention_heads", 2},   {"q_lora_rank", 6},      {"kv_lora_rank", 4},
                 {"qk_nope_head_dim", 3},      {"qk_rope_head_dim", 2}, {"v_head_dim", 5},
                 {"moe_intermediate_size", 4}, {"n_shared_experts", 1}};
  return s;
}

TEST(RowSplits, MlaProjectionsPassThroughWithTheirConfigWidths) {
  Layer layer;
  // in/out worked out from transformers' DeepseekV3Attention: q_b 2 x (3 + 2) = 10 rows,
  // kv_a 4 + 2 = 6, kv_b 2 x (3 + 5) = 16, o_proj in 2 x 5 = 10.
  layer.Add("self_attention.linear_q_down_proj", AdapterParam::kLinearIn, {kRank, 8});
  layer.Add("self_attention.linear_q_down_proj", AdapterParam::kLinearOut, {6, kRank});
  layer.Add("self_attention.linear_q_up_proj", AdapterParam::kLinearIn, {kRank, 6});
  layer.Add("self_attention.linear_q_up_proj", AdapterParam::kLinearOut, {10, kRank});
  layer.Add("self_attention.linear_kv_down_proj", AdapterParam::kLinearIn, {kRank, 8});
  layer.Add("self_attention.linear_kv_down_proj", AdapterParam::kLinearOut, {6, kRank});
  layer.Add("self_attention.linear_kv_up_proj", AdapterParam::kLinearIn, {kRank, 4});
  layer.Add("self_attention.linear_kv_up_proj", AdapterParam::kLinearOut, {16, kRank});
  layer.Add("self_attention.linear_proj", AdapterParam::kLinearIn, {kRank, 10});
  layer.Add("self_attention.linear_proj", AdapterParam::kLinearOut, {8, kRank});
  layer.Add("mlp.shared_experts.linear_fc1", AdapterParam::kLinearIn, {kRank, 8});
  layer.Add("mlp.shared_experts.linear_fc1", AdapterParam::kLinearOut, {8, kRank});
  const auto out = layer.Plan(DeepSeekV3());
  EXPECT_THAT(layer.RowsOf(out.at(kPrefix + "self_attn.kv_b_proj.lora_B.weight")),
              ElementsAreArray({0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}));
  EXPECT_THAT(out.at(kPrefix + "self_attn.o_proj.lora_A.weight").shape, ElementsAre(kRank, 10));
  EXPECT_THAT(out.at(kPrefix + "self_attn.q_a_proj.lora_B.weight").shape, ElementsAre(6, kRank));
  EXPECT_THAT(out.at(kPrefix + "self_attn.kv_a_proj_with_mqa.lora_B.weight").shape,
              ElementsAre(6, kRank));
  EXPECT_THAT(layer.RowsOf(out.at(kPrefix + "mlp.shared_experts.up_proj.lora_B.weight")),
              ElementsAre(4, 5, 6, 7));
}

TEST(RowSplits, AConfigWidthNamesTheKeyItNeeds) {
  Layer layer;
  layer.Add("self_attention.linear_kv_up_proj", AdapterParam::kLinearIn, {kRank, 4});
  layer.Add("self_attention.linear_kv_up_proj", AdapterParam::kLinearOut, {16, kRank});
  ConversionSettings s = DeepSeekV3();
  s.model.raw.erase("v_head_dim");
  try {
    layer.Plan(s);
    FAIL() << "no v_head_dim in the config";
  } catch (const FormatError& e) {
    EXPECT_THAT(e.what(), HasSubstr("deepseek/config.json"));
    EXPECT_THAT(e.what(), HasSubstr("'v_head_dim'"));
  }
  Layer wrong;  // kv_b rows that assume v_head_dim 3
  wrong.Add("self_attention.linear_kv_up_proj", AdapterParam::kLinearIn, {kRank, 4});
  wrong.Add("self_attention.linear_kv_up_proj", AdapterParam::kLinearOut, {12, kRank});
  EXPECT_THROW(wrong.Plan(DeepSeekV3()), FormatError);
}

}  // namespace
}  // namespace adapter_job::convert
