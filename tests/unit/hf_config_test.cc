// config.json as transformers 5 saves a hybrid (Nemotron-H): no num_hidden_layers, and the expert
// defaults saved whether or not a layer is an MoE layer.
#include "adapter_job/convert/hf_config.h"

#include <gtest/gtest.h>

#include <string>

#include "scratch_directory.h"

namespace adapter_job::convert {
namespace {

// From transformers 5.17's save of a 4-layer NemotronHConfig (tests/fixtures/tiny_llama.py
// nemotron_h): the keys read, with the expert defaults saved for a model without MoE layers, and
// `@BLOCKS@` for its layers_block_type.
constexpr const char* kNemotronH = R"json({
  "architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h",
  "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
  "intermediate_size": 96, "vocab_size": 256, "layer_norm_epsilon": 1e-05,
  "layers_block_type": @BLOCKS@,
  "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 7688,
  "n_shared_experts": 1, "moe_shared_expert_intermediate_size": 7688
})json";

class HfConfigTest : public testing::ScratchDirectoryTest {
 protected:
  HfModelConfig Read(const std::string& block_types) {
    std::string text = kNemotronH;
    text.replace(text.find("@BLOCKS@"), 8, block_types);
    WriteFile(root_ / "config.json", text);
    return ReadHfConfig(root_);
  }
};

TEST_F(HfConfigTest, AHybridWithoutMoeLayersHasNoExpertsWhateverItsDefaultsSay) {
  const HfModelConfig c =
      Read(R"(["linear_attention", "full_attention", "linear_attention", "mlp"])");
  EXPECT_EQ(c.num_hidden_layers, 4);
  EXPECT_EQ(c.num_experts, 0);  // n_routed_experts 8 describes no layer
  EXPECT_EQ(c.experts_per_token, 0);
}

TEST_F(HfConfigTest, AHybridWithMoeLayersHasTheirExperts) {
  const HfModelConfig c = Read(R"(["linear_attention", "moe", "full_attention", "moe", "mlp"])");
  EXPECT_EQ(c.num_hidden_layers, 5);
  EXPECT_EQ(c.num_experts, 8);
  EXPECT_EQ(c.experts_per_token, 2);
}

}  // namespace
}  // namespace adapter_job::convert
