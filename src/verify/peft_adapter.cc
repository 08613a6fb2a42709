// Tensor names as PEFT 0.21's save_and_load.py writes and reads them; which modules are adapted,
// with which rank and scale, is peft_config.h's.
#include "peft_adapter.h"

#include <algorithm>
#include <optional>
#include <set>

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
                              const std::string& layers_prefix, int64_t num_layers,
                              const std::vector<std::string>& linears, const MoeSettings& moe,
                              const std::string& model_type, bool for_stock_peft) {
  PeftAdapter adapter;
  adapter.moe_ = moe;
  adapter.layers_prefix_ = layers_prefix;
  const auto config_path = dir / writer::kAdapterConfigFile;
  const PeftConfig config = PeftConfig::Read(config_path, model_type);
  adapter.unmodelled_ = config.unmodelled();
  const bool has_experts = std::any_of(linears.begin(), linears.end(), [](const std::string& l) {
    return l.find("experts.") != l.npos;
  });
  if (config.all_linear() && has_experts) {
    // Which linears PEFT then wraps depends on how transformers builds the experts and router.
    adapter.unmodelled_.push_back("target_modules: \"all-linear\" on a mixture-of-experts model");
  }

  // PEFT's ParamWrapper, which every target_parameters entry gets (tuners/lora/layer.py), refuses
  // DoRA and dropout when it is built.
  const auto as_parameter = [&](const std::string& name) {
    if (std::none_of(config.target_parameters().begin(), config.target_parameters().end(),
                     [&](const std::string& t) { return NamesParameter(t, name); }))
      return false;
    if (config.dora() || config.dropout() > 0) {
      Fail("{}: target_parameters wraps {} in PEFT's ParamWrapper, which refuses {}",
           config_path.string(), name, config.dora() ? "use_dora" : "lora_dropout > 0");
    }
    return true;
  };
  // Every targeted module of the base model, as PEFT would wrap them.
  for (int64_t layer = 0; layer < num_layers; ++layer) {
    for (const std::string& linear : linears) {
      const std::string module = fmt::format("{}.{}.{}", layers_prefix, layer, linear);
      if (!base.Has(module + ".weight") || !config.Targets(module)) continue;
      as_parameter(module + ".weight");
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
  // Fused expert parameters in target_parameters (tuners_utils.py _inject_parameters): each gets
  // a ParamWrapper around what its module is by then, in the order the module registers its
  // parameters, so its adapter lies under one ".base_layer" per targeted parameter registered
  // after it. ParamWrapper reads the shape as [experts, in, out] and swaps in and out for a
  // module without `is_transposed`.
  const auto parent_of = [](const std::string& p) { return p.substr(0, p.rfind('.')); };
  for (int64_t layer = 0; layer < num_layers; ++layer) {
    const std::string prefix = fmt::format("{}.{}.", layers_prefix, layer);
    for (std::size_t i = 0; i < moe.fused.size(); ++i) {
      const FusedExperts& f = moe.fused[i];
      if (!base.Has(prefix + f.parameter) || !as_parameter(prefix + f.parameter)) continue;
      std::string wrapper = prefix + parent_of(f.parameter);
      for (std::size_t later = i + 1; later < moe.fused.size(); ++later) {
        const std::string other = prefix + moe.fused[later].parameter;
        if (parent_of(moe.fused[later].parameter) == parent_of(f.parameter) && base.Has(other) &&
            as_parameter(other))
          wrapper += ".base_layer";
      }
      const auto shape = base.Shape(prefix + f.parameter);
      Module m;
      m.fused = i;
      m.experts = shape.at(0);
      m.swapped = f.layout == convert::FusedLayout::kOutIn;
      m.in_features = m.swapped ? shape.at(2) : shape.at(1);
      m.out_features = m.swapped ? shape.at(1) : shape.at(2);
      // PEFT matches rank_pattern and alpha_pattern against the parameter's name.
      m.rank = config.RankOf(prefix + f.parameter);
      m.scale = config.ScaleOf(prefix + f.parameter);
      if (m.rank < 1)
        Fail("{}: the rank of {} is {}: PEFT refuses a rank below 1", config_path.string(),
             prefix + f.parameter, m.rank);
      adapter.modules_.emplace(wrapper, std::move(m));
    }
  }
  // PEFT refuses LoRA on a Mamba-based model's out_proj and conv1d when it injects the adapter
  // (tuners/tuners_utils.py _check_lora_target_modules_mamba).
  static const std::set<std::string> kMambaModelTypes = {"falcon_h1", "mamba", "mamba2",
                                                         "falcon_mamba", "nemotron_h"};
  if (for_stock_peft && kMambaModelTypes.contains(model_type)) {
    for (const auto& [module, m] : adapter.modules_) {
      const std::string leaf = module.substr(module.rfind('.') + 1);
      if (leaf == "out_proj" || leaf == "conv1d") {
        Fail(
            "{}: target_modules reaches '{}', but stock PEFT refuses LoRA on a Mamba-based model's "
            "{} (model_type '{}'; peft tuners/tuners_utils.py _check_lora_target_modules_mamba): "
            "the adapter does not load",
            config_path.string(), module, leaf, model_type);
      }
    }
  }
  // A target_parameters entry that names no linear's weight and no fused expert parameter
  // targets something not modelled here.
  for (const std::string& parameter : config.target_parameters()) {
    bool matched = false;
    for (int64_t layer = 0; layer < num_layers && !matched; ++layer) {
      for (const FusedExperts& f : moe.fused) {
        const std::string name = fmt::format("{}.{}.{}", layers_prefix, layer, f.parameter);
        if (base.Has(name) && NamesParameter(parameter, name)) matched = true;
      }
    }
    for (int64_t layer = 0; layer < num_layers && !matched; ++layer) {
      for (const std::string& linear : linears) {
        const std::string weight = fmt::format("{}.{}.{}.weight", layers_prefix, layer, linear);
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
      // A ParamWrapper's lora_A is [rank x experts, in], its lora_B [out, rank x experts].
      const int64_t rows = target->rank * target->experts;
      const std::vector<int64_t> expected =
          which == 0   ? std::vector<int64_t>{rows, target->in_features}
          : which == 1 ? std::vector<int64_t>{target->out_features, rows}
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
  const std::string prefix = fmt::format("{}.{}.", layers_prefix_, layer);
  for (auto it = modules_.lower_bound(prefix);
       it != modules_.end() && it->first.starts_with(prefix); ++it) {
    const Module& m = it->second;
    if (!m.lora_a || !m.lora_b) continue;
    if (m.fused) {
      ApplyFused(m, prefix, weights, device);
      continue;
    }
    std::optional<at::Tensor> magnitude;
    if (m.magnitude) magnitude = m.magnitude->to(device);
    at::Tensor& w = weights.Linear(it->first.substr(prefix.size()));
    w = MergeAdapter(w, m.lora_a->to(device), m.lora_b->to(device), m.scale, magnitude,
                     it->first + " (PEFT adapter)");
  }
}

// ParamWrapper.get_delta_weight: lora_A read as [experts, rank, in], lora_B as [out, rank,
// experts]; expert e's delta is B_e A_e ([out, in]), in the parameter's orientation (transposed
// for an [experts, in, out] one), and so splits into the expert's linears as the weight does.
void PeftAdapter::ApplyFused(const Module& m, const std::string& layer_prefix,
                             LayerWeights& weights, const at::Device& device) const {
  const FusedExperts& f = moe_.fused.at(*m.fused);
  const at::Tensor a = m.lora_a->to(device).view({m.experts, m.rank, m.in_features});
  const at::Tensor b = m.lora_b->to(device).view({m.out_features, m.rank, m.experts});
  for (int64_t e = 0; e < m.experts; ++e) {
    const at::Tensor delta = m.scale * at::matmul(b.select(2, e), a[e]);
    const auto parts = SplitFused(m.swapped ? delta : delta.t(), f.layout, f.linears.size());
    for (std::size_t k = 0; k < parts.size(); ++k) {
      at::Tensor& w = weights.Linear(convert::ExpertPath(moe_.expert[f.linears[k]], e));
      if (!w.sizes().equals(parts[k].sizes()))
        Fail("{}{} (PEFT adapter): expert {}'s delta is {} but its weight {}", layer_prefix,
             f.parameter, e, ShapeToString({parts[k].sizes().data(), parts[k].sizes().size()}),
             ShapeToString({w.sizes().data(), w.sizes().size()}));
      w = w + parts[k];
    }
  }
}

}  // namespace adapter_job::verify
