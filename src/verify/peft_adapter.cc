// Matching rules from PEFT 0.21 (tuners_utils.check_target_module_exists, utils/other.py
// get_pattern_key, save_and_load.py): a target name matches a module equal to it or ending with
// "." + name, a string target is a full-match regex, rank/alpha patterns match "(.*\.)?(key)$".
#include "peft_adapter.h"

#include <cmath>
#include <nlohmann/json.hpp>
#include <optional>
#include <regex>

#include "adapter_job/core/error.h"
#include "adapter_job/core/file.h"
#include "lora_merge.h"

namespace adapter_job::verify {
namespace {

constexpr std::string_view kPrefix = "base_model.model.";

// Regexes are compiled once: an MoE model has tens of thousands of modules to match.
class TargetMatcher {
 public:
  explicit TargetMatcher(const nlohmann::ordered_json& targets) {
    if (targets.is_string()) {
      regex_ = std::regex(targets.get<std::string>());
    } else if (targets.is_array()) {
      for (const auto& t : targets) names_.push_back(t.get<std::string>());
    }
  }
  bool Targets(const std::string& module) const {
    if (regex_) return std::regex_match(module, *regex_);
    for (const auto& name : names_) {
      if (module == name || (module.ends_with(name) && module.size() > name.size() &&
                             module[module.size() - name.size() - 1] == '.'))
        return true;
    }
    return false;
  }

 private:
  std::optional<std::regex> regex_;
  std::vector<std::string> names_;
};

// rank_pattern or alpha_pattern: the first key, in the file's order, that matches wins.
template <typename T>
class PatternValues {
 public:
  PatternValues(const nlohmann::ordered_json& config, const char* pattern_key) {
    if (!config.contains(pattern_key) || !config[pattern_key].is_object()) return;
    for (const auto& [key, value] : config[pattern_key].items())
      patterns_.emplace_back(std::regex("(.*\\.)?(" + key + ")"), value.template get<T>());
  }
  T ValueFor(const std::string& module, T fallback) const {
    for (const auto& [pattern, value] : patterns_) {
      if (std::regex_match(module, pattern)) return value;
    }
    return fallback;
  }

