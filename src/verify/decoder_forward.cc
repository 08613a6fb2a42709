// Follows
// transformers/models/{llama,qwen2,qwen3,gemma,gemma2,gemma3,qwen3_moe,mixtral,deepseek_v3,
// gpt_oss}/
// modeling_*.py and modeling_rope_utils.py (_compute_default_rope_parameters,
// _compute_llama3_parameters, _compute_linear_scaling_rope_parameters, _compute_yarn_parameters).
#include "decoder_forward.h"

#include <cmath>

#include "adapter_job/core/error.h"
#include "hybrid_forward.h"

namespace adapter_job::verify {
namespace {

double Number(const nlohmann::json& j, const char* key, double fallback) {
  return j.contains(key) && j[key].is_number() ? j[key].get<double>() : fallback;
}

std::optional<double> OptionalNumber(const nlohmann::json& j, const char* key) {
  if (j.contains(key) && j[key].is_number()) return j[key].get<double>();
  return std::nullopt;
}

LayerAttention Yarn(const nlohmann::json& rope, const nlohmann::json& raw, int64_t dim,
                    const at::Tensor& inv_freq, const std::string& where);
LayerAttention RopeFrequencies(const nlohmann::json& rope, const nlohmann::json& raw, int64_t dim,
                               const std::string& where);

// inv_freq and the cos/sin scaling of one RoPE parameter set.
LayerAttention Rope(const nlohmann::json& rope, const nlohmann::json& raw, int64_t dim,
                    const std::string& where) {
  // transformers: dim = int(head_dim * partial_rotary_factor), the leading dims of each head.
  const double partial =
      Number(rope, "partial_rotary_factor", Number(raw, "partial_rotary_factor", 1.0));
  const auto rotary_dim = static_cast<int64_t>(static_cast<double>(dim) * partial);
  if (partial <= 0 || partial > 1 || rotary_dim % 2 != 0)
    Fail("{}: partial_rotary_factor {} of head_dim {} is not an even number of dims", where,
         partial, dim);
  LayerAttention layer = RopeFrequencies(rope, raw, rotary_dim, where);
  layer.rotary_dim = rotary_dim;
  return layer;
}

// inv_freq and the cos/sin scaling over the `dim` dims RoPE turns.
LayerAttention RopeFrequencies(const nlohmann::json& rope, const nlohmann::json& raw, int64_t dim,
                               const std::string& where) {
  const double theta = Number(rope, "rope_theta", Number(raw, "rope_theta", 10000.0));
  const std::string type = rope.value("rope_type", rope.value("type", std::string("default")));
  at::Tensor inv_freq = 1.0 / at::pow(theta, at::arange(0, dim, 2, at::kLong).to(at::kFloat) / dim);
  if (type == "llama3") {
    const double factor = Number(rope, "factor", 8.0);
    const double low = Number(rope, "low_freq_factor", 1.0);
    const double high = Number(rope, "high_freq_factor", 4.0);
    const double old_context = Number(rope, "original_max_position_embeddings",
                                      Number(raw, "max_position_embeddings", 8192));
    const double low_wavelen = old_context / low;
    const double high_wavelen = old_context / high;
    const at::Tensor wavelen = 2 * M_PI / inv_freq;
    at::Tensor scaled = at::where(wavelen > low_wavelen, inv_freq / factor, inv_freq);
    const at::Tensor smooth = (old_context / wavelen - low) / (high - low);
    const at::Tensor smoothed = (1 - smooth) * scaled / factor + smooth * scaled;
    const at::Tensor medium = (wavelen >= high_wavelen).logical_and(wavelen <= low_wavelen);
    inv_freq = at::where(medium, smoothed, scaled);
  } else if (type == "linear") {
    inv_freq = inv_freq / Number(rope, "factor", 1.0);
  } else if (type == "yarn") {
    return Yarn(rope, raw, dim, inv_freq, where);
  } else if (type != "default") {
    Fail("{}: rope type '{}' is not supported (default, linear, llama3, yarn)", where, type);
  }
  return {inv_freq, 1.0, 0};
}

double YarnMscale(double scale, double mscale) {
  return scale <= 1 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0;
}

// YaRN: frequencies interpolated by `factor` below the beta_slow rotation count, kept above
// beta_fast, ramped between; cos/sin scaled by the attention factor.
LayerAttention Yarn(const nlohmann::json& rope, const nlohmann::json& raw, int64_t dim,
                    const at::Tensor& inv_freq, const std::string& where) {
  const double theta = Number(rope, "rope_theta", Number(raw, "rope_theta", 10000.0));
  const double original = Number(rope, "original_max_position_embeddings", 0);
  if (original <= 0)
    Fail("{}: yarn RoPE needs rope_parameters.original_max_position_embeddings", where);
  const double factor =
      Number(rope, "factor", Number(raw, "max_position_embeddings", 0) / original);
  std::optional<double> attention_factor = OptionalNumber(rope, "attention_factor");
  if (!attention_factor) {
    const double mscale = Number(rope, "mscale", 0), all_dim = Number(rope, "mscale_all_dim", 0);
    attention_factor = mscale != 0 && all_dim != 0
                           ? YarnMscale(factor, mscale) / YarnMscale(factor, all_dim)
                           : YarnMscale(factor, 1);
  }
  const double beta_fast = Number(rope, "beta_fast", 32), beta_slow = Number(rope, "beta_slow", 1);
  const auto correction_dim = [&](double rotations) {
    return dim * std::log(original / (rotations * 2 * M_PI)) / (2 * std::log(theta));
  };
  double low = correction_dim(beta_fast), high = correction_dim(beta_slow);
  if (!rope.contains("truncate") || rope["truncate"] != false) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  low = std::max(low, 0.0);
  high = std::min(high, static_cast<double>(dim - 1));
  if (low == high) high += 0.001;
  const at::Tensor ramp = ((at::arange(dim / 2, at::kFloat) - low) / (high - low)).clamp(0, 1);
  const at::Tensor extrapolation = 1 - ramp;
  return {inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation, *attention_factor, 0};
}

Activation ActivationOf(const nlohmann::json& raw, const std::string& where) {
  std::string name = "silu";
  for (const char* key : {"hidden_activation", "hidden_act", "mlp_hidden_act"}) {
    if (raw.contains(key) && raw[key].is_string()) {
      name = raw[key].get<std::string>();
      break;
    }
  }
  if (name == "silu" || name == "swish") return Activation::kSilu;
  if (name == "gelu_pytorch_tanh" || name == "gelu_new" || name == "gelu_fast")
    return Activation::kGeluTanh;
  if (name == "gelu") return Activation::kGelu;
  if (name == "relu2") return Activation::kRelu2;
  Fail("{}: activation '{}' is not supported (silu, gelu, gelu_pytorch_tanh, relu2)", where, name);
}

// Nemotron-H (transformers NemotronHConfig): the block of each layer from layers_block_type (or
// the hub's hybrid_override_pattern, one of M, *, - a layer), the Mamba-2 dims, no RoPE.
LlamaSettings WithHybridLayers(LlamaSettings s, const convert::HfModelConfig& config) {
  const nlohmann::json& raw = config.text();
  const std::string where = config.path.string();
  std::vector<std::string> types;
  if (raw.contains("layers_block_type") && raw["layers_block_type"].is_array()) {
    for (const auto& type : raw["layers_block_type"])
      types.push_back(type.is_string() ? type.get<std::string>() : type.dump());
  } else if (raw.contains("hybrid_override_pattern") &&
             raw["hybrid_override_pattern"].is_string()) {
    for (char c : raw["hybrid_override_pattern"].get<std::string>()) {
      types.push_back(c == 'M'   ? "mamba"
                      : c == '*' ? "attention"
                      : c == '-' ? "mlp"
                                 : std::string(1, c));
    }
  } else {
    Fail("{}: a hybrid model needs layers_block_type (or hybrid_override_pattern)", where);
  }
  if (std::ssize(types) != config.num_hidden_layers)
    Fail("{}: {} layer types for {} layers", where, types.size(), config.num_hidden_layers);
  for (const std::string& type : types) {
    if (type == "linear_attention" || type == "mamba") {
      s.hybrid.push_back(HybridBlock::kMamba);
    } else if (type == "full_attention" || type == "attention") {
      s.hybrid.push_back(HybridBlock::kAttention);
    } else if (type == "mlp") {
      s.hybrid.push_back(HybridBlock::kMlp);
    } else {
      Fail("{}: layer type '{}' is not supported (Mamba-2, attention and MLP layers; no MoE yet)",
           where, type);
    }
  }
  const auto integer = [&](const char* key, const char* legacy) {
    for (const char* name : {key, legacy}) {
      if (raw.contains(name) && raw[name].is_number_integer() && raw[name].get<int64_t>() > 0)
        return raw[name].get<int64_t>();
    }
    Fail("{}: a Mamba-2 mixer needs '{}' as a positive integer", where, key);
  };
  s.mamba.heads = integer("mamba_num_heads", "mamba_num_heads");
  s.mamba.head_dim = integer("mamba_head_dim", "mamba_head_dim");
  s.mamba.state = integer("ssm_state_size", "ssm_state_size");
  s.mamba.groups = integer("n_groups", "mamba_n_groups");
  s.mamba.conv_kernel = integer("conv_kernel", "mamba_d_conv");
  if (s.mamba.heads % s.mamba.groups != 0)
    Fail("{}: {} Mamba heads do not split into {} groups", where, s.mamba.heads, s.mamba.groups);
  // transformers clamps dt from below at time_step_limit's floor, which NemotronHConfig sets to
  // time_step_min (modeling_nemotron_h.py NemotronHMamba2Mixer); Megatron does not clamp.
  s.mamba.time_step_min = Number(raw, "time_step_min", 0.001);
  s.rms_norm_eps = Number(raw, "layer_norm_epsilon", 1e-5);
  s.mamba.norm_eps = s.rms_norm_eps;
  s.activation = ActivationOf(raw, where);
  if (raw.value("mamba_hidden_act", std::string("silu")) != "silu")
    Fail("{}: mamba_hidden_act '{}' is not modelled (silu)", where, raw["mamba_hidden_act"].dump());
  if (raw.value("use_bias", false) || raw.value("mlp_bias", false))
    Fail("{}: use_bias/mlp_bias: biased linears are not modelled in a hybrid", where);
  // No RoPE: NemotronHAttention never applies one.
  s.layers.assign(types.size(), LayerAttention{at::empty({0}, at::kFloat), 1.0, 0, 0});
  return s;
}

}  // namespace

at::Tensor& LayerWeights::Linear(const std::string& module) {
  if (module == "self_attn.q_proj") return q_proj;
  if (module == "self_attn.k_proj") return k_proj;
  if (module == "self_attn.v_proj") return v_proj;
  if (module == "self_attn.o_proj") return o_proj;
  if (module == "mlp.gate_proj") return gate_proj;
  if (module == "mlp.up_proj") return up_proj;
  if (module == "mlp.down_proj") return down_proj;
  if (const auto it = other_linears.find(module); it != other_linears.end()) return it->second;
  Fail("'{}' is not a linear module of this decoder layer", module);
}

const at::Tensor& LayerWeights::Linear(const std::string& module) const {
  return const_cast<LayerWeights*>(this)->Linear(module);
}

void ForEachWeight(LayerWeights& w, const LlamaSettings& s,
                   const std::function<void(const std::string&, at::Tensor&)>& visit) {
  const auto maybe = [&](const std::string& name, at::Tensor& t) {
    if (t.defined()) visit(name, t);
  };
  for (const std::string linear : kDecoderLinears) maybe(linear + ".weight", w.Linear(linear));
  for (auto& [path, t] : w.other_linears) maybe(path + ".weight", t);
  if (!s.moe.router.empty()) {
    maybe(s.moe.router + ".e_score_correction_bias", w.router_bias);
  }
  for (auto& [path, t] : w.biases) maybe(path + ".bias", t);
  for (auto& [name, t] : w.hybrid_params) maybe(name, t);
  maybe("self_attn.sinks", w.sinks);
  maybe("self_attn.q_a_layernorm.weight", w.q_a_layernorm);
  maybe("self_attn.kv_a_layernorm.weight", w.kv_a_layernorm);
  maybe("input_layernorm.weight", w.input_layernorm);
  maybe("post_attention_layernorm.weight", w.post_attention_layernorm);
  maybe("self_attn.q_proj.bias", w.q_bias);
  maybe("self_attn.k_proj.bias", w.k_bias);
  maybe("self_attn.v_proj.bias", w.v_bias);
  maybe("self_attn.q_norm.weight", w.q_norm);
  maybe("self_attn.k_norm.weight", w.k_norm);
  maybe("pre_feedforward_layernorm.weight", w.pre_feedforward_layernorm);
  maybe("post_feedforward_layernorm.weight", w.post_feedforward_layernorm);
}

std::vector<std::string> AttentionLinearPaths(const LlamaSettings& s) {
  if (!s.mla) return {kDecoderLinears.begin(), kDecoderLinears.begin() + 4};
  std::vector<std::string> paths;
  if (s.mla->q_lora_rank > 0) {
    paths = {"self_attn.q_a_proj", "self_attn.q_b_proj"};
  } else {
    paths = {"self_attn.q_proj"};
  }
  paths.insert(paths.end(),
               {"self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj", "self_attn.o_proj"});
  return paths;
}

std::vector<std::string> DenseMlpPaths() {
  return {kDecoderLinears.begin() + 4, kDecoderLinears.end()};
}

std::vector<std::string> SparseMlpPaths(const LlamaSettings& s) {
  std::vector<std::string> paths;
  if (!s.moe.router.empty()) paths.push_back(s.moe.router);
  for (int64_t e = 0; e < s.moe.experts; ++e) {
    for (const auto& path : s.moe.expert) paths.push_back(convert::ExpertPath(path, e));
  }
  for (const auto& path : s.moe.shared) {
    if (!path.empty()) paths.push_back(path);
  }
  return paths;
}

std::vector<std::string> HybridLinearPaths(HybridBlock block) {
  switch (block) {
    case HybridBlock::kMamba:
      return {"mixer.in_proj", "mixer.out_proj"};
    case HybridBlock::kAttention:
      return {"mixer.q_proj", "mixer.k_proj", "mixer.v_proj", "mixer.o_proj"};
    case HybridBlock::kMlp:
      return {"mixer.up_proj", "mixer.down_proj"};
  }
  return {};
}

std::vector<std::string> DecoderLinearPaths(const LlamaSettings& s) {
  if (!s.hybrid.empty()) {
    std::vector<std::string> paths;
    for (HybridBlock block : {HybridBlock::kMamba, HybridBlock::kAttention, HybridBlock::kMlp}) {
      const auto more = HybridLinearPaths(block);
      paths.insert(paths.end(), more.begin(), more.end());
    }
    return paths;
  }
  std::vector<std::string> paths = AttentionLinearPaths(s);
  for (auto more : {DenseMlpPaths(), SparseMlpPaths(s)}) {
    paths.insert(paths.end(), more.begin(), more.end());
  }
  return paths;
}

LlamaSettings MakeLlamaSettings(const convert::HfModelConfig& config,
                                const convert::ModelFamily& family) {
  convert::RequireVerificationForward(family);
  const convert::ForwardTraits& traits = family.forward;
  LlamaSettings s;
  s.hidden = config.hidden_size;
  s.heads = config.num_attention_heads;
  s.kv_heads = config.num_key_value_heads;
  s.head_dim = config.head_dim;
  const nlohmann::json& raw = config.text();
  const std::string where = config.path.string();
  s.rms_norm_eps = Number(raw, "rms_norm_eps", 1e-6);
  s.norm_weight_offset = traits.norm_weight_offset;
  s.embedding_scale = traits.scale_embedding ? std::sqrt(static_cast<double>(s.hidden)) : 1.0;
  s.attention_scale =
      1.0 / std::sqrt(Number(raw, "query_pre_attn_scalar", static_cast<double>(s.head_dim)));
  if (raw.contains("kv_lora_rank") && !raw["kv_lora_rank"].is_null()) {
    MlaSettings mla;
    const auto dim = [&](const char* key) {
      if (!raw.contains(key) || !raw[key].is_number_integer() || raw[key].get<int64_t>() < 0)
        Fail("{}: multi-latent attention needs '{}' as an integer", where, key);
      return raw[key].get<int64_t>();
    };
    mla.q_lora_rank =
        raw.contains("q_lora_rank") && raw["q_lora_rank"].is_null() ? 0 : dim("q_lora_rank");
    mla.kv_lora_rank = dim("kv_lora_rank");
    mla.qk_nope_head_dim = dim("qk_nope_head_dim");
    mla.qk_rope_head_dim = dim("qk_rope_head_dim");
    mla.v_head_dim = dim("v_head_dim");
    mla.rope_interleave = raw.value("rope_interleave", true);
    if (mla.qk_rope_head_dim != s.head_dim)
      Fail("{}: head_dim {} is not qk_rope_head_dim {}, the dims RoPE turns", where, s.head_dim,
           mla.qk_rope_head_dim);
    s.mla = mla;
    s.attention_scale =
        1.0 / std::sqrt(static_cast<double>(mla.qk_nope_head_dim + mla.qk_rope_head_dim));
  }
  s.layers_prefix = family.hf_layers_prefix;
  s.embedding = traits.embedding;
  s.final_norm = traits.final_norm;
  if (traits.hybrid) return WithHybridLayers(std::move(s), config);
  s.attention_softcap = OptionalNumber(raw, "attn_logit_softcapping");
  s.final_softcap = OptionalNumber(raw, "final_logit_softcapping");
  s.clip_qkv = OptionalNumber(raw, "clip_qkv");
  s.activation = ActivationOf(raw, where);

  // Which layers attend through a sliding window: layer_types where the config has them (Gemma
  // 2/3, and transformers 5's Qwen2/3 and Mistral), else every layer when sliding_window is set
  // and not switched off (Mistral of transformers 4).
  std::vector<std::string> types(static_cast<std::size_t>(config.num_hidden_layers),
                                 "full_attention");
  const std::optional<double> window = OptionalNumber(raw, "sliding_window");
  if (raw.contains("layer_types") && raw["layer_types"].is_array()) {
    if (raw["layer_types"].size() != types.size())
      Fail("{}: layer_types has {} entries for {} layers", where, raw["layer_types"].size(),
           types.size());
    for (std::size_t i = 0; i < types.size(); ++i)
      types[i] = raw["layer_types"][i].get<std::string>();
  } else if (window && raw.value("use_sliding_window", true)) {
    std::fill(types.begin(), types.end(), "sliding_attention");
  }

  // transformers 5 keeps RoPE in rope_parameters, per layer type for Gemma 3; 4 has rope_theta +
  // rope_scaling.
  const nlohmann::json rope = raw.contains("rope_parameters") && raw["rope_parameters"].is_object()
                                  ? raw["rope_parameters"]
                                  : (raw.contains("rope_scaling") && raw["rope_scaling"].is_object()
                                         ? raw["rope_scaling"]
                                         : nlohmann::json::object());
  for (const auto& type : types) {
    if (type != "full_attention" && type != "sliding_attention")
      Fail("{}: layer type '{}' is not supported", where, type);
    const nlohmann::json& params =
        rope.contains(type) && rope[type].is_object() ? rope[type] : rope;
    LayerAttention layer = Rope(params, raw, s.head_dim, where);
    if (type == "sliding_attention") {
      if (!window) Fail("{}: sliding_attention layers but no sliding_window", where);
      layer.window = static_cast<int64_t>(*window);
    }
    s.layers.push_back(std::move(layer));
  }
  // DeepseekV3Attention's yarn_apply_mscale: a non-default RoPE with mscale_all_dim scales the
  // softmax by mscale(factor, mscale_all_dim) squared as well.
  if (s.mla && rope.value("rope_type", std::string("default")) != "default" &&
      Number(rope, "mscale_all_dim", 0) != 0) {
    const double m = YarnMscale(Number(rope, "factor", 1), Number(rope, "mscale_all_dim", 0));
    s.attention_scale *= m * m;
  }

  if (config.num_experts > 0) {
    const convert::ModuleMapping* fc1 = family.FindExperts("linear_fc1");
    const convert::ModuleMapping* fc2 = family.FindExperts("linear_fc2");
    if (traits.moe_router.empty() || fc1 == nullptr || fc2 == nullptr || fc1->hf.size() != 2) {
      Fail(
          "{}: an MoE model ({} experts), but model family '{}' names no router "
          "(forward.moe_router) or no expert linear_fc1 (gate, up) and linear_fc2 (down) modules",
          where, config.num_experts, family.name);
    }
    s.moe.router = traits.moe_router;
    s.moe.expert = {fc1->hf[0].path, fc1->hf[1].path, fc2->hf[0].path};
    s.moe.experts = config.num_experts;
    s.moe.top_k = config.experts_per_token;
    s.moe.normalize_top_k = raw.value("norm_topk_prob", true);
    if (s.moe.top_k > s.moe.experts)
      Fail("{}: num_experts_per_tok {} exceeds the {} experts", where, s.moe.top_k, s.moe.experts);
    s.moe.sigmoid = traits.moe_router_sigmoid;
    if (s.moe.sigmoid) {
      s.moe.groups = static_cast<int64_t>(Number(raw, "n_group", 1));
      s.moe.top_k_groups = static_cast<int64_t>(Number(raw, "topk_group", 1));
      s.moe.routed_scaling = Number(raw, "routed_scaling_factor", 1.0);
      if (s.moe.groups < 1 || s.moe.experts % s.moe.groups != 0 ||
          s.moe.top_k_groups > s.moe.groups)
        Fail("{}: {} experts in n_group {} groups, topk_group {}: expected whole groups", where,
             s.moe.experts, s.moe.groups, s.moe.top_k_groups);
    }
    for (const convert::ModuleMapping* m : family.StoredFusedExperts()) {
      s.moe.fused.push_back(
          {m->fused_parameter,
           m == fc1 ? std::vector<std::size_t>{0, 1} : std::vector<std::size_t>{2},
           m->fused_layout});
    }
    s.moe.clamped_swiglu = traits.moe_clamped_swiglu;
    if (!traits.moe_shared_experts.empty()) {
      s.moe.shared_ffn = static_cast<int64_t>(Number(raw, "n_shared_experts", 1)) *
                         config.expert_intermediate_size;
      const std::string& prefix = traits.moe_shared_experts;
      s.moe.shared = {prefix + ".gate_proj", prefix + ".up_proj", prefix + ".down_proj"};
    }
  }
  return s;
}

std::vector<at::Tensor> SplitFused(const at::Tensor& slice, convert::FusedLayout layout,
                                   std::size_t parts) {
  // Output features first: a bias is [out]; a weight [out, in], or [in, out] stored as x @ W.
  const at::Tensor rows =
      slice.dim() == 1 || layout == convert::FusedLayout::kOutIn ? slice : slice.t();
  const auto n = static_cast<int64_t>(parts);
  const int64_t width = rows.size(0) / n;
  std::vector<at::Tensor> out;
  for (int64_t k = 0; k < n; ++k) {
    out.push_back(layout == convert::FusedLayout::kInOutInterleaved
                      ? rows.slice(0, k, rows.size(0), n)
                      : rows.slice(0, k * width, (k + 1) * width));
  }
  return out;
}

at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps, double offset) {
  const at::Tensor variance = x.to(at::kFloat).pow(2).mean(-1, /*keepdim=*/true);
  const at::Tensor normed = x.to(at::kFloat) * at::rsqrt(variance + eps);
  if (offset != 0) return ((weight.to(at::kFloat) + offset) * normed).to(x.scalar_type());
  return weight * normed.to(x.scalar_type());
}

