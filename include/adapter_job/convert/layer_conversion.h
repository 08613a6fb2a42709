// Megatron adapter tensors of one layer -> HuggingFace PEFT tensors. The conversion is planned
// from shapes alone (so the output file's header is known before any data arrives) and then
// applied to each assembled layer: every output is a set of row ranges of one Megatron tensor.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "adapter_job/checkpoint/adapter_layout.h"
#include "adapter_job/checkpoint/run_directory.h"
#include "adapter_job/convert/hf_config.h"
#include "adapter_job/convert/model_family.h"
#include "adapter_job/core/tensor.h"

namespace adapter_job::convert {

struct ConversionSettings {
  ModelFamily family;  // a copy, so that settings move freely
  HfModelConfig model;
  checkpoint::AdapterKind kind = checkpoint::AdapterKind::kLoRA;
  int training_tensor_parallel = 1;  // undoes the TP-interleaved DoRA fc1 magnitude
  std::optional<DType> dtype;        // output dtype; the checkpoint's when unset
};

struct OutputTensor {
  // The HF name, e.g. model.layers.0.self_attn.q_proj.lora_A.weight (PEFT's file prefixes it with
  // base_model.model., see writer::PeftName).
  std::string name;
  std::string module;  // e.g. model.layers.0.self_attn.q_proj
  std::string leaf;    // e.g. q_proj
  checkpoint::AdapterParam param = checkpoint::AdapterParam::kLinearIn;
  std::size_t source = 0;  // index into LayerLayout::tensors
  // [begin, end) rows of the source, counted over all its leading dimensions ([experts, rows,
  // cols] has experts x rows); empty: all of it.
  std::vector<std::pair<int64_t, int64_t>> rows;
  std::vector<int64_t> shape;
  DType dtype = DType::kBFloat16;
  // rank_pattern keys (regexes, as PEFT matches them) that give this module its rank when it is
  // not `r`: empty means the module path itself. Expert modules use one key per HF leaf across
  // layers and experts, plus the parameter transformers 5 fuses them into with its summed rank.
  std::vector<std::pair<std::string, int64_t>> rank_keys;
  bool expert = false;  // one MoE expert's module
  std::string path;     // within the layer, e.g. "mlp.down_proj"
};

// Throws FormatError when a key has no mapping in the family, when shapes contradict the HF
// config, or when an HF module lacks lora_A, lora_B or (DoRA) its magnitude.
std::vector<OutputTensor> PlanLayerConversion(const checkpoint::LayerLayout& layer,
                                              const ConversionSettings& settings);

// The output's bytes as spans of `layer_buffer` (which holds the layer's Megatron tensors back to
// back, see LayerTensor::offset_in_layer), in the source dtype: no copy is made.
std::vector<std::span<const std::byte>> OutputPieces(const OutputTensor& output,
                                                     const checkpoint::LayerLayout& layer,
                                                     std::span<const std::byte> layer_buffer);
bool NeedsCast(const OutputTensor& output, const checkpoint::LayerLayout& layer);

// The output as a tensor of its own, cast to its dtype.
Tensor MaterializeOutput(const OutputTensor& output, const checkpoint::LayerLayout& layer,
                         std::span<const std::byte> layer_buffer);

}  // namespace adapter_job::convert
