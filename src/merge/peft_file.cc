#include "peft_file.h"

#include <algorithm>
#include <nlohmann/json.hpp>

#include "adapter_job/core/error.h"
#include "adapter_job/core/file.h"
#include "adapter_job/core/json_file.h"
#include "adapter_job/writer/adapter_config.h"

namespace adapter_job::merge {
namespace {

namespace fs = std::filesystem;

constexpr std::string_view kWrapped = ".base_layer";

// lora_alpha from adapter_config.json; alpha / r is each module's scale, r its lora_A's rows
// (what rank_pattern says).
double Alpha(const fs::path& adapter_dir) {
  const fs::path path = adapter_dir / writer::kAdapterConfigFile;
  const nlohmann::json config = ReadJsonFile(path);
  const auto alpha = config.find("lora_alpha");
  if (alpha == config.end() || !alpha->is_number())
    Fail("'{}': lora_alpha is {}, expected a number", path.string(),
         alpha == config.end() ? "missing" : alpha->dump());
  if (config.value("use_rslora", false)) Fail("'{}': use_rslora is not merged", path.string());
  if (const auto pattern = config.find("alpha_pattern");
      pattern != config.end() && !pattern->empty())
    Fail("'{}': alpha_pattern is not merged", path.string());
  return alpha->get<double>();
}

std::vector<std::string> TargetParameters(const fs::path& adapter_dir) {
  const nlohmann::json config = ReadJsonFile(adapter_dir / writer::kAdapterConfigFile);
  const auto it = config.find("target_parameters");
  if (it == config.end() || !it->is_array()) return {};
  return it->get<std::vector<std::string>>();
}

}  // namespace

PeftFile PeftFile::Open(const fs::path& adapter_dir, const safetensors::ModelWeights& base) {
  PeftFile peft(safetensors::File::Open(adapter_dir / writer::kAdapterWeightsFile));
  peft.alpha_ = Alpha(adapter_dir);
  for (const auto& entry : peft.file_.header().tensors) {
    std::string_view name = entry.name;
    if (!name.starts_with(writer::kPeftNamePrefix))
      Fail("'{}': tensor '{}' lacks PEFT's '{}' prefix", peft.file_.path().string(), name,
           writer::kPeftNamePrefix);
    name.remove_prefix(writer::kPeftNamePrefix.size());
    const auto take = [&](std::string_view suffix, const safetensors::TensorEntry* Module::*slot) {
      if (!name.ends_with(suffix)) return false;
      peft.modules_[std::string(name.substr(0, name.size() - suffix.size()))].*slot = &entry;
      return true;
    };
    if (!take(".lora_A.weight", &Module::a) && !take(".lora_B.weight", &Module::b) &&
        !take(".lora_magnitude_vector", &Module::magnitude))
      Fail("'{}': tensor '{}' is not a LoRA or DoRA weight this merge knows",
           peft.file_.path().string(), entry.name);
  }
  // ParamWrappers of fused expert parameters: named after their module, nested once per further
  // parameter of it (tuners_utils.py _inject_parameters). Which parameter each adapts follows
  // from the shapes, and verification checks the merged result against PEFT's own nesting.
  const std::vector<std::string> targets = TargetParameters(adapter_dir);
  std::map<std::string, Module> resolved;
  for (auto& [name, parts] : peft.modules_) {
    std::string module = name;
    for (std::size_t at; (at = module.find(kWrapped)) != std::string::npos;)
      module.erase(at, kWrapped.size());
    if (base.Find(module + ".weight") || !parts.a || !parts.b) {
      resolved.emplace(name, parts);
      continue;
    }
    std::vector<std::string> fits;
    for (const auto& [tensor_name, tensor] : base.tensors()) {
      const auto& shape = tensor.entry.shape;
      if (!tensor_name.starts_with(module + ".") ||
          tensor_name.find('.', module.size() + 1) != std::string::npos || shape.size() != 3 ||
          std::none_of(targets.begin(), targets.end(), [&](const std::string& t) {
            return tensor_name == t || tensor_name.ends_with("." + t);
          }))
        continue;
      const int64_t experts = shape[0], rows = parts.a->shape.at(0);
      if (rows % experts == 0 && parts.a->shape.at(1) == shape[1] &&
          parts.b->shape == std::vector<int64_t>{shape[2], rows})
        fits.push_back(tensor_name);
    }
    if (fits.size() != 1)
      Fail(
          "'{}': '{}' adapts {} of the base's [experts, in, out] parameters of '{}' named by "
          "target_parameters; expected exactly one",
          peft.file_.path().string(), name, fits.size(), module);
    parts.experts = base.Find(fits[0])->entry.shape[0];
    if (!resolved.emplace(fits[0], parts).second)
      Fail("'{}': two adapters fit '{}'", peft.file_.path().string(), fits[0]);
  }
  peft.modules_ = std::move(resolved);
  return peft;
}

std::vector<std::string> PeftFile::Modules() const {
  std::vector<std::string> names;
  for (const auto& [module, unused] : modules_) names.push_back(module);
  return names;
}

void PeftFile::Check(const OutputTensor& target) const {
  const std::string& module = *target.module;
  const auto where = [&] {
    return fmt::format("'{}', module '{}'", file_.path().string(), module);
  };
  const auto it = modules_.find(module);
  if (it == modules_.end()) Fail("{}: no such module", where());
  const Module& parts = it->second;
  if (!parts.a || !parts.b) Fail("{}: lora_A or lora_B is missing", where());
  if (parts.experts > 0) {
    if (parts.magnitude) Fail("{}: DoRA on a fused expert parameter is not merged", where());
    return;  // fitted to the parameter's shape when the file was opened
  }
  if (parts.a->shape.size() != 2 || parts.b->shape.size() != 2 || target.shape.size() != 2)
    Fail("{}: lora_A, lora_B and the base weight must be matrices", where());
  const int64_t rank = parts.a->shape[0];
  const int64_t out = target.shape[0], in = target.shape[1];
  if (parts.a->shape[1] != in || parts.b->shape[0] != out || parts.b->shape[1] != rank)
    Fail(
        "{}: lora_A is {} and lora_B {}, which do not fit the base weight '{}' of {} (expected "
        "lora_A [r, {}] and lora_B [{}, r])",
        where(), ShapeToString(parts.a->shape), ShapeToString(parts.b->shape), target.name,
        ShapeToString(target.shape), in, out);
  if (parts.magnitude && parts.magnitude->shape != std::vector<int64_t>{out})
    Fail("{}: the DoRA magnitude is {}, expected [{}]", where(),
         ShapeToString(parts.magnitude->shape), out);
}

LowRankUpdate PeftFile::Update(const OutputTensor& target) const {
  Check(target);
  const Module& parts = modules_.at(*target.module);
  LowRankUpdate update;
  update.rank = parts.a->shape[0];
  update.scale = alpha_ / static_cast<double>(update.rank);
  update.a = ToFloat32(file_.Data(*parts.a), parts.a->dtype);
  update.b = ToFloat32(file_.Data(*parts.b), parts.b->dtype);
  if (parts.experts > 0) {
    // ParamWrapper.get_delta_weight: expert e's delta to its [in, out] slice is (B_e A_e)^T with
    // A_e = lora_A[e r : (e + 1) r] and B_e[o, k] = lora_B[o, k experts + e]. Row i of the slice
    // so gains sum_k A_e[k, i] B_e[:, k]: the row-wise update with "lora_B" rows A_e^T and a
    // per-expert "lora_A" B_e^T.
    const int64_t experts = parts.experts, rank = update.rank / experts;
    const int64_t in = parts.a->shape[1], out = parts.b->shape[0];
    std::vector<float> a(update.b.size()), b(update.a.size());  // B^T per expert, A^T
    for (int64_t e = 0; e < experts; ++e) {
      for (int64_t k = 0; k < rank; ++k) {
        for (int64_t o = 0; o < out; ++o)
          a[(e * rank + k) * out + o] = update.b[o * rank * experts + k * experts + e];
        for (int64_t i = 0; i < in; ++i)
          b[(e * in + i) * rank + k] = update.a[(e * rank + k) * in + i];
      }
    }
    update.a = std::move(a);
    update.b = std::move(b);
    update.rank = rank;
    update.scale = alpha_ / static_cast<double>(rank);
    update.rows_per_expert = in;
  }
  if (parts.magnitude)
    update.magnitude = ToFloat32(file_.Data(*parts.magnitude), parts.magnitude->dtype);
  return update;
}

}  // namespace adapter_job::merge