at::Tensor SoftCap(const at::Tensor& x, const std::optional<double>& cap) {
  return cap ? at::tanh(x / *cap) * *cap : x;
}

at::Tensor Activate(const at::Tensor& x, Activation activation) {
  switch (activation) {
    case Activation::kSilu:
      return at::silu(x);
    case Activation::kGeluTanh:
      return at::gelu(x, "tanh");
    case Activation::kGelu:
      return at::gelu(x);
    case Activation::kRelu2:
      return at::relu(x).square();
  }
  return x;
}

namespace {

at::Tensor RotateHalf(const at::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return at::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
}

// Each token's top-k experts and their weights [tokens, k]. Softmax routers (transformers'
// Qwen3MoeSparseMoeBlock, MixtralSparseMoeBlock): the top-k probabilities, renormalised where the
// model does. Sigmoid routers (DeepseekV3TopkRouter): the choice by score + correction bias,
// within the best groups (each scored by its two best experts), the weights the plain scores,
// renormalised and scaled.
std::pair<at::Tensor, at::Tensor> Route(const at::Tensor& x, const LayerWeights& w,
                                        const MoeSettings& moe) {
  at::Tensor logits = at::matmul(x.to(at::kFloat), w.Linear(moe.router).to(at::kFloat).t());
  if (const at::Tensor bias = w.Bias(moe.router); bias.defined()) logits = logits + bias;
  if (!moe.sigmoid) {
    auto [weights, chosen] = at::softmax(logits, -1).topk(moe.top_k, -1);
    if (moe.normalize_top_k) weights = weights / weights.sum(-1, /*keepdim=*/true);
    return {weights, chosen};
  }
  const at::Tensor scores = logits.sigmoid();
  at::Tensor choice = w.router_bias.defined() ? scores + w.router_bias : scores;
  if (moe.groups > 1) {
    const int64_t tokens = x.size(0), per_group = moe.experts / moe.groups;
    const at::Tensor group_scores =
        std::get<0>(choice.view({tokens, moe.groups, per_group}).topk(2, -1)).sum(-1);
    const at::Tensor best = std::get<1>(group_scores.topk(moe.top_k_groups, -1));
    const at::Tensor keep = at::zeros_like(group_scores)
                                .scatter_(1, best, 1)
                                .unsqueeze(-1)
                                .expand({tokens, moe.groups, per_group})
                                .reshape({tokens, moe.experts})
                                .to(at::kBool);
    choice = choice.masked_fill(keep.logical_not(), -std::numeric_limits<float>::infinity());
  }
  const at::Tensor chosen = std::get<1>(choice.topk(moe.top_k, -1));
  at::Tensor weights = scores.gather(1, chosen);
  if (moe.normalize_top_k) weights = weights / (weights.sum(-1, /*keepdim=*/true) + 1e-20);
  return {weights * moe.routed_scaling, chosen};
}

at::Tensor GatedMlp(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& up,
                    const at::Tensor& down, Activation activation) {
  return at::matmul(Activate(at::matmul(x, gate.t()), activation) * at::matmul(x, up.t()),
                    down.t());
}

at::Tensor Biased(const at::Tensor& y, const at::Tensor& bias) {
  return bias.defined() ? y + bias : y;
}

// Routed expert `e` on its tokens: a gated MLP, with GPT-OSS's biases and clamped SwiGLU where
// the model has them.
at::Tensor Expert(const at::Tensor& x, const LayerWeights& w, const LlamaSettings& s, int64_t e) {
  const auto linear = [&](std::size_t which) {
    const std::string path = convert::ExpertPath(s.moe.expert[which], e);
    return std::pair{w.Linear(path), w.Bias(path)};
  };
  const auto [gate_w, gate_b] = linear(0);
  const auto [up_w, up_b] = linear(1);
  const auto [down_w, down_b] = linear(2);
  at::Tensor gate = Biased(at::matmul(x, gate_w.t()), gate_b);
  at::Tensor up = Biased(at::matmul(x, up_w.t()), up_b);
  at::Tensor hidden;
  if (const auto& clamp = s.moe.clamped_swiglu) {
    gate = gate.clamp_max(clamp->limit);
    up = up.clamp(-clamp->limit, clamp->limit);
    hidden = (up + 1) * gate * at::sigmoid(gate * clamp->alpha);
  } else {
    hidden = Activate(gate, s.activation) * up;
  }
  return Biased(at::matmul(hidden, down_w.t()), down_b);
}

// The routed experts' outputs weighted per token, plus the shared experts' where the model has
// them.
at::Tensor SparseMoe(const at::Tensor& x, const LayerWeights& w, const LlamaSettings& s) {
  auto [weights, chosen] = Route(x, w, s.moe);
  weights = weights.to(x.scalar_type());
  at::Tensor out = at::zeros_like(x);
  for (int64_t e = 0; e < s.moe.experts; ++e) {
    const at::Tensor hit = chosen == e;  // [tokens, k]: at most one true per token
    const at::Tensor tokens = hit.any(-1).nonzero().squeeze(1);
    if (tokens.numel() == 0) continue;
    const at::Tensor weight = (weights * hit).sum(-1).index_select(0, tokens).unsqueeze(1);
    out.index_add_(0, tokens, Expert(x.index_select(0, tokens), w, s, e) * weight);
  }
  if (!s.moe.shared[0].empty()) {
    out = out + GatedMlp(x, w.Linear(s.moe.shared[0]), w.Linear(s.moe.shared[1]),
                         w.Linear(s.moe.shared[2]), s.activation);
  }
  return out;
}

// cos/sin [tokens, dim] of the layer's RoPE, cat(freqs, freqs) as transformers builds them.
std::pair<at::Tensor, at::Tensor> RopeTables(const LayerAttention& attention, int64_t tokens,
                                             const at::TensorOptions& options) {
  const at::Tensor positions = at::arange(tokens, options.dtype(at::kFloat));
  const at::Tensor freqs = at::outer(positions, attention.inv_freq.to(options.device()));
  const at::Tensor emb = at::cat({freqs, freqs}, -1);
  return {(emb.cos() * attention.rope_scaling).to(options.dtype()),
          (emb.sin() * attention.rope_scaling).to(options.dtype())};
}

// Softmax attention of q [heads, tokens, d] over k, v [heads, tokens, *], causal (and within a
// window where the layer has one), each head's sink logit (GPT-OSS; undefined: none) taking its
// share of the softmax; [tokens, heads x v dims].
at::Tensor Attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const LlamaSettings& s, const LayerAttention& attention,
                  const at::Tensor& sinks = at::Tensor()) {
  const int64_t tokens = q.size(1);
  const auto options = q.options();
  at::Tensor scores =
      SoftCap(at::matmul(q, k.transpose(1, 2)) * s.attention_scale, s.attention_softcap);
  at::Tensor hidden_mask = at::ones({tokens, tokens}, options.dtype(at::kBool)).triu(1);
  if (attention.window > 0) {  // a query sees keys q - window < k <= q
    hidden_mask = hidden_mask.logical_or(
        at::ones({tokens, tokens}, options.dtype(at::kBool)).tril(-attention.window));
  }
  scores = scores.masked_fill(hidden_mask, -std::numeric_limits<float>::infinity()).to(at::kFloat);
  at::Tensor probs;
  if (sinks.defined()) {
    const at::Tensor sink = sinks.to(at::kFloat).view({-1, 1, 1}).expand({q.size(0), tokens, 1});
    probs = at::softmax(at::cat({scores, sink}, -1), -1).slice(-1, 0, tokens);
  } else {
    probs = at::softmax(scores, -1);
  }
  probs = probs.to(q.scalar_type());
  return at::matmul(probs, v).transpose(0, 1).reshape({tokens, -1});
}

