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
  // The adapter of a whole fused expert parameter (ModuleMapping::stored_fused): the parameter as
  // target_parameters names it, e.g. "mlp.experts.gate_up_proj"; empty for a module's adapter.
  std::string parameter;
  // PEFT's ParamWrapper holds lora_B of an [experts, ...] parameter as [out, rank x experts] with
  // the expert index fastest (tuners/lora/layer.py ParamWrapper.get_delta_weight reads it as
  // "o r e"). The selected rows are [source_experts, out, rank] (1: one adapter shared by all
  // experts), their out rows `interleave` equal parts that alternate in the parameter (GPT-OSS's
  // gate and up columns): they are permuted into that layout.
  struct ExpertPacking {
    int64_t experts = 0;
    int64_t source_experts = 0;
    int64_t interleave = 1;
  };
  std::optional<ExpertPacking> packing;
  std::string peft_refuses;  // ModuleMapping::peft_refuses of the module it came from
  // vLLM's layout (serving_target.h): the selected rows hold rank `rank` (lora_A's rows, lora_B's
  // columns), padded with zeros to `to` (`shape` is the padded one), lora_B scaled by `scale`
  // first, in float32.
  struct RankPadding {
    int64_t rank = 0;
    int64_t to = 0;
    double scale = 1;
  };
  std::optional<RankPadding> padding;
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
// Whether the output's bytes are not spans of the layer buffer: it is cast, permuted or padded.
bool NeedsCopy(const OutputTensor& output, const checkpoint::LayerLayout& layer);

// The output as a tensor of its own, permuted, padded and cast.
Tensor MaterializeOutput(const OutputTensor& output, const checkpoint::LayerLayout& layer,
                         std::span<const std::byte> layer_buffer);

}  // namespace adapter_job::convert
