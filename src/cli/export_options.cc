#include "export_options.h"

#include <algorithm>
#include <boost/program_options.hpp>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <sstream>

#include "adapter_job/checkpoint/checkpoint_resolver.h"
#include "adapter_job/convert/base_model.h"
#include "adapter_job/core/error.h"
#include "adapter_job/core/serving_target.h"
#include "adapter_job/merge/merged_layout.h"
#include "adapter_job/verify/plugin.h"
#include "config_dir.h"
#include "console.h"
#include "layered_options.h"
#include "verify_options.h"

namespace adapter_job::cli {
namespace {

namespace po = boost::program_options;
namespace fs = std::filesystem;

// config/<command>.ini from the config directory (config_dir.h); none: no defaults file.
std::vector<fs::path> DefaultsFiles(ExportCommand command) {
  const std::optional<fs::path> dir = ConfigDir();
  if (!dir) return {};
  return {*dir / (command == ExportCommand::kMerge ? "merge.ini" : "export.ini")};
}

const char* Usage(ExportCommand command) {
  switch (command) {
    case ExportCommand::kStream:
      return "adapter_job stream [options]";
    case ExportCommand::kMerge:
      return "adapter_job merge [options]";
    default:
      return "adapter_job export [options]";
  }
}

// Megatron-Bridge's spellings too (str_to_dtype: any case, "torch." in front).
std::optional<DType> ParseDType(const std::string& given) {
  std::string name = given;
  std::transform(name.begin(), name.end(), name.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  if (name.starts_with("torch.")) name.erase(0, 6);
  if (name == "auto") return std::nullopt;
  if (name == "bf16" || name == "bfloat16") return DType::kBFloat16;
  if (name == "fp16" || name == "float16") return DType::kFloat16;
  if (name == "fp32" || name == "float32") return DType::kFloat32;
  Fail("--dtype must be auto, bf16, fp16 or fp32 (or bfloat16, float16, float32), not '{}'", given);
}

// Strings, not doubles, in the options: --print-config shows strings (and --config files hold
// them).
double Seconds(const po::variables_map& vm, const char* name) {
  const std::string& text = vm[name].as<std::string>();
  double value = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size() || !std::isfinite(value) || value < 0) {
    throw po::error(fmt::format("--{} must be a number of seconds >= 0, not '{}'", name, text));
  }
  return value;
}

// --verify and --no-verify are one setting: --print-config shows it once, as `verify`, false
// where --no-verify (from whichever layer) turns it off.
void ShowNoVerifyAsVerify(const LayeredOptions& layered, std::string& text) {
  for (const auto& layer : layered.layers) {
    if (!layer.values.count("no-verify") || layer.values["no-verify"].defaulted() ||
        !layer.values["no-verify"].as<bool>())
      continue;
    const auto line = text.find("\nverify = ");
    if (line == std::string::npos) return;
    const auto end = text.find('\n', line + 1);
    text.replace(line + 1, end - line - 1,
                 fmt::format("verify = false  # no-verify in {}", layer.source));
    return;
  }
}

}  // namespace

ExportCommandLine ParseExportCommandLine(const std::vector<std::string>& args,
                                         ExportCommand command) {
  const bool stream = command == ExportCommand::kStream;
  const bool merge = command == ExportCommand::kMerge;
  po::options_description options(Usage(command));
  // clang-format off
  options.add_options()
    ("help,h", "show this help")
    ("config", po::value<std::string>(), "INI file with any of these options (key = value)")
    ("print-config", po::bool_switch(),
     "print the effective settings and where each comes from, as an INI file, and exit")
    ("dry-run", po::value<std::string>()->implicit_value("text"),
     "plan and check everything the run would, write nothing, and print the plan (which rank "
     "reads which files and bytes, the files and tensors it would write, the verification "
     "prompts) on stdout: --dry-run or --dry-run=json; exits 0 if the run could start")
    ("hf-model-id", po::value<std::string>(),
     "base model: a local HF model directory (config.json is read), or a model id ('org/name') "
     "found in the local HF cache ($HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface/hub; "
     "never downloaded) or else only recorded; default: run_config.yaml's model.hf_model_id")
    ("revision", po::value<std::string>()->default_value("main"),
     "the revision of an --hf-model-id found in the HF cache: a branch, tag or commit hash")
    ("megatron-peft-checkpoint", po::value<std::string>(),
     "Megatron-Bridge checkpoint: the top-level run directory or an iter_* directory")
    ("dtype", po::value<std::string>()->default_value("auto"),
     merge ? "auto (each tensor keeps the base's dtype) | bf16 | fp16 | fp32"
           : "auto | bf16 | fp16 | fp32")
    ("backend", po::value<std::string>()->default_value("auto"), "auto | nccl | mpi")
    ("overwrite", po::value<bool>()->default_value(false)->implicit_value(true)->zero_tokens(),
     stream ? "replace an existing output file" : "replace an existing output directory")
    ("report", po::value<std::string>(), "also write the run report as JSON to this file")
    ("no-integrity-check", po::bool_switch(),
     "do not check the files against the sha256 digests of the checkpoint's integrity.json")
    ("model-families", po::value<std::vector<std::string>>(),
     "a directory of model family descriptions (*.json, see config/models/README.md) to add to "
     "the built-in ones (repeatable)")
    ("exclude-adapter-base-prefix", po::value<std::vector<std::string>>(),
     "leave out the adapters whose Megatron key starts with this prefix, e.g. "
     "decoder.layers.0.mlp (repeatable; a prefix matching nothing is an error)")
    ("include-mtp-layers", po::bool_switch(),
     "also export the multi-token prediction layers' adapters (mtp.layers.<i>), as layers "
     "num_hidden_layers + i, where DeepSeek-V3's and GLM-4.5's HF checkpoints keep them; "
     "left out otherwise")
    ("trust-remote-code", po::value<bool>()->default_value(false)->implicit_value(true)->zero_tokens(),
     "accepted for compatibility with Megatron-Bridge's script; no code is ever loaded")
    // Megatron-Bridge's spellings (examples/conversion/adapter/export_adapter.py), for its users'
    // scripts: the same options under its names.
    ("hf-model-path", po::value<std::string>(), "Megatron-Bridge's spelling of --hf-model-id")
    ("lora-checkpoint", po::value<std::string>(),
     "Megatron-Bridge's spelling of --megatron-peft-checkpoint")
    ("iteration", po::value<int64_t>(),
     "export iteration N of the save directory (its iter_%07d) instead of the one "
     "latest_checkpointed_iteration.txt names")
    ("sequence-parallel", po::bool_switch(),
     "accepted for compatibility with Megatron-Bridge's script: the adapters' layout does not "
     "depend on it");
  // clang-format on
  AddParallelSizeOptions(options, /*expert_tp=*/true);
  // clang-format off
  if (stream) {
    options.add_options()("output", po::value<std::string>(),
                          "safetensors file for the HF-named adapter tensors");
  } else {
    options.add_options()("output", po::value<std::string>(),
                          "Megatron-Bridge's spelling of --output-hf-path");
    options.add_options()(
        "verify", po::value<bool>()->default_value(true)->implicit_value(true)->zero_tokens(),
        merge ? "verify before publishing (the default)"
              : "verify the adapter's logits before publishing it (the default)")(
        "no-verify", po::bool_switch(), "skip verification");
  }
  if (!merge && !stream) {
    options.add_options()(
        "target", po::value<std::string>()->default_value("peft"),
        "the engine that serves the adapter: peft (PEFT's layout, with rank_pattern) | vllm (one "
        "alpha / r: ranks padded, each module's scale folded into lora_B) | sglang; DoRA is "
        "refused for vllm and sglang (serve `adapter_job merge`'s model instead)");
  }
  if (merge) {
    options.add_options()(
        "max-shard-size", po::value<std::string>()->default_value("50GB"),
        "the largest weights file, as transformers' save_pretrained (5GB, 500MB, 2GiB, bytes)")(
        "merge-device", po::value<std::string>()->default_value("auto"),
        "where each rank merges: auto (its GPU when it sees one, else the CPU), cpu or cuda; "
        "the bytes written are the same")(
        "merge-threads", po::value<int>()->default_value(0),
        "CPU threads per rank for the merge; 0: the host's cores shared by its ranks");
  }
  if (!stream) {
    options.add_options()
      ("wait", po::value<std::string>()->default_value("0"),
       "wait up to this many seconds for the checkpoint to be complete (its iteration's .metadata "
       "and metadata.json written, its files unchanged for --wait-settle); 0: take it as it is")
      ("wait-poll", po::value<std::string>()->default_value("10"),
       "seconds between looks while a checkpoint file is missing")
      ("wait-settle", po::value<std::string>()->default_value("10"),
       "seconds the iteration's files must stay unchanged (names, sizes, modification times)")
      ("result", po::value<std::string>(),
       merge ? "write the outcome as JSON to this file (status, exit code, message, checkpoint, "
               "the output's files, report); a merged model this file records as made from the "
               "same checkpoint is skipped"
             : "write the outcome as JSON to this file (status, exit code, message, checkpoint, "
               "adapter hashes, report); an adapter this file records as made from the same "
               "checkpoint is skipped")
      ("record-failure", po::value<std::string>(),
       "write nothing else: this message to --result as a failure (for wrappers)")
      ("record-failure-code", po::value<int>()->default_value(2),
       "the exit code --record-failure records and exits with (1 to 255)")
      ("overwrite-hint", po::value<std::string>()->default_value("pass --overwrite"),
       "with --result: how the refusal of an existing output says to replace it (for wrappers)");
  }
  if (!stream) AddVerifyOptions(options);
  // clang-format on
  AddConsoleOptions(options);
  // A PEFT directory's options: `stream` writes a file of tensors and no adapter_config.json, so
  // its help leaves them out, but it still reads them (export.ini, which it shares, sets one).
  po::options_description directory_options;
  // clang-format off
  directory_options.add_options()
    ("base-model-name-or-path", po::value<std::string>(),
     "what adapter_config.json records as base_model_name_or_path (default: the model id, also "
     "for a snapshot directory of the HF cache, else --hf-model-id as given)")
    ("output-hf-path", merge ? po::value<std::string>() : po::value<std::string>()->default_value("./my_adapter"),
     merge ? "the merged model's directory to write" : "PEFT adapter directory to write");
  po::options_description parsed_options;
  parsed_options.add(options).add(directory_options);
  if (!stream) options.add(directory_options);
  // clang-format on

  const LayeredOptions layered =
      ParseLayered(args, stream ? parsed_options : options, DefaultsFiles(command));
  const po::variables_map& vm = layered.merged;

  ExportCommandLine cl;
  cl.command = command;
  if (vm.count("result")) cl.result_path = vm["result"].as<std::string>();
  if (vm.count("record-failure")) {
    if (!cl.result_path) throw po::error("--record-failure needs --result");
    cl.record_failure = vm["record-failure"].as<std::string>();
    cl.record_failure_code = vm["record-failure-code"].as<int>();
    if (cl.record_failure_code < 1 || cl.record_failure_code > 255) {
      throw po::error("--record-failure-code must be 1 to 255");
    }
    // What the wrapper was given, for the result; none of it is needed.
    if (auto given = EitherSpelling(vm, "megatron-peft-checkpoint", "lora-checkpoint", &layered))
      cl.options.checkpoint = *given;
    if (auto given = EitherSpelling(vm, "output-hf-path", "output", &layered))
      cl.options.output = *given;
    cl.values = vm;
    return cl;
  }
  if (vm.count("help")) {
    std::ostringstream text;
    text << options;
    cl.help = true;
    cl.help_text = text.str();
    return cl;
  }
  if (vm["print-config"].as<bool>()) {
    cl.help = true;  // print and exit, like --help
    cl.help_text = PrintConfig(layered, options, {"help", "config", "print-config", "no-verify"});
    if (!stream) ShowNoVerifyAsVerify(layered, cl.help_text);
    return cl;
  }
  const auto hf_model = EitherSpelling(vm, "hf-model-id", "hf-model-path", &layered);
  const auto checkpoint =
      EitherSpelling(vm, "megatron-peft-checkpoint", "lora-checkpoint", &layered);
  if (!checkpoint) throw po::error("the option '--megatron-peft-checkpoint' is required");
  // Absent, the export takes the base model run_config.yaml records.
  cl.options.hf_model_id = hf_model.value_or("");
  cl.options.stated_parallelism = StatedParallelSizes(vm);
  cl.options.revision = vm["revision"].as<std::string>();
  if (vm.count("base-model-name-or-path"))
    cl.options.base_model_name_or_path = vm["base-model-name-or-path"].as<std::string>();
  cl.options.checkpoint = *checkpoint;
  const auto output = stream ? std::optional<std::string>()
                             : EitherSpelling(vm, "output-hf-path", "output", &layered);
  if (!stream && !output) throw po::error("the option '--output-hf-path' is required");
  if (output) cl.options.output = *output;
  if (merge) {
    // Every rank of a merge reads the base weights, but only rank 0 plans the export (which
    // would read run_config.yaml's base): the merge needs the base named on its command line.
    if (!hf_model) throw po::error("adapter_job merge needs --hf-model-id (the base model)");
    // The adapter the merge goes through keeps the checkpoint's dtype; --dtype is the model's.
    cl.merge.base_model =
        convert::ResolveBaseModel(*hf_model, cl.options.revision).dir.value_or(*hf_model);
    cl.merge.target = cl.options.output;
    cl.merge.overwrite = vm["overwrite"].as<bool>();
    cl.merge.dtype = ParseDType(vm["dtype"].as<std::string>());
    cl.merge.max_shard_bytes = merge::ParseShardSize(vm["max-shard-size"].as<std::string>());
    cl.merge.device = merge::ParseMergeDevice(vm["merge-device"].as<std::string>());
    cl.merge.threads = vm["merge-threads"].as<int>();
    if (cl.merge.threads < 0) throw po::error("--merge-threads must be >= 0");
  } else {
    cl.options.dtype = ParseDType(vm["dtype"].as<std::string>());
  }
  if (!merge && !stream) cl.options.target = ParseServingTarget(vm["target"].as<std::string>());
  cl.options.backend = comm::ParseBackend(vm["backend"].as<std::string>());
  cl.options.overwrite = vm["overwrite"].as<bool>();
  cl.options.check_integrity = !vm["no-integrity-check"].as<bool>();
  if (vm.count("model-families")) {
    for (const auto& dir : vm["model-families"].as<std::vector<std::string>>())
      cl.options.model_family_dirs.emplace_back(dir);
  }
  if (vm.count("exclude-adapter-base-prefix"))
    cl.options.excluded_adapter_prefixes =
        vm["exclude-adapter-base-prefix"].as<std::vector<std::string>>();
  cl.options.include_mtp_layers = vm["include-mtp-layers"].as<bool>();
  if (vm.count("report")) cl.report_path = vm["report"].as<std::string>();
  if (vm.count("dry-run")) {
    cl.dry_run = vm["dry-run"].as<std::string>();
    if (*cl.dry_run != "text" && *cl.dry_run != "json")
      throw po::error(fmt::format("--dry-run must be text or json, not '{}'", *cl.dry_run));
  }
  if (stream) {
    if (!vm.count("output")) throw po::error("the option '--output' is required");
    cl.stream_output = vm["output"].as<std::string>();
  } else {
    if (vm["verify"].as<bool>() && !vm["no-verify"].as<bool>()) {
      verify::RequireVerificationBuilt();  // before any work: never skip verification silently
      verify::VerifyOptions verify;
      ReadVerifyOptions(vm, verify);
      cl.options.verify = verify;
    }
  }
  if (!stream) {
    cl.overwrite_hint = vm["overwrite-hint"].as<std::string>();
    if (const double seconds = Seconds(vm, "wait"); seconds != 0) {
      cl.wait.emplace();
      cl.wait->timeout_seconds = seconds;
      cl.wait->poll_seconds = Seconds(vm, "wait-poll");
      cl.wait->settle_seconds = Seconds(vm, "wait-settle");
    }
  }
  if (vm.count("iteration")) {
    cl.options.checkpoint = checkpoint::PickIteration(
        cl.options.checkpoint, vm["iteration"].as<int64_t>(), cl.wait.has_value());
  }
  cl.values = vm;
  return cl;
}

}  // namespace adapter_job::cli