// DeepseekV3Attention: the latent kv expanded per head, one rope key shared by all heads.
at::Tensor MultiLatentAttention(const at::Tensor& h, const LayerWeights& w, const LlamaSettings& s,
                                const LayerAttention& attention) {
  const MlaSettings& m = *s.mla;
  const int64_t tokens = h.size(0);
  // q_a_layernorm and kv_a_layernorm are built without the config's rms_norm_eps, so they keep
  // DeepseekV3RMSNorm's default.
  constexpr double kLatentNormEps = 1e-6;
  const auto norm = [&](const at::Tensor& t, const at::Tensor& weight) {
    return RmsNorm(t, weight, kLatentNormEps);
  };
  const at::Tensor q_states =
      m.q_lora_rank > 0
          ? at::matmul(norm(at::matmul(h, w.Linear("self_attn.q_a_proj").t()), w.q_a_layernorm),
                       w.Linear("self_attn.q_b_proj").t())
          : at::matmul(h, w.Linear("self_attn.q_proj").t());
  const at::Tensor q =
      q_states.view({tokens, s.heads, m.qk_nope_head_dim + m.qk_rope_head_dim}).transpose(0, 1);
  const at::Tensor latent = at::matmul(h, w.Linear("self_attn.kv_a_proj_with_mqa").t());
  const at::Tensor kv = at::matmul(norm(latent.slice(-1, 0, m.kv_lora_rank), w.kv_a_layernorm),
                                   w.Linear("self_attn.kv_b_proj").t())
                            .view({tokens, s.heads, m.qk_nope_head_dim + m.v_head_dim})
                            .transpose(0, 1);

  auto [cos, sin] = RopeTables(attention, tokens, h.options());
  const auto rotate = [&](const at::Tensor& x) {
    if (!m.rope_interleave) return x * cos + RotateHalf(x) * sin;
    // Pairs (x0, x1), (x2, x3), ... each turned by one frequency, output as [evens'; odds'].
    const int64_t half = x.size(-1) / 2;
    const at::Tensor c = cos.slice(-1, 0, half), sn = sin.slice(-1, 0, half);
    const at::Tensor even = x.slice(-1, 0, x.size(-1), 2), odd = x.slice(-1, 1, x.size(-1), 2);
    return at::cat({even * c - odd * sn, odd * c + even * sn}, -1);
  };
  const at::Tensor q_rot = rotate(q.slice(-1, m.qk_nope_head_dim));
  const at::Tensor k_rot = rotate(latent.slice(-1, m.kv_lora_rank).unsqueeze(0));
  const at::Tensor query = at::cat({q.slice(-1, 0, m.qk_nope_head_dim), q_rot}, -1);
  const at::Tensor key = at::cat(
      {kv.slice(-1, 0, m.qk_nope_head_dim), k_rot.expand({s.heads, tokens, m.qk_rope_head_dim})},
      -1);
  return at::matmul(Attend(query, key, kv.slice(-1, m.qk_nope_head_dim), s, attention),
                    w.Linear("self_attn.o_proj").t());
}

}  // namespace