 private:
  std::vector<std::pair<std::regex, T>> patterns_;
};

TensorStat StatOf(const std::string& name, const at::Tensor& t, DType dtype) {
  TensorStat s;
  s.name = name;
  s.shape = t.sizes().vec();
  s.dtype = std::string(SafetensorsName(dtype).value_or("?"));
  const at::Tensor f = t.to(at::kDouble);
  s.mean = f.mean().item<double>();
  s.std = f.numel() > 1 ? f.std().item<double>() : 0.0;
  s.max_abs = f.abs().max().item<double>();
  s.frobenius_norm = f.norm().item<double>();
  return s;
}

}  // namespace

PeftAdapter PeftAdapter::Open(const std::filesystem::path& dir, const HfWeights& base,
                              int64_t num_layers, const std::vector<std::string>& linears) {
  PeftAdapter adapter;
  const auto config_path = dir / "adapter_config.json";
  nlohmann::ordered_json config;  // PEFT tries patterns in the file's order
  WithContext([&] { return config_path.string(); },
              [&] {
                try {
                  config = nlohmann::ordered_json::parse(ReadTextFile(config_path));
                } catch (const nlohmann::json::exception& e) {
                  Fail("not valid JSON: {}", e.what());
                }
                if (!config.is_object() || config.value("peft_type", "") != "LORA")
                  Fail("peft_type is not LORA");
                if (!config.contains("target_modules")) Fail("no target_modules");
              });
  const int64_t r = config.value("r", int64_t{8});
  const double alpha = config.value("lora_alpha", 8.0);
  const bool rslora = config.value("use_rslora", false);
  const bool dora = config.value("use_dora", false);

  // Every targeted module of the base model, as PEFT would wrap them.
  const TargetMatcher targets(config["target_modules"]);
  const PatternValues<int64_t> ranks(config, "rank_pattern");
  const PatternValues<double> alphas(config, "alpha_pattern");
  for (int64_t layer = 0; layer < num_layers; ++layer) {
    for (const std::string& linear : linears) {
      const std::string module = fmt::format("model.layers.{}.{}", layer, linear);
      if (!base.Has(module + ".weight") || !targets.Targets(module)) continue;
      Module m;
      const auto rank = ranks.ValueFor(module, r);
      const auto module_alpha = alphas.ValueFor(module, alpha);
      m.scale = rslora ? module_alpha / std::sqrt(static_cast<double>(rank)) : module_alpha / rank;
      adapter.modules_.emplace(module, std::move(m));
    }
  }

  const auto weights_path = dir / "adapter_model.safetensors";
  const safetensors::File file = safetensors::File::Open(weights_path);
  for (const auto& entry : file.header().tensors) {
    if (adapter.tensor_count_++ == 0 ||
        ItemSize(entry.dtype) > at::elementSize(adapter.storage_dtype_)) {
      adapter.storage_dtype_ = ToTorch(entry.dtype);
    }
    const auto bytes = file.Data(entry);
    const at::Tensor tensor = at::from_blob(const_cast<std::byte*>(bytes.data()), entry.shape,
                                            at::TensorOptions().dtype(ToTorch(entry.dtype)))
                                  .to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
    adapter.stats_.push_back(StatOf(entry.name, tensor, entry.dtype));

    std::string key = entry.name;
    if (!key.starts_with(kPrefix)) {
      adapter.unused_.push_back(entry.name);
      continue;
    }
    key = key.substr(kPrefix.size());
    // PEFT strips the adapter name; ".default" may survive in hand-made files.
    if (const auto at = key.find(".default"); at != std::string::npos) key.erase(at, 8);
    std::optional<at::Tensor>* slot = nullptr;
    bool is_magnitude = false;
    std::string module;
    for (const auto& [suffix, which] : {std::pair{".lora_A.weight", 0},
                                        {".lora_B.weight", 1},
                                        {".lora_magnitude_vector.weight", 2},
                                        {".lora_magnitude_vector", 2}}) {
      if (key.ends_with(suffix)) {
        module = key.substr(0, key.size() - std::string_view(suffix).size());
        const auto it = adapter.modules_.find(module);
        if (it != adapter.modules_.end()) {
          slot = which == 0   ? &it->second.lora_a
                 : which == 1 ? &it->second.lora_b
                              : &it->second.magnitude;
        }
        is_magnitude = which == 2;
        break;
      }
    }
    // A magnitude without use_dora is silently ignored by PEFT: count it as unused.
    if (slot == nullptr || (is_magnitude && !dora)) {
      adapter.unused_.push_back(entry.name);
      continue;
    }
    *slot = tensor;
  }
  for (const auto& [module, m] : adapter.modules_) {
    if (!m.lora_a) adapter.missing_.push_back(module + ".lora_A.weight");
    if (!m.lora_b) adapter.missing_.push_back(module + ".lora_B.weight");
    if (dora && !m.magnitude) adapter.missing_.push_back(module + ".lora_magnitude_vector");
  }
  return adapter;
}

void PeftAdapter::Apply(int64_t layer, LayerWeights& weights, const at::Device& device) const {
  const std::string prefix = fmt::format("model.layers.{}.", layer);
  for (auto it = modules_.lower_bound(prefix);
       it != modules_.end() && it->first.starts_with(prefix); ++it) {
    const Module& m = it->second;
    if (!m.lora_a || !m.lora_b) continue;
    std::optional<at::Tensor> magnitude;
    if (m.magnitude) magnitude = m.magnitude->to(device);
    at::Tensor& w = weights.Linear(it->first.substr(prefix.size()));
    w = MergeAdapter(w, m.lora_a->to(device), m.lora_b->to(device), m.scale, magnitude,
                     it->first + " (PEFT adapter)");
  }
}

}  // namespace adapter_job::verify
