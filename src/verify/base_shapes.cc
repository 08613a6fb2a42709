#include "base_shapes.h"

#include <fmt/format.h>

#include "adapter_job/core/error.h"
#include "adapter_job/core/tensor.h"

namespace adapter_job::verify {
namespace {

void Expect(const HfWeights& base, const std::string& name, const std::vector<int64_t>& expected,
            const convert::HfModelConfig& config, std::string_view why) {
  const std::vector<int64_t> shape = base.Shape(name);
  if (shape != expected) {
    Fail("{}: tensor '{}' has shape {}, but {} implies {} ({})", base.FileOf(name).string(), name,
         ShapeToString(shape), config.path.string(), ShapeToString(expected), why);
  }
}

// Nemotron-H's layers (transformers NemotronHMamba2Mixer, NemotronHAttention, NemotronHMLP).
void CheckHybridLayers(const HfWeights& base, const convert::HfModelConfig& config,
                       const LlamaSettings& s) {
  const int64_t hidden = config.hidden_size;
  const int64_t query = s.heads * s.head_dim;
  const int64_t key_value = s.kv_heads * s.head_dim;
  const int64_t ffn = config.intermediate_size;
  const Mamba2Settings& m = s.mamba;
  const int64_t inner = m.inner(), group_state = m.groups * m.state;
  for (int64_t layer = 0; layer < std::ssize(s.hybrid); ++layer) {
    const std::string p = fmt::format("{}.{}.", s.layers_prefix, layer);
    const auto expect = [&](const std::string& name, std::vector<int64_t> shape,
                            std::string_view why) { Expect(base, p + name, shape, config, why); };
    expect("norm.weight", {hidden}, "[hidden_size]");
    switch (s.hybrid[static_cast<std::size_t>(layer)]) {
      case HybridBlock::kMamba:
        expect("mixer.in_proj.weight", {2 * inner + 2 * group_state + m.heads, hidden},
               "[2 x heads x head_dim + 2 x n_groups x ssm_state_size + heads, hidden_size]");
        expect("mixer.conv1d.weight", {inner + 2 * group_state, 1, m.conv_kernel},
               "[heads x head_dim + 2 x n_groups x ssm_state_size, 1, conv_kernel]");
        if (base.Has(p + "mixer.conv1d.bias"))
          expect("mixer.conv1d.bias", {inner + 2 * group_state}, "[conv channels]");
        for (const char* name : {"mixer.A_log", "mixer.D", "mixer.dt_bias"})
          expect(name, {m.heads}, "[mamba_num_heads]");
        expect("mixer.norm.weight", {inner}, "[mamba_num_heads x mamba_head_dim]");
        expect("mixer.out_proj.weight", {hidden, inner},
               "[hidden_size, mamba_num_heads x mamba_head_dim]");
        break;
      case HybridBlock::kAttention:
        expect("mixer.q_proj.weight", {query, hidden}, "[heads x head_dim, hidden_size]");
        expect("mixer.k_proj.weight", {key_value, hidden}, "[kv heads x head_dim, hidden_size]");
        expect("mixer.v_proj.weight", {key_value, hidden}, "[kv heads x head_dim, hidden_size]");
        expect("mixer.o_proj.weight", {hidden, query}, "[hidden_size, heads x head_dim]");
        break;
      case HybridBlock::kMlp:
        expect("mixer.up_proj.weight", {ffn, hidden}, "[intermediate_size, hidden_size]");
        expect("mixer.down_proj.weight", {hidden, ffn}, "[hidden_size, intermediate_size]");
        break;
    }
  }
}

}  // namespace

void CheckBaseShapes(const HfWeights& base, const convert::HfModelConfig& config,
                     const LlamaSettings& s) {
  const int64_t hidden = config.hidden_size;
  const int64_t query = s.heads * s.head_dim;
  const int64_t key_value = s.kv_heads * s.head_dim;
  const int64_t ffn = config.intermediate_size;
  const int64_t expert_ffn = config.expert_intermediate_size;
  const int64_t vocab = config.vocab_size;
  Expect(base, s.embedding, {vocab, hidden}, config, "[vocab_size, hidden_size]");
  Expect(base, s.final_norm, {hidden}, config, "[hidden_size]");
  if (base.Has("lm_head.weight") && !config.tie_word_embeddings)
    Expect(base, "lm_head.weight", {vocab, hidden}, config, "[vocab_size, hidden_size]");
  if (!s.hybrid.empty()) return CheckHybridLayers(base, config, s);

  for (int64_t layer = 0; layer < config.num_hidden_layers; ++layer) {
    const std::string p = fmt::format("{}.{}.", s.layers_prefix, layer);
    const auto expect = [&](const std::string& module, std::vector<int64_t> shape,
                            std::string_view why) { Expect(base, p + module, shape, config, why); };
    const auto optional = [&](const std::string& module, std::vector<int64_t> shape,
                              std::string_view why) {
      if (base.Has(p + module)) expect(module, std::move(shape), why);
    };
    if (s.mla) {
      // transformers' DeepseekV3Attention.
      const MlaSettings& m = *s.mla;
      const int64_t q_heads = s.heads * (m.qk_nope_head_dim + m.qk_rope_head_dim);
      if (m.q_lora_rank > 0) {
        expect("self_attn.q_a_proj.weight", {m.q_lora_rank, hidden}, "[q_lora_rank, hidden_size]");
        expect("self_attn.q_a_layernorm.weight", {m.q_lora_rank}, "[q_lora_rank]");
        expect("self_attn.q_b_proj.weight", {q_heads, m.q_lora_rank},
               "[heads x (qk_nope_head_dim + qk_rope_head_dim), q_lora_rank]");
      } else {
        expect("self_attn.q_proj.weight", {q_heads, hidden},
               "[heads x (qk_nope_head_dim + qk_rope_head_dim), hidden_size]");
      }
      expect("self_attn.kv_a_proj_with_mqa.weight", {m.kv_lora_rank + m.qk_rope_head_dim, hidden},
             "[kv_lora_rank + qk_rope_head_dim, hidden_size]");
      expect("self_attn.kv_a_layernorm.weight", {m.kv_lora_rank}, "[kv_lora_rank]");
      expect("self_attn.kv_b_proj.weight",
             {s.heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank},
             "[heads x (qk_nope_head_dim + v_head_dim), kv_lora_rank]");
      expect("self_attn.o_proj.weight", {hidden, s.heads * m.v_head_dim},
             "[hidden_size, heads x v_head_dim]");
    } else {
      expect("self_attn.q_proj.weight", {query, hidden}, "[heads x head_dim, hidden_size]");
      expect("self_attn.k_proj.weight", {key_value, hidden}, "[kv heads x head_dim, hidden_size]");
      expect("self_attn.v_proj.weight", {key_value, hidden}, "[kv heads x head_dim, hidden_size]");
      expect("self_attn.o_proj.weight", {hidden, query}, "[hidden_size, heads x head_dim]");
    }
    optional("self_attn.q_proj.bias", {query}, "[heads x head_dim]");
    optional("self_attn.k_proj.bias", {key_value}, "[kv heads x head_dim]");
    optional("self_attn.v_proj.bias", {key_value}, "[kv heads x head_dim]");
    optional("self_attn.o_proj.bias", {hidden}, "[hidden_size]");
    optional("self_attn.sinks", {s.heads}, "[heads]");
    // Per head (Qwen3, Gemma 3), or over the whole projection (OLMoE).
    const auto head_or_whole = [&](const char* name, int64_t whole) {
      if (base.Has(p + name) && base.Shape(p + name) != std::vector<int64_t>{whole})
        expect(name, {s.head_dim}, "[head_dim], or the whole projection's width");
    };
    head_or_whole("self_attn.q_norm.weight", query);
    head_or_whole("self_attn.k_norm.weight", key_value);
    expect("input_layernorm.weight", {hidden}, "[hidden_size]");
    expect("post_attention_layernorm.weight", {hidden}, "[hidden_size]");
    optional("pre_feedforward_layernorm.weight", {hidden}, "[hidden_size]");
    optional("post_feedforward_layernorm.weight", {hidden}, "[hidden_size]");
    // As LoadLayer decides: a layer with a router is sparse.
    if (!s.moe.router.empty() && base.Has(p + s.moe.router + ".weight")) {
      expect(s.moe.router + ".weight", {s.moe.experts, hidden}, "[experts, hidden_size]");
      optional(s.moe.router + ".bias", {s.moe.experts}, "[experts]");
      for (const FusedExperts& f : s.moe.fused) {  // GPT-OSS
        const bool up = f.linears.size() == 2;     // gate and up; else down
        const int64_t in = up ? hidden : expert_ffn;
        const int64_t out = up ? 2 * expert_ffn : hidden;
        if (f.layout == convert::FusedLayout::kOutIn) {
          expect(f.parameter, {s.moe.experts, out, in}, "[experts, out features, in features]");
        } else {
          expect(f.parameter, {s.moe.experts, in, out}, "[experts, in features, out features]");
        }
        optional(f.parameter + "_bias", {s.moe.experts, out}, "[experts, out features]");
      }
      for (int64_t e = 0; e < s.moe.experts && s.moe.fused.empty(); ++e) {
        const auto path = [&](std::size_t i) { return convert::ExpertPath(s.moe.expert[i], e); };
        expect(path(0) + ".weight", {expert_ffn, hidden}, "[expert ffn, hidden_size]");
        expect(path(1) + ".weight", {expert_ffn, hidden}, "[expert ffn, hidden_size]");
        expect(path(2) + ".weight", {hidden, expert_ffn}, "[hidden_size, expert ffn]");
      }
      if (!s.moe.shared[0].empty()) {  // DeepseekV3MoE's shared experts: one wider MLP
        const int64_t f = s.moe.shared_ffn;
        const char* why = "[n_shared_experts x moe_intermediate_size, hidden_size]";
        expect(s.moe.shared[0] + ".weight", {f, hidden}, why);
        expect(s.moe.shared[1] + ".weight", {f, hidden}, why);
        expect(s.moe.shared[2] + ".weight", {hidden, f},
               "[hidden_size, n_shared_experts x moe_intermediate_size]");
      }
      if (s.moe.sigmoid)
        optional(s.moe.router + ".e_score_correction_bias", {s.moe.experts}, "[experts]");
    } else {
      expect("mlp.gate_proj.weight", {ffn, hidden}, "[intermediate_size, hidden_size]");
      expect("mlp.up_proj.weight", {ffn, hidden}, "[intermediate_size, hidden_size]");
      expect("mlp.down_proj.weight", {hidden, ffn}, "[hidden_size, intermediate_size]");
    }
  }
}

}  // namespace adapter_job::verify
