// Follows transformers/models/nemotron_h/modeling_nemotron_h.py (5.17): NemotronHBlock,
// NemotronHMamba2Mixer.torch_forward with its reference causal_conv1d and chunk scan (whose
// result the chunking does not change), MambaRMSNormGated (norm_before_gate=False, per group),
// NemotronHAttention (no RoPE) and NemotronHMLP (down(relu(up(x))^2)).
#include "hybrid_forward.h"

#include "adapter_job/core/error.h"

namespace adapter_job::verify {
namespace {

const at::Tensor& Param(const LayerWeights& w, const std::string& name) {
  const auto it = w.hybrid_params.find(name);
  if (it == w.hybrid_params.end()) Fail("the hybrid layer has no weight '{}'", name);
  return it->second;
}

}  // namespace

at::Tensor Mamba2Mixer(const at::Tensor& h, const LayerWeights& w, const Mamba2Settings& m) {
  const int64_t tokens = h.size(0);
  const int64_t inner = m.inner();
  const int64_t group_state = m.groups * m.state;
  const int64_t conv_channels = inner + 2 * group_state;
  const at::Tensor projected = at::matmul(h, w.Linear("mixer.in_proj").t());
  const at::Tensor z = projected.slice(1, 0, inner);
  const at::Tensor xbc = projected.slice(1, inner, inner + conv_channels);
  const at::Tensor dt_raw =
      projected.slice(1, inner + conv_channels, inner + conv_channels + m.heads);

  // Depthwise causal conv: each channel sees its last conv_kernel values, zeros before the start.
  const at::Tensor padded =
      at::constant_pad_nd(xbc.t().unsqueeze(0), {m.conv_kernel - 1, 0});  // [1, channels, time]
  const at::Tensor& conv_bias =
      w.hybrid_params.contains("mixer.conv1d.bias") ? Param(w, "mixer.conv1d.bias") : at::Tensor();
  const at::Tensor conv = at::silu(
      at::conv1d(padded, Param(w, "mixer.conv1d.weight"), conv_bias, /*stride=*/{1},
                 /*padding=*/at::IntArrayRef{0}, /*dilation=*/{1}, /*groups=*/conv_channels)
          .squeeze(0)
          .t());  // [tokens, channels]
  const at::Tensor xs = conv.slice(1, 0, inner).view({tokens, m.heads, m.head_dim});
  // Each group's B and C serve its heads, which are contiguous (repeat_interleave).
  const int64_t heads_per_group = m.heads / m.groups;
  const at::Tensor b = conv.slice(1, inner, inner + group_state)
                           .view({tokens, m.groups, m.state})
                           .repeat_interleave(heads_per_group, 1);
  const at::Tensor c = conv.slice(1, inner + group_state, conv_channels)
                           .view({tokens, m.groups, m.state})
                           .repeat_interleave(heads_per_group, 1);
  const at::Tensor a = -at::exp(Param(w, "mixer.A_log"));
  const at::Tensor dt = at::softplus(dt_raw + Param(w, "mixer.dt_bias"))
                            .clamp_min(m.time_step_min);  // [tokens, heads]
  const at::Tensor decay = at::exp(dt * a);               // [tokens, heads]
  const at::Tensor dt_x = (dt.unsqueeze(-1) * xs);        // [tokens, heads, head_dim]

  // state_t = state_{t-1} * exp(dt_t A) + dt_t x_t (x) B_t;  y_t = state_t C_t + D x_t.
  at::Tensor state = at::zeros({m.heads, m.head_dim, m.state}, h.options());
  std::vector<at::Tensor> outputs;
  outputs.reserve(static_cast<std::size_t>(tokens));
  for (int64_t t = 0; t < tokens; ++t) {
    state = state * decay[t].view({m.heads, 1, 1}) + dt_x[t].unsqueeze(-1) * b[t].unsqueeze(1);
    outputs.push_back(at::matmul(state, c[t].unsqueeze(-1)).squeeze(-1));
  }
  const at::Tensor y = (at::stack(outputs) + Param(w, "mixer.D").view({1, m.heads, 1}) * xs)
                           .reshape({tokens, inner});

  // Gated, then RMS-normalised within each group of inner / groups channels.
  const at::Tensor gated = (y * at::silu(z)).view({tokens, m.groups, inner / m.groups});
  const at::Tensor normed =
      (gated * at::rsqrt(gated.square().mean(-1, /*keepdim=*/true) + m.norm_eps))
          .reshape({tokens, inner}) *
      Param(w, "mixer.norm.weight");
  return at::matmul(normed, w.Linear("mixer.out_proj").t());
}

at::Tensor HybridLayer(const at::Tensor& x, const LayerWeights& w, const LlamaSettings& s,
                       int64_t layer) {
  const at::Tensor h = RmsNorm(x, Param(w, "norm.weight"), s.rms_norm_eps);
  switch (s.hybrid.at(static_cast<std::size_t>(layer))) {
    case HybridBlock::kMamba:
      return x + Mamba2Mixer(h, w, s.mamba);
    case HybridBlock::kAttention: {
      LayerWeights attention;
      attention.q_proj = w.Linear("mixer.q_proj");
      attention.k_proj = w.Linear("mixer.k_proj");
      attention.v_proj = w.Linear("mixer.v_proj");
      attention.o_proj = w.Linear("mixer.o_proj");
      return x +
             GroupedQueryAttention(h, attention, s, s.layers.at(static_cast<std::size_t>(layer)));
    }
    case HybridBlock::kMlp: {
      const at::Tensor up = at::matmul(h, w.Linear("mixer.up_proj").t());
      return x + at::matmul(Activate(up, s.activation), w.Linear("mixer.down_proj").t());
    }
  }
  return x;
}

}  // namespace adapter_job::verify
