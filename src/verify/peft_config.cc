#include "peft_config.h"

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string_view>

#include "adapter_job/core/error.h"
#include "adapter_job/core/file.h"
#include "adapter_job/core/json_file.h"
#include "adapter_job/core/utf8.h"
#include "adapter_job/text/unicode.h"

namespace adapter_job::verify {
namespace {

using Json = nlohmann::ordered_json;  // PEFT tries patterns in the file's key order

// Python's truthiness of a loaded field: absent, null, false, 0 and empty are all "not set".
bool IsSet(const Json& config, const char* key) {
  if (!config.contains(key)) return false;
  const Json& v = config[key];
  if (v.is_null()) return false;
  if (v.is_boolean()) return v.get<bool>();
  if (v.is_number()) return v.get<double>() != 0;
  if (v.is_string() || v.is_array() || v.is_object()) return !v.empty();
  return true;
}

using text::Regex;
using Anchor = Regex::Anchor;

// text::Regex reads Python's syntax as `re` does for what PEFT configs hold; the rare constructs
// only one of them knows (PCRE2's \p{..} and (*VERB)s, Python's (?a) and (?u)) are not
// translated: a pattern PCRE2 refuses is a FormatError naming the field.
Regex Compile(const std::string& pattern, const char* field) {
  try {
    return Regex(pattern, Regex::Dialect::kPython);
  } catch (const FormatError& e) {
    Fail("{}: '{}' is not a regular expression this verifier can read ({})", field, pattern,
         e.what());
  }
}

std::vector<std::string> Names(const Json& value, const char* field) {
  if (!value.is_array()) Fail("{} must be a list of module names or a regex string", field);
  return value.get<std::vector<std::string>>();
}

// PEFT's list match: the module's name, or its last dotted components.
bool NamedIn(const std::string& module, const std::vector<std::string>& names) {
  return std::any_of(names.begin(), names.end(), [&](const std::string& name) {
    return module == name || (module.size() > name.size() && module.ends_with(name) &&
                              module[module.size() - name.size() - 1] == '.');
  });
}

// rank_pattern / alpha_pattern: utils/other.py get_pattern_key tries
// re.match(rf"(.*\.)?({key})$", module) for each key in the file's order.
template <typename T>
std::vector<std::pair<Regex, T>> Patterns(const Json& config, const char* field) {
  std::vector<std::pair<Regex, T>> out;
  if (!config.contains(field) || config[field].is_null()) return out;
  if (!config[field].is_object()) Fail("{} must be an object of pattern: value", field);
  for (const auto& [key, value] : config[field].items())
    out.emplace_back(Compile("(.*\\.)?(" + key + ")$", field), value.template get<T>());
  return out;
}

template <typename T>
T FirstMatch(const std::vector<std::pair<Regex, T>>& patterns, const std::string& module,
             T fallback) {
  for (const auto& [pattern, value] : patterns) {
    if (pattern.Matches(module, Anchor::kStart)) return value;
  }
  return fallback;
}

// int() of the digits that \d matched, which may be any script's ("\u0663" is 3); nullopt
// past int64.
std::optional<int64_t> LayerIndex(std::string_view digits) {
  int64_t value = 0;
  for (std::size_t pos = 0, length = 0; pos < digits.size(); pos += length) {
    const int digit = text::DecimalDigitValue(utf8::DecodeAt(digits, pos, &length)).value_or(0);
    if (__builtin_mul_overflow(value, 10, &value) || __builtin_add_overflow(value, digit, &value))
      return std::nullopt;
  }
  return value;
}

// init_lora_weights that only seed lora_A/lora_B, which loading overwrites. The others (pissa,
// olora, corda, loftq, lora_ga) rewrite the base weight when PEFT loads the adapter, and mica is
// a LoRA variant.
bool InitOnlySeedsAdapter(const Json& init) {
  if (init.is_boolean()) return true;
  if (!init.is_string()) return false;
  std::string s = init.get<std::string>();
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char ch) { return std::tolower(ch); });
  return s == "gaussian" || s == "eva" || s == "orthogonal";
}

