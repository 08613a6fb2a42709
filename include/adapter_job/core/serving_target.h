// The serving engine an export lays its adapter out for (convert/serving_layout.h says how).
#pragma once

#include <string_view>

namespace adapter_job {

enum class ServingTarget { kPeft, kVllm, kSglang };

// "peft" | "vllm" | "sglang"; throws FormatError naming the choices otherwise.
ServingTarget ParseServingTarget(std::string_view name);
std::string_view ServingTargetName(ServingTarget target);

}  // namespace adapter_job
