// Tensor names as PEFT 0.21's save_and_load.py writes and reads them; which modules are adapted,
// with which rank and scale, is peft_config.h's.
#include "peft_adapter.h"

#include <algorithm>
#include <optional>

#include "adapter_job/core/error.h"
#include "adapter_job/core/tensor.h"
#include "adapter_job/writer/adapter_config.h"
#include "lora_merge.h"
#include "peft_config.h"

namespace adapter_job::verify {
namespace {

constexpr std::string_view kPrefix = writer::kPeftNamePrefix;

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
                              int64_t num_layers, const std::vector<std::string>& linears,
                              const std::string& model_type) {
  PeftAdapter adapter;
  const auto config_path = dir / writer::kAdapterConfigFile;
  const PeftConfig config = PeftConfig::Read(config_path, model_type);
  adapter.unmodelled_ = config.unmodelled();
  const bool moe = std::any_of(linears.begin(), linears.end(),
                               [](const std::string& l) { return l.find("experts.") != l.npos; });
  if (config.all_linear() && moe) {
    // Which linears PEFT then wraps depends on how transformers builds the experts and router.
    adapter.unmodelled_.push_back("target_modules: \"all-linear\" on a mixture-of-experts model");
  }

  // Every targeted module of the base model, as PEFT would wrap them.
  for (int64_t layer = 0; layer < num_layers; ++layer) {
    for (const std::string& linear : linears) {
      const std::string module = fmt::format("model.layers.{}.{}", layer, linear);
      if (!base.Has(module + ".weight") || !config.Targets(module)) continue;
      Module m;
      m.rank = config.RankOf(module);
      if (m.rank < 1) {
        Fail("{}: the rank of {} (rank_pattern or r) is {}: PEFT refuses a rank below 1",
             config_path.string(), module, m.rank);
      }
      m.scale = config.ScaleOf(module);
      const auto shape = base.Shape(module + ".weight");
      m.out_features = shape.at(0);
      m.in_features = shape.size() > 1 ? shape[1] : 1;
      adapter.modules_.emplace(module, std::move(m));
    }
  }
  // A target_parameters entry that names no linear's weight targets something not modelled here
  // (an expert's fused parameter, say).
  for (const std::string& parameter : config.target_parameters()) {
    bool matched = false;
    for (int64_t layer = 0; layer < num_layers && !matched; ++layer) {
      for (const std::string& linear : linears) {
        const std::string weight = fmt::format("model.layers.{}.{}.weight", layer, linear);
        if (base.Has(weight) && NamesParameter(parameter, weight)) {
          matched = true;
          break;
        }
      }
    }
    if (!matched) adapter.unmodelled_.push_back("target_parameters: " + parameter);
  }
  // PEFT raises NoMatchingPeftModuleError; with a field it reads that is not modelled here, the
  // verdict names that field instead.
  if (adapter.modules_.empty() && adapter.unmodelled_.empty()) {
    Fail(
        "{}: target_modules (with exclude_modules and layers_to_transform) matches no linear "
        "module of the base model: PEFT refuses to load it",
        config_path.string());
  }

  const auto weights_path = dir / writer::kAdapterWeightsFile;
  const safetensors::File file = safetensors::File::Open(weights_path);
  for (const auto& entry : file.header().tensors) {
    if (adapter.tensor_count_++ == 0 ||
        ItemSize(entry.dtype) > at::elementSize(adapter.storage_dtype_)) {
      adapter.storage_dtype_ = ToTorch(entry.dtype);
    }
    std::string key = entry.name;
    std::optional<at::Tensor>* slot = nullptr;
    bool is_magnitude = false;
    std::string module;
    const Module* target = nullptr;
    int which = -1;
    if (key.starts_with(kPrefix)) {
      key = key.substr(kPrefix.size());
      // PEFT strips the adapter name; ".default" may survive in hand-made files.
      if (const auto at = key.find(".default"); at != std::string::npos) key.erase(at, 8);
      for (const auto& [suffix, kind] : {std::pair{".lora_A.weight", 0},
                                         {".lora_B.weight", 1},
                                         {".lora_magnitude_vector.weight", 2},
                                         {".lora_magnitude_vector", 2}}) {
        if (key.ends_with(suffix)) {
          module = key.substr(0, key.size() - std::string_view(suffix).size());
          which = kind;
          is_magnitude = kind == 2;
          const auto it = adapter.modules_.find(module);
          if (it != adapter.modules_.end()) {
            target = &it->second;
            slot = kind == 0   ? &it->second.lora_a
                   : kind == 1 ? &it->second.lora_b
                               : &it->second.magnitude;
          }
          break;
        }
      }
    }
    // A magnitude without use_dora is silently ignored by PEFT: count it as unused.
    if (is_magnitude && !config.dora()) slot = nullptr;
    // PEFT builds lora_A [r, in], lora_B [out, r] and the magnitude [out] from the config and the
    // base layer, and refuses a file whose tensor does not fit them.
    if (slot != nullptr) {
      const std::vector<int64_t> expected =
          which == 0   ? std::vector<int64_t>{target->rank, target->in_features}
          : which == 1 ? std::vector<int64_t>{target->out_features, target->rank}
                       : std::vector<int64_t>{target->out_features};
      if (entry.shape != expected) {
        Fail(
            "{}: {} has shape {} but module {} needs {} (rank {} from adapter_config.json's "
            "rank_pattern or r; the base weight is [{}, {}])",
            weights_path.string(), entry.name, ShapeToString(entry.shape), module,
            ShapeToString(expected), target->rank, target->out_features, target->in_features);
      }
    }

    const auto bytes = file.Data(entry);
    const at::Tensor tensor = at::from_blob(const_cast<std::byte*>(bytes.data()), entry.shape,
                                            at::TensorOptions().dtype(ToTorch(entry.dtype)))
                                  .to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
    adapter.stats_.push_back(StatOf(entry.name, tensor, entry.dtype));
    if (slot == nullptr) {
      adapter.unused_.push_back(entry.name);
      continue;
    }
    *slot = tensor;
  }
  for (const auto& [module, m] : adapter.modules_) {
    if (!m.lora_a) adapter.missing_.push_back(module + ".lora_A.weight");
    if (!m.lora_b) adapter.missing_.push_back(module + ".lora_B.weight");
    if (config.dora() && !m.magnitude)
      adapter.missing_.push_back(module + ".lora_magnitude_vector");
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
