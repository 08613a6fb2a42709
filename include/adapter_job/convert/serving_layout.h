// What a serving engine's loader needs of an adapter that PEFT does not (shared reference
// serving-and-merge.md: vLLM vllm/lora/peft_helper.py, lora_model.py; SGLang
// python/sglang/srt/lora/).
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "adapter_job/convert/layer_conversion.h"
#include "adapter_job/core/serving_target.h"

namespace adapter_job::convert {

// vLLM's --max-lora-rank choices (its LoRAConfig); the adapter's r must not exceed the one set.
inline constexpr std::array<int64_t, 9> kVllmMaxLoraRanks = {1, 8, 16, 32, 64, 128, 256, 320, 512};

struct ServingLayout {
  int64_t rank = 0;            // adapter_config.json's r
  int64_t folded_modules = 0;  // modules whose own alpha / rank went into their lora_B (vLLM)
  std::string note;            // for the log and the report; empty for PEFT
};

// Lays `outputs` out for `target` (r: peft.dim). Refuses, naming `adapter_job merge` where it
// serves instead, what the engine cannot serve: DoRA (vLLM and SGLang), and for vLLM the router's
// adapter and experts held as one fused parameter, which its loader would drop without a word.
// vLLM applies one alpha / r to every module and ignores rank_pattern, so each module's rank is
// padded with zeros to the largest (R) and its lora_B scaled by (alpha / r_i) / (alpha / R) =
// R / r_i: stock PEFT and vLLM then compute what the fine-tune did. SGLang honours rank_pattern:
// its layout is PEFT's.
ServingLayout LayOutForServing(ServingTarget target, const ConversionSettings& settings, int64_t r,
                               std::vector<std::vector<OutputTensor>>& outputs);

}  // namespace adapter_job::convert
