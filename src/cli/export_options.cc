#include "export_options.h"

#include <boost/program_options.hpp>
#include <cstdlib>
#include <filesystem>
#include <sstream>

#include "adapter_job/core/error.h"
#include "adapter_job/verify/plugin.h"
#include "config_dir.h"
#include "console.h"
#include "layered_options.h"
#include "verify_options.h"

namespace adapter_job::cli {
namespace {

namespace po = boost::program_options;
namespace fs = std::filesystem;

// config/export.ini from the config directory (config_dir.h); none: no defaults file.
std::vector<fs::path> DefaultsFiles() {
  const std::optional<fs::path> dir = ConfigDir();
  if (!dir) return {};
  return {*dir / "export.ini"};
}

std::optional<DType> ParseDType(const std::string& name) {
  if (name == "auto") return std::nullopt;
  if (name == "bf16" || name == "bfloat16") return DType::kBFloat16;
  if (name == "fp16" || name == "float16") return DType::kFloat16;
  if (name == "fp32" || name == "float32") return DType::kFloat32;
  Fail("--dtype must be auto, bf16, fp16 or fp32, not '{}'", name);
}

}  // namespace

ExportCommandLine ParseExportCommandLine(const std::vector<std::string>& args, bool stream) {
  po::options_description options(stream ? "adapter_job stream [options]"
                                         : "adapter_job export [options]");
  // clang-format off
  options.add_options()
    ("help,h", "show this help")
    ("config", po::value<std::string>(), "INI file with any of these options (key = value)")
    ("print-config", po::bool_switch(),
     "print the effective settings and where each comes from, as an INI file, and exit")
    ("hf-model-id", po::value<std::string>(),
     "base model: a local HF model directory (config.json is read) or a model id string")
    ("megatron-peft-checkpoint", po::value<std::string>(),
     "Megatron-Bridge checkpoint: the top-level run directory or an iter_* directory")
    ("output-hf-path", po::value<std::string>()->default_value("./my_adapter"),
     "PEFT adapter directory to write")
    ("dtype", po::value<std::string>()->default_value("auto"), "auto | bf16 | fp16 | fp32")
    ("backend", po::value<std::string>()->default_value("auto"), "auto | nccl | mpi")
    ("overwrite", po::value<bool>()->default_value(false)->implicit_value(true)->zero_tokens(),
     "replace an existing output directory")
    ("report", po::value<std::string>(), "also write the run report as JSON to this file")
    ("no-integrity-check", po::bool_switch(),
     "do not check the files against the sha256 digests of the checkpoint's integrity.json")
    ("model-families", po::value<std::vector<std::string>>(),
     "a directory of model family descriptions (*.json, see config/models/README.md) to add to "
     "the built-in ones (repeatable)")
    ("trust-remote-code", po::value<bool>()->default_value(false)->implicit_value(true)->zero_tokens(),
     "accepted for compatibility with Megatron-Bridge's script; no code is ever loaded");
  if (stream) {
    options.add_options()("output", po::value<std::string>(),
                          "safetensors file for the HF-named adapter tensors");
  } else {
    options.add_options()(
        "verify", po::value<bool>()->default_value(true)->implicit_value(true)->zero_tokens(),
        "verify the adapter's logits before publishing it (the default)")(
        "no-verify", po::bool_switch(), "skip verification");
    AddVerifyOptions(options);
  }
  // clang-format on
  AddConsoleOptions(options);

  const LayeredOptions layered = ParseLayered(args, options, DefaultsFiles());
  const po::variables_map& vm = layered.merged;

  ExportCommandLine cl;
  if (vm.count("help")) {
    std::ostringstream text;
    text << options;
    cl.help = true;
    cl.help_text = text.str();
    return cl;
  }
  if (vm["print-config"].as<bool>()) {
    cl.help = true;  // print and exit, like --help
    cl.help_text = PrintConfig(layered, options, {"help", "config", "print-config"});
    return cl;
  }
  if (!vm.count("hf-model-id")) throw po::error("the option '--hf-model-id' is required");
  if (!vm.count("megatron-peft-checkpoint")) {
    throw po::error("the option '--megatron-peft-checkpoint' is required");
  }
  cl.options.hf_model_id = vm["hf-model-id"].as<std::string>();
  cl.options.checkpoint = vm["megatron-peft-checkpoint"].as<std::string>();
  cl.options.output = vm["output-hf-path"].as<std::string>();
  cl.options.dtype = ParseDType(vm["dtype"].as<std::string>());
  cl.options.backend = comm::ParseBackend(vm["backend"].as<std::string>());
  cl.options.overwrite = vm["overwrite"].as<bool>();
  cl.options.check_integrity = !vm["no-integrity-check"].as<bool>();
  if (vm.count("model-families")) {
    for (const auto& dir : vm["model-families"].as<std::vector<std::string>>())
      cl.options.model_family_dirs.emplace_back(dir);
  }
  if (vm.count("report")) cl.report_path = vm["report"].as<std::string>();
  if (stream) {
    if (!vm.count("output")) throw po::error("the option '--output' is required");
    cl.stream_output = vm["output"].as<std::string>();
  } else if (vm["verify"].as<bool>() && !vm["no-verify"].as<bool>()) {
    verify::RequireVerificationBuilt();  // before any work: never skip verification silently
    verify::VerifyOptions verify;
    ReadVerifyOptions(vm, verify);
    cl.options.verify = verify;
  }
  cl.values = vm;
  return cl;
}

}  // namespace adapter_job::cli
