// A Llama-family forward pass in libtorch, one decoder layer at a time, matching transformers:
// LlamaForCausalLM (RMSNorm, RoPE default/llama3/linear, GQA attention, SwiGLU MLP) and, where the
// config and weights say so, Qwen2's q/k/v biases, Qwen3's and Gemma 3's per-head q/k norms,
// Gemma's (1 + weight) norms, scaled embeddings and GeGLU, Gemma 2/3's sandwich norms,
// soft-capping and sliding-window layers with their own RoPE base, the sparse MoE MLPs of
// Qwen3-MoE and Mixtral (softmax router, top-k experts, optionally renormalised), and
// DeepSeek-V3's multi-latent attention (YaRN RoPE on interleaved pairs) and MoE (sigmoid router
// with a score correction bias, group-limited top-k, scaled weights, shared experts), and
// GPT-OSS's attention sinks, biased o_proj and router, and fused, biased experts with a clamped
// SwiGLU.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "adapter_job/convert/hf_config.h"
#include "adapter_job/convert/model_family.h"

namespace adapter_job::verify {

enum class Activation { kSilu, kGeluTanh, kGelu, kRelu2 };

// What differs between the layers of one model: full or sliding-window attention, and its RoPE.
struct LayerAttention {
  at::Tensor inv_freq;  // [head_dim / 2], float32
  double rope_scaling = 1.0;
  int64_t window = 0;  // 0: every earlier position; else only the last `window` positions
  // The leading head dims RoPE turns (GLM's partial_rotary_factor); the rest pass through.
  int64_t rotary_dim = 0;
};

// DeepSeek's multi-latent attention (config.json's MLA dims): q through q_a_proj, q_a_layernorm
// and q_b_proj (or one q_proj without a q LoRA rank), k/v from the latent kv_a_proj_with_mqa
// (kv_lora_rank, then one shared rope key) through kv_a_layernorm and kv_b_proj.
struct MlaSettings {
  int64_t q_lora_rank = 0;  // 0: q_proj
  int64_t kv_lora_rank = 0;
  int64_t qk_nope_head_dim = 0;
  int64_t qk_rope_head_dim = 0;
  int64_t v_head_dim = 0;
  bool rope_interleave = true;  // RoPE on (x0, x1), (x2, x3), ... pairs, not on halves
};

// Experts the checkpoint stores as one fused parameter (GPT-OSS's mlp.experts.gate_up_proj):
// each expert's linears (MoeSettings::expert, by index: {0, 1} for gate and up, {2} for down)
// are slices of it, and of its "<parameter>_bias" where the model has one.
struct FusedExperts {
  std::string parameter;
  std::vector<std::size_t> linears;
  convert::FusedLayout layout = convert::FusedLayout::kOutIn;
};

// One expert's slices of a fused parameter: `slice` is that expert's weight as stored (or its
// bias, 1-D); returns each of the `parts` linears as [out, in] (or [out]), as views.
std::vector<at::Tensor> SplitFused(const at::Tensor& slice, convert::FusedLayout layout,
                                   std::size_t parts);

// A sparse MoE MLP: its router and each expert's gate/up/down linears by HF path within a layer
// ("{expert}" stands for the expert's index), from the model family and config.json.
struct MoeSettings {
  std::string router;                 // e.g. "mlp.gate"; empty for a dense model
  std::array<std::string, 3> expert;  // gate, up, down, e.g. "mlp.experts.{expert}.gate_proj"
  int64_t experts = 0;
  int64_t top_k = 0;
  bool normalize_top_k = true;  // Qwen3-MoE's norm_topk_prob; Mixtral always renormalises
  // DeepSeek-V3: sigmoid scores, a correction bias ("<router>.e_score_correction_bias") added for
  // the choice only, experts chosen within the top `top_k_groups` of `groups` groups, weights
  // times `routed_scaling`, and shared experts (gate, up, down paths) beside the routed ones.
  bool sigmoid = false;
  int64_t groups = 1;
  int64_t top_k_groups = 1;
  double routed_scaling = 1;
  std::array<std::string, 3> shared;  // empty paths: none
  int64_t shared_ffn = 0;             // n_shared_experts x moe_intermediate_size
  // GPT-OSS: the experts stored fused, in the order transformers registers the parameters, and
  // their clamped SwiGLU in place of the model's activation.
  std::vector<FusedExperts> fused;
  std::optional<convert::ForwardTraits::ClampedSwiglu> clamped_swiglu;
};

// Nemotron-H's hybrid layers: each one block behind one norm ("norm.weight"), its "mixer" a
// Mamba-2 mixer, attention without RoPE, or a squared-ReLU MLP (config.json layers_block_type).
enum class HybridBlock { kMamba, kAttention, kMlp };

// A Mamba-2 mixer's dims (transformers NemotronHMamba2Mixer): in_proj's output is [z; x; B; C;
// dt] of inner, inner, groups x state, groups x state and heads rows, x, B and C through a
// depthwise causal conv of `conv_kernel` taps.
struct Mamba2Settings {
  int64_t heads = 0;
  int64_t head_dim = 0;
  int64_t state = 0;
  int64_t groups = 1;
  int64_t conv_kernel = 4;
  double time_step_min = 0;  // dt is clamped to at least this (time_step_limit's floor)
  double norm_eps = 1e-5;    // the gated RMSNorm's, per group
  int64_t inner() const { return heads * head_dim; }
};

struct LlamaSettings {
  int64_t hidden = 0;
  int64_t heads = 0;
  int64_t kv_heads = 0;
  int64_t head_dim = 0;
  double rms_norm_eps = 1e-6;
  double norm_weight_offset = 0;  // Gemma: (1 + weight)
  double embedding_scale = 1;     // Gemma: sqrt(hidden)
  double attention_scale = 1;     // 1 / sqrt(query_pre_attn_scalar or head_dim)
  std::optional<double> attention_softcap, final_softcap;
  std::optional<double> clip_qkv;  // OLMoE: q, k and v clamped to [-clip, clip] after the norms
  Activation activation = Activation::kSilu;
  std::vector<LayerAttention> layers;
  std::optional<MlaSettings> mla;
  MoeSettings moe;
  // A hybrid (Nemotron-H): one block per layer; empty for a decoder of attention + MLP layers.
  std::vector<HybridBlock> hybrid;
  Mamba2Settings mamba;
  // Where the weights are: the family's hf_layers_prefix, its embedding and final norm (Nemotron-H
  // keeps transformers 4's backbone.* names on disk).
  std::string layers_prefix = "model.layers";
  std::string embedding = "model.embed_tokens.weight";
  std::string final_norm = "model.norm.weight";
};

// Reads rms_norm_eps, the activation, soft-caps, sliding windows and the RoPE parameters
// (transformers 5 `rope_parameters`, per layer type where the model has several, or 4's
// `rope_theta`/`rope_scaling`) from the config; throws for what it does not model.
LlamaSettings MakeLlamaSettings(const convert::HfModelConfig& config,
                                const convert::ModelFamily& family);

// The linear modules of a dense decoder layer, by their HF paths.
inline constexpr std::array<const char*, 7> kDecoderLinears = {
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj"};

// The attention's linear modules (q/k/v/o_proj, or MLA's), a dense MLP's (gate/up/down_proj) and
// an MoE layer's (the router, each expert's, then the shared experts').
std::vector<std::string> AttentionLinearPaths(const LlamaSettings& s);
std::vector<std::string> DenseMlpPaths();
std::vector<std::string> SparseMlpPaths(const LlamaSettings& s);
// A hybrid layer's linear modules (its mixer's), by its block.
std::vector<std::string> HybridLinearPaths(HybridBlock block);
// Every linear module a layer of this model may have: the three above, or a hybrid's.
std::vector<std::string> DecoderLinearPaths(const LlamaSettings& s);

// The linear weights of one decoder layer ([out, in], as in HF) and its norms; the optional
// ones are undefined tensors when the model has none.
struct LayerWeights {
  at::Tensor q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj;
  at::Tensor input_layernorm, post_attention_layernorm;
  at::Tensor q_bias, k_bias, v_bias;  // Qwen2
  // Qwen3, Gemma 3: RMSNorm over each head's dims; OLMoE: over the whole projection.
  at::Tensor q_norm, k_norm;
  // Gemma 2/3: post_attention_layernorm then normalises the attention output, and these wrap
  // the MLP.
  at::Tensor pre_feedforward_layernorm, post_feedforward_layernorm;
  // MoE layers: DeepSeek's router correction bias [experts]; the router [experts, hidden] and the
  // experts' linears are in other_linears, in place of gate/up/down_proj.
  at::Tensor router_bias;
  // Biases beyond q/k/v's, by linear path: o_proj's, the router's logits' and each expert's
  // linears' (GPT-OSS).
  std::map<std::string, at::Tensor> biases;
  // GPT-OSS's attention sinks: a logit per head that joins each softmax and is dropped after it.
  at::Tensor sinks;
  // Names ForEachWeight gives slices of a fused expert parameter ("mlp.experts.3.gate_proj.weight")
  // -> the checkpoint tensor they are slices of ("mlp.experts.gate_up_proj").
  std::map<std::string, std::string> stored_as;
  // Linears beyond the named ones, by HF path: the router, experts, shared experts, MLA's
  // projections, a hybrid layer's mixer's.
  std::map<std::string, at::Tensor> other_linears;
  // A hybrid layer's other weights by name within the layer: "norm.weight", and a Mamba mixer's
  // "mixer.conv1d.weight", "mixer.conv1d.bias", "mixer.A_log", "mixer.D", "mixer.dt_bias",
  // "mixer.norm.weight".
  std::map<std::string, at::Tensor> hybrid_params;

  // An MoE layer: it has the router `s.moe.router`.
  bool Sparse(const MoeSettings& moe) const {
    return !moe.router.empty() && other_linears.contains(moe.router);
  }
  at::Tensor q_a_layernorm, kv_a_layernorm;  // MLA

  // The bias of linear `path`, or an undefined tensor.
  at::Tensor Bias(const std::string& path) const {
    const auto it = biases.find(path);
    return it == biases.end() ? at::Tensor() : it->second;
  }
  // "self_attn.q_proj" -> q_proj; any other path -> its entry in other_linears.
  at::Tensor& Linear(const std::string& module);
  const at::Tensor& Linear(const std::string& module) const;
};

// Calls `visit` with every defined tensor of `w` and its HF name within the layer (e.g.
// "self_attn.q_proj.weight", "input_layernorm.weight").
void ForEachWeight(LayerWeights& w, const LlamaSettings& s,
                   const std::function<void(const std::string&, at::Tensor&)>& visit);

at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps, double offset = 0);

at::Tensor Activate(const at::Tensor& x, Activation activation);

// x: [tokens, hidden] -> [tokens, hidden]; causal attention over positions 0..tokens-1 (or a
// hybrid's block, see hybrid_forward.h).
at::Tensor DecoderLayer(const at::Tensor& x, const LayerWeights& w, const LlamaSettings& s,
                        int64_t layer);

// Llama-style attention of normed hidden states h: q/k/v heads (GQA) from w.q_proj ... w.o_proj,
// optional biases and per-head norms, RoPE on halves of the leading `attention.rotary_dim` dims
// (none when 0).
at::Tensor GroupedQueryAttention(const at::Tensor& h, const LayerWeights& w, const LlamaSettings& s,
                                 const LayerAttention& attention);

// Soft-capping as Gemma 2 does it: cap * tanh(x / cap).
at::Tensor SoftCap(const at::Tensor& x, const std::optional<double>& cap);

}  // namespace adapter_job::verify