at::Tensor GroupedQueryAttention(const at::Tensor& h, const LayerWeights& w, const LlamaSettings& s,
                                 const LayerAttention& attention) {
  const int64_t tokens = h.size(0);
  const auto project = [&](const at::Tensor& weight, const at::Tensor& bias, int64_t heads,
                           const at::Tensor& norm) {
    at::Tensor out = at::matmul(h, weight.t());
    if (bias.defined()) out = out + bias;
    // A norm as wide as the projection (OLMoE) comes before the split into heads.
    const bool whole = norm.defined() && norm.numel() == heads * s.head_dim && heads > 1;
    if (whole) out = RmsNorm(out, norm, s.rms_norm_eps, s.norm_weight_offset);
    if (s.clip_qkv) out = out.clamp(-*s.clip_qkv, *s.clip_qkv);
    out = out.view({tokens, heads, s.head_dim});
    if (norm.defined() && !whole) out = RmsNorm(out, norm, s.rms_norm_eps, s.norm_weight_offset);
    return out.transpose(0, 1);
  };
  at::Tensor q = project(w.q_proj, w.q_bias, s.heads, w.q_norm);
  at::Tensor k = project(w.k_proj, w.k_bias, s.kv_heads, w.k_norm);
  at::Tensor v = project(w.v_proj, w.v_bias, s.kv_heads, at::Tensor());
  auto [cos, sin] = RopeTables(attention, tokens, h.options());
  const auto rotate =
      [&](const at::Tensor& x) {  // the leading rotary_dim dims; the rest as they are
        if (attention.rotary_dim == 0) return x;
        const at::Tensor turned = x.slice(-1, 0, attention.rotary_dim);
        const at::Tensor rotated = turned * cos + RotateHalf(turned) * sin;
        return attention.rotary_dim == x.size(-1)
                   ? rotated
                   : at::cat({rotated, x.slice(-1, attention.rotary_dim)}, -1);
      };
  q = rotate(q);
  k = rotate(k);
  const int64_t groups = s.heads / s.kv_heads;
  return Biased(at::matmul(Attend(q, k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0),
                                  s, attention, w.sinks),
                           w.o_proj.t()),
                w.Bias("self_attn.o_proj"));
}

