// A Llama-family forward pass in libtorch, one decoder layer at a time, matching transformers'
// LlamaForCausalLM: RMSNorm, RoPE (default and Llama-3 scaling), GQA attention, SwiGLU MLP; with
// Qwen2's q/k/v biases and Qwen3's per-head q/k RMSNorm when the weights have them.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <string>

#include "adapter_job/convert/hf_config.h"

namespace adapter_job::verify {

struct LlamaSettings {
  int64_t hidden = 0;
  int64_t heads = 0;
  int64_t kv_heads = 0;
  int64_t head_dim = 0;
  double rms_norm_eps = 1e-6;
  at::Tensor inv_freq;  // [head_dim / 2], float32
  double attention_scaling = 1.0;
};

// Reads rms_norm_eps and the RoPE parameters (transformers 5 `rope_parameters` or 4's
// `rope_theta`/`rope_scaling`) from the config; throws for rope types other than default/llama3.
LlamaSettings MakeLlamaSettings(const convert::HfModelConfig& config);

// The linear modules of a decoder layer, by their HF paths.
inline constexpr std::array<const char*, 7> kDecoderLinears = {
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj"};

// The linear weights of one decoder layer ([out, in], as in HF) and its two norms; the optional
// ones are undefined tensors when the model has none.
struct LayerWeights {
  at::Tensor q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj;
  at::Tensor input_layernorm, post_attention_layernorm;
  at::Tensor q_bias, k_bias, v_bias;  // Qwen2
  at::Tensor q_norm, k_norm;          // Qwen3: RMSNorm over each head's dims

  at::Tensor& Linear(const std::string& module);  // "self_attn.q_proj" -> q_proj
};

at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps);

// x: [tokens, hidden] -> [tokens, hidden]; causal attention over positions 0..tokens-1.
at::Tensor DecoderLayer(const at::Tensor& x, const LayerWeights& w, const LlamaSettings& s);

}  // namespace adapter_job::verify
