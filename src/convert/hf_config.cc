#include "adapter_job/convert/hf_config.h"

#include <algorithm>

#include "adapter_job/core/error.h"
#include "adapter_job/core/file.h"
#include "adapter_job/core/json_file.h"

namespace adapter_job::convert {
namespace {

int64_t RequireInt(const nlohmann::json& j, const char* key) {
  if (!j.contains(key) || !j[key].is_number_integer() || j[key].get<int64_t>() <= 0) {
    Fail("'{}' must be a positive integer", key);
  }
  return j[key].get<int64_t>();
}

// A positive number where one is given (null means "the default"): the verifying forward pass
// reads these, and a string in their place would quietly leave it at the default.
void RequirePositiveNumberIfSet(const nlohmann::json& j, const char* key,
                                const std::string& where) {
  if (!j.contains(key) || j[key].is_null()) return;
  if (!j[key].is_number() || !(j[key].get<double>() > 0)) {
    Fail("'{}{}' is {}; expected a number > 0", where, key, j[key].dump());
  }
}

// rope_theta sits at the top level (transformers 4), in rope_parameters or rope_scaling
// (transformers 5), or in their per-layer-type entries (Gemma 3).
void CheckRopeAndNormNumbers(const nlohmann::json& j) {
  RequirePositiveNumberIfSet(j, "rms_norm_eps", "");
  RequirePositiveNumberIfSet(j, "rope_theta", "");
  for (const char* section : {"rope_parameters", "rope_scaling"}) {
    if (!j.contains(section) || !j[section].is_object()) continue;
    const std::string where = std::string(section) + ".";
    RequirePositiveNumberIfSet(j[section], "rope_theta", where);
    for (const auto& [type, params] : j[section].items()) {
      if (params.is_object()) RequirePositiveNumberIfSet(params, "rope_theta", where + type + ".");
    }
  }
}

}  // namespace

HfModelConfig ReadHfConfig(const std::filesystem::path& model_dir) {
  HfModelConfig c;
  c.path = model_dir / "config.json";
  return WithContext(
      [&] { return c.path.string(); },
      [&] {
        c.raw = ParseJson(ReadTextFile(c.path));
        if (!c.raw.is_object()) Fail("expected a JSON object");
        const nlohmann::json& j = c.text();
        if (c.raw.contains("architectures") && c.raw["architectures"].is_array() &&
            !c.raw["architectures"].empty() && c.raw["architectures"][0].is_string()) {
          c.architecture = c.raw["architectures"][0].get<std::string>();
        }
        c.model_type = j.value("model_type", c.raw.value("model_type", std::string()));
        c.hidden_size = RequireInt(j, "hidden_size");
        c.num_attention_heads = RequireInt(j, "num_attention_heads");
        c.num_key_value_heads =
            j.contains("num_key_value_heads") && !j["num_key_value_heads"].is_null()
                ? RequireInt(j, "num_key_value_heads")
                : c.num_attention_heads;
        c.head_dim = j.contains("head_dim") && !j["head_dim"].is_null()
                         ? RequireInt(j, "head_dim")
                         : c.hidden_size / c.num_attention_heads;
        c.intermediate_size = RequireInt(j, "intermediate_size");
        // transformers 5's hybrids (Nemotron-H) save the layer types and no num_hidden_layers,
        // which is a property of the list there; a model built without MoE layers still saves
        // the expert defaults, which then describe no layer.
        const nlohmann::json* block_types =
            j.contains("layers_block_type") && j["layers_block_type"].is_array()
                ? &j["layers_block_type"]
                : nullptr;
        c.num_hidden_layers = !j.contains("num_hidden_layers") && block_types
                                  ? static_cast<int64_t>(block_types->size())
                                  : RequireInt(j, "num_hidden_layers");
        const bool no_moe_layers =
            block_types &&
            std::find(block_types->begin(), block_types->end(), "moe") == block_types->end();
        // Qwen3-MoE calls it num_experts, Mixtral num_local_experts, DeepSeek-V3 n_routed_experts,
        // and transformers 5 treats them as one; two different counts leave the model's
        // unknowable.
        const char* experts_key = nullptr;
        for (const char* key : {"num_experts", "num_local_experts", "n_routed_experts"}) {
          if (no_moe_layers || !j.contains(key) || j[key].is_null() || j[key] == 0) continue;
          const int64_t experts = RequireInt(j, key);
          if (experts_key != nullptr && experts != c.num_experts) {
            Fail("{} {} and {} {} disagree; expected one expert count", experts_key, c.num_experts,
                 key, experts);
          }
          experts_key = key;
          c.num_experts = experts;
        }
        if (c.num_experts > 0) {
          c.experts_per_token = RequireInt(j, "num_experts_per_tok");
          c.expert_intermediate_size = j.contains("moe_intermediate_size")
                                           ? RequireInt(j, "moe_intermediate_size")
                                           : c.intermediate_size;
        }
        c.vocab_size = RequireInt(j, "vocab_size");
        CheckRopeAndNormNumbers(j);
        c.tie_word_embeddings =
            c.raw.value("tie_word_embeddings", j.value("tie_word_embeddings", false));
        if (c.num_attention_heads % c.num_key_value_heads != 0) {
          Fail("num_attention_heads {} is not a multiple of num_key_value_heads {}",
               c.num_attention_heads, c.num_key_value_heads);
        }
        for (const char* key : {"dtype", "torch_dtype"}) {
          if (c.raw.contains(key) && c.raw[key].is_string()) {
            c.dtype = DTypeFromTorchName(c.raw[key].get<std::string>());
            if (c.dtype) break;
          }
        }
        return c;
      });
}

HfModelConfig ModelConfigFromRunConfig(const checkpoint::RunDirectory& run) {
  const auto& m = run.model;
  const auto need = [&](const std::optional<int64_t>& v, const char* key) {
    if (!v) {
      Fail(
          "--hf-model-id is not a local directory, and {} has no model.{} to take the model "
          "dimensions from",
          run.run_config_path ? run.run_config_path->string() : "the checkpoint", key);
    }
    return *v;
  };
  HfModelConfig c;
  c.path = run.run_config_path.value_or(run.iteration_dir / "run_config.yaml");
  c.architecture = "LlamaForCausalLM";
  c.model_type = "llama";
  c.hidden_size = need(m.hidden_size, "hidden_size");
  c.num_attention_heads = need(m.num_attention_heads, "num_attention_heads");
  c.num_key_value_heads = m.num_query_groups.value_or(c.num_attention_heads);
  c.head_dim = m.kv_channels.value_or(c.hidden_size / c.num_attention_heads);
  c.intermediate_size = need(m.ffn_hidden_size, "ffn_hidden_size");
  c.num_hidden_layers = need(m.num_layers, "num_layers");
  return c;
}

}  // namespace adapter_job::convert
