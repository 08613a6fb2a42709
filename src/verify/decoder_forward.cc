// Follows
// transformers/models/{llama,qwen2,qwen3,gemma,gemma2,gemma3,qwen3_moe,mixtral}/modeling_*.py and
// modeling_rope_utils.py (_compute_default_rope_parameters, _compute_llama3_parameters,
// _compute_linear_scaling_rope_parameters).
#include "decoder_forward.h"

#include <cmath>

#include "adapter_job/core/error.h"

namespace adapter_job::verify {
namespace {

double Number(const nlohmann::json& j, const char* key, double fallback) {
  return j.contains(key) && j[key].is_number() ? j[key].get<double>() : fallback;
}

std::optional<double> OptionalNumber(const nlohmann::json& j, const char* key) {
  if (j.contains(key) && j[key].is_number()) return j[key].get<double>();
  return std::nullopt;
}

// inv_freq and the cos/sin scaling of one RoPE parameter set.
LayerAttention Rope(const nlohmann::json& rope, const nlohmann::json& raw, int64_t dim,
                    const std::string& where) {
  const double theta = Number(rope, "rope_theta", Number(raw, "rope_theta", 10000.0));
  const std::string type = rope.value("rope_type", rope.value("type", std::string("default")));
  const double partial =
      Number(rope, "partial_rotary_factor", Number(raw, "partial_rotary_factor", 1.0));
  if (partial != 1.0) Fail("{}: partial_rotary_factor {} is not supported", where, partial);

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
  } else if (type != "default") {
    Fail("{}: rope type '{}' is not supported (default, linear, llama3)", where, type);
  }
  return {inv_freq, 1.0, 0};
}

Activation ActivationOf(const nlohmann::json& raw, const std::string& where) {
  std::string name = "silu";
  for (const char* key : {"hidden_activation", "hidden_act"}) {
    if (raw.contains(key) && raw[key].is_string()) {
      name = raw[key].get<std::string>();
      break;
    }
  }
  if (name == "silu" || name == "swish") return Activation::kSilu;
  if (name == "gelu_pytorch_tanh" || name == "gelu_new" || name == "gelu_fast")
    return Activation::kGeluTanh;
  if (name == "gelu") return Activation::kGelu;
  Fail("{}: activation '{}' is not supported (silu, gelu, gelu_pytorch_tanh)", where, name);
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
  if (const auto it = expert_linears.find(module); it != expert_linears.end()) return it->second;
  Fail("'{}' is not a linear module of this decoder layer", module);
}

void ForEachWeight(LayerWeights& w, const LlamaSettings& s,
                   const std::function<void(const std::string&, at::Tensor&)>& visit) {
  const auto maybe = [&](const std::string& name, at::Tensor& t) {
    if (t.defined()) visit(name, t);
  };
  for (const std::string linear : kDecoderLinears) maybe(linear + ".weight", w.Linear(linear));
  for (auto& [path, t] : w.expert_linears) maybe(path + ".weight", t);
  if (!s.moe.router.empty()) maybe(s.moe.router + ".weight", w.router);
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

std::vector<std::string> DecoderLinearPaths(const LlamaSettings& s) {
  std::vector<std::string> paths(kDecoderLinears.begin(), kDecoderLinears.end());
  for (int64_t e = 0; e < s.moe.experts; ++e) {
    for (const auto& path : s.moe.expert) paths.push_back(convert::ExpertPath(path, e));
  }
  return paths;
}

LlamaSettings MakeLlamaSettings(const convert::HfModelConfig& config,
                                const convert::ModelFamily& family) {
  const convert::ForwardTraits& traits = family.forward;
  LlamaSettings s;
  s.hidden = config.hidden_size;
  s.heads = config.num_attention_heads;
  s.kv_heads = config.num_key_value_heads;
  s.head_dim = config.head_dim;
  const auto& raw = config.raw.contains("text_config") && !config.raw.contains("hidden_size")
                        ? config.raw["text_config"]
                        : config.raw;
  const std::string where = config.path.string();
  s.rms_norm_eps = Number(raw, "rms_norm_eps", 1e-6);
  s.norm_weight_offset = traits.norm_weight_offset;
  s.embedding_scale = traits.scale_embedding ? std::sqrt(static_cast<double>(s.hidden)) : 1.0;
  s.attention_scale =
      1.0 / std::sqrt(Number(raw, "query_pre_attn_scalar", static_cast<double>(s.head_dim)));
  s.attention_softcap = OptionalNumber(raw, "attn_logit_softcapping");
  s.final_softcap = OptionalNumber(raw, "final_logit_softcapping");
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
  }
  return s;
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

namespace {

at::Tensor RotateHalf(const at::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return at::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
}

at::Tensor Activate(const at::Tensor& x, Activation activation) {
  switch (activation) {
    case Activation::kSilu:
      return at::silu(x);
    case Activation::kGeluTanh:
      return at::gelu(x, "tanh");
    case Activation::kGelu:
      return at::gelu(x);
  }
  return x;
}

// Each token's top-k experts by softmax router probability, their outputs weighted by those
// probabilities (renormalised to sum to one where the model does), as transformers'
// Qwen3MoeSparseMoeBlock and MixtralSparseMoeBlock compute them.
at::Tensor SparseMoe(const at::Tensor& x, const LayerWeights& w, const LlamaSettings& s) {
  const at::Tensor probs = at::softmax(at::matmul(x, w.router.t()).to(at::kFloat), -1);
  auto [weights, chosen] = probs.topk(s.moe.top_k, -1);
  if (s.moe.normalize_top_k) weights = weights / weights.sum(-1, /*keepdim=*/true);
  weights = weights.to(x.scalar_type());
  at::Tensor out = at::zeros_like(x);
  for (int64_t e = 0; e < s.moe.experts; ++e) {
    const at::Tensor hit = chosen == e;  // [tokens, k]: at most one true per token
    const at::Tensor tokens = hit.any(-1).nonzero().squeeze(1);
    if (tokens.numel() == 0) continue;
    const auto linear = [&](std::size_t which) {
      return w.expert_linears.at(convert::ExpertPath(s.moe.expert[which], e));
    };
    const at::Tensor in = x.index_select(0, tokens);
    const at::Tensor gated =
        Activate(at::matmul(in, linear(0).t()), s.activation) * at::matmul(in, linear(1).t());
    const at::Tensor weight = (weights * hit).sum(-1).index_select(0, tokens).unsqueeze(1);
    out.index_add_(0, tokens, at::matmul(gated, linear(2).t()) * weight);
  }
  return out;
}

}  // namespace

at::Tensor DecoderLayer(const at::Tensor& x, const LayerWeights& w, const LlamaSettings& s,
                        int64_t layer) {
  const LayerAttention& attention = s.layers.at(static_cast<std::size_t>(layer));
  const int64_t tokens = x.size(0);
  const auto options = x.options();
  const auto norm = [&](const at::Tensor& t, const at::Tensor& weight) {
    return RmsNorm(t, weight, s.rms_norm_eps, s.norm_weight_offset);
  };

  // Attention.
  const at::Tensor h = norm(x, w.input_layernorm);
  const auto project = [&](const at::Tensor& weight, const at::Tensor& bias, int64_t heads,
                           const at::Tensor& head_norm) {
    at::Tensor out = at::matmul(h, weight.t());
    if (bias.defined()) out = out + bias;
    out = out.view({tokens, heads, s.head_dim});
    if (head_norm.defined()) out = norm(out, head_norm);
    return out.transpose(0, 1);
  };
  at::Tensor q = project(w.q_proj, w.q_bias, s.heads, w.q_norm);
  at::Tensor k = project(w.k_proj, w.k_bias, s.kv_heads, w.k_norm);
  at::Tensor v = project(w.v_proj, w.v_bias, s.kv_heads, at::Tensor());

  const at::Tensor positions = at::arange(tokens, options.dtype(at::kFloat));
  const at::Tensor freqs = at::outer(positions, attention.inv_freq.to(x.device()));
  const at::Tensor emb = at::cat({freqs, freqs}, -1);
  const at::Tensor cos = (emb.cos() * attention.rope_scaling).to(x.scalar_type());
  const at::Tensor sin = (emb.sin() * attention.rope_scaling).to(x.scalar_type());
  q = q * cos + RotateHalf(q) * sin;
  k = k * cos + RotateHalf(k) * sin;

  const int64_t groups = s.heads / s.kv_heads;
  k = k.repeat_interleave(groups, 0);
  v = v.repeat_interleave(groups, 0);
  at::Tensor scores =
      SoftCap(at::matmul(q, k.transpose(1, 2)) * s.attention_scale, s.attention_softcap);
  at::Tensor hidden_mask = at::ones({tokens, tokens}, options.dtype(at::kBool)).triu(1);
  if (attention.window > 0) {  // a query sees keys q - window < k <= q
    hidden_mask = hidden_mask.logical_or(
        at::ones({tokens, tokens}, options.dtype(at::kBool)).tril(-attention.window));
  }
  scores = scores.masked_fill(hidden_mask, -std::numeric_limits<float>::infinity());
  const at::Tensor probs = at::softmax(scores.to(at::kFloat), -1).to(x.scalar_type());
  at::Tensor attended = at::matmul(
      at::matmul(probs, v).transpose(0, 1).reshape({tokens, s.heads * s.head_dim}), w.o_proj.t());
  const bool sandwich = w.pre_feedforward_layernorm.defined();
  if (sandwich) attended = norm(attended, w.post_attention_layernorm);
  const at::Tensor after_attention = x + attended;

  // Gated MLP (SwiGLU, GeGLU), or a sparse MoE of them.
  const at::Tensor m =
      norm(after_attention, sandwich ? w.pre_feedforward_layernorm : w.post_attention_layernorm);
  at::Tensor mlp;
  if (w.router.defined()) {
    mlp = SparseMoe(m, w, s);
  } else {
    const at::Tensor gated =
        Activate(at::matmul(m, w.gate_proj.t()), s.activation) * at::matmul(m, w.up_proj.t());
    mlp = at::matmul(gated, w.down_proj.t());
  }
  if (sandwich) mlp = norm(mlp, w.post_feedforward_layernorm);
  return after_attention + mlp;
}

}  // namespace adapter_job::verify
