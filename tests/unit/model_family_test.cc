// The model families as data: the built-in files, `like`, families added from a directory, and
// errors that name the file and the key.
#include "adapter_job/convert/model_family.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <tuple>

#include "adapter_job/core/error.h"

namespace adapter_job::convert {
namespace {

using ::testing::HasSubstr;

std::string ErrorOf(const std::function<void()>& f) {
  try {
    f();
  } catch (const FormatError& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(ModelFamily, BuiltInFamiliesAndTheirLookups) {
  const auto families = LoadModelFamilies();
  for (const char* arch :
       {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
        "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"}) {
    const ModelFamily f = FamilyFor(families, arch, "");
    ASSERT_EQ(f.modules.size(), 4u) << arch;
    const ModuleMapping* qkv = f.FindModule("self_attention.linear_qkv");
    ASSERT_NE(qkv, nullptr);
    EXPECT_EQ(qkv->fusion, Fusion::kQkv);
    EXPECT_EQ(qkv->hf[1].path, "self_attn.k_proj");
    EXPECT_EQ(qkv->hf[1].out.kind, Width::Kind::kKeyValue);
    EXPECT_EQ(f.FindModule("mlp.linear_fc2")->parallelism, Parallelism::kRow);
    EXPECT_TRUE(f.FindCanonical("mlp.linear_fc1", "adapter_up")->swiglu_sharded);
    EXPECT_EQ(f.hf_layers_prefix, "model.layers");
  }
  EXPECT_EQ(FamilyFor(families, "", "qwen2").name,
            "qwen2");  // by model_type, without architectures
  // An unknown architecture is refused even when its model_type is known.
  EXPECT_THAT(ErrorOf([&] { FamilyFor(families, "EvilForCausalLM", "llama"); }),
              HasSubstr("'EvilForCausalLM' (model_type 'llama') is not supported"));
  const std::string error = ErrorOf([&] { FamilyFor(families, "GPT2LMHeadModel", "gpt2"); });
  EXPECT_THAT(error, HasSubstr("'GPT2LMHeadModel'"));
  EXPECT_THAT(error, HasSubstr("supported: "));
  for (const char* arch :
       {"LlamaForCausalLM", "DeepseekV3ForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
        "Qwen3ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"})
    EXPECT_THAT(error, HasSubstr(arch));
}

TEST(ModelFamily, MoeFamiliesAddExpertModulesToLlamasAttention) {
  const auto families = LoadModelFamilies();
  // Llama's four, then (Qwen3-MoE) the router's LoRA and the experts' two.
  for (const auto& [arch, gate, down, modules] :
       {std::tuple{"Qwen3MoeForCausalLM", "mlp.experts.{expert}.gate_proj",
                   "mlp.experts.{expert}.down_proj", 7u},
        std::tuple{"MixtralForCausalLM", "block_sparse_moe.experts.{expert}.w1",
                   "block_sparse_moe.experts.{expert}.w2", 6u}}) {
    const ModelFamily f = FamilyFor(families, arch, "");
    EXPECT_EQ(f.modules.size(), modules) << arch;
    EXPECT_NE(f.FindModule("self_attention.linear_qkv"), nullptr);
    const ModuleMapping* fc1 = f.FindExperts("linear_fc1");
    ASSERT_NE(fc1, nullptr) << arch;
    EXPECT_EQ(fc1->megatron, "mlp.experts.experts.linear_fc1");
    EXPECT_EQ(fc1->fusion, Fusion::kGatedMlp);
    EXPECT_EQ(fc1->hf[0].path, gate);
    EXPECT_EQ(fc1->hf[0].out.kind, Width::Kind::kExpertFfn);
    EXPECT_EQ(fc1->fused_parameter, "mlp.experts.gate_up_proj");
    EXPECT_EQ(f.FindExperts("linear_fc2")->hf[0].path, down);
    EXPECT_FALSE(f.FindModule("mlp.linear_fc1")->experts);
    EXPECT_FALSE(f.forward.moe_router.empty());
  }
  const ModuleMapping* router =
      FamilyFor(families, "Qwen3MoeForCausalLM", "").FindModule("mlp.router");
  ASSERT_NE(router, nullptr);
  EXPECT_EQ(router->hf.at(0).path, "mlp.gate");
  EXPECT_EQ(router->hf.at(0).out.kind, Width::Kind::kExperts);
  EXPECT_EQ(ExpertPath("mlp.experts.{expert}.w1", 12), "mlp.experts.12.w1");
  EXPECT_EQ(ExpertPath("mlp.gate_proj", 12), "mlp.gate_proj");
  // Expert modules, and only they, name the expert in their paths.
  const std::string unmarked = R"({"family": "f", "architectures": ["A"], "like": "llama",
      "add_modules": [{"megatron": "mlp.experts.experts.linear_fc2", "peft_target": "linear_fc2",
                       "fusion": "none", "parallelism": "row", "experts": true,
                       "hf": [{"path": "mlp.experts.down", "in": "expert_ffn", "out": "hidden"}]}]})";
  EXPECT_THAT(ErrorOf([&] { ParseModelFamily(unmarked, "x.json", families); }),
              HasSubstr("x.json (family 'f').add_modules[0].hf: expert modules, and only they"));
  // GPT-OSS stores its experts fused, as [experts, in, out]; another layout is refused.
  const ModelFamily gpt_oss = FamilyFor(families, "GptOssForCausalLM", "");
  ASSERT_EQ(gpt_oss.StoredFusedExperts().size(), 2u);
  EXPECT_EQ(gpt_oss.StoredFusedExperts()[0]->fused_layout, FusedLayout::kInOutInterleaved);
  EXPECT_EQ(gpt_oss.StoredFusedExperts()[1]->fused_parameter, "mlp.experts.down_proj");
  const std::string out_in = R"({"family": "f", "architectures": ["A"], "like": "llama",
      "add_modules": [{"megatron": "mlp.experts.experts.linear_fc2", "peft_target": "linear_fc2",
                       "fusion": "none", "parallelism": "row", "experts": true,
                       "fused_parameter": "mlp.experts.down_proj", "stored_fused": true,
                       "hf": [{"path": "mlp.experts.{expert}.down", "in": "expert_ffn",
                               "out": "hidden"}]}]})";
  EXPECT_THAT(ErrorOf([&] { ParseModelFamily(out_in, "x.json", families); }),
              HasSubstr("stored_fused: needs fused_layout in_out or in_out_interleaved"));
}

