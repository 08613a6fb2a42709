// Logit verification: runs the base model, the PEFT adapter as written to disk, and (given the
// checkpoint) the Megatron adapter merged in Megatron's own layout, in one layer-streamed pass,
// and holds them to named checks. libtorch stays behind this header.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "adapter_job/report/report.h"
#include "adapter_job/tokenizer/tokenizer.h"
#include "adapter_job/verify/options.h"

namespace adapter_job::verify {

// The base model's weights as verification reads them from `model_dir`: model.safetensors, else
// the index of a sharded model (model.safetensors.index.json); nullopt when there is neither.
std::optional<std::filesystem::path> FindBaseWeights(const std::filesystem::path& model_dir);

// Throws FormatError unless `hf_model` is a local directory holding the base weights, saying what
// is missing and that --no-verify exports without verification. Needs no plugin (and no
// libtorch), so an export checks it before any work.
void RequireVerifiable(const std::string& hf_model);

// The model's tokenizer.json, when it has one.
std::optional<tokenizer::Tokenizer> OpenTokenizer(const std::filesystem::path& model_dir);

// The prompts verification runs, encoded (prompt, token_ids and synthetic filled): options.prompts
// through `tokenizer`, then options.prompt_ids; with neither, kDefaultPrompt, or without a
// tokenizer 16 ids spread over the vocabulary (marked synthetic). Throws FormatError for a prompt
// that needs a missing tokenizer, is too long, encodes to nothing or leaves the vocabulary. Needs
// no plugin: an export's --dry-run shows the prompts verification will run.
std::vector<PromptResult> ResolvePrompts(const VerifyOptions& options,
                                         const tokenizer::Tokenizer* tokenizer, int64_t vocab_size);

// Throws FormatError for inputs that cannot be read; a failed check is a report that did not
// pass, not an exception. Defined in the verification plugin (libadapter_job_verify.so), the only
// part of the project that links libtorch.
VerificationReport Verify(const VerifyOptions& options);

// The device and prompts Verify(options) would use, checked as it checks them (a device that is
// not there, a prompt that cannot be encoded); only options.hf_model's config.json and
// tokenizer.json are read. Defined in the plugin.
VerificationPreview PreviewVerification(const VerifyOptions& options);
VerificationPreview PreviewVerificationWithPlugin(const VerifyOptions& options);

// The same through the plugin, loaded on first use, so that programs that never verify never
// pay for loading libtorch. The plugin is found at $ADAPTER_JOB_VERIFY_PLUGIN, beside the
// executable, or in <executable>/../lib/adapter_job/.
VerificationReport VerifyWithPlugin(const VerifyOptions& options);

// The plugin's entry point (extern "C", so dlsym finds it by this name). Returns 0 and fills
// `report`, or returns the exit code and fills `error` with the message.
inline constexpr const char* kPluginEntry = "adapter_job_verify_v1";
using PluginEntry = int (*)(const VerifyOptions* options, VerificationReport* report,
                            std::string* error);

// The plugin's preview entry point (PreviewVerificationWithPlugin), alike.
inline constexpr const char* kPreviewEntry = "adapter_job_preview_verification_v1";
using PreviewEntry = int (*)(const VerifyOptions* options, VerificationPreview* preview,
                             std::string* error);

// The plugin's HDF5 entry point (verify/plugin.h's WriteHdf5WithPlugin): 0 on success, else
// the exit code with `error` filled.
inline constexpr const char* kHdf5Entry = "adapter_job_write_hdf5_v1";
using Hdf5Entry = int (*)(const VerificationReport* report, const std::filesystem::path* path,
                          std::string* error);

}  // namespace adapter_job::verify
