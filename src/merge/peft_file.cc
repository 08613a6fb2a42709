#include "peft_file.h"

#include <nlohmann/json.hpp>

#include "adapter_job/core/error.h"
#include "adapter_job/core/file.h"
#include "adapter_job/core/json_file.h"
#include "adapter_job/writer/adapter_config.h"

namespace adapter_job::merge {
namespace {

namespace fs = std::filesystem;

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

}  // namespace

PeftFile PeftFile::Open(const fs::path& adapter_dir) {
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
  if (parts.magnitude)
    update.magnitude = ToFloat32(file_.Data(*parts.magnitude), parts.magnitude->dtype);
  return update;
}

}  // namespace adapter_job::merge
