// How a model family's Megatron modules map to HuggingFace modules: data, not code. Each family is
// a JSON file (config/models/*.json, compiled in; more can be given at run time), so adding a
// family that reuses the existing fused layouts needs no code.
#pragma once

#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace adapter_job::convert {

// The layout of a fused Megatron projection, and so how its adapter splits.
enum class Fusion {
  kNone,      // one HF module; tensors pass through
  kQkv,       // linear_qkv: rows interleaved per query group [q heads of g, k_g, v_g]
  kGatedMlp,  // linear_fc1: rows [gate; up]
};

// Whether the base layer is column- or row-parallel decides how its adapter is TP-sharded.
enum class Parallelism { kColumn, kRow };

// How a fused expert parameter holds each expert's HF modules: [experts, out, in] with the
// modules' rows one after the other (transformers 5's Qwen3-MoE gate_up_proj), [experts, in, out]
// (x @ W, GPT-OSS's down_proj), or [experts, in, out] with the modules' output features
// alternating (GPT-OSS's gate_up_proj: gate in the even columns, up in the odd ones).
enum class FusedLayout { kOutIn, kInOut, kInOutInterleaved };

// A width in terms of the HF config: hidden, q heads x head_dim, kv heads x head_dim, ffn, an MoE
// expert's ffn (moe_intermediate_size, else intermediate_size), the number of routed experts
// (the router's output), or, for layouts those do not name (DeepSeek's MLA), a sum of products of
// config.json integers: "kv_lora_rank + qk_rope_head_dim", "num_attention_heads * v_head_dim".
struct Width {
  enum class Kind { kHidden, kQuery, kKeyValue, kFfn, kExpertFfn, kExperts, kConfigSum };
  Kind kind = Kind::kHidden;
  // kConfigSum: the terms, each a product of config.json keys and integer constants.
  std::vector<std::vector<std::string>> terms;
  std::string text;  // as the family file wrote it, for messages
};

// Parses a family file's width: a named one ("hidden", "query", "key_value", "ffn",
// "expert_ffn", "experts") or a config sum. Throws FormatError naming `where` for anything else.
Width ParseWidth(const std::string& text, const std::string& where);

// A HuggingFace linear module inside a layer and its (in, out) widths.
struct HfModule {
  std::string path;  // e.g. "self_attn.q_proj"; "mlp.experts.{expert}.gate_proj" for experts
  Width in;
  Width out;
};

struct ModuleMapping {
  std::string megatron;  // path inside a layer, e.g. "self_attention.linear_qkv"
  Fusion fusion = Fusion::kNone;
  Parallelism parallelism = Parallelism::kColumn;
  std::vector<HfModule> hf;  // in split order
  std::string peft_target;   // run_config.yaml target_modules name, e.g. "linear_qkv"
  // MoE experts: the Megatron tensors carry an expert axis (or, from older versions, one adapter
  // shared by all experts), and each expert gets its own HF modules ("{expert}" in the paths).
  bool experts = false;
  // Where transformers 5 fuses these per-expert modules into one parameter (e.g.
  // "mlp.experts.gate_up_proj"); PEFT then loads the adapter with the modules' ranks summed, and
  // rank_pattern must say so when they are not `r`.
  std::string fused_parameter;
  FusedLayout fused_layout = FusedLayout::kOutIn;
  // The HF checkpoint itself stores the fused parameter (GPT-OSS), so the "{expert}" paths only
  // name each expert's slice of it: the PEFT adapter is written on the parameter
  // (target_parameters, PEFT's ParamWrapper), as no per-expert module exists to load into.
  bool stored_fused = false;
  // Why stock PEFT refuses to load an adapter on this module, when it does (Nemotron-H's Mamba
  // out_proj): a PEFT adapter directory cannot carry it, a merged model can. Empty: it loads.
  std::string peft_refuses;
};

// "mlp.experts.{expert}.gate_proj" with expert 3 -> "mlp.experts.3.gate_proj".
std::string ExpertPath(const std::string& path, int64_t expert);

