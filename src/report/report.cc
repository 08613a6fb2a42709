// The verification report's verdict, its JSON form and its text table (the HDF5 file is written
// by hdf5_writer.cc). Both text forms share the UTF-8 handling here.
#include "adapter_job/report/report.h"

#include <fmt/format.h>

#include <algorithm>
#include <iterator>
#include <limits>
#include <string_view>

#include "adapter_job/core/utf8.h"

namespace adapter_job::verify {
namespace {

using Json = nlohmann::ordered_json;

// JSON text must be UTF-8, and nlohmann's dump() throws on anything else. Paths on Linux are
// bytes, so a report about `/data/modèle` in Latin-1 would otherwise fail only when a scheduler
// serializes it, after all the verification work. Invalid bytes become U+FFFD, as Python's
// errors="replace" does.
std::string ValidUtf8(std::string_view s) { return utf8::Lossy(s); }

Json CheckJson(const CheckResult& check) {
  Json j;
  j["name"] = ValidUtf8(check.name);
  j["passed"] = check.passed;
  // Non-finite figures (a NaN logit difference) are written as null by nlohmann's dump().
  j["figure"] = check.figure;
  j["threshold"] = check.threshold;
  j["relation"] = ValidUtf8(check.relation);
  j["detail"] = ValidUtf8(check.detail);
  return j;
}

Json TopTokenJson(const TopToken& token) {
  Json j;
  j["id"] = token.id;
  j["text"] = ValidUtf8(token.text);
  j["logit"] = token.logit;
  j["probability"] = token.probability;
  return j;
}

Json PromptJson(const PromptResult& prompt) {
  Json top_k = Json::object();
  for (const auto& variant : prompt.top_k) {
    Json tokens = Json::array();
    for (const auto& token : variant.tokens) tokens.push_back(TopTokenJson(token));
    top_k[ValidUtf8(variant.variant)] = std::move(tokens);
  }
  Json j;
  j["prompt"] = ValidUtf8(prompt.prompt);
  j["token_ids"] = prompt.token_ids;
  if (prompt.synthetic) j["synthetic"] = true;
  j["top_k"] = std::move(top_k);
  return j;
}

Json TensorStatJson(const TensorStat& stat) {
  Json j;
  j["name"] = ValidUtf8(stat.name);
  j["shape"] = stat.shape;
  j["dtype"] = ValidUtf8(stat.dtype);
  j["mean"] = stat.mean;
  j["std"] = stat.std;
  j["max_abs"] = stat.max_abs;
  j["frobenius_norm"] = stat.frobenius_norm;
  return j;
}

template <typename T, typename ToJsonFn>
Json JsonArray(const std::vector<T>& items, ToJsonFn to_json) {
  Json array = Json::array();
  for (const auto& item : items) array.push_back(to_json(item));
  return array;
}

// ---- the table -------------------------------------------------------------------------------

// Widest token text and prompt line shown; longer ones end in "…". Real vocabularies hold
// tokens of dozens of spaces or dashes that would otherwise push the columns off the screen.
constexpr int kMaxTokenWidth = 20;
constexpr int kMaxPromptWidth = 100;

// One character of escaped text with the terminal columns it takes.
struct Glyph {
  std::string text;
  int width = 1;
};

// Characters a terminal shows as nothing, or that reorder the rest of the line (bidi controls):
// escaped so that two different tokens never look alike.
bool IsInvisible(char32_t c) {
  return (c >= 0x80 && c <= 0x9F) || c == 0xAD || (c >= 0x200B && c <= 0x200F) ||
         (c >= 0x2028 && c <= 0x202E) || (c >= 0x2060 && c <= 0x206F) || c == 0xFEFF;
}

bool IsCombiningMark(char32_t c) {
  return (c >= 0x0300 && c <= 0x036F) || (c >= 0x1AB0 && c <= 0x1AFF) ||
         (c >= 0x1DC0 && c <= 0x1DFF) || (c >= 0x20D0 && c <= 0x20FF) ||
         (c >= 0xFE20 && c <= 0xFE2F);
}

// Terminal columns of a printable character: two for East Asian wide and fullwidth forms and
// emoji, none for combining marks. A coarse table rather than wcwidth(), whose answer depends
// on the locale, but enough to keep CJK tokens (Qwen, Gemma) from shifting the columns.
int ColumnWidth(char32_t c) {
  if (IsCombiningMark(c)) return 0;
  const bool wide = (c >= 0x1100 && c <= 0x115F) || (c >= 0x2E80 && c <= 0x303E) ||
                    (c >= 0x3041 && c <= 0x33FF) || (c >= 0x3400 && c <= 0x4DBF) ||
                    (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0xA000 && c <= 0xA4CF) ||
                    (c >= 0xAC00 && c <= 0xD7A3) || (c >= 0xF900 && c <= 0xFAFF) ||
                    (c >= 0xFE30 && c <= 0xFE4F) || (c >= 0xFF00 && c <= 0xFF60) ||
                    (c >= 0xFFE0 && c <= 0xFFE6) || (c >= 0x1F300 && c <= 0x1F64F) ||
                    (c >= 0x1F900 && c <= 0x1F9FF) || (c >= 0x20000 && c <= 0x3FFFD);
  return wide ? 2 : 1;
}

// Escapes `text` for the table: \n, \t, \r and \\ as in C, other control and invisible
// characters as \xNN or \uNNNN, bytes that are not UTF-8 as \xNN, a combining mark with nothing
// to combine with as \uNNNN. With `mark_edge_spaces`, leading and trailing spaces become ␠:
// tokenizers put word boundaries there ("␠Paris" and "Paris" are different tokens) and a plain
// space at a column's edge cannot be seen. An empty text shows as "".
std::vector<Glyph> Escape(std::string_view text, bool mark_edge_spaces) {
  if (text.empty()) return {{"\"\"", 2}};
  const std::size_t first_visible = text.find_first_not_of(' ');
  const std::size_t last_visible = text.find_last_not_of(' ');
  std::vector<Glyph> glyphs;
  bool after_character = false;  // whether the last glyph is a character shown as itself
  for (std::size_t i = 0; i < text.size();) {
    after_character =
        !glyphs.empty() && glyphs.back().text.front() != '\\' && glyphs.back().text != "\u2420";
    const std::size_t length = utf8::SequenceLength(text.substr(i));
    if (length == 0) {
      glyphs.push_back({fmt::format("\\x{:02x}", static_cast<unsigned char>(text[i])), 4});
      ++i;
      continue;
    }
    std::size_t decoded = 0;
    const char32_t c = utf8::DecodeAt(text, i, &decoded);
    const auto code = static_cast<uint32_t>(c);
    const bool edge =
        i < first_visible || first_visible == std::string_view::npos || i > last_visible;
    if (c == ' ' && mark_edge_spaces && edge) {
      glyphs.push_back({"\u2420", 1});
    } else if (c == '\n') {
      glyphs.push_back({"\\n", 2});
    } else if (c == '\t') {
      glyphs.push_back({"\\t", 2});
    } else if (c == '\r') {
      glyphs.push_back({"\\r", 2});
    } else if (c == '\\') {
      glyphs.push_back({"\\\\", 2});
    } else if (c < 0x20 || c == 0x7F) {
      glyphs.push_back({fmt::format("\\x{:02x}", code), 4});
    } else if (IsInvisible(c) || (IsCombiningMark(c) && !after_character)) {
      glyphs.push_back({fmt::format("\\u{:04x}", code), 6});
    } else {
      glyphs.push_back({std::string(text.substr(i, length)), ColumnWidth(c)});
    }
    i += length;
  }
  return glyphs;
}

// Escaped text and its width in terminal columns.
struct Cell {
  std::string text;
  int width = 0;
};

// Joins `glyphs`, cut to at most `max_width` columns with a final "…" where they do not fit.
Cell Fit(const std::vector<Glyph>& glyphs, int max_width) {
  int total = 0;
  for (const auto& g : glyphs) total += g.width;
  Cell cell;
  const int budget = total <= max_width ? max_width : max_width - 1;
  for (const auto& g : glyphs) {
    if (cell.width + g.width > budget) break;
    cell.text += g.text;
    cell.width += g.width;
  }
  if (total > max_width) {
    cell.text += "\u2026";
    ++cell.width;
  }
  return cell;
}

Cell TokenCell(std::string_view text) { return Fit(Escape(text, true), kMaxTokenWidth); }

// Text printed whole within a line, with control characters escaped (a check's detail may quote
// a token that is a newline).
Cell InlineCell(std::string_view text) {
  if (text.empty()) return {};
  return Fit(Escape(text, false), std::numeric_limits<int>::max());
}

std::string Inline(std::string_view text) { return InlineCell(text).text; }

std::string PadRight(const Cell& cell, int width) {
  return cell.text + std::string(static_cast<std::size_t>(std::max(0, width - cell.width)), ' ');
}

int TokenColumnWidth(const std::vector<PromptResult>& prompts) {
  int width = 6;  // "merged"
  for (const auto& prompt : prompts) {
    for (const auto& variant : prompt.top_k) {
      for (const auto& token : variant.tokens) width = std::max(width, TokenCell(token.text).width);
    }
  }
  return width;
}

std::string PromptLine(std::size_t index, const PromptResult& prompt) {
  std::vector<Glyph> shown;
  if (prompt.synthetic) {
    shown = Escape(fmt::format("(synthetic token ids, the base model has no tokenizer.json: {})",
                               fmt::join(prompt.token_ids, " ")),
                   false);
  } else if (prompt.prompt.empty()) {
    // Given as token ids: show those instead of an empty string.
    shown = Escape(fmt::format("(token ids: {})", fmt::join(prompt.token_ids, " ")), false);
  } else {
    shown = Escape(prompt.prompt, true);
  }
  return fmt::format("prompt {} ({} tokens): {}\n", index, prompt.token_ids.size(),
                     Fit(shown, kMaxPromptWidth).text);
}

// Ends the last line of `out` without the padding of its last column: trailing spaces are noise
// in logs and diffs.
void EndLine(std::string& out) {
  const std::size_t line_start = out.rfind('\n') + 1;  // 0 when `out` has one line
  const std::size_t end = out.find_last_not_of(' ');
  out.resize(std::max(line_start, end == std::string::npos ? 0 : end + 1));
  out += '\n';
}

// Rank 1..k of every variant side by side: token text and probability.
void AppendPromptTable(std::string& out, std::size_t index, const PromptResult& prompt,
                       int token_width) {
  out += PromptLine(index, prompt);
  if (prompt.top_k.empty()) {
    out += "  (no top-k tokens)\n";
    return;
  }
  const int column_width = token_width + 2 + 6;  // text, two spaces, "0.1234"
  std::size_t rows = 0;
  out += "  rank";
  for (const auto& variant : prompt.top_k) {
    out += "   " + PadRight(Fit(Escape(variant.variant, true), column_width), column_width);
    rows = std::max(rows, variant.tokens.size());
  }
  EndLine(out);
  for (std::size_t rank = 0; rank < rows; ++rank) {
    out += fmt::format("  {:>4}", rank + 1);
    for (const auto& variant : prompt.top_k) {
      std::string cell(static_cast<std::size_t>(column_width), ' ');
      if (rank < variant.tokens.size()) {
        const TopToken& token = variant.tokens[rank];
        cell = PadRight(TokenCell(token.text), token_width) +
               fmt::format("  {:>6.4f}", token.probability);
      }
      out += "   " + cell;
    }
    EndLine(out);
  }
}

Cell NumberCell(double value, int precision = 6) {
  std::string text = fmt::format("{:.{}g}", value, precision);
  const int width = static_cast<int>(text.size());
  return {std::move(text), width};
}

// Six significant digits, or as many more as it takes to tell a figure from its threshold: a
// cosine of 0.9999988675 against 1 - 1e-6 must not print as "0.999999 >= 0.999999".
int CheckPrecision(const CheckResult& check) {
  int precision = 6;
  while (precision < 17 && check.figure != check.threshold &&
         NumberCell(check.figure, precision).text == NumberCell(check.threshold, precision).text)
    ++precision;
  return precision;
}

std::string PadLeft(const Cell& cell, int width) {
  return std::string(static_cast<std::size_t>(std::max(0, width - cell.width)), ' ') + cell.text;
}

// One check a line: PASS/FAIL, name, figure, relation, threshold, detail, in aligned columns.
void AppendChecks(std::string& out, const std::vector<CheckResult>& checks) {
  if (checks.empty()) {
    out += "checks: none\n";
    return;
  }
  out += "checks:\n";
  int name_width = 0, figure_width = 0, relation_width = 0, threshold_width = 0;
  for (const auto& check : checks) {
    name_width = std::max(name_width, InlineCell(check.name).width);
    const int precision = CheckPrecision(check);
    figure_width = std::max(figure_width, NumberCell(check.figure, precision).width);
    relation_width = std::max(relation_width, InlineCell(check.relation).width);
    threshold_width = std::max(threshold_width, NumberCell(check.threshold, precision).width);
  }
  for (const auto& check : checks) {
    const int precision = CheckPrecision(check);
    out += fmt::format("  {}  {}  {}  {}  {}  {}", check.passed ? "PASS" : "FAIL",
                       PadRight(InlineCell(check.name), name_width),
                       PadLeft(NumberCell(check.figure, precision), figure_width),
                       PadRight(InlineCell(check.relation), relation_width),
                       PadRight(NumberCell(check.threshold, precision), threshold_width),
                       Inline(check.detail));
    EndLine(out);
  }
}

std::string Verdict(const std::vector<CheckResult>& checks, bool passed) {
  if (passed) return "verification PASSED\n";
  if (checks.empty()) return "verification FAILED (no checks were run)\n";
  const auto failed =
      std::count_if(checks.begin(), checks.end(), [](const CheckResult& c) { return !c.passed; });
  return fmt::format("verification FAILED ({} of {} checks)\n", failed, checks.size());
}

}  // namespace

bool VerificationReport::passed() const {
  // No checks proves nothing: a run whose checks were all skipped must not read as a success.
  return !checks.empty() &&
         std::all_of(checks.begin(), checks.end(), [](const CheckResult& c) { return c.passed; });
}

nlohmann::ordered_json VerificationReport::ToJson() const {
  Json j;
  j["base_model"] = ValidUtf8(base_model);
  j["adapter_path"] = ValidUtf8(adapter_path);
  j["device"] = ValidUtf8(device);
  j["compute_dtype"] = ValidUtf8(compute_dtype);
  j["top_k"] = top_k;
  j["passed"] = passed();
  j["seconds"] = seconds;
  j["checks"] = JsonArray(checks, CheckJson);
  // The full logits are left to the HDF5 file: a 128k vocabulary makes megabytes per prompt.
  j["prompts"] = JsonArray(prompts, PromptJson);
  j["adapter_tensors"] = JsonArray(adapter_tensors, TensorStatJson);
  return j;
}

std::string VerificationReport::FailureLine() const {
  if (passed()) return "";
  if (checks.empty()) return "verification FAILED: no checks were run";
  std::string line = "verification FAILED:";
  const char* separator = " ";
  for (const auto& check : checks) {
    if (check.passed) continue;
    const int precision = CheckPrecision(check);
    line += fmt::format("{}{} {} (must be {} {}{})", separator, Inline(check.name),
                        NumberCell(check.figure, precision).text, Inline(check.relation),
                        NumberCell(check.threshold, precision).text,
                        check.detail.empty() ? "" : ": " + Inline(check.detail));
    separator = "; ";
  }
  return line;
}

std::string VerificationReport::Table() const {
  std::string out = fmt::format(
      "base model: {}   adapter: {}   device: {}   dtype: {}   top-k: {}   time: {:.1f} s\n",
      Inline(base_model), Inline(adapter_path), Inline(device), Inline(compute_dtype), top_k,
      seconds);
  const int token_width = TokenColumnWidth(prompts);
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    out += '\n';
    AppendPromptTable(out, i, prompts[i], token_width);
  }
  out += '\n';
  AppendChecks(out, checks);
  out += Verdict(checks, passed());
  return out;
}

}  // namespace adapter_job::verify
