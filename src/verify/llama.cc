// Follows transformers/models/llama/modeling_llama.py and modeling_rope_utils.py
// (_compute_default_rope_parameters, _compute_llama3_parameters).
#include "llama.h"

#include <cmath>

#include "adapter_job/core/error.h"

namespace adapter_job::verify {
namespace {

double Number(const nlohmann::json& j, const char* key, double fallback) {
  return j.contains(key) && j[key].is_number() ? j[key].get<double>() : fallback;
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
  Fail("'{}' is not a linear module of a Llama decoder layer", module);
}

LlamaSettings MakeLlamaSettings(const convert::HfModelConfig& config) {
  LlamaSettings s;
  s.hidden = config.hidden_size;
  s.heads = config.num_attention_heads;
  s.kv_heads = config.num_key_value_heads;
  s.head_dim = config.head_dim;
  const auto& raw = config.raw;
  s.rms_norm_eps = Number(raw, "rms_norm_eps", 1e-6);

  // transformers 5 keeps everything in rope_parameters; 4 has rope_theta + rope_scaling.
  nlohmann::json rope = raw.contains("rope_parameters") && raw["rope_parameters"].is_object()
                            ? raw["rope_parameters"]
                            : (raw.contains("rope_scaling") && raw["rope_scaling"].is_object()
                                   ? raw["rope_scaling"]
                                   : nlohmann::json::object());
  const double theta = Number(rope, "rope_theta", Number(raw, "rope_theta", 10000.0));
  std::string type = rope.value("rope_type", rope.value("type", std::string("default")));
  if (raw.value("use_sliding_window", false))
    Fail("{}: use_sliding_window is not supported by verification", config.path.string());
  const double partial =
      Number(rope, "partial_rotary_factor", Number(raw, "partial_rotary_factor", 1.0));
  if (partial != 1.0)
    Fail("{}: partial_rotary_factor {} is not supported", config.path.string(), partial);

  const int64_t dim = s.head_dim;
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
  } else if (type != "default") {
    Fail("{}: rope type '{}' is not supported (default, llama3)", config.path.string(), type);
  }
  s.inv_freq = inv_freq;
  return s;
}

at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const at::Tensor variance = x.to(at::kFloat).pow(2).mean(-1, /*keepdim=*/true);
  return weight * (x.to(at::kFloat) * at::rsqrt(variance + eps)).to(x.scalar_type());
}

namespace {

at::Tensor RotateHalf(const at::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return at::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
}

}  // namespace

at::Tensor DecoderLayer(const at::Tensor& x, const LayerWeights& w, const LlamaSettings& s) {
  using at::indexing::Slice;
  const int64_t tokens = x.size(0);
  const auto options = x.options();

  // Attention.
  const at::Tensor h = RmsNorm(x, w.input_layernorm, s.rms_norm_eps);
  const auto project = [&](const at::Tensor& weight, const at::Tensor& bias, int64_t heads,
                           const at::Tensor& norm) {
    at::Tensor out = at::matmul(h, weight.t());
    if (bias.defined()) out = out + bias;
    out = out.view({tokens, heads, s.head_dim});
    if (norm.defined()) out = RmsNorm(out, norm, s.rms_norm_eps);
    return out.transpose(0, 1);
  };
  at::Tensor q = project(w.q_proj, w.q_bias, s.heads, w.q_norm);
  at::Tensor k = project(w.k_proj, w.k_bias, s.kv_heads, w.k_norm);
  at::Tensor v = project(w.v_proj, w.v_bias, s.kv_heads, at::Tensor());

  const at::Tensor positions = at::arange(tokens, options.dtype(at::kFloat));
  const at::Tensor freqs = at::outer(positions, s.inv_freq.to(x.device()));
  const at::Tensor emb = at::cat({freqs, freqs}, -1);
  const at::Tensor cos = (emb.cos() * s.attention_scaling).to(x.scalar_type());
  const at::Tensor sin = (emb.sin() * s.attention_scaling).to(x.scalar_type());
  q = q * cos + RotateHalf(q) * sin;
  k = k * cos + RotateHalf(k) * sin;

  const int64_t groups = s.heads / s.kv_heads;
  k = k.repeat_interleave(groups, 0);
  v = v.repeat_interleave(groups, 0);
  at::Tensor scores = at::matmul(q, k.transpose(1, 2)) / std::sqrt(static_cast<double>(s.head_dim));
  const at::Tensor future = at::ones({tokens, tokens}, options.dtype(at::kBool)).triu(1);
  scores = scores.masked_fill(future, -std::numeric_limits<float>::infinity());
  const at::Tensor probs = at::softmax(scores.to(at::kFloat), -1).to(x.scalar_type());
  const at::Tensor attended =
      at::matmul(probs, v).transpose(0, 1).reshape({tokens, s.heads * s.head_dim});
  const at::Tensor after_attention = x + at::matmul(attended, w.o_proj.t());

  // SwiGLU MLP.
  const at::Tensor m = RmsNorm(after_attention, w.post_attention_layernorm, s.rms_norm_eps);
  const at::Tensor gated = at::silu(at::matmul(m, w.gate_proj.t())) * at::matmul(m, w.up_proj.t());
  return after_attention + at::matmul(gated, w.down_proj.t());
}

}  // namespace adapter_job::verify
