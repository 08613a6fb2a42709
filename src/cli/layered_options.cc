#include "layered_options.h"

#include <fmt/format.h>

#include <algorithm>
#include <sstream>

#include "adapter_job/core/error.h"
#include "adapter_job/core/file.h"

namespace adapter_job::cli {
namespace {

namespace po = boost::program_options;
namespace fs = std::filesystem;

po::parsed_options ParseIni(const fs::path& file, const po::options_description& options) {
  // An ifstream opens a directory and reads nothing from it: the settings would be ignored.
  if (fs::is_directory(file))
    Fail("config file '{}' is a directory; expected an INI file", file.string());
  // Config files are a few KB; the cap keeps a wrong path (a FIFO, a huge file) from hanging.
  std::istringstream in(ReadTextFile(file, std::size_t{1} << 20));
  try {
    return po::parse_config_file(in, options);
  } catch (const po::error& e) {
    Fail("{}: {}", file.string(), e.what());
  }
}

void AddLayer(LayeredOptions& layered, std::string source, const po::parsed_options& parsed) {
  OptionLayer layer{std::move(source), {}};
  po::store(parsed, layer.values);
  // store() keeps the first value it sees: higher layers are stored first.
  po::store(parsed, layered.merged);
  layered.layers.push_back(std::move(layer));
}

// The values --print-config can show; an option of another type prints as "(set)".
std::vector<std::string> ValueTexts(const boost::any& value) {
  if (const auto* s = boost::any_cast<std::string>(&value)) return {*s};
  if (const auto* b = boost::any_cast<bool>(&value)) return {*b ? "true" : "false"};
  if (const auto* i = boost::any_cast<int>(&value)) return {std::to_string(*i)};
  if (const auto* v = boost::any_cast<std::vector<std::string>>(&value)) return *v;
  return {"(set)"};
}

}  // namespace

std::optional<std::string> EitherSpelling(const po::variables_map& vm, const char* name,
                                          const char* alias, const LayeredOptions* layered) {
  const auto given = [&](const char* key) {
    if (layered == nullptr) return vm.count(key) > 0 && !vm[key].defaulted();
    return std::any_of(layered->layers.begin(), layered->layers.end(), [&](const OptionLayer& l) {
      return !l.source.starts_with("defaults ") && l.values.count(key) > 0 &&
             !l.values[key].defaulted();
    });
  };
  if (given(name) && given(alias)) {
    throw po::error(fmt::format(
        "--{} and --{} (Megatron-Bridge's spelling) are the same option: give one", name, alias));
  }
  if (given(alias)) return vm[alias].as<std::string>();
  if (vm.count(name)) return vm[name].as<std::string>();
  return std::nullopt;
}

ParallelSizes StatedParallelSizes(const po::variables_map& vm) {
  const auto stated = [&](const char* key) -> std::optional<int64_t> {
    if (!vm.count(key)) return std::nullopt;
    return vm[key].as<int>();
  };
  return {stated("tp"), stated("pp"), stated("ep"), stated("etp")};
}

void AddParallelSizeOptions(po::options_description& options, bool expert_tp) {
  constexpr const char* kWhy = ": read from the checkpoint; given, it must agree";
  options.add_options()("tp", po::value<int>(),
                        (std::string("tensor parallel size") + kWhy).c_str())(
      "pp", po::value<int>(), (std::string("pipeline parallel size") + kWhy).c_str())(
      "ep", po::value<int>(), (std::string("expert parallel size") + kWhy).c_str());
  if (expert_tp) {
    options.add_options()("etp", po::value<int>(),
                          (std::string("expert tensor parallel size") + kWhy).c_str());
  }
}

po::parsed_options ParseOptionsOnly(const std::vector<std::string>& args,
                                    const po::options_description& options) {
  // Without a positional description Boost keeps such arguments unnamed, and store() drops them.
  // No guessing: Boost would take --out for --output-hf-path, and a typo for some other option.
  po::parsed_options parsed =
      po::command_line_parser(args)
          .options(options)
          .style(po::command_line_style::default_style & ~po::command_line_style::allow_guessing)
          .run();
  for (const auto& option : parsed.options) {
    if (option.string_key.empty() && !option.original_tokens.empty()) {
      throw po::error(fmt::format("unexpected argument '{}' (this command takes only --options)",
                                  option.original_tokens.front()));
    }
  }
  return parsed;
}

LayeredOptions ParseLayered(const std::vector<std::string>& args,
                            const po::options_description& options,
                            const std::vector<fs::path>& defaults_files) {
  LayeredOptions layered;
  AddLayer(layered, "command line", ParseOptionsOnly(args, options));
  const auto& from_command_line = layered.layers.front().values;
  if (from_command_line.count("config")) {
    const fs::path config = from_command_line["config"].as<std::string>();
    AddLayer(layered, "--config " + config.string(), ParseIni(config, options));
  }
  for (const auto& file : defaults_files)
    AddLayer(layered, "defaults " + file.string(), ParseIni(file, options));
  po::notify(layered.merged);
  return layered;
}

std::string PrintConfig(const LayeredOptions& layered, const po::options_description& options,
                        const std::vector<std::string>& skip) {
  std::string out = "# adapter_job: effective settings (command line > --config > defaults)\n";
  for (const auto& option : options.options()) {
    const std::string& key = option->long_name();
    if (std::find(skip.begin(), skip.end(), key) != skip.end()) continue;
    std::string source = "built-in default";
    for (const auto& layer : layered.layers) {
      if (layer.values.count(key) && !layer.values[key].defaulted()) {
        source = layer.source;
        break;
      }
    }
    if (!layered.merged.count(key)) {
      out += fmt::format("# {} is not set\n", key);
      continue;
    }
    for (const auto& text : ValueTexts(layered.merged[key].value()))
      out += fmt::format("{} = {}  # {}\n", key, text, source);
  }
  return out;
}

}  // namespace adapter_job::cli
