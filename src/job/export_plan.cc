#include "export_plan.h"

#include <fmt/format.h>

#include <set>

#include "adapter_job/checkpoint/integrity.h"
#include "adapter_job/convert/hf_config.h"
#include "adapter_job/convert/model_family.h"
#include "adapter_job/core/error.h"
#include "adapter_job/safetensors/model_weights.h"
#include "adapter_job/verify/verify.h"

namespace adapter_job::job {
namespace {

namespace fs = std::filesystem;

writer::AdapterWeight WeightOf(checkpoint::AdapterParam param) {
  switch (param) {
    case checkpoint::AdapterParam::kLinearIn:
      return writer::AdapterWeight::kLoraA;
    case checkpoint::AdapterParam::kLinearOut:
      return writer::AdapterWeight::kLoraB;
    case checkpoint::AdapterParam::kMagnitude:
      return writer::AdapterWeight::kMagnitude;
  }
  Fail("unknown adapter parameter");
}

// The digests first: a damaged file is then named as such, not as whatever parse error it causes.
checkpoint::RunDirectory OpenRun(const ExportOptions& options, int world_size, int rank,
                                 std::optional<std::size_t>& integrity_files,
                                 std::string& integrity_not_checked) {
  auto run = checkpoint::OpenRunDirectory(options.checkpoint, [&](const auto& opened) {
    if (!opened.integrity) {
      integrity_not_checked = "the checkpoint has no integrity.json";
    } else if (!options.check_integrity) {
      integrity_not_checked = "--no-integrity-check";
    } else {
      checkpoint::CheckIntegrity(*opened.integrity, opened.iteration_dir, rank, world_size);
      integrity_files = opened.integrity->files.size();
    }
  });
  if (!run.peft) {
    Fail(
        "no run_config.yaml with a peft: section in or above '{}': the adapter's dim, alpha and "
        "kind are unknown",
        run.iteration_dir.string());
  }
  return run;
}

convert::ConversionSettings SettingsFor(const ExportOptions& options,
                                        const convert::BaseModel& base,
                                        const checkpoint::RunDirectory& run,
                                        const checkpoint::AdapterLayout& layout) {
  convert::ConversionSettings settings;
  settings.model =
      base.dir ? convert::ReadHfConfig(*base.dir) : convert::ModelConfigFromRunConfig(run);
  if (settings.model.num_hidden_layers != layout.num_layers) {
    Fail("{} says {} layers but the checkpoint has {}", settings.model.path.string(),
         settings.model.num_hidden_layers, layout.num_layers);
  }
  const auto families = convert::LoadModelFamilies(options.model_family_dirs);
  settings.family = WithContext([&] { return settings.model.path.string(); },
                                [&] {
                                  return convert::FamilyFor(families, settings.model.architecture,
                                                            settings.model.model_type);
                                });
  settings.kind = run.peft->kind;
  settings.training_tensor_parallel = layout.tensor_parallel;
  settings.dtype = options.dtype;
  return settings;
}

// Expert tensors with an expert axis are checked against the model's count by the conversion; a
// shared adapter saved without one (before Megatron-Bridge 0.5.1) says nothing of it, so the
// training's own count must agree with the model's, or the adapter is copied to experts that were
// never trained.
void CheckExpertCount(const convert::BaseModel& base, const checkpoint::RunDirectory& run,
                      const convert::ConversionSettings& settings) {
  if (const auto experts = run.model.num_moe_experts;
      experts && base.dir && *experts != settings.model.num_experts) {
    const int64_t model_experts = settings.model.num_experts;
    Fail("{} describes {}, but {}: model.num_moe_experts is {}", settings.model.path.string(),
         model_experts == 0 ? "a dense model"
                            : fmt::format("{} experts per MoE layer", model_experts),
         run.run_config_path->string(), *experts);
  }
}

// The base model's linear modules that target_modules (the exported leaves) matches but that got
// no adapter, once adapters were left out on purpose: PEFT would wrap them and warn of missing
// keys. An expert cannot be left out alone: transformers 5 fuses the experts into one parameter.
std::vector<std::string> ModulesLeftOut(
    const convert::BaseModel& base, const convert::ModelFamily& family,
    const std::vector<std::vector<convert::OutputTensor>>& layer_outputs) {
  if (!base.dir) {
    Fail(
        "--exclude-adapter-base-prefix needs --hf-model-id to be the local base model directory: "
        "adapter_config.json must name the base modules left without an adapter");
  }
  std::set<std::string> leaves, exported;
  for (const auto& layer : layer_outputs) {
    for (const auto& out : layer) {
      leaves.insert(out.leaf);
      exported.insert(out.module);
    }
  }
  const std::string prefix = family.hf_layers_prefix + ".";
  std::vector<std::string> left_out;
  const auto weights = safetensors::ModelWeights::Open(*base.dir);
  for (const auto& [name, tensor] : weights.tensors()) {
    if (!name.starts_with(prefix) || !name.ends_with(".weight")) continue;
    const std::string module = name.substr(0, name.size() - 7);
    const std::string leaf = module.substr(module.rfind('.') + 1);
    if (!leaves.contains(leaf) || exported.contains(module) || tensor.entry.shape.size() != 2)
      continue;
    if (module.find(".experts.") != std::string::npos) {
      Fail(
          "--exclude-adapter-base-prefix leaves '{}' without an adapter while other experts keep "
          "theirs; PEFT cannot leave out part of transformers' fused experts: exclude no expert "
          "adapters",
          module);
    }
    left_out.push_back(module);
  }
  return left_out;
}

}  // namespace

ExportPlan PlanExport(const ExportOptions& options, bool verify,
                      const std::vector<writer::NamedPath>& outputs, int world_size, int rank) {
  // Verification asked for but impossible is an error before any work, never a quiet skip.
  const auto require_verifiable = [&](const convert::BaseModel& base) {
    if (verify) verify::RequireVerifiable(base.dir ? base.dir->string() : base.id);
    return base;
  };
  std::optional<convert::BaseModel> given_base;
  if (!options.hf_model_id.empty())
    given_base =
        require_verifiable(convert::ResolveBaseModel(options.hf_model_id, options.revision));
  std::optional<std::size_t> integrity_files;
  std::string integrity_not_checked;
  checkpoint::RunDirectory run =
      OpenRun(options, world_size, rank, integrity_files, integrity_not_checked);
  // Without --hf-model-id, the base model the fine-tune recorded (read once the files are
  // checked against integrity.json, as all of run_config.yaml is).
  convert::BaseModel base =
      given_base ? *given_base
                 : require_verifiable(convert::ResolveRecordedBaseModel(
                       run.model.hf_model_id, run.run_config_path.value_or(run.iteration_dir),
                       options.revision));

  std::vector<writer::NamedPath> inputs = {
      {"--megatron-peft-checkpoint", options.checkpoint},
      {"the checkpoint's iteration directory", run.iteration_dir},
      {"--hf-model-id", base.dir.value_or(fs::path())}};
  for (const auto& dir : options.model_family_dirs) inputs.push_back({"--model-families", dir});
  writer::RefuseOutputsOverInputs(outputs, inputs);

  auto reader = checkpoint::CheckpointReader::Open(run.iteration_dir);
  auto layout = checkpoint::PlanAdapterLayout(
      reader.metadata(), run.model,
      {options.excluded_adapter_prefixes, options.include_mtp_layers});
  // Before any collective, and before any buffer is sized from the .metadata: a missing or short
  // shard, or a .metadata that declares more than the files hold. Every rank checks every chunk,
  // so all fail alike.
  reader.CheckDeclaredBytes(layout);
  checkpoint::RequireParallelSizes(options.stated_parallelism, run.model,
                                   run.run_config_path.value_or(run.iteration_dir));
  auto settings = SettingsFor(options, base, run, layout);
  if (verify) convert::RequireVerificationForward(settings.family);
  std::vector<std::vector<convert::OutputTensor>> layer_outputs;
  for (const auto& layer : layout.layers) {
    layer_outputs.push_back(convert::PlanLayerConversion(layer, settings));
  }
  CheckExpertCount(base, run, settings);
  convert::ServingLayout serving =
      convert::LayOutForServing(options.target, settings, run.peft->dim, layer_outputs);
  std::vector<std::string> exclude_modules =
      options.excluded_adapter_prefixes.empty()
          ? std::vector<std::string>()
          : ModulesLeftOut(base, settings.family, layer_outputs);
  auto owners = comm::ShardOwnership::Assign(layout.shard_count(), world_size);
  return ExportPlan{std::move(base),
                    std::move(run),
                    std::move(reader),
                    std::move(layout),
                    std::move(settings),
                    std::move(layer_outputs),
                    std::move(owners),
                    integrity_files,
                    std::move(integrity_not_checked),
                    std::move(exclude_modules),
                    options.target,
                    std::move(serving)};
}

writer::ExportAnnouncement ExportPlan::Announce(const ExportOptions& options) const {
  writer::ExportAnnouncement announced;
  // Megatron's peft settings plus the rank of every adapted module (for rank_pattern).
  writer::AdapterConfigInputs& config = announced.config;
  config.base_model_name_or_path = options.base_model_name_or_path.value_or(base.name);
  announced.base_model_dir = base.dir;
  config.r = serving.rank;
  config.lora_alpha = run.peft->alpha;
  config.lora_dropout = run.peft->dropout;
  config.use_dora = settings.kind == checkpoint::AdapterKind::kDoRA;
  config.exclude_modules = exclude_modules;
  // The leaves of experts transformers 5 fuses: PEFT re-targets them to the fused parameters.
  std::set<std::string> fused_leaves;
  for (const auto& m : settings.family.modules) {
    if (!m.experts || m.fused_parameter.empty() || m.stored_fused) continue;
    for (const auto& hf : m.hf) fused_leaves.insert(hf.path.substr(hf.path.rfind('.') + 1));
  }
  for (std::size_t l = 0; l < outputs.size(); ++l) {
    for (const auto& out : outputs[l]) {
      announced.tensors.push_back({out.name, out.module, WeightOf(out.param),
                                   static_cast<int64_t>(l), out.dtype, out.shape});
      if (out.param == checkpoint::AdapterParam::kLinearIn) {
        if (!out.peft_refuses.empty())
          announced.peft_refused.push_back({out.module, out.peft_refuses});
        if (!out.parameter.empty()) {  // a fused expert parameter: lora_A is [experts x rank, in]
          config.modules.push_back({out.module, out.leaf, out.shape[0] / settings.model.num_experts,
                                    out.rank_keys, out.parameter});
          continue;
        }
        // transformers 5 routers are no nn.Linear: PEFT reaches them only as a parameter.
        const bool as_parameter = (!out.expert && fused_leaves.contains(out.leaf)) ||
                                  out.path == settings.family.forward.moe_router;
        config.modules.push_back({out.module, out.leaf, out.shape[0], out.rank_keys,
                                  as_parameter ? out.path + ".weight" : std::string()});
      }
    }
  }
  return announced;
}

std::vector<writer::NamedPath> CheckedOutputs(const writer::ExportSink& sink,
                                              const ExportOptions& options) {
  if (options.verify && !sink.verifiable())
    Fail("verification was asked for, but this export's output cannot be verified");
  std::vector<writer::NamedPath> outputs = sink.Outputs();
  outputs.push_back({"--report", options.report_path.value_or(fs::path())});
  return outputs;
}

verify::VerifyOptions VerifyOptionsFor(const ExportOptions& options, const ExportPlan& plan) {
  verify::VerifyOptions v = *options.verify;
  v.hf_model = plan.base.dir.value_or(plan.base.id);
  v.base_model_name = options.base_model_name_or_path.value_or(plan.base.name);
  // The iteration this export read: a newer save appearing meanwhile must not be verified instead.
  v.megatron_checkpoint = plan.run.iteration_dir;
  if (!v.progress) v.progress = options.progress;
  v.model_family_dirs = options.model_family_dirs;
  v.excluded_adapter_prefixes = options.excluded_adapter_prefixes;
  v.include_mtp_layers = options.include_mtp_layers;
  return v;
}

}  // namespace adapter_job::job
