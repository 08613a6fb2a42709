// Test tool: writes a deterministic verification report in all three forms, so that
// test_report.py can read the HDF5 file with h5py and hold it against the JSON and the formula.
//
//   report_demo OUT_STEM [--empty]
// writes OUT_STEM.h5 and OUT_STEM.json and prints the table. The report has 2 prompts, the
// variants base, peft and merged over a 32-token vocabulary, 3 checks of which one fails, and 4
// adapter tensors; --empty gives one with no prompts, checks or tensors.
//
// Logits come from Logit() below, whose values are multiples of 1/1024 below 8 in magnitude:
// exact in float32, so Python can recompute them bit for bit.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <string>

#include "adapter_job/core/error.h"
#include "adapter_job/core/file.h"
#include "adapter_job/report/hdf5_writer.h"
#include "adapter_job/report/report.h"

using namespace adapter_job;
using namespace adapter_job::verify;

namespace {

constexpr int64_t kVocab = 32;
constexpr int kTopK = 5;
const char* const kVariants[] = {"base", "peft", "merged"};

// Token texts that exercise the table's escaping: edge spaces, control characters, invisible
// and wide characters, a leading combining mark, an empty text (an id the tokenizer lacks).
const char* const kTokenText[kVocab] = {
    "<s>",  "</s>",   " the",         "\n",  "Paris", " Paris",   "\u03A9",  "  ",
    "end ", "\u00E9", "\"q\"",        "!",   " ",     "\u200B",   "x\ny",    "caf\u00E9",
    "a\\b", "?",      " of",          "ing", "\r\n",  "  indent", "tail  ",  "\U0001F642",
    "\x01", "\x7F",   "\u65E5\u672C", "",    "\t",    " a b ",    "\u0301e", "zz"};

// The formula test_report.py repeats: prompt p, variant v (0 base, 1 peft, 2 merged), position
// t, token j. peft and merged differ by at most 2/1024, more than the demo's 1e-3 tolerance.
double Logit(int64_t p, int64_t v, int64_t t, int64_t j) {
  const int64_t adapter = v > 0 ? 11 * (j % 5) : 0;
  const double merge_error = v == 2 ? static_cast<double>((t + j) % 3) / 1024.0 : 0.0;
  return static_cast<double>((p * 29 + t * 17 + j * 37 + adapter) % 97) / 8.0 - 6.0 + merge_error;
}

VariantLogits MakeLogits(int64_t p, int64_t v, int64_t tokens) {
  VariantLogits logits{kVariants[v], {tokens, kVocab}, {}};
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t j = 0; j < kVocab; ++j)
      logits.values.push_back(static_cast<float>(Logit(p, v, t, j)));
  }
  return logits;
}

// The best kTopK tokens at the last position, ties to the lower id; probabilities are the
// softmax over the whole vocabulary, computed in double.
VariantTopK MakeTopK(const VariantLogits& logits) {
  const int64_t tokens = logits.shape[0];
  const float* last = logits.values.data() + (tokens - 1) * kVocab;
  const double max = *std::max_element(last, last + kVocab);
  double sum = 0;
  for (int64_t j = 0; j < kVocab; ++j) sum += std::exp(last[j] - max);
  std::vector<int64_t> ids(kVocab);
  std::iota(ids.begin(), ids.end(), 0);
  std::stable_sort(ids.begin(), ids.end(), [&](int64_t a, int64_t b) { return last[a] > last[b]; });
  VariantTopK top_k{logits.variant, {}};
  for (int rank = 0; rank < kTopK; ++rank) {
    const int64_t id = ids[rank];
    top_k.tokens.push_back(
        {id, kTokenText[id], last[id], static_cast<float>(std::exp(last[id] - max) / sum)});
  }
  return top_k;
}

PromptResult MakePrompt(int64_t p, std::string text, std::vector<int64_t> token_ids) {
  PromptResult prompt{std::move(text), std::move(token_ids), {}, {}, false};
  const auto tokens = static_cast<int64_t>(prompt.token_ids.size());
  for (int64_t v = 0; v < 3; ++v) {
    prompt.logits.push_back(MakeLogits(p, v, tokens));
    prompt.top_k.push_back(MakeTopK(prompt.logits.back()));
  }
  return prompt;
}

