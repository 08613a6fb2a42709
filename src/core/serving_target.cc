#include "adapter_job/core/serving_target.h"

#include "adapter_job/core/error.h"

namespace adapter_job {

ServingTarget ParseServingTarget(std::string_view name) {
  if (name == "peft") return ServingTarget::kPeft;
  if (name == "vllm") return ServingTarget::kVllm;
  if (name == "sglang") return ServingTarget::kSglang;
  Fail("--target must be peft, vllm or sglang, not '{}'", name);
}

std::string_view ServingTargetName(ServingTarget target) {
  switch (target) {
    case ServingTarget::kPeft:
      return "peft";
    case ServingTarget::kVllm:
      return "vllm";
    case ServingTarget::kSglang:
      return "sglang";
  }
  return "?";
}

}  // namespace adapter_job
