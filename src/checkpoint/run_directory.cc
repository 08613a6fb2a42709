#include "adapter_job/checkpoint/run_directory.h"

#include <yaml-cpp/yaml.h>

#include <cmath>
#include <limits>

#include "adapter_job/checkpoint/checkpoint_resolver.h"
#include "adapter_job/core/error.h"
#include "adapter_job/core/file.h"
#include "adapter_job/core/json_file.h"
#include "yaml_values.h"

namespace adapter_job::checkpoint {
namespace {

namespace fs = std::filesystem;

// Size caps, far above what real checkpoints hold, so hostile files fail fast instead of
// exhausting memory (yaml-cpp takes ~125 bytes of memory per input byte, nlohmann::json ~10-20).
// Megatron-Bridge's run_config.yaml is ~22 KB (shared/fixtures/megatron-bridge) and does not grow
// with the model: it is the run's configuration.
constexpr std::size_t kMaxRunConfigBytes = std::size_t{1} << 20;
// metadata.json holds two keys (63 bytes in the fixtures).
constexpr std::size_t kMaxMetadataJsonBytes = std::size_t{1} << 20;
// integrity.json holds one ~100-byte digest line per file: a 1024-rank DeepSeek-V3 run is ~100 KB.
constexpr std::size_t kMaxIntegrityBytes = std::size_t{16} << 20;

// Beyond any Megatron run, and small enough that TP x PP x EP arithmetic stays far from overflow.
constexpr int64_t kMaxParallelSize = 65536;
// The training shards, PP x max(TP, EP x expert TP): each is a rank that wrote.
constexpr int64_t kMaxTrainingShards = int64_t{1} << 20;
// No model dimension comes near 2^31, and a product of two stays within int64.
constexpr int64_t kMaxDimension = std::numeric_limits<int32_t>::max();

PeftSettings ParsePeft(const YamlSection& peft) {
  PeftSettings s;
  peft.RejectNull("_target_", "a Megatron-Bridge PEFT class name");
  s.target = peft.String("_target_").value_or("");
  if (s.target.find("CanonicalLoRA") != std::string::npos) {
    s.kind = AdapterKind::kCanonicalLoRA;
  } else if (s.target.find("DoRA") != std::string::npos) {
    s.kind = AdapterKind::kDoRA;
  } else if (s.target.find("VLMLoRA") != std::string::npos) {
    s.kind = AdapterKind::kVLMLoRA;
  } else if (s.target.find("LoRA") != std::string::npos) {
    s.kind = AdapterKind::kLoRA;
  } else {
    Fail("{}: peft._target_ '{}' is not a LoRA, DoRA or CanonicalLoRA class", peft.file->string(),
         s.target);
  }
  if (s.kind == AdapterKind::kDoRA) s.alpha = 64;  // DoRA's own default
  // Megatron-Bridge's dataclasses default none of these to None: a null is a damaged file, and
  // taking the default instead would export (and verify) an adapter trained with other settings.
  constexpr std::string_view kDim = "an integer from 1 to 2147483647";
  constexpr std::string_view kAlpha = "a finite number > 0 (int or float)";
  constexpr std::string_view kDropout = "a number >= 0 and < 1";
  constexpr std::string_view kStrings = "a list of strings";
  constexpr std::string_view kBool = "true or false";
  peft.RejectNull("dim", kDim);
  peft.RejectNull("alpha", kAlpha);
  peft.RejectNull("dropout", kDropout);
  peft.RejectNull("dropout_position", "pre or post");
  peft.RejectNull("target_modules", kStrings);
  peft.RejectNull("share_expert_adapters", kBool);
  peft.RejectNull("normalize_moe_lora", kBool);
  s.dim = peft.Int("dim", 1, kMaxDimension).value_or(s.dim);
  s.alpha = peft.Number("alpha", 0, false, HUGE_VAL, false, kAlpha).value_or(s.alpha);
  s.dropout = peft.Number("dropout", 0, true, 1, false, kDropout).value_or(s.dropout);
  s.dropout_position = peft.String("dropout_position").value_or(s.dropout_position);
  if (s.dropout_position != "pre" && s.dropout_position != "post") {
    peft.Bad("dropout_position", peft.node["dropout_position"], "pre or post");
  }
  s.target_modules = peft.StringList("target_modules").value_or(s.target_modules);
  s.exclude_modules = peft.StringList("exclude_modules").value_or(s.exclude_modules);
  s.share_expert_adapters = peft.Bool("share_expert_adapters").value_or(s.share_expert_adapters);
  s.normalize_moe_lora = peft.Bool("normalize_moe_lora").value_or(s.normalize_moe_lora);
  return s;
}

ModelSettings ParseModel(const YamlSection& model) {
  ModelSettings m;
  const auto parallel = [&](const char* key) { return model.Int(key, 1, kMaxParallelSize); };
  const auto dimension = [&](const char* key) { return model.Int(key, 1, kMaxDimension); };
  // Megatron's defaults for these are numbers, never None.
  for (const char* key : {"tensor_model_parallel_size", "pipeline_model_parallel_size",
                          "expert_model_parallel_size"}) {
    model.RejectNull(key, "an integer from 1 to 65536");
  }
  for (const char* key : {"bf16", "fp16"}) model.RejectNull(key, "true or false");
  m.tensor_parallel = parallel("tensor_model_parallel_size").value_or(1);
  m.pipeline_parallel = parallel("pipeline_model_parallel_size").value_or(1);
  m.virtual_pipeline_parallel = parallel("virtual_pipeline_model_parallel_size");
  m.expert_parallel = parallel("expert_model_parallel_size").value_or(1);
  m.expert_tensor_parallel = parallel("expert_tensor_parallel_size").value_or(m.tensor_parallel);
  const int64_t shards = m.pipeline_parallel *
                         std::max(m.tensor_parallel, m.expert_parallel * m.expert_tensor_parallel);
  if (shards > kMaxTrainingShards) {
    Fail(
        "{}: model.pipeline_model_parallel_size {} x max(tensor_model_parallel_size {}, "
        "expert_model_parallel_size {} x expert_tensor_parallel_size {}) is {} training shards; "
        "expected at most {}",
        model.file->string(), m.pipeline_parallel, m.tensor_parallel, m.expert_parallel,
        m.expert_tensor_parallel, shards, kMaxTrainingShards);
  }
  m.num_layers = dimension("num_layers");
  m.hidden_size = dimension("hidden_size");
  m.ffn_hidden_size = dimension("ffn_hidden_size");
  m.num_attention_heads = dimension("num_attention_heads");
  m.num_query_groups = dimension("num_query_groups");
  m.kv_channels = dimension("kv_channels");
  m.num_moe_experts = dimension("num_moe_experts");
  m.hf_model_id = model.String("hf_model_id");
  if (const auto extra = model.Section("extra_checkpoint_metadata")) {
    if (auto id = extra->String("hf_model_id")) m.hf_model_id = id;
  }
  if (const auto dtype = model.Section("params_dtype")) m.params_dtype = dtype->String("_target_");
  m.bf16 = model.Bool("bf16").value_or(false);
  m.fp16 = model.Bool("fp16").value_or(false);
  return m;
}

IntegrityManifest ParseIntegrity(const fs::path& file) {
  return WithContext([&] { return file.string(); },
                     [&] {
                       const nlohmann::json j = ParseJson(ReadTextFile(file, kMaxIntegrityBytes));
                       IntegrityManifest m;
                       if (!j.is_object() || !j.contains("algorithm") ||
                           !j["algorithm"].is_string() || !j.contains("files") ||
                           !j["files"].is_object()) {
                         Fail("expected {{\"algorithm\": str, \"files\": {{name: digest}}}}");
                       }
                       m.algorithm = j["algorithm"].get<std::string>();
                       for (const auto& [name, digest] : j["files"].items()) {
                         if (!digest.is_string())
                           Fail("files.{} should be a hex digest string", name);
                         m.files[name] = digest.get<std::string>();
                       }
                       return m;
                     });
}

}  // namespace

std::string_view AdapterKindName(AdapterKind kind) {
  switch (kind) {
    case AdapterKind::kLoRA:
      return "LoRA";
    case AdapterKind::kDoRA:
      return "DoRA";
    case AdapterKind::kCanonicalLoRA:
      return "CanonicalLoRA";
    case AdapterKind::kVLMLoRA:
      return "VLMLoRA";
  }
  return "?";
}

RunDirectory OpenRunDirectory(const fs::path& path,
                              const std::function<void(const RunDirectory&)>& before_parsing) {
  RunDirectory run;
  run.given = path;
  const CheckpointLocation location = ResolveCheckpoint(path);
  run.iteration_dir = location.iteration_dir;
  run.iteration = location.iteration;
  if (!fs::exists(run.iteration_dir / ".metadata")) {
    Fail(
        "'{}' is not a torch_dist checkpoint: it has no .metadata (pass the save directory or an "
        "iter_* directory)",
        run.iteration_dir.string());
  }
  const fs::path integrity = run.iteration_dir / "integrity.json";
  if (fs::exists(integrity)) run.integrity = ParseIntegrity(integrity);
  if (before_parsing) before_parsing(run);

  const fs::path metadata_json = run.iteration_dir / "metadata.json";
  if (fs::exists(metadata_json)) {
    WithContext([&] { return metadata_json.string(); },
                [&] {
                  run.metadata_json = ParseJson(ReadTextFile(metadata_json, kMaxMetadataJsonBytes));
                  if (!run.metadata_json.is_object()) Fail("expected a JSON object");
                  const auto backend = run.metadata_json.value("sharded_backend", std::string());
                  if (backend != "torch_dist") {
                    Fail("sharded_backend is '{}'; only torch_dist checkpoints are supported",
                         backend);
                  }
                });
  }

  // Megatron-Bridge writes run_config.yaml into the iteration directory; accept it one level up.
  for (const fs::path& candidate : {run.iteration_dir / "run_config.yaml",
                                    run.iteration_dir.parent_path() / "run_config.yaml"}) {
    if (fs::exists(candidate)) {
      run.run_config_path = candidate;
      break;
    }
  }
  if (run.run_config_path) {
    const fs::path& file = *run.run_config_path;
    const std::string text = ReadTextFile(file, kMaxRunConfigBytes);
    YAML::Node root;
    try {
      root = YAML::Load(text);
    } catch (const YAML::Exception& e) {
      Fail("{}: not valid YAML: {}", file.string(), e.what());
    }
    if (!root.IsMap()) Fail("{}: expected a mapping at the top level", file.string());
    const auto section = [&](const char* key) -> std::optional<YamlSection> {
      const YAML::Node value = root[key];
      if (!value.IsDefined() || value.IsNull()) return std::nullopt;
      if (!value.IsMap()) {
        Fail("{}: {} is {}; expected a mapping", file.string(), key, DescribeYaml(value));
      }
      return YamlSection{value, key, &file};
    };
    if (const auto peft = section("peft")) run.peft = ParsePeft(*peft);
    if (const auto model = section("model")) run.model = ParseModel(*model);
  }
  return run;
}

void RequireParallelSizes(const ParallelSizes& stated, const ModelSettings& model,
                          const std::filesystem::path& run_config) {
  const struct {
    const char* flag;
    const char* key;
    std::optional<int64_t> stated;
    int64_t actual;
  } sizes[] = {
      {"--tp", "tensor_model_parallel_size", stated.tensor, model.tensor_parallel},
      {"--pp", "pipeline_model_parallel_size", stated.pipeline, model.pipeline_parallel},
      {"--ep", "expert_model_parallel_size", stated.expert, model.expert_parallel},
      {"--etp", "expert_tensor_parallel_size", stated.expert_tensor, model.expert_tensor_parallel},
  };
  for (const auto& size : sizes) {
    if (size.stated && *size.stated != size.actual) {
      Fail(
          "{} {} does not match the checkpoint's {} {} ({}): the parallel sizes are read from the "
          "checkpoint, so {} may be left out; a stated one must agree",
          size.flag, *size.stated, size.key, size.actual, run_config.string(), size.flag);
    }
  }
}

}  // namespace adapter_job::checkpoint
