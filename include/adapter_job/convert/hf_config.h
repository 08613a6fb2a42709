// The base model's HuggingFace config.json: the dimensions the adapter must agree with.
#pragma once

#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "adapter_job/checkpoint/run_directory.h"
#include "adapter_job/core/dtype.h"

namespace adapter_job::convert {

struct HfModelConfig {
  std::filesystem::path path;  // the config.json read
  std::string architecture;    // architectures[0]
  std::string model_type;
  int64_t hidden_size = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  int64_t head_dim = 0;
  int64_t intermediate_size = 0;
  // MoE: experts per MoE layer (num_experts, Mixtral's num_local_experts; 0 for a dense model),
  // the experts each token is routed to, and one expert's ffn width.
  int64_t num_experts = 0;
  int64_t experts_per_token = 0;
  int64_t expert_intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t vocab_size = 0;
  bool tie_word_embeddings = false;
  std::optional<DType> dtype;  // "dtype" (transformers 5) or "torch_dtype" (4)
  nlohmann::json raw;

  // The language model's part of `raw`: its text_config where a multimodal config nests it there,
  // else `raw` itself.
  const nlohmann::json& text() const {
    return raw.contains("text_config") && raw["text_config"].is_object() &&
                   !raw.contains("hidden_size")
               ? raw["text_config"]
               : raw;
  }
};

// Reads `<model_dir>/config.json`; throws FormatError naming the file and the missing key.
HfModelConfig ReadHfConfig(const std::filesystem::path& model_dir);

// The model config when --hf-model-id is a model id rather than a local directory: the dims come
// from the training's run_config.yaml and the Megatron GPT layout maps like Llama's (as
// Megatron-Bridge's GPTModelProvider does). `path` is the run_config.yaml. Throws FormatError
// naming the missing model.<key>.
HfModelConfig ModelConfigFromRunConfig(const checkpoint::RunDirectory& run);

}  // namespace adapter_job::convert
