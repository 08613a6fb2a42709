#include "adapter_job/convert/model_family.h"

#include <algorithm>
#include <nlohmann/json.hpp>

#include "adapter_job/core/error.h"
#include "adapter_job/core/file.h"
#include "adapter_job/core/json_file.h"
#include "model_families_builtin.h"

namespace adapter_job::convert {
namespace {

using nlohmann::json;

const json& Field(const json& j, const char* key, const std::string& where) {
  if (!j.is_object() || !j.contains(key)) Fail("{}: missing '{}'", where, key);
  return j[key];
}

std::string String(const json& j, const char* key, const std::string& where) {
  const json& v = Field(j, key, where);
  if (!v.is_string() || v.get<std::string>().empty())
    Fail("{}.{}: expected a non-empty string", where, key);
  return v.get<std::string>();
}

std::vector<std::string> Strings(const json& j, const char* key, const std::string& where) {
  std::vector<std::string> out;
  if (!j.contains(key)) return out;
  if (!j[key].is_array()) Fail("{}.{}: expected a list of strings", where, key);
  for (const auto& v : j[key]) {
    if (!v.is_string()) Fail("{}.{}: expected a list of strings", where, key);
    out.push_back(v.get<std::string>());
  }
  return out;
}

template <typename Enum, std::size_t N>
Enum Choice(const json& j, const char* key, const std::string& where,
            const std::pair<const char*, Enum> (&choices)[N]) {
  const std::string value = String(j, key, where);
  std::string names;
  for (const auto& [name, e] : choices) {
    if (value == name) return e;
    names += (names.empty() ? "" : ", ") + std::string(name);
  }
  Fail("{}.{}: '{}' is not one of {}", where, key, value, names);
}

constexpr std::pair<const char*, Fusion> kFusions[] = {
    {"none", Fusion::kNone}, {"qkv", Fusion::kQkv}, {"gated_mlp", Fusion::kGatedMlp}};
constexpr std::pair<const char*, FusedLayout> kFusedLayouts[] = {
    {"out_in", FusedLayout::kOutIn},
    {"in_out", FusedLayout::kInOut},
    {"in_out_interleaved", FusedLayout::kInOutInterleaved}};
constexpr std::pair<const char*, Parallelism> kParallelisms[] = {{"column", Parallelism::kColumn},
                                                                 {"row", Parallelism::kRow}};

HfModule ParseHfModule(const json& j, const std::string& where) {
  return {String(j, "path", where), ParseWidth(String(j, "in", where), where + ".in"),
          ParseWidth(String(j, "out", where), where + ".out")};
}

}  // namespace

ModelFamily ParseModelFamily(std::string_view text, const std::string& source,
                             const std::vector<ModelFamily>& known) {
  const json j = WithContext([&] { return source; }, [&] { return ParseJson(text); });
  if (!j.is_object()) Fail("{}: expected a JSON object", source);
  ModelFamily f;
  f.name = String(j, "family", source);
  const std::string where = fmt::format("{} (family '{}')", source, f.name);
  if (j.contains("like")) {
    const std::string like = String(j, "like", where);
    const auto it = std::find_if(known.begin(), known.end(),
                                 [&](const ModelFamily& k) { return k.name == like; });
    if (it == known.end())
      Fail("{}: 'like' names '{}', which is not a family defined before it", where, like);
    f = *it;
    f.name = String(j, "family", source);
  }
  f.architectures = Strings(j, "architectures", where);
  f.model_types = Strings(j, "model_types", where);
  if (f.architectures.empty() && f.model_types.empty())
    Fail("{}: give 'architectures' or 'model_types' to recognise the family by", where);
  if (j.contains("hf_layers_prefix")) f.hf_layers_prefix = String(j, "hf_layers_prefix", where);
  // `modules` replaces what `like` gave; `add_modules` extends it (an MoE family adds its experts
  // to a dense family's attention).
  if (j.contains("modules")) f.modules.clear();
  for (const char* list : {"modules", "add_modules"}) {
    if (!j.contains(list)) continue;
    const json& modules = j[list];
    if (!modules.is_array()) Fail("{}.{}: expected a list", where, list);
    for (std::size_t i = 0; i < modules.size(); ++i) {
      const std::string at = fmt::format("{}.{}[{}]", where, list, i);
      ModuleMapping m;
      m.megatron = String(modules[i], "megatron", at);
      m.peft_target = String(modules[i], "peft_target", at);
      m.fusion = Choice(modules[i], "fusion", at, kFusions);
      m.parallelism = Choice(modules[i], "parallelism", at, kParallelisms);
      const json& hf = Field(modules[i], "hf", at);
      if (!hf.is_array() || hf.empty()) Fail("{}.hf: expected a non-empty list", at);
      for (std::size_t k = 0; k < hf.size(); ++k)
        m.hf.push_back(ParseHfModule(hf[k], fmt::format("{}.hf[{}]", at, k)));
      const std::size_t parts = m.fusion == Fusion::kQkv        ? 3
                                : m.fusion == Fusion::kGatedMlp ? 2
                                                                : 1;
      if (m.hf.size() != parts)
        Fail("{}.hf: a '{}' fusion splits into {} modules, not {}", at,
             String(modules[i], "fusion", at), parts, m.hf.size());
      if (modules[i].contains("experts")) {
        if (!modules[i]["experts"].is_boolean()) Fail("{}.experts: expected true or false", at);
        m.experts = modules[i]["experts"].get<bool>();
      }
      for (const auto& hf_module : m.hf) {
        if (m.experts != (hf_module.path.find("{expert}") != std::string::npos))
          Fail("{}.hf: expert modules, and only they, have '{{expert}}' in their paths", at);
      }
      if (modules[i].contains("fused_parameter"))
        m.fused_parameter = String(modules[i], "fused_parameter", at);
      if (modules[i].contains("fused_layout"))
        m.fused_layout = Choice(modules[i], "fused_layout", at, kFusedLayouts);
      if (modules[i].contains("stored_fused")) {
        if (!modules[i]["stored_fused"].is_boolean())
          Fail("{}.stored_fused: expected true or false", at);
        m.stored_fused = modules[i]["stored_fused"].get<bool>();
        if (m.stored_fused && (!m.experts || m.fused_parameter.empty() ||
                               m.fused_parameter.find('.') == std::string::npos))
          Fail(
              "{}.stored_fused: only expert modules with a fused_parameter ('mlp.experts.x') "
              "can be stored fused",
              at);
        // merge/peft_file.cc folds an adapter into [experts, in, out] (GPT-OSS's, transformers'
        // is_transposed experts); [experts, out, in] would fit it wrongly when in == out.
        if (m.stored_fused && m.fused_layout == FusedLayout::kOutIn)
          Fail("{}.stored_fused: needs fused_layout in_out or in_out_interleaved", at);
      }
      if (modules[i].contains("peft_refuses"))
        m.peft_refuses = String(modules[i], "peft_refuses", at);
      f.modules.push_back(std::move(m));
    }
  }
  if (j.contains("canonical")) {
    const json& canonical = j["canonical"];
    if (!canonical.is_array()) Fail("{}.canonical: expected a list", where);
    f.canonical.clear();
    for (std::size_t i = 0; i < canonical.size(); ++i) {
      const std::string at = fmt::format("{}.canonical[{}]", where, i);
      CanonicalMapping c;
      c.megatron = String(canonical[i], "megatron", at);
      c.adapter = String(canonical[i], "adapter", at);
      c.hf = ParseHfModule(Field(canonical[i], "hf", at), at + ".hf");
      if (canonical[i].contains("swiglu_sharded")) {
        if (!canonical[i]["swiglu_sharded"].is_boolean())
          Fail("{}.swiglu_sharded: expected true or false", at);
        c.swiglu_sharded = canonical[i]["swiglu_sharded"].get<bool>();
      }
      f.canonical.push_back(std::move(c));
    }
  }
  if (j.contains("forward")) {
    const json& forward = j["forward"];
    const std::string at = where + ".forward";
    if (!forward.is_object()) Fail("{}: expected an object", at);
    for (const auto& [key, value] : forward.items()) {
      if (key == "norm_weight_offset" && value.is_number()) {
        f.forward.norm_weight_offset = value.get<double>();
      } else if (key == "embedding_scale" && value.is_string() &&
                 (value == "sqrt_hidden" || value == "none")) {
        f.forward.scale_embedding = value == "sqrt_hidden";
      } else if (key == "moe_router" && value.is_string() && !value.get<std::string>().empty()) {
        f.forward.moe_router = value.get<std::string>();
      } else if (key == "moe_router_scoring" && value.is_string() &&
                 (value == "softmax" || value == "sigmoid")) {
        f.forward.moe_router_sigmoid = value == "sigmoid";
      } else if (key == "moe_shared_experts" && value.is_string() &&
                 !value.get<std::string>().empty()) {
        f.forward.moe_shared_experts = value.get<std::string>();
      } else if (key == "moe_clamped_swiglu" && value.is_object() && value.size() == 2 &&
                 value.contains("alpha") && value["alpha"].is_number() && value.contains("limit") &&
                 value["limit"].is_number()) {
        f.forward.moe_clamped_swiglu = ForwardTraits::ClampedSwiglu{value["alpha"].get<double>(),
                                                                    value["limit"].get<double>()};
      } else if (key == "verification" && value.is_boolean()) {
        f.forward.verification = value.get<bool>();
      } else if (key == "hybrid" && value.is_boolean()) {
        f.forward.hybrid = value.get<bool>();
      } else if ((key == "embedding" || key == "final_norm") && value.is_string() &&
                 !value.get<std::string>().empty()) {
        (key == "embedding" ? f.forward.embedding : f.forward.final_norm) =
            value.get<std::string>();
      } else {
        Fail(
            "{}.{}: expected norm_weight_offset (a number), embedding_scale (\"sqrt_hidden\" or "
            "\"none\"), moe_router (a module path), moe_router_scoring (\"softmax\" or "
            "\"sigmoid\"), moe_shared_experts (a module path), moe_clamped_swiglu ({{\"alpha\": "
            "a number, \"limit\": a number}}), verification or hybrid (true or false), embedding "
            "or final_norm (a tensor name)",
            at, key);
      }
    }
  }
  if (f.hf_layers_prefix.empty()) Fail("{}: missing 'hf_layers_prefix'", where);
  if (f.modules.empty()) Fail("{}: missing 'modules'", where);
  return f;
}

std::vector<ModelFamily> LoadModelFamilies(const std::vector<std::filesystem::path>& dirs) {
  // (source, text): the built-in files, then each directory's, in name order.
  std::vector<std::pair<std::string, std::string>> sources;
  for (const auto& [name, text] : BuiltinModelFamilies())
    sources.emplace_back("built-in config/models/" + name, std::string(text));
  for (const auto& dir : dirs) {
    if (!std::filesystem::is_directory(dir))
      Fail("model family directory '{}' does not exist", dir.string());
    std::vector<std::filesystem::path> files;
    for (const auto& entry : std::filesystem::directory_iterator(dir)) {
      if (entry.path().extension() == ".json") files.push_back(entry.path());
    }
    std::sort(files.begin(), files.end());
    for (const auto& file : files) sources.emplace_back(file.string(), ReadTextFile(file));
  }
  std::vector<ModelFamily> families;
  const auto add = [&](ModelFamily f) {
    const auto same = std::find_if(families.begin(), families.end(),
                                   [&](const ModelFamily& k) { return k.name == f.name; });
    if (same != families.end())
      *same = std::move(f);
    else
      families.push_back(std::move(f));
  };
  // Families that stand alone first, then those `like` one of them.
  for (const bool second : {false, true}) {
    for (const auto& [source, text] : sources) {
      const json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
      const bool like = j.is_object() && j.contains("like");
      if (like == second) add(ParseModelFamily(text, source, families));
    }
  }
  return families;
}

const ModuleMapping* ModelFamily::FindModule(std::string_view megatron) const {
  for (const auto& m : modules) {
    if (m.megatron == megatron) return &m;
  }
  return nullptr;
}

const ModuleMapping* ModelFamily::FindExperts(std::string_view megatron_leaf) const {
  for (const auto& m : modules) {
    if (m.experts && m.megatron.ends_with(megatron_leaf)) return &m;
  }
  return nullptr;
}

std::vector<const ModuleMapping*> ModelFamily::StoredFusedExperts() const {
  std::vector<const ModuleMapping*> out;
  for (const auto& m : modules) {
    if (m.stored_fused) out.push_back(&m);
  }
  return out;
}

void RequireVerificationForward(const ModelFamily& family) {
  if (family.forward.verification) return;
  Fail(
      "verification has no forward pass for the {} family yet, so it cannot check this export; "
      "pass --no-verify to export without it (and load the adapter with stock PEFT to check it)",
      family.name);
}

Width ParseWidth(const std::string& text, const std::string& where) {
  static constexpr std::pair<const char*, Width::Kind> kNamed[] = {
      {"hidden", Width::Kind::kHidden},        {"query", Width::Kind::kQuery},
      {"key_value", Width::Kind::kKeyValue},   {"ffn", Width::Kind::kFfn},
      {"expert_ffn", Width::Kind::kExpertFfn}, {"experts", Width::Kind::kExperts}};
  for (const auto& [name, kind] : kNamed) {
    if (text == name) return {kind, {}, text};
  }
  const auto is_factor = [](std::string_view f) {
    if (f.empty()) return false;
    const bool number =
        std::all_of(f.begin(), f.end(), [](char c) { return c >= '0' && c <= '9'; });
    const bool key = (f[0] < '0' || f[0] > '9') && std::all_of(f.begin(), f.end(), [](char c) {
                       return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_';
                     });
    return number || key;
  };
  const auto split = [](std::string_view s, char by) {
    std::vector<std::string> parts;
    for (std::size_t begin = 0;;) {
      const std::size_t end = s.find(by, begin);
      std::string part(s.substr(begin, end == std::string_view::npos ? end : end - begin));
      part.erase(0, part.find_first_not_of(' '));
      part.erase(part.find_last_not_of(' ') + 1);
      parts.push_back(std::move(part));
      if (end == std::string_view::npos) return parts;
      begin = end + 1;
    }
  };
  Width width{Width::Kind::kConfigSum, {}, text};
  for (const std::string& term : split(text, '+')) {
    width.terms.push_back(split(term, '*'));
    for (const std::string& factor : width.terms.back()) {
      if (!is_factor(factor)) {
        Fail(
            "{}: '{}' is neither a named width (hidden, query, key_value, ffn, expert_ffn, "
            "experts) "
            "nor a sum of products of config.json keys and integers (e.g. 'kv_lora_rank + "
            "qk_rope_head_dim', 'num_attention_heads * v_head_dim')",
            where, text);
      }
    }
  }
  return width;
}

std::string ExpertPath(const std::string& path, int64_t expert) {
  std::string out = path;
  const auto at = out.find("{expert}");
  if (at != std::string::npos) out.replace(at, 8, std::to_string(expert));
  return out;
}

const CanonicalMapping* ModelFamily::FindCanonical(std::string_view megatron,
                                                   std::string_view adapter) const {
  for (const auto& c : canonical) {
    if (c.megatron == megatron && c.adapter == adapter) return &c;
  }
  return nullptr;
}

const ModelFamily& FamilyFor(const std::vector<ModelFamily>& families,
                             const std::string& architecture, const std::string& model_type) {
  for (const auto& family : families) {
    if (std::find(family.architectures.begin(), family.architectures.end(), architecture) !=
        family.architectures.end())
      return family;
  }
  // model_type decides only when config.json names no architecture, or for a family that is
  // recognised by model_type alone: an unknown architecture is another model class, whatever
  // model_type it claims (EvilForCausalLM with model_type llama is not Llama).
  for (const auto& family : families) {
    if (!architecture.empty() && !family.architectures.empty()) continue;
    if (std::find(family.model_types.begin(), family.model_types.end(), model_type) !=
        family.model_types.end())
      return family;
  }
  std::string supported;
  for (const auto& family : families) {
    for (const auto& a : family.architectures) supported += (supported.empty() ? "" : ", ") + a;
  }
  Fail(
      "model architecture '{}' (model_type '{}') is not supported; supported: {} (a family "
      "using the same layouts can be added as a JSON file: config/models/README.md)",
      architecture, model_type, supported);
}

}  // namespace adapter_job::convert