at::Tensor DecoderLayer(const at::Tensor& x, const LayerWeights& w, const LlamaSettings& s,
                        int64_t layer) {
  if (!s.hybrid.empty()) return HybridLayer(x, w, s, layer);
  const LayerAttention& attention = s.layers.at(static_cast<std::size_t>(layer));
  const auto norm = [&](const at::Tensor& t, const at::Tensor& weight) {
    return RmsNorm(t, weight, s.rms_norm_eps, s.norm_weight_offset);
  };

  const at::Tensor h = norm(x, w.input_layernorm);
  at::Tensor attended =
      s.mla ? MultiLatentAttention(h, w, s, attention) : GroupedQueryAttention(h, w, s, attention);
  const bool sandwich = w.pre_feedforward_layernorm.defined();
  if (sandwich) attended = norm(attended, w.post_attention_layernorm);
  const at::Tensor after_attention = x + attended;

  // Gated MLP (SwiGLU, GeGLU), or a sparse MoE of them.
  const at::Tensor m =
      norm(after_attention, sandwich ? w.pre_feedforward_layernorm : w.post_attention_layernorm);
  at::Tensor mlp = w.Sparse(s.moe) ? SparseMoe(m, w, s)
                                   : GatedMlp(m, w.gate_proj, w.up_proj, w.down_proj, s.activation);
  if (sandwich) mlp = norm(mlp, w.post_feedforward_layernorm);
  return after_attention + mlp;
}

}  // namespace adapter_job::verify
