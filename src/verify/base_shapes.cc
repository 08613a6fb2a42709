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

}  // namespace

void CheckBaseShapes(const HfWeights& base, const convert::HfModelConfig& config,
                     const LlamaSettings& s) {
  const int64_t hidden = config.hidden_size;
  const int64_t query = s.heads * s.head_dim;
  const int64_t key_value = s.kv_heads * s.head_dim;
  const int64_t ffn = config.intermediate_size;
  const int64_t expert_ffn = config.expert_intermediate_size;
  const int64_t vocab = config.vocab_size;
  Expect(base, "model.embed_tokens.weight", {vocab, hidden}, config, "[vocab_size, hidden_size]");
  Expect(base, "model.norm.weight", {hidden}, config, "[hidden_size]");
  if (base.Has("lm_head.weight") && !config.tie_word_embeddings)
    Expect(base, "lm_head.weight", {vocab, hidden}, config, "[vocab_size, hidden_size]");

  for (int64_t layer = 0; layer < config.num_hidden_layers; ++layer) {
    const std::string p = fmt::format("model.layers.{}.", layer);
    const auto expect = [&](const std::string& module, std::vector<int64_t> shape,
                            std::string_view why) { Expect(base, p + module, shape, config, why); };
    const auto optional = [&](const std::string& module, std::vector<int64_t> shape,
                              std::string_view why) {
      if (base.Has(p + module)) expect(module, std::move(shape), why);
    };
    expect("self_attn.q_proj.weight", {query, hidden}, "[heads x head_dim, hidden_size]");
    expect("self_attn.k_proj.weight", {key_value, hidden}, "[kv heads x head_dim, hidden_size]");
    expect("self_attn.v_proj.weight", {key_value, hidden}, "[kv heads x head_dim, hidden_size]");
    expect("self_attn.o_proj.weight", {hidden, query}, "[hidden_size, heads x head_dim]");
    optional("self_attn.q_proj.bias", {query}, "[heads x head_dim]");
    optional("self_attn.k_proj.bias", {key_value}, "[kv heads x head_dim]");
    optional("self_attn.v_proj.bias", {key_value}, "[kv heads x head_dim]");
    optional("self_attn.q_norm.weight", {s.head_dim}, "[head_dim]");
    optional("self_attn.k_norm.weight", {s.head_dim}, "[head_dim]");
    expect("input_layernorm.weight", {hidden}, "[hidden_size]");
    expect("post_attention_layernorm.weight", {hidden}, "[hidden_size]");
    optional("pre_feedforward_layernorm.weight", {hidden}, "[hidden_size]");
    optional("post_feedforward_layernorm.weight", {hidden}, "[hidden_size]");
    // As LoadLayer decides: a layer with a router is sparse.
    if (!s.moe.router.empty() && base.Has(p + s.moe.router + ".weight")) {
      expect(s.moe.router + ".weight", {s.moe.experts, hidden}, "[experts, hidden_size]");
      for (int64_t e = 0; e < s.moe.experts; ++e) {
        const auto path = [&](std::size_t i) { return convert::ExpertPath(s.moe.expert[i], e); };
        expect(path(0) + ".weight", {expert_ffn, hidden}, "[expert ffn, hidden_size]");
        expect(path(1) + ".weight", {expert_ffn, hidden}, "[expert ffn, hidden_size]");
        expect(path(2) + ".weight", {hidden, expert_ffn}, "[hidden_size, expert ffn]");
      }
    } else {
      expect("mlp.gate_proj.weight", {ffn, hidden}, "[intermediate_size, hidden_size]");
      expect("mlp.up_proj.weight", {ffn, hidden}, "[intermediate_size, hidden_size]");
      expect("mlp.down_proj.weight", {hidden, ffn}, "[hidden_size, intermediate_size]");
    }
  }
}

}  // namespace adapter_job::verify
