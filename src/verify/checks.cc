// Thresholds are for float32 math on adapters of the same precision: the merged variant rounds
// the checkpoint's tensors to the adapter file's dtype first (the rounding the export is asked
// for), so a correct export differs from it by float32 noise only, about 1e-6 of the logit scale;
// every fault this verification exists to catch (k/v swapped, a contiguous QKV split, gate/up
// swapped, a dropped DoRA magnitude, alpha ignored, rounding the file did not declare) moves
// logits by 1e-3 to 1 of it.
//
// The figures themselves are computed in float64 from the float32 logits: a float32 reduction over
// a 128k-262k vocabulary is off by 1e-6 on its own (the cosine of a row with itself came out as
// 0.9999988 on one GPU, and 1 - 1.5e-6 on one CPU thread), which is the cosine threshold itself.
// In float64 a check's own rounding stays below 1e-12 of its threshold at any vocabulary size.
#include "checks.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <utility>

namespace adapter_job::verify {
namespace {

constexpr double kEffectFloor = 1e-4;      // an adapter that moves no logit by this did nothing
constexpr double kMaxDiffRelative = 1e-4;  // of the largest |logit|
// Of the largest |weight update|: both updates come from the same adapter-dtype tensors in
// float32, so they differ by summation order and by the float32 rounding of W + update - W
// (1e-7 of |W|, W at most ~100x the update); a mapping error differs by the update itself.
constexpr double kMaxUpdateDiffRelative = 1e-4;
constexpr double kMeanDiffRelative = 1e-5;
constexpr double kMinCosine = 1.0 - 1e-6;
constexpr double kTieRelative = 1e-4;  // near-ties: logits closer than this may swap ranks
// A merge summing in another order than PEFT's lands on the other side of a rounding tie for
// about 1e-5 of the elements at most (1e-4 of the sum's fp32 noise per bf16 step, times |ΔW|/|W|);
// rounding the update to bf16 before adding it, as some merges do, flips half of |ΔW|/|W|.
constexpr double kMaxMisroundedFraction = 1e-3;

CheckResult Check(std::string name, double figure, std::string relation, double threshold,
                  std::string detail) {
  const bool passed = relation == "<="   ? figure <= threshold
                      : relation == ">=" ? figure >= threshold
                                         : figure == threshold;
  return {std::move(name), passed, figure, threshold, std::move(relation), std::move(detail)};
}

// Top-k ids agree when every rank holds the same id, or the ids at ranks that differ have logits
// within the tie tolerance of each other in the reference (so either order is right). Both rows
// are float64.
std::pair<bool, std::string> TopKAgree(const at::Tensor& ours, const at::Tensor& reference, int k,
                                       double tolerance) {
  const auto [ref_values, ref_ids] = reference.topk(k);
  const auto [our_values, our_ids] = ours.topk(k);
  for (int i = 0; i < k; ++i) {
    const int64_t a = our_ids[i].item<int64_t>();
    const int64_t b = ref_ids[i].item<int64_t>();
    if (a == b) continue;
    const double gap = std::abs(reference[a].item<double>() - reference[b].item<double>());
    if (gap > tolerance) {
      return {false, fmt::format("rank {}: token {} vs {} (reference logits differ by {:.6g}, "
                                 "more than the tie tolerance {:.6g})",
                                 i + 1, a, b, gap, tolerance)};
    }
  }
  return {true, ""};
}

// Lowest cosine similarity of the rows of two [tokens, vocab] float64 tensors. A row equal to
// its counterpart gives exactly 1 (the dot product and both squared norms are the same sum, and
// sqrt(x * x) == x in IEEE arithmetic); a zero row gives 0 unless both are zero.
double MinRowCosine(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor dot = (a * b).sum(1);
  const at::Tensor norms = (a * a).sum(1) * (b * b).sum(1);
  double lowest = 1;
  for (int64_t row = 0; row < a.size(0); ++row) {
    const double n = norms[row].item<double>();
    const double d = dot[row].item<double>();
    const double cosine = n > 0 ? d / std::sqrt(n) : (a[row].equal(b[row]) ? 1.0 : 0.0);
    lowest = std::min(lowest, cosine);
  }
  return lowest;
}

struct LogitsPair {
  at::Tensor ours, reference;  // one prompt's [tokens, vocab]
};

// The four checks that hold `ours` to `reference` over every prompt: <prefix>_topk,
// _max_abs_diff, _mean_abs_diff and _min_cosine. None when `pairs` is empty.
void ComparePair(std::vector<CheckResult>& checks, const std::string& prefix,
                 const std::pair<std::string, std::string>& shown,
                 const std::vector<LogitsPair>& pairs, int top_k) {
  if (pairs.empty()) return;
  double max_diff = 0, sum_diff = 0, count = 0, scale = 1, min_cosine = 1;
  bool topk_ok = true;
  std::string topk_detail = fmt::format("top-{} ids of {} equal {} at the last position", top_k,
                                        shown.first, shown.second);
  for (std::size_t i = 0; i < pairs.size(); ++i) {
    const at::Tensor ours = pairs[i].ours.to(at::kDouble);
    const at::Tensor reference = pairs[i].reference.to(at::kDouble);
    const at::Tensor diff = (ours - reference).abs();
    max_diff = std::max(max_diff, diff.max().item<double>());
    sum_diff += diff.sum().item<double>();
    count += static_cast<double>(diff.numel());
    scale = std::max(scale, reference.abs().max().item<double>());
    min_cosine = std::min(min_cosine, MinRowCosine(ours, reference));
    if (topk_ok) {
      const int64_t last = ours.size(0) - 1;
      const int k = static_cast<int>(std::min<int64_t>(top_k, ours.size(1)));
      const at::Tensor last_reference = reference.index({last});
      const double tolerance =
          kTieRelative * std::max(1.0, last_reference.abs().max().item<double>());
      auto [agree, why] = TopKAgree(ours.index({last}), last_reference, k, tolerance);
      if (!agree) {
        topk_ok = false;
        topk_detail = fmt::format("prompt {}: {}", i, why);
      }
    }
  }
  checks.push_back(Check(prefix + "_topk", topk_ok ? 1 : 0, "==", 1, topk_detail));
  checks.push_back(
      Check(prefix + "_max_abs_diff", max_diff, "<=", kMaxDiffRelative * scale,
            fmt::format("every logit of every prompt; largest |logit| {:.3g}", scale)));
  checks.push_back(Check(prefix + "_mean_abs_diff", count > 0 ? sum_diff / count : 0,
                         "<=", kMeanDiffRelative * scale, "mean over every logit of every prompt"));
  checks.push_back(Check(prefix + "_min_cosine", min_cosine, ">=", kMinCosine,
                         "cosine similarity of the logit vectors, lowest over positions"));
}

}  // namespace

at::Tensor& PromptLogits::Of(std::string_view variant) {
  if (variant == "base") return base;
  if (variant == "peft") return peft;
  if (variant == "merged") return merged.emplace();
  if (variant == "peft_as_stored") return peft_as_stored.emplace();
  if (variant == "merged_model") return merged_model.emplace();
  throw std::logic_error(fmt::format("no logits variant '{}'", variant));
}

std::vector<CheckResult> RunChecks(const CheckInputs& in) {
  std::vector<CheckResult> checks;

  double effect = 0;
  for (const auto& p : in.prompts)
    effect = std::max(effect,
                      (p.peft.to(at::kDouble) - p.base.to(at::kDouble)).abs().max().item<double>());
  checks.push_back(Check("adapter_changes_logits", effect, ">=", kEffectFloor,
                         "max |PEFT - base| over every prompt and position"));

  checks.push_back(Check(
      "adapter_tensors_all_applied", static_cast<double>(in.unused_tensors), "==", 0,
      in.unused_tensors ? "unused: " + in.first_unused : "every tensor maps to a targeted module"));
  checks.push_back(Check("adapter_tensors_none_missing", static_cast<double>(in.missing_tensors),
                         "==", 0,
                         in.missing_tensors ? "missing: " + in.first_missing
                                            : "every targeted module has its tensors"));
  {
    // The PEFT variant means stock PEFT only while every config field PEFT applies is modelled.
    std::string fields;
    for (const auto& f : in.unmodelled_fields) fields += (fields.empty() ? "" : "; ") + f;
    checks.push_back(
        Check("adapter_config_modelled", static_cast<double>(in.unmodelled_fields.size()), "==", 0,
              fields.empty() ? "every adapter_config.json field PEFT applies is modelled"
                             : "PEFT applies what this check does not model: " + fields));
  }

  if (in.merged_model_weights) {
    const RoundingTally& t = *in.merged_model_weights;
    checks.push_back(Check(
        "merged_model_weights_within_rounding", t.worst, "<=", 1,
        fmt::format("largest |merged file - PEFT merge| per what rounding allows (one step of the "
                    "stored dtype + 1e-5 of the row); worst in {}",
                    t.worst_tensor.empty() ? "none" : t.worst_tensor)));
    checks.push_back(Check("merged_model_weights_rounded_to_nearest",
                           t.elements ? static_cast<double>(t.misrounded) / t.elements : 0,
                           "<=", kMaxMisroundedFraction,
                           fmt::format("fraction of {} bf16/fp16 elements not rounded to the "
                                       "nearest value (float32 sums in another order flip about "
                                       "1e-5)",
                                       t.elements)));
  }
  if (in.mtp_layers) {
    const UpdateComparison& m = *in.mtp_layers;
    checks.push_back(Check(
        "mtp_layers_peft_vs_merged_update", m.max_diff, "<=", kMaxUpdateDiffRelative * m.scale,
        fmt::format("{} MTP layer(s), weights only (no forward pass runs them): largest |PEFT "
                    "update - Megatron merge's update| of any element, worst in {}; largest "
                    "|update| {:.3g}",
                    m.layers, m.worst_tensor.empty() ? "none" : m.worst_tensor, m.scale)));
  }
  if (in.prompts.empty()) return checks;
  // The adapter as PEFT applies it against the checkpoint's own adapter merged in Megatron's
  // layout; a merged model against PEFT's weights stored as the merged files store them.
  std::vector<LogitsPair> peft_vs_merged, merged_model_vs_peft;
  for (const auto& p : in.prompts) {
    if (p.merged) peft_vs_merged.push_back({p.peft, *p.merged});
    if (p.merged_model) merged_model_vs_peft.push_back({*p.merged_model, *p.peft_as_stored});
  }
  ComparePair(checks, "peft_vs_merged", {"PEFT", "merged"}, peft_vs_merged, in.top_k);
  ComparePair(checks, "merged_model_vs_peft", {"the merged model", "PEFT as stored"},
              merged_model_vs_peft, in.top_k);
  return checks;
}

}  // namespace adapter_job::verify
