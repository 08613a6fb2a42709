// Logit verification: runs the base model, the PEFT adapter as written to disk, and (given the
// checkpoint) the Megatron adapter merged in Megatron's own layout, in one layer-streamed pass,
// and holds them to named checks. libtorch stays behind this header.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "adapter_job/core/progress.h"
#include "adapter_job/report/report.h"

namespace adapter_job::verify {

struct VerifyOptions {
  std::filesystem::path hf_model;  // local HF model directory (config.json + safetensors)
  std::string base_model_name;     // for the report; the directory when empty
  std::filesystem::path adapter;   // PEFT directory to verify
  std::optional<std::filesystem::path> megatron_checkpoint;  // enables the merged variant
  std::vector<std::string> prompts;  // encoded with <hf_model>/tokenizer.json
  std::vector<std::vector<int64_t>> prompt_ids;
  int top_k = 5;
  std::string device = "auto";  // auto | cuda | cpu
  // Weights held on the device at once: the embedding and output head, plus one layer in each
  // variant. Layers are always streamed; a model whose single layer cannot fit is refused.
  std::optional<uint64_t> max_device_bytes;
  ProgressSink progress;                                 // after every layer of the forward pass
  std::vector<std::filesystem::path> model_family_dirs;  // besides the built-in families
};

// Default prompt when none is given, as Megatron-Bridge's verify_adapter.py.
inline constexpr const char* kDefaultPrompt = "The capital of France is";

// The base model's weights as verification reads them from `model_dir`: model.safetensors, else
// the index of a sharded model (model.safetensors.index.json); nullopt when there is neither.
std::optional<std::filesystem::path> FindBaseWeights(const std::filesystem::path& model_dir);

// Throws FormatError unless `hf_model` is a local directory holding the base weights, saying what
// is missing and that --no-verify exports without verification. Needs no plugin (and no
// libtorch), so an export checks it before any work.
void RequireVerifiable(const std::string& hf_model);

// Throws FormatError for inputs that cannot be read; a failed check is a report that did not
// pass, not an exception. Defined in the verification plugin (libadapter_job_verify.so), the only
// part of the project that links libtorch.
VerificationReport Verify(const VerifyOptions& options);

// The same through the plugin, loaded on first use, so that programs that never verify never
// pay for loading libtorch. The plugin is found at $ADAPTER_JOB_VERIFY_PLUGIN, beside the
// executable, or in <executable>/../lib/adapter_job/.
VerificationReport VerifyWithPlugin(const VerifyOptions& options);

// The plugin's entry point (extern "C", so dlsym finds it by this name). Returns 0 and fills
// `report`, or returns the exit code and fills `error` with the message.
inline constexpr const char* kPluginEntry = "adapter_job_verify_v1";
using PluginEntry = int (*)(const VerifyOptions* options, VerificationReport* report,
                            std::string* error);

}  // namespace adapter_job::verify
