// `adapter_job verify`: Megatron-Bridge's verify_adapter.py flags, our checks.
#include <boost/program_options.hpp>
#include <fstream>
#include <iostream>
#include <sstream>

#include "adapter_job/checkpoint/checkpoint_resolver.h"
#include "adapter_job/checkpoint/run_directory.h"
#include "adapter_job/convert/base_model.h"
#include "adapter_job/core/error.h"
#include "adapter_job/core/file.h"
#include "adapter_job/verify/plugin.h"
#include "adapter_job/verify/verify.h"
#include "adapter_job/writer/output_guard.h"
#include "commands.h"
#include "console.h"
#include "layered_options.h"
#include "verify_options.h"

namespace adapter_job::cli {

namespace po = boost::program_options;

namespace {

// "20GiB", "512MiB", "1e9" or a plain number of bytes.
uint64_t ParseBytes(const std::string& text) {
  std::size_t used = 0;
  double value = 0;
  try {
    value = std::stod(text, &used);
  } catch (const std::exception&) {
    Fail("--verify-max-gpu-mem '{}' is not a size", text);
  }
  const std::string unit = text.substr(used);
  double scale = 1;
  if (unit == "KiB")
    scale = 1024.0;
  else if (unit == "MiB")
    scale = 1024.0 * 1024;
  else if (unit == "GiB")
    scale = 1024.0 * 1024 * 1024;
  else if (unit == "KB")
    scale = 1e3;
  else if (unit == "MB")
    scale = 1e6;
  else if (unit == "GB")
    scale = 1e9;
  else if (!unit.empty() && unit != "B")
    Fail("--verify-max-gpu-mem '{}': unknown unit '{}'", text, unit);
  if (value <= 0) Fail("--verify-max-gpu-mem must be positive");
  return static_cast<uint64_t>(value * scale);
}

}  // namespace

void AddVerifyOptions(po::options_description& options) {
  // clang-format off
  options.add_options()
    ("prompt", po::value<std::vector<std::string>>(),
     "prompt to compare logits on (repeatable; default \"The capital of France is\")")
    ("prompts-file", po::value<std::string>(), "file with one prompt per line")
    ("prompt-ids", po::value<std::vector<std::string>>(),
     "a prompt as comma-separated token ids (repeatable)")
    ("top-k", po::value<int>()->default_value(5), "how many top tokens must agree")
    ("verify-device", po::value<std::string>()->default_value("auto"), "auto | cuda | cpu")
    ("verify-h5", po::value<std::string>(), "write every variant's logits to this HDF5 file")
    ("verify-max-gpu-mem", po::value<std::string>(),
     "most device memory for weights, e.g. 20GiB (layers are streamed one at a time)");
  // clang-format on
}

void ReadVerifyOptions(const po::variables_map& vm, verify::VerifyOptions& options) {
  if (vm.count("prompt")) options.prompts = vm["prompt"].as<std::vector<std::string>>();
  if (vm.count("prompts-file")) {
    // One prompt a line, each a sentence or two: 1 MiB is thousands of prompts.
    constexpr std::size_t kMaxPromptsFileBytes = std::size_t{1} << 20;
    std::istringstream lines(
        ReadTextFile(vm["prompts-file"].as<std::string>(), kMaxPromptsFileBytes));
    for (std::string line; std::getline(lines, line);) {
      if (!line.empty()) options.prompts.push_back(line);
    }
  }
  if (vm.count("prompt-ids")) {
    for (const auto& text : vm["prompt-ids"].as<std::vector<std::string>>()) {
      std::vector<int64_t> ids;
      std::istringstream in(text);
      for (std::string item; std::getline(in, item, ',');) {
        try {
          ids.push_back(std::stoll(item));
        } catch (const std::exception&) {
          Fail("--prompt-ids '{}': '{}' is not a token id", text, item);
        }
      }
      options.prompt_ids.push_back(std::move(ids));
    }
  }
  options.top_k = vm["top-k"].as<int>();
  if (options.top_k < 1) Fail("--top-k must be at least 1");
  options.device = vm["verify-device"].as<std::string>();
  if (vm.count("verify-max-gpu-mem"))
    options.max_device_bytes = ParseBytes(vm["verify-max-gpu-mem"].as<std::string>());
}

int ReportVerification(const verify::VerificationReport& report, const po::variables_map& vm,
                       Console& console, std::string_view consequence) {
  console.Result(report.Table());
  if (vm.count("verify-h5")) verify::WriteHdf5WithPlugin(report, vm["verify-h5"].as<std::string>());
  if (report.passed()) return 0;
  // An error, so it shows at every log level, --quiet included: exit 3 alone says nothing of why.
  console.Log(LogLevel::kError, report.FailureLine() + std::string(consequence));
  return static_cast<int>(ExitCode::kVerificationFailed);
}

int RunVerify(const std::vector<std::string>& args) {
  po::options_description options("adapter_job verify [options]");
  // clang-format off
  options.add_options()
    ("help,h", "show this help")
    ("config", po::value<std::string>(), "INI file with any of these options (key = value)")
    ("print-config", po::bool_switch(),
     "print the effective settings and where each comes from, as an INI file, and exit")
    ("hf-model-id", po::value<std::string>(),
     "the base model: its local HF directory, or a model id ('org/name') the local HF cache holds")
    ("revision", po::value<std::string>()->default_value("main"),
     "the revision of an --hf-model-id found in the HF cache: a branch, tag or commit hash")
    ("hf-adapter-path", po::value<std::string>(), "the PEFT adapter directory to verify")
    ("megatron-peft-checkpoint", po::value<std::string>(),
     "also compare against the checkpoint's adapter merged in Megatron's layout")
    ("merged-model", po::value<std::string>(),
     "also hold this merged model (adapter_job merge's output) to the adapter")
    ("report", po::value<std::string>(), "write the verification report as JSON to this file")
    ("model-families", po::value<std::vector<std::string>>(),
     "a directory of model family descriptions to add to the built-in ones (repeatable)")
    ("exclude-adapter-base-prefix", po::value<std::vector<std::string>>(),
     "as the export was given it: the Megatron-merged variant leaves these adapters out too "
     "(repeatable)")
    ("include-mtp-layers", po::bool_switch(),
     "as the export was given it: hold the MTP layers' adapted weights to the Megatron merge's")
    // Megatron-Bridge's spellings (examples/conversion/adapter/verify_adapter.py).
    ("hf-model-path", po::value<std::string>(), "Megatron-Bridge's spelling of --hf-model-id")
    ("lora-checkpoint", po::value<std::string>(),
     "Megatron-Bridge's spelling of --megatron-peft-checkpoint")
    ("cpu", po::bool_switch(), "Megatron-Bridge's spelling of --verify-device cpu")
    ("iteration", po::value<int64_t>(),
     "compare against iteration N of the checkpoint's save directory (its iter_%07d)");
  // clang-format on
  AddParallelSizeOptions(options, /*expert_tp=*/false);
  AddVerifyOptions(options);
  AddConsoleOptions(options);
  // The command line, then --config FILE (verify has no installed defaults file).
  const LayeredOptions layered = ParseLayered(args, options, {});
  const po::variables_map& vm = layered.merged;
  if (vm.count("help")) {
    std::cout << options;
    return 0;
  }
  if (vm["print-config"].as<bool>()) {
    std::cout << PrintConfig(layered, options, {"help", "config", "print-config"});
    return 0;
  }
  verify::RequireVerificationBuilt();
  if (!vm.count("hf-adapter-path")) throw po::error("the option '--hf-adapter-path' is required");
  verify::VerifyOptions verify;
  verify.adapter = vm["hf-adapter-path"].as<std::string>();
  if (auto given = EitherSpelling(vm, "megatron-peft-checkpoint", "lora-checkpoint", &layered))
    verify.megatron_checkpoint = *given;
  if (vm.count("iteration")) {
    if (!verify.megatron_checkpoint)
      throw po::error("--iteration picks an iteration of the Megatron checkpoint: it needs one");
    verify.megatron_checkpoint = checkpoint::PickIteration(
        *verify.megatron_checkpoint, vm["iteration"].as<int64_t>(), /*may_appear=*/false);
  }
  // Absent, the base model is the one the checkpoint's run_config.yaml records.
  const std::optional<std::string> hf_model =
      EitherSpelling(vm, "hf-model-id", "hf-model-path", &layered);
  if (!hf_model && !verify.megatron_checkpoint)
    throw po::error("the option '--hf-model-id' is required (or a checkpoint that records it)");
  const std::string revision = vm["revision"].as<std::string>();
  // The checkpoint's run directory, read once, when something needs it.
  std::optional<checkpoint::RunDirectory> opened_run;
  const auto run = [&]() -> const checkpoint::RunDirectory& {
    if (!opened_run) {
      opened_run = checkpoint::OpenRunDirectory(
          checkpoint::ResolveCheckpoint(*verify.megatron_checkpoint).iteration_dir);
    }
    return *opened_run;
  };
  convert::BaseModel base;
  if (hf_model) {
    base = convert::ResolveBaseModel(*hf_model, revision);
  } else {
    base = convert::ResolveRecordedBaseModel(
        run().model.hf_model_id, run().run_config_path.value_or(run().iteration_dir), revision);
  }
  verify.hf_model = base.dir.value_or(base.id);
  verify.base_model_name = base.name;
  const ParallelSizes stated = StatedParallelSizes(vm);
  if (stated.tensor || stated.pipeline || stated.expert) {
    if (!verify.megatron_checkpoint)
      throw po::error("--tp, --pp and --ep describe the Megatron checkpoint: they need one");
    checkpoint::RequireParallelSizes(stated, run().model,
                                     run().run_config_path.value_or(run().iteration_dir));
  }
  if (vm.count("merged-model")) verify.merged_model = vm["merged-model"].as<std::string>();
  if (vm.count("model-families")) {
    for (const auto& dir : vm["model-families"].as<std::vector<std::string>>())
      verify.model_family_dirs.emplace_back(dir);
  }
  if (vm.count("exclude-adapter-base-prefix"))
    verify.excluded_adapter_prefixes =
        vm["exclude-adapter-base-prefix"].as<std::vector<std::string>>();
  verify.include_mtp_layers = vm["include-mtp-layers"].as<bool>();
  ReadVerifyOptions(vm, verify);
  if (vm["cpu"].as<bool>()) {
    if (!vm["verify-device"].defaulted() && verify.device != "cpu")
      throw po::error("--cpu and --verify-device " + verify.device + " disagree");
    verify.device = "cpu";
  }
  writer::RefuseOutputsOverInputs(
      {{"--report", vm.count("report") ? vm["report"].as<std::string>() : ""},
       {"--verify-h5", vm.count("verify-h5") ? vm["verify-h5"].as<std::string>() : ""}},
      {{"--hf-model-id", verify.hf_model},
       {"--hf-adapter-path", verify.adapter},
       {"--megatron-peft-checkpoint", verify.megatron_checkpoint.value_or("")},
       {"--merged-model", verify.merged_model.value_or("")}});
  Console console = Console::FromOptions(vm, /*rank=*/0);
  verify.progress = console.Progress();
  const verify::VerificationReport report = verify::VerifyWithPlugin(verify);
  if (vm.count("report")) {
    OutputFile out = OutputFile::Create(vm["report"].as<std::string>(), /*overwrite=*/true);
    out.Write(report.ToJson().dump(2) + "\n");
    std::move(out).Commit();
  }
  return ReportVerification(report, vm, console);
}

}  // namespace adapter_job::cli