TEST(ModelFamily, AFamilyAddedFromADirectoryNeedsNoCode) {
  const auto dir = std::filesystem::temp_directory_path() / "adapter_job_family_test";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "olmo.json") << R"({"family": "olmo", "architectures": ["OlmoForCausalLM"],
                                          "like": "llama"})";
  const auto families = LoadModelFamilies({dir});
  const ModelFamily olmo = FamilyFor(families, "OlmoForCausalLM", "olmo");
  EXPECT_EQ(olmo.name, "olmo");
  EXPECT_EQ(olmo.modules.size(), 4u);
  EXPECT_EQ(olmo.canonical.size(), 5u);
  std::filesystem::remove_all(dir);
}

TEST(ModelFamily, WidthsAreNamedOrSumsOfConfigIntegers) {
  EXPECT_EQ(ParseWidth("key_value", "w").kind, Width::Kind::kKeyValue);
  const Width mla = ParseWidth("num_attention_heads * qk_nope_head_dim + 2 * v_head_dim", "w");
  EXPECT_EQ(mla.kind, Width::Kind::kConfigSum);
  EXPECT_EQ(mla.terms, (std::vector<std::vector<std::string>>{
                           {"num_attention_heads", "qk_nope_head_dim"}, {"2", "v_head_dim"}}));
  for (const char* bad : {"", "heads *", "Hidden", "kv_lora_rank - 1", "a + + b", "2x"}) {
    EXPECT_THAT(ErrorOf([&] { ParseWidth(bad, "f.json (family 'x').modules[0].hf[0].out"); }),
                HasSubstr("modules[0].hf[0].out"))
        << bad;
  }
  const auto families = LoadModelFamilies();
  const ModelFamily deepseek = FamilyFor(families, "DeepseekV3ForCausalLM", "");
  EXPECT_TRUE(deepseek.forward.moe_router_sigmoid);
  EXPECT_EQ(deepseek.forward.moe_shared_experts, "mlp.shared_experts");
  EXPECT_NE(deepseek.FindModule("mlp.shared_experts.linear_fc1"), nullptr);
  EXPECT_TRUE(deepseek.forward.verification);
  // A family whose forward verification does not have yet says so, and exporting it verified is
  // refused with the way out.
  const ModelFamily unverified = ParseModelFamily(
      R"({"family": "new", "architectures": ["NewForCausalLM"], "like": "llama",
          "forward": {"verification": false}})",
      "new.json", families);
  EXPECT_THAT(ErrorOf([&] { RequireVerificationForward(unverified); }),
              HasSubstr("pass --no-verify"));
}

TEST(ModelFamily, MalformedDescriptionsNameFileAndKey) {
  const auto families = LoadModelFamilies();
  const auto error = [&](const std::string& json) {
    return ErrorOf([&] { ParseModelFamily(json, "x.json", families); });
  };
  EXPECT_THAT(error("{"), HasSubstr("x.json: not valid JSON"));
  EXPECT_THAT(error(R"({"architectures": ["A"]})"), HasSubstr("x.json: missing 'family'"));
  EXPECT_THAT(error(R"({"family": "f", "architectures": ["A"], "like": "nope"})"),
              HasSubstr("'like' names 'nope'"));
  EXPECT_THAT(error(R"({"family": "f", "like": "llama"})"),
              HasSubstr("give 'architectures' or 'model_types'"));
  const std::string bad_fusion = R"({"family": "f", "architectures": ["A"],
      "hf_layers_prefix": "model.layers",
      "modules": [{"megatron": "m", "peft_target": "m", "fusion": "triple", "parallelism": "row",
                   "hf": [{"path": "p", "in": "hidden", "out": "hidden"}]}]})";
  const std::string message = error(bad_fusion);
  EXPECT_THAT(message, HasSubstr("x.json (family 'f').modules[0].fusion: 'triple'"));
  EXPECT_THAT(message, HasSubstr("none, qkv, gated_mlp"));
  const std::string bad_width = R"({"family": "f", "architectures": ["A"],
      "hf_layers_prefix": "model.layers",
      "modules": [{"megatron": "m", "peft_target": "m", "fusion": "qkv", "parallelism": "column",
                   "hf": [{"path": "p", "in": "hidden", "out": "wide-ish"}]}]})";
  EXPECT_THAT(error(bad_width), HasSubstr("modules[0].hf[0].out: 'wide-ish' is neither a named"));
  const std::string short_split = R"({"family": "f", "architectures": ["A"],
      "hf_layers_prefix": "model.layers",
      "modules": [{"megatron": "m", "peft_target": "m", "fusion": "qkv", "parallelism": "column",
                   "hf": [{"path": "p", "in": "hidden", "out": "query"}]}]})";
  EXPECT_THAT(error(short_split), HasSubstr("a 'qkv' fusion splits into 3 modules, not 1"));
}

}  // namespace
}  // namespace adapter_job::convert