// CanonicalLoRA keeps one adapter per HF projection inside the fused Megatron module.
struct CanonicalMapping {
  std::string megatron;  // e.g. "self_attention.linear_qkv"
  std::string adapter;   // e.g. "adapter_q"
  HfModule hf;
  // Megatron-Bridge saves every linear_out under a linear_fc1 base through the SwiGLU sharded
  // factory: TP rank i's rows are halved into chunks i and i + TP, which permutes the rows of a
  // canonical gate/up adapter at TP > 1 (peft/utils.py ParallelLinearAdapter.sharded_state_dict).
  bool swiglu_sharded = false;
};

// What verification's forward pass needs beyond config.json and the weights (which give biases,
// q/k norms, sandwich norms, activations, soft-caps and sliding windows).
struct ForwardTraits {
  double norm_weight_offset = 0;  // Gemma: RMSNorm scales by (1 + weight)
  bool scale_embedding = false;   // Gemma: embeddings times sqrt(hidden_size)
  std::string moe_router;         // MoE: the router's linear inside a layer, e.g. "mlp.gate"
  // DeepSeek-V3: sigmoid router scores (else softmax), and the shared experts' module beside the
  // routed ones (its gate_proj, up_proj and down_proj), e.g. "mlp.shared_experts".
  bool moe_router_sigmoid = false;
  std::string moe_shared_experts;
  // GPT-OSS's experts: gate clamped to at most `limit`, up to [-limit, limit], then
  // (up + 1) * gate * sigmoid(alpha * gate) (transformers GptOssExperts._apply_gate); unset: the
  // model's activation(gate) * up.
  struct ClampedSwiglu {
    double alpha = 0;
    double limit = 0;
  };
  std::optional<ClampedSwiglu> moe_clamped_swiglu;
  // False for a family whose forward pass verification does not have yet: exporting it with
  // verification on is then an error before any work, never a quiet skip.
  bool verification = true;
  // Nemotron-H: a hybrid of Mamba-2, attention and MLP layers (config.json layers_block_type).
  bool hybrid = false;
  // The embedding and the final norm, as the model's files name them.
  std::string embedding = "model.embed_tokens.weight";
  std::string final_norm = "model.norm.weight";
};

struct ModelFamily {
  std::string name;
  std::vector<std::string> architectures;  // config.json "architectures" / "model_type" values
  std::vector<std::string> model_types;
  std::string hf_layers_prefix;  // e.g. "model.layers"
  std::vector<ModuleMapping> modules;
  std::vector<CanonicalMapping> canonical;
  ForwardTraits forward;

  const ModuleMapping* FindModule(std::string_view megatron) const;
  // The expert modules (megatron "mlp.experts.experts.linear_fc1" / "...linear_fc2"), if any.
  const ModuleMapping* FindExperts(std::string_view megatron_leaf) const;
  // The stored_fused expert modules, in the order transformers registers their parameters (the
  // family file's order), which is the order PEFT nests its ParamWrappers in.
  std::vector<const ModuleMapping*> StoredFusedExperts() const;
  const CanonicalMapping* FindCanonical(std::string_view megatron, std::string_view adapter) const;
};

// Throws FormatError when `family` has no verification forward pass, saying how to export
// without verification.
void RequireVerificationForward(const ModelFamily& family);

// The built-in families (config/models/*.json at build time), then those of every *.json in
// `dirs`, in order; a later family of the same name replaces an earlier one. Throws FormatError
// naming the file and key of a malformed description.
std::vector<ModelFamily> LoadModelFamilies(const std::vector<std::filesystem::path>& dirs = {});

// One family from its JSON text; `like` families are looked up in `known`.
ModelFamily ParseModelFamily(std::string_view json, const std::string& source,
                             const std::vector<ModelFamily>& known);

// By config.json `architectures[0]`; by `model_type` only when there is no architecture, or for a
// family listing no architectures. Throws FormatError listing what is supported.
const ModelFamily& FamilyFor(const std::vector<ModelFamily>& families,
                             const std::string& architecture, const std::string& model_type);

}  // namespace adapter_job::convert
