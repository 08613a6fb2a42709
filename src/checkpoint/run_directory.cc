#include "adapter_job/checkpoint/run_directory.h"

#include <yaml-cpp/yaml.h>

#include <charconv>

#include "adapter_job/core/error.h"
#include "adapter_job/core/file.h"

namespace adapter_job::checkpoint {
namespace {

namespace fs = std::filesystem;

constexpr std::string_view kLatestIterationFile = "latest_checkpointed_iteration.txt";

// Size caps, far above what real checkpoints hold, so hostile files fail fast instead of
// exhausting memory (yaml-cpp takes ~125 bytes of memory per input byte, nlohmann::json ~10-20).
// Megatron-Bridge's run_config.yaml is ~22 KB (shared/fixtures/megatron-bridge) and does not grow
// with the model: it is the run's configuration.
constexpr std::size_t kMaxRunConfigBytes = std::size_t{1} << 20;
// metadata.json holds two keys (63 bytes in the fixtures).
constexpr std::size_t kMaxMetadataJsonBytes = std::size_t{1} << 20;
// integrity.json holds one ~100-byte digest line per file: a 1024-rank DeepSeek-V3 run is ~100 KB.
constexpr std::size_t kMaxIntegrityBytes = std::size_t{16} << 20;

std::string Trim(std::string s) {
  const auto not_space = [](unsigned char c) { return !std::isspace(c); };
  s.erase(s.begin(), std::find_if(s.begin(), s.end(), not_space));
  s.erase(std::find_if(s.rbegin(), s.rend(), not_space).base(), s.end());
  return s;
}

std::optional<int64_t> ParseInt(std::string_view text) {
  int64_t value = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size()) return std::nullopt;
  return value;
}

// Megatron-LM's layout: `<save>/iter_%07d`, or `<save>/release` for released weights.
fs::path ResolveIterationDir(const fs::path& given, std::optional<int64_t>& iteration) {
  if (!fs::exists(given)) Fail("checkpoint path '{}' does not exist", given.string());
  if (!fs::is_directory(given)) Fail("checkpoint path '{}' is not a directory", given.string());
  const fs::path marker = given / kLatestIterationFile;
  if (!fs::exists(given / ".metadata") && fs::exists(marker)) {
    const std::string text = Trim(ReadTextFile(marker, 4096));
    if (text == "release") return given / "release";
    const auto number = ParseInt(text);
    if (!number || *number < 0) {
      Fail("{}: expected an iteration number or 'release', found '{}'", marker.string(), text);
    }
    iteration = *number;
    const fs::path dir = given / fmt::format("iter_{:07d}", *number);
    if (!fs::is_directory(dir)) {
      Fail("{} names iteration {}, but '{}' does not exist", marker.string(), *number,
           dir.string());
    }
    return dir;
  }
  const std::string name = given.filename().string();
  if (name.rfind("iter_", 0) == 0) iteration = ParseInt(name.substr(5));
  return given;
}

template <typename T>
std::optional<T> Optional(const YAML::Node& section, const char* key, const fs::path& file,
                          std::string_view section_name) {
  const YAML::Node node = section[key];
  if (!node || node.IsNull()) return std::nullopt;
  try {
    return node.as<T>();
  } catch (const YAML::Exception&) {
    Fail("{}: {}.{} has an unexpected value", file.string(), section_name, key);
  }
}

// A YAML scalar as the JSON number (or string) it reads as, so 16 stays 16 and 0.05 stays 0.05.
nlohmann::json ScalarToJson(const YAML::Node& node) {
  const std::string text = node.Scalar();
  if (auto i = ParseInt(text)) return *i;
  double d = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), d);
  if (ec == std::errc() && end == text.data() + text.size()) return d;
  return text;
}

std::vector<std::string> StringList(const YAML::Node& section, const char* key,
                                    const fs::path& file) {
  std::vector<std::string> out;
  const YAML::Node node = section[key];
  if (!node || node.IsNull()) return out;
  if (!node.IsSequence()) Fail("{}: peft.{} should be a list", file.string(), key);
  for (const auto& item : node) out.push_back(item.as<std::string>());
  return out;
}