// Fields that change what PEFT computes, beyond the LoRA/DoRA merge modelled here.
std::vector<std::string> UnmodelledFields(const Json& j) {
  std::vector<std::string> out;
  const auto flag = [&](const char* field, bool active) {
    if (active) out.push_back(fmt::format("{}: {}", field, j[field].dump()));
  };
  const auto non_null = [&](const char* field) { return j.contains(field) && !j[field].is_null(); };
  flag("modules_to_save", IsSet(j, "modules_to_save"));     // replaces whole modules
  flag("bias", j.contains("bias") && j["bias"] != "none");  // loads the base biases
  flag("lora_bias", IsSet(j, "lora_bias"));
  flag("target_parameters",
       IsSet(j, "target_parameters") && !j["target_parameters"].is_array());  // a list is modelled
  flag("trainable_token_indices", IsSet(j, "trainable_token_indices"));
  flag("layer_replication", IsSet(j, "layer_replication"));
  flag("use_qalora", IsSet(j, "use_qalora"));
  flag("megatron_config", IsSet(j, "megatron_config"));
  flag("alora_invocation_tokens", IsSet(j, "alora_invocation_tokens"));
  // LoRA variants: PEFT turns any non-null sub-config, even {}, into the variant.
  for (const char* variant :
       {"velora_config", "monteclora_config", "use_bdlora", "arrow_config", "kasa_config"})
    flag(variant, non_null(variant));
  flag("init_lora_weights",
       non_null("init_lora_weights") && !InitOnlySeedsAdapter(j["init_lora_weights"]));
  // fan_in_fan_out is not flagged: PEFT resets it to false on every torch.nn.Linear.
  return out;
}

// The target_modules leaves PEFT 0.21 re-targets to transformers 5's fused expert parameters, by
// model type (utils/transformers_weight_conversion.py: the _MODEL_TO_CONVERSION_PATTERN entries
// of the qwen2_moe and mixtral patterns, and _MOE_TARGET_MODULE_MAPPING).
std::vector<std::string> FusedExpertLeaves(const std::string& model_type) {
  static const std::set<std::string> kQwen2MoePattern = {
      "afmoe",       "deepseek_v2",    "deepseek_v3",    "deepseek_v32",
      "dots1",       "ernie4_5_moe",   "glm4_moe",       "glm4_moe_lite",
      "glm_moe_dsa", "glm4v_moe",      "longcat_flash",  "solar_open",
      "mellum",      "qwen3_moe",      "qwen3_omni_moe", "qwen3_omni_moe_thinker",
      "qwen3_next",  "hunyuan_v1_moe", "flex_olmo",      "olmoe",
      "exaone_moe",  "cohere2_moe"};
  if (kQwen2MoePattern.contains(model_type)) return {"gate_proj", "up_proj", "down_proj"};
  if (model_type == "mixtral" || model_type == "minimax" || model_type == "minimax_m2")
    return {"w1", "w3", "w2"};
  return {};
}

// "model.layers.1.mlp.experts.3.gate_proj": one expert's linear, as the hub checkpoints name it.
bool IsExpertLinear(std::string_view module) {
  const auto at = module.find(".experts.");
  return at != std::string_view::npos && at + 9 < module.size() &&
         std::isdigit(static_cast<unsigned char>(module[at + 9]));
}

}  // namespace

bool NamesParameter(const std::string& target, const std::string& name) {
  return name == target || std::string_view(name).ends_with("." + target);
}

