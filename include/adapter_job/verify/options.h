// What verification runs on and how (ExportOptions::verify, `adapter_job verify`).
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "adapter_job/core/progress.h"

namespace adapter_job::verify {

struct VerifyOptions {
  std::filesystem::path hf_model;  // local HF model directory (config.json + safetensors)
  std::string base_model_name;     // for the report; the directory when empty
  std::filesystem::path adapter;   // PEFT directory to verify
  std::optional<std::filesystem::path> megatron_checkpoint;  // enables the merged variant
  // A merged full-weight model (adapter_job merge) read as a fourth variant, held to the PEFT
  // variant with its weights rounded to the merged files' dtypes.
  std::optional<std::filesystem::path> merged_model;
  std::vector<std::string> prompts;  // encoded with <hf_model>/tokenizer.json
  std::vector<std::vector<int64_t>> prompt_ids;
  int top_k = 5;
  std::string device = "auto";  // auto | cuda | cpu
  // Weights held on the device at once: the embedding and output head, plus one layer in each
  // variant. Layers are always streamed; a model whose single layer cannot fit is refused.
  std::optional<uint64_t> max_device_bytes;
  ProgressSink progress;                                 // after every layer of the forward pass
  std::vector<std::filesystem::path> model_family_dirs;  // besides the built-in families
  // The export's --exclude-adapter-base-prefix: the Megatron-merged variant leaves out the same.
  std::vector<std::string> excluded_adapter_prefixes;
  // The export's --include-mtp-layers: the MTP layers' adapted weights are held to the Megatron
  // merge's (no forward pass runs them).
  bool include_mtp_layers = false;
};

// Default prompt when none is given, as Megatron-Bridge's verify_adapter.py.
inline constexpr const char* kDefaultPrompt = "The capital of France is";

}  // namespace adapter_job::verify