PeftSettings ParsePeft(const YAML::Node& peft, const fs::path& file) {
  PeftSettings s;
  s.target = Optional<std::string>(peft, "_target_", file, "peft").value_or("");
  if (s.target.find("CanonicalLoRA") != std::string::npos) {
    s.kind = AdapterKind::kCanonicalLoRA;
  } else if (s.target.find("DoRA") != std::string::npos) {
    s.kind = AdapterKind::kDoRA;
  } else if (s.target.find("VLMLoRA") != std::string::npos) {
    s.kind = AdapterKind::kVLMLoRA;
  } else if (s.target.find("LoRA") != std::string::npos) {
    s.kind = AdapterKind::kLoRA;
  } else {
    Fail("{}: peft._target_ '{}' is not a LoRA, DoRA or CanonicalLoRA class", file.string(),
         s.target);
  }
  if (s.kind == AdapterKind::kDoRA) s.alpha = 64;  // DoRA's own default
  s.dim = Optional<int64_t>(peft, "dim", file, "peft").value_or(s.dim);
  if (s.dim <= 0) Fail("{}: peft.dim must be positive, found {}", file.string(), s.dim);
  if (peft["alpha"] && peft["alpha"].IsScalar()) s.alpha = ScalarToJson(peft["alpha"]);
  if (!s.alpha.is_number()) Fail("{}: peft.alpha should be a number", file.string());
  if (peft["dropout"] && peft["dropout"].IsScalar()) s.dropout = ScalarToJson(peft["dropout"]);
  if (!s.dropout.is_number()) Fail("{}: peft.dropout should be a number", file.string());
  s.dropout_position =
      Optional<std::string>(peft, "dropout_position", file, "peft").value_or(s.dropout_position);
  s.target_modules = StringList(peft, "target_modules", file);
  s.exclude_modules = StringList(peft, "exclude_modules", file);
  s.share_expert_adapters =
      Optional<bool>(peft, "share_expert_adapters", file, "peft").value_or(s.share_expert_adapters);
  s.normalize_moe_lora =
      Optional<bool>(peft, "normalize_moe_lora", file, "peft").value_or(s.normalize_moe_lora);
  return s;
}

ModelSettings ParseModel(const YAML::Node& model, const fs::path& file) {
  ModelSettings m;
  const auto get_int = [&](const char* key) {
    return Optional<int64_t>(model, key, file, "model");
  };
  m.tensor_parallel = get_int("tensor_model_parallel_size").value_or(1);
  m.pipeline_parallel = get_int("pipeline_model_parallel_size").value_or(1);
  m.virtual_pipeline_parallel = get_int("virtual_pipeline_model_parallel_size");
  m.expert_parallel = get_int("expert_model_parallel_size").value_or(1);
  m.expert_tensor_parallel = get_int("expert_tensor_parallel_size").value_or(m.tensor_parallel);
  for (auto [size, name] : {std::pair{m.tensor_parallel, "tensor_model_parallel_size"},
                            {m.pipeline_parallel, "pipeline_model_parallel_size"},
                            {m.expert_parallel, "expert_model_parallel_size"}}) {
    if (size <= 0) Fail("{}: model.{} must be positive, found {}", file.string(), name, size);
  }
  m.num_layers = get_int("num_layers");
  m.hidden_size = get_int("hidden_size");
  m.ffn_hidden_size = get_int("ffn_hidden_size");
  m.num_attention_heads = get_int("num_attention_heads");
  m.num_query_groups = get_int("num_query_groups");
  m.kv_channels = get_int("kv_channels");
  m.hf_model_id = Optional<std::string>(model, "hf_model_id", file, "model");
  if (const YAML::Node extra = model["extra_checkpoint_metadata"]; extra && extra.IsMap()) {
    if (auto id =
            Optional<std::string>(extra, "hf_model_id", file, "model.extra_checkpoint_metadata")) {
      m.hf_model_id = id;
    }
  }
  if (const YAML::Node dtype = model["params_dtype"]; dtype && dtype.IsMap()) {
    m.params_dtype = Optional<std::string>(dtype, "_target_", file, "model.params_dtype");
  }
  m.bf16 = Optional<bool>(model, "bf16", file, "model").value_or(false);
  m.fp16 = Optional<bool>(model, "fp16", file, "model").value_or(false);
  return m;
}

IntegrityManifest ParseIntegrity(const fs::path& file) {
  return WithContext([&] { return file.string(); },
                     [&] {
                       nlohmann::json j;
                       try {
                         j = nlohmann::json::parse(ReadTextFile(file, kMaxIntegrityBytes));
                       } catch (const nlohmann::json::exception& e) {
                         Fail("not valid JSON: {}", e.what());
                       }
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

RunDirectory OpenRunDirectory(const fs::path& path) {
  RunDirectory run;
  run.given = path;
  run.iteration_dir = ResolveIterationDir(path, run.iteration);
  if (!fs::exists(run.iteration_dir / ".metadata")) {
    Fail(
        "'{}' is not a torch_dist checkpoint: it has no .metadata (pass the save directory or an "
        "iter_* directory)",
        run.iteration_dir.string());
  }

  const fs::path metadata_json = run.iteration_dir / "metadata.json";
  if (fs::exists(metadata_json)) {
    WithContext([&] { return metadata_json.string(); },
                [&] {
                  try {
                    run.metadata_json =
                        nlohmann::json::parse(ReadTextFile(metadata_json, kMaxMetadataJsonBytes));
                  } catch (const nlohmann::json::exception& e) {
                    Fail("not valid JSON: {}", e.what());
                  }
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
    if (const YAML::Node peft = root["peft"]; peft && peft.IsMap())
      run.peft = ParsePeft(peft, file);
    if (const YAML::Node model = root["model"]; model && model.IsMap()) {
      run.model = ParseModel(model, file);
    }
  }

  const fs::path integrity = run.iteration_dir / "integrity.json";
  if (fs::exists(integrity)) run.integrity = ParseIntegrity(integrity);
  return run;
}

}  // namespace adapter_job::checkpoint