PeftConfig PeftConfig::Read(const std::filesystem::path& path, const std::string& model_type) {
  PeftConfig c;
  WithContext(
      [&] { return path.string(); },
      [&] {
        const Json j = ParseJson<Json>(ReadTextFile(path));
        try {
          if (!j.is_object() || j.value("peft_type", "") != "LORA") Fail("peft_type is not LORA");
          c.r_ = j.value("r", int64_t{8});
          c.alpha_ = j.value("lora_alpha", 8.0);
          c.rslora_ = j.value("use_rslora", false);
          c.dora_ = j.value("use_dora", false);
          // nn.Dropout refuses p > 1; a value <= 0 makes PEFT use no dropout at all.
          c.dropout_ = j.value("lora_dropout", 0.0);
          if (c.dropout_ > 1)
            Fail("lora_dropout is {}: PEFT refuses a dropout probability above 1", c.dropout_);

          const bool regex_target = j.contains("target_modules") && j["target_modules"].is_string();
          if (regex_target) {
            std::string target = j["target_modules"].get<std::string>();
            std::string lower = target;
            std::transform(lower.begin(), lower.end(), lower.begin(),
                           [](unsigned char ch) { return std::tolower(ch); });
            if (lower == "all-linear") {
              c.all_linear_ = true;
            } else {
              c.target_regex_ = Compile(target, "target_modules");
            }
          } else if (IsSet(j, "target_modules")) {
            c.target_names_ = Names(j["target_modules"], "target_modules");
          } else {
            // PEFT then picks its own per-architecture default list.
            c.unmodelled_.push_back("target_modules: " + (j.contains("target_modules")
                                                              ? j["target_modules"].dump()
                                                              : "absent"));
          }

          if (j.contains("exclude_modules") && j["exclude_modules"].is_string()) {
            c.exclude_regex_ = Compile(j["exclude_modules"].get<std::string>(), "exclude_modules");
          } else if (IsSet(j, "exclude_modules")) {
            c.exclude_names_ = Names(j["exclude_modules"], "exclude_modules");
          }

          // layers_to_transform filters only list targets matched by suffix (LoraConfig refuses it
          // with a regex); an empty list filters nothing.
          const bool has_layers =
              j.contains("layers_to_transform") && !j["layers_to_transform"].is_null();
          if (regex_target && has_layers)
            Fail("layers_to_transform: PEFT refuses it when target_modules is a string");
          if (regex_target && j.contains("layers_pattern") && !j["layers_pattern"].is_null())
            Fail("layers_pattern: PEFT refuses it when target_modules is a string");
          if (IsSet(j, "layers_pattern") && !has_layers)
            Fail("layers_pattern: PEFT refuses it without layers_to_transform");
          if (has_layers) {
            const Json& layers = j["layers_to_transform"];
            if (layers.is_number_integer()) {
              c.layers_ = std::vector<int64_t>{layers.get<int64_t>()};
            } else if (!layers.empty()) {
              c.layers_ = layers.get<std::vector<int64_t>>();
            }
            if (!IsSet(j, "layers_pattern")) {
              // The first numbered component: "model.layers.3.mlp.experts.0" is layer 3.
              c.layer_patterns_.push_back(Compile(R"(.*?\.[^.]*\.(?P<idx>\d+)\.)", "layers"));
            } else {
              const Json& p = j["layers_pattern"];
              for (const std::string& pattern : p.is_string()
                                                    ? std::vector<std::string>{p.get<std::string>()}
                                                    : p.get<std::vector<std::string>>()) {
                c.layer_patterns_.push_back(
                    Compile("(?:^|.*?\\.)" + pattern + "\\.(?P<idx>\\d+)\\.", "layers_pattern"));
              }
            }
          }
          if (j.contains("target_parameters") && j["target_parameters"].is_array())
            c.target_parameters_ = Names(j["target_parameters"], "target_parameters");
          c.fused_expert_leaves_ = FusedExpertLeaves(model_type);
          c.rank_pattern_ = Patterns<int64_t>(j, "rank_pattern");
          c.alpha_pattern_ = Patterns<double>(j, "alpha_pattern");

          if (IsSet(j, "lora_bias") && c.dora_)
            Fail("lora_bias: PEFT refuses it together with use_dora");
          if (IsSet(j, "megatron_config") && c.dora_)
            Fail("megatron_config: PEFT refuses it together with use_dora");

          if (IsSet(j, "modules_to_save")) {
            for (const auto& name : Names(j["modules_to_save"], "modules_to_save"))
              c.modules_to_save_.push_back(
                  Compile("(^|.*\\.)" + name + "($|\\..*)", "modules_to_save"));
          }
          for (auto& field : UnmodelledFields(j)) c.unmodelled_.push_back(std::move(field));
        } catch (const nlohmann::json::exception& e) {
          Fail("a field has the wrong type: {}", e.what());
        }
      });
  return c;
}

bool PeftConfig::Targets(const std::string& module) const {
  if (exclude_regex_ ? exclude_regex_->Matches(module, Anchor::kFull)
                     : NamedIn(module, exclude_names_))
    return false;
  // PEFT keeps LoRA off a module it saves whole.
  for (const Regex& saved : modules_to_save_) {
    if (saved.Matches(module, Anchor::kStart)) return false;
  }
  const std::string weight = module + ".weight";
  const bool as_parameter =
      std::any_of(target_parameters_.begin(), target_parameters_.end(),
                  [&](const std::string& t) { return NamesParameter(t, weight); });
  const std::string leaf = module.substr(module.rfind('.') + 1);
  if (!IsExpertLinear(module) && std::find(fused_expert_leaves_.begin(), fused_expert_leaves_.end(),
                                           leaf) != fused_expert_leaves_.end())
    return as_parameter;
  if (as_parameter) return true;
  if (all_linear_) return true;
  if (target_regex_) return target_regex_->Matches(module, Anchor::kFull);
  if (std::find(target_names_.begin(), target_names_.end(), module) != target_names_.end())
    return true;  // an exact name bypasses layers_to_transform, as in PEFT
  if (!NamedIn(module, target_names_)) return false;
  if (!layers_) return true;
  // check_target_module_exists: the first layers_pattern that matches gives the layer index.
  for (const Regex& pattern : layer_patterns_) {
    if (const std::optional<text::Groups> m = pattern.Match(module, Anchor::kStart)) {
      const text::Span idx = *m->back();
      const std::optional<int64_t> index =
          LayerIndex(std::string_view(module).substr(idx.begin, idx.end - idx.begin));
      return index && std::find(layers_->begin(), layers_->end(), *index) != layers_->end();
    }
  }
  return false;
}

int64_t PeftConfig::RankOf(const std::string& module) const {
  return FirstMatch(rank_pattern_, module, r_);
}

double PeftConfig::ScaleOf(const std::string& module) const {
  const double rank = static_cast<double>(RankOf(module));
  const double alpha = FirstMatch(alpha_pattern_, module, alpha_);
  return rslora_ ? alpha / std::sqrt(rank) : alpha / rank;
}

}  // namespace adapter_job::verify
