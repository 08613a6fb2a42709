// What verification found: per prompt, every variant's logits and top-k tokens; each check with
// its figure and threshold; statistics of every adapter tensor. Rendered as a table for people,
// JSON for schedulers and HDF5 (verification.h5, report/hdf5_writer.h) for analysis. No libtorch
// and no HDF5 here.
#pragma once

#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace adapter_job::verify {

// One variant's full logits for one prompt, row-major [tokens, vocab], float32.
struct VariantLogits {
  std::string variant;  // "base" | "peft" | "merged"
  std::vector<int64_t> shape;
  std::vector<float> values;
};

struct TopToken {
  int64_t id = 0;
  std::string text;  // decoded token
  float logit = 0;
  float probability = 0;  // softmax over the vocabulary at the last position
};

struct VariantTopK {
  std::string variant;
  std::vector<TopToken> tokens;  // best first
};

struct PromptResult {
  std::string prompt;  // empty when given as ids
  std::vector<int64_t> token_ids;
  std::vector<VariantLogits> logits;
  std::vector<VariantTopK> top_k;
  // No prompt was given and the base model has no tokenizer.json: ids spread over the vocabulary.
  bool synthetic = false;
};

struct CheckResult {
  std::string name;  // e.g. "peft_vs_merged_max_abs_logit_diff"
  bool passed = false;
  double figure = 0;     // the measured value
  double threshold = 0;  // the bound it is held to
  std::string relation;  // how figure compares to threshold to pass: "<=", ">=" or "=="
  std::string detail;    // one line for people, e.g. which prompt and token decided it
};

struct TensorStat {
  std::string name;  // PEFT key in adapter_model.safetensors
  std::vector<int64_t> shape;
  std::string dtype;
  double mean = 0;
  double std = 0;
  double max_abs = 0;
  double frobenius_norm = 0;
};

// What verification will run on, found without running it (an export's --dry-run): the device
// it picks and the prompts as encoded (token_ids filled, no logits).
struct VerificationPreview {
  std::string device;  // "cuda:0" | "cpu"
  std::vector<PromptResult> prompts;
};

struct VerificationReport {
  std::string base_model;
  std::string adapter_path;
  std::string device;         // "cuda:0" | "cpu"
  std::string compute_dtype;  // "float32" by default
  int top_k = 5;
  std::vector<PromptResult> prompts;
  std::vector<CheckResult> checks;
  std::vector<TensorStat> adapter_tensors;
  double seconds = 0;

  bool passed() const;
  nlohmann::ordered_json ToJson() const;  // everything but the full logits
  std::string Table() const;              // the readable summary printed on rank 0
  // One line naming each failed check with its figure and threshold ("" when it passed): a
  // failed verdict is an error, shown at every log level.
  std::string FailureLine() const;
};

}  // namespace adapter_job::verify