// The largest |a - b| over every prompt, position and token, and where it is.
CheckResult MaxAbsDiff(const std::vector<PromptResult>& prompts, int a, int b, std::string name,
                       double threshold, std::string relation) {
  double worst = -1;
  std::string where;
  for (std::size_t p = 0; p < prompts.size(); ++p) {
    const auto& x = prompts[p].logits[a].values;
    const auto& y = prompts[p].logits[b].values;
    for (std::size_t i = 0; i < x.size(); ++i) {
      const double diff = std::abs(static_cast<double>(x[i]) - y[i]);
      if (diff > worst) {
        worst = diff;
        where = "prompt " + std::to_string(p) + ", position " + std::to_string(i / kVocab) +
                ", token '" + kTokenText[i % kVocab] + "'";
      }
    }
  }
  const bool passed = relation == "<=" ? worst <= threshold : worst >= threshold;
  return {std::move(name), passed, worst, threshold, std::move(relation), where};
}

CheckResult Top1Agreement(const std::vector<PromptResult>& prompts) {
  int agree = 0;
  for (const auto& prompt : prompts) {
    agree += prompt.top_k[1].tokens[0].id == prompt.top_k[2].tokens[0].id;
  }
  const double figure = static_cast<double>(agree) / static_cast<double>(prompts.size());
  return {"peft_vs_merged_top1_agreement",
          figure >= 1.0,
          figure,
          1.0,
          ">=",
          std::to_string(agree) + " of " + std::to_string(prompts.size()) + " prompts agree"};
}

std::vector<TensorStat> MakeTensorStats() {
  const std::string layer = "base_model.model.model.layers.0.self_attn.q_proj.";
  std::vector<TensorStat> stats = {{layer + "lora_A.weight", {8, 64}, "float32"},
                                   {layer + "lora_B.weight", {64, 8}, "bfloat16"},
                                   {layer + "lora_magnitude_vector", {64}, "float32"},
                                   {"demo.scalar", {}, "float64"}};
  for (std::size_t i = 0; i < stats.size(); ++i) {
    const double k = static_cast<double>(i + 1);
    stats[i].mean = 0.001 * k - 0.002;
    stats[i].std = 0.02 * k;
    stats[i].max_abs = 0.1 * k;
    stats[i].frobenius_norm = 0.25 * k * k;
  }
  return stats;
}

VerificationReport MakeReport(bool empty) {
  VerificationReport report;
  report.base_model = "demo/tiny-llama";
  report.adapter_path = "/runs/demo adapter";
  report.device = "cpu";
  report.compute_dtype = "float32";
  report.top_k = kTopK;
  report.seconds = 1.25;
  if (empty) return report;
  report.prompts.push_back(MakePrompt(0, " Hello,\nworld ", {1, 12, 4, 3, 19, 12}));
  report.prompts.push_back(MakePrompt(1, "", {0, 7, 21, 30}));
  report.checks.push_back(
      MaxAbsDiff(report.prompts, 1, 2, "peft_vs_merged_max_abs_logit_diff", 1e-3, "<="));
  report.checks.push_back(Top1Agreement(report.prompts));
  report.checks.push_back(MaxAbsDiff(report.prompts, 0, 1, "adapter_changes_logits", 1e-2, ">="));
  report.adapter_tensors = MakeTensorStats();
  return report;
}

}  // namespace

int main(int argc, char** argv) {
  const bool empty = argc == 3 && std::string(argv[2]) == "--empty";
  if (argc < 2 || argc > 3 || (argc == 3 && !empty)) {
    std::fprintf(stderr, "usage: report_demo OUT_STEM [--empty]\n");
    return 2;
  }
  try {
    const VerificationReport report = MakeReport(empty);
    const std::string stem = argv[1];
    WriteHdf5(report, stem + ".h5");
    OutputFile json = OutputFile::Create(stem + ".json", /*overwrite=*/true);
    json.Write(report.ToJson().dump(2) + "\n");
    std::move(json).Commit();
    std::fputs(report.Table().c_str(), stdout);
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "report_demo: error: %s\n", e.what());
    return static_cast<int>(e.exit_code());
  }
}
