#include "adapter_job/convert/serving_layout.h"

#include <algorithm>
#include <cmath>

#include "adapter_job/core/error.h"

namespace adapter_job::convert {

ServingLayout LayOutForServing(ServingTarget target, const ConversionSettings& settings, int64_t r,
                               std::vector<std::vector<OutputTensor>>& outputs) {
  ServingLayout layout{r, 0, ""};
  if (target == ServingTarget::kPeft) return layout;
  const std::string_view name = ServingTargetName(target);
  if (settings.kind == checkpoint::AdapterKind::kDoRA) {
    Fail(
        "--target {}: {} does not load DoRA adapters (it refuses use_dora); `adapter_job merge` "
        "writes the base model with the adapter merged in, which it serves as it is",
        name, name == "vllm" ? "vLLM" : "SGLang");
  }
  if (target == ServingTarget::kSglang) {
    layout.note = "SGLang honours rank_pattern: the layout is PEFT's";
    return layout;
  }
  int64_t largest = r;
  for (const auto& layer : outputs) {
    for (const OutputTensor& out : layer) {
      if (!out.parameter.empty()) {
        Fail(
            "--target vllm: '{}' holds the experts' adapter as one fused parameter "
            "(target_parameters), a layout vLLM's loader does not read; `adapter_job merge` "
            "serves it",
            out.module);
      }
      if (!settings.family.forward.moe_router.empty() &&
          out.path == settings.family.forward.moe_router) {
        Fail(
            "--target vllm: '{}' is the MoE router's adapter, which vLLM has no LoRA layer for "
            "and would drop; `adapter_job merge` serves it",
            out.module);
      }
      if (out.param == checkpoint::AdapterParam::kLinearIn)
        largest = std::max(largest, out.shape.at(0));
    }
  }
  if (largest > kVllmMaxLoraRanks.back()) {
    Fail("--target vllm: rank {} exceeds the largest --max-lora-rank vLLM accepts ({})", largest,
         kVllmMaxLoraRanks.back());
  }
  int64_t widened = 0;
  for (auto& layer : outputs) {
    for (OutputTensor& out : layer) {
      out.rank_keys.clear();  // every module has rank `largest` now
      const bool lora_a = out.param == checkpoint::AdapterParam::kLinearIn;
      int64_t& rank = out.shape.at(lora_a ? 0 : 1);
      if (rank == largest) continue;
      const double scale = lora_a ? 1.0 : static_cast<double>(largest) / static_cast<double>(rank);
      out.padding = OutputTensor::RankPadding{rank, largest, scale};
      if (lora_a) ++layout.folded_modules;
      rank = largest;
      // A scale that is no power of two is not exact in bf16 or fp16 (1.5 x needs a bit more):
      // such a lora_B stays float32 unless --dtype asks otherwise, and the engine rounds it once,
      // as it rounds any adapter to its own dtype.
      int exponent = 0;
      if (!lora_a && !settings.dtype && std::frexp(scale, &exponent) != 0.5 &&
          out.dtype != DType::kFloat32 && out.dtype != DType::kFloat64) {
        out.dtype = DType::kFloat32;
        ++widened;
      }
    }
  }
  layout.rank = largest;
  const int64_t needed =
      *std::lower_bound(kVllmMaxLoraRanks.begin(), kVllmMaxLoraRanks.end(), largest);
  layout.note = fmt::format(
      "vLLM applies one alpha / r and ignores rank_pattern: {} module(s) padded to rank {} with "
      "their alpha / rank folded into lora_B{}; serve with --max-lora-rank {} or more",
      layout.folded_modules, largest,
      widened == 0 ? ""
                   : fmt::format(" ({} of them float32, where the fold is not exact in the "
                                 "checkpoint's dtype)",
                                 widened),
      needed);
  return layout;
}

}  // namespace adapter_job::convert
