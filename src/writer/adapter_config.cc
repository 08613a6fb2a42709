#include "adapter_job/writer/adapter_config.h"

#include <cmath>
#include <set>

#include "adapter_job/core/error.h"

namespace adapter_job::writer {

nlohmann::ordered_json BuildAdapterConfig(const AdapterConfigInputs& in) {
  // JSON has no NaN or infinity: nlohmann would write null, which PEFT reads as "no alpha".
  const auto finite = [](const nlohmann::json& v) {
    return v.is_number() && std::isfinite(v.get<double>());
  };
  if (!finite(in.lora_alpha) || in.lora_alpha.get<double>() <= 0)
    Fail("lora_alpha {} is not a finite number > 0", in.lora_alpha.dump());
  if (!finite(in.lora_dropout) || in.lora_dropout.get<double>() < 0 ||
      in.lora_dropout.get<double>() >= 1)
    Fail("lora_dropout {} is not a number >= 0 and < 1", in.lora_dropout.dump());
  std::set<std::string> targets, parameters;
  nlohmann::ordered_json rank_pattern = nlohmann::ordered_json::object();
  for (const auto& m : in.modules) {
    if (m.parameter.empty()) {
      targets.insert(m.leaf);
    } else {
      parameters.insert(m.parameter);
      if (m.rank != in.r && m.rank_keys.empty())
        Fail("{} is targeted as the parameter {} with rank {}, but only rank r = {} is supported",
             m.module, m.parameter, m.rank, in.r);
    }
    if (m.rank == in.r) continue;
    const std::vector<std::pair<std::string, int64_t>> own = {{m.module, m.rank}};
    for (const auto& [key, rank] : m.rank_keys.empty() ? own : m.rank_keys) {
      if (rank_pattern.contains(key) && rank_pattern[key] != rank) {
        Fail("rank_pattern '{}' would need rank {} for {} but {} for an earlier module", key, rank,
             m.module, rank_pattern[key].get<int64_t>());
      }
      rank_pattern[key] = rank;
    }
  }
  nlohmann::ordered_json c;
  c["peft_type"] = "LORA";
  c["auto_mapping"] = nullptr;
  c["base_model_name_or_path"] = in.base_model_name_or_path;
  c["bias"] = "none";
  c["fan_in_fan_out"] = false;
  c["inference_mode"] = true;
  c["init_lora_weights"] = true;
  c["lora_alpha"] = in.lora_alpha;
  // PEFT's ParamWrapper refuses any dropout (it cannot be factored out of the merged delta), and
  // dropout does nothing at inference: an adapter with target_parameters says 0, as
  // Megatron-Bridge's export does (peft_bridge.py build_adapter_config_dict).
  c["lora_dropout"] = parameters.empty() ? in.lora_dropout : nlohmann::json(0.0);
  c["modules_to_save"] = nullptr;
  c["r"] = in.r;
  c["rank_pattern"] = std::move(rank_pattern);
  c["alpha_pattern"] = nlohmann::ordered_json::object();
  c["target_modules"] = std::vector<std::string>(targets.begin(), targets.end());
  if (!parameters.empty() && in.use_dora)
    Fail("{} would be targeted as a parameter, which PEFT does not support with DoRA",
         *parameters.begin());
  if (!parameters.empty())
    c["target_parameters"] = std::vector<std::string>(parameters.begin(), parameters.end());
  if (!in.exclude_modules.empty()) c["exclude_modules"] = in.exclude_modules;
  c["task_type"] = "CAUSAL_LM";
  c["use_dora"] = in.use_dora;
  c["use_rslora"] = false;
  return c;
}

std::string ToPythonJson(const nlohmann::ordered_json& value) {
  // nlohmann's indented form matches json.dump(indent=2): ": " and "," separators, empty
  // containers as {} and [], shortest round-trip floats with ".0"; ensure_ascii as Python's.
  return value.dump(2, ' ', /*ensure_ascii=*/true);
}

}  // namespace adapter_job::writer
