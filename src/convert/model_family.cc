// Module names follow Megatron-Bridge's bridges (models/llama/llama_bridge.py and its peers):
// linear_qkv -> q/k/v_proj (QKVMapping), linear_proj -> o_proj, linear_fc1 -> gate/up_proj
// (GatedMLPMapping), linear_fc2 -> down_proj.
#include "adapter_job/convert/model_family.h"

#include "adapter_job/core/error.h"

namespace adapter_job::convert {
namespace {

const HfModule kQProj{"self_attn.q_proj", Width::kHidden, Width::kQuery};
const HfModule kKProj{"self_attn.k_proj", Width::kHidden, Width::kKeyValue};
const HfModule kVProj{"self_attn.v_proj", Width::kHidden, Width::kKeyValue};
const HfModule kOProj{"self_attn.o_proj", Width::kQuery, Width::kHidden};
const HfModule kGateProj{"mlp.gate_proj", Width::kHidden, Width::kFfn};
const HfModule kUpProj{"mlp.up_proj", Width::kHidden, Width::kFfn};
const HfModule kDownProj{"mlp.down_proj", Width::kFfn, Width::kHidden};

std::vector<ModuleMapping> LlamaModules() {
  return {
      {"self_attention.linear_qkv",
       Fusion::kQkv,
       Parallelism::kColumn,
       {kQProj, kKProj, kVProj},
       "linear_qkv"},
      {"self_attention.linear_proj", Fusion::kNone, Parallelism::kRow, {kOProj}, "linear_proj"},
      {"mlp.linear_fc1",
       Fusion::kGatedMlp,
       Parallelism::kColumn,
       {kGateProj, kUpProj},
       "linear_fc1"},
      {"mlp.linear_fc2", Fusion::kNone, Parallelism::kRow, {kDownProj}, "linear_fc2"},
  };
}

std::vector<CanonicalMapping> LlamaCanonical() {
  return {
      {"self_attention.linear_qkv", "adapter_q", kQProj},
      {"self_attention.linear_qkv", "adapter_k", kKProj},
      {"self_attention.linear_qkv", "adapter_v", kVProj},
      {"mlp.linear_fc1", "adapter_gate", kGateProj, /*swiglu_sharded=*/true},
      {"mlp.linear_fc1", "adapter_up", kUpProj, /*swiglu_sharded=*/true},
  };
}

}  // namespace

const ModuleMapping* ModelFamily::FindModule(std::string_view megatron) const {
  for (const auto& m : modules) {
    if (m.megatron == megatron) return &m;
  }
  return nullptr;
}

const CanonicalMapping* ModelFamily::FindCanonical(std::string_view megatron,
                                                   std::string_view adapter) const {
  for (const auto& c : canonical) {
    if (c.megatron == megatron && c.adapter == adapter) return &c;
  }
  return nullptr;
}

const std::vector<ModelFamily>& SupportedFamilies() {
  static const std::vector<ModelFamily> families = {
      {"llama", {"LlamaForCausalLM"}, {"llama"}, "model.layers", LlamaModules(), LlamaCanonical()},
      {"mistral",
       {"MistralForCausalLM"},
       {"mistral"},
       "model.layers",
       LlamaModules(),
       LlamaCanonical()},
  };
  return families;
}

const ModelFamily& FamilyFor(const std::string& architecture, const std::string& model_type) {
  for (const auto& family : SupportedFamilies()) {
    for (const auto& a : family.architectures) {
      if (a == architecture) return family;
    }
    for (const auto& t : family.model_types) {
      if (t == model_type) return family;
    }
  }
  std::string supported;
  for (const auto& family : SupportedFamilies()) {
    for (const auto& a : family.architectures) supported += (supported.empty() ? "" : ", ") + a;
  }
  Fail("model architecture '{}' (model_type '{}') is not supported; supported: {}", architecture,
       model_type, supported);
}

}  // namespace adapter_job::convert
