// Test tool: text::Regex in Python's dialect over JSON lines, so that test_regex_dialect.py can
// hold it against Python's `re`; std::regex (ECMAScript), which PEFT patterns were matched with
// before, answers too, to show where the two engines part.
//
//   regex_match < requests > responses
//
// Each request line is {"pattern": "...", "text": "...", "anchor": "search" | "match" |
// "fullmatch"}; each response line is {"pcre2": R, "std_regex": R}, where R is null (no match),
// the [begin, end] byte spans of the match and its groups (null for a group that took no part),
// or {"error": "..."} for a pattern the engine refuses.
#include <iostream>
#include <nlohmann/json.hpp>
#include <regex>
#include <string>

#include "adapter_job/core/error.h"
#include "adapter_job/text/regex.h"

using adapter_job::text::Regex;
using nlohmann::json;

namespace {

json Pcre2(const std::string& pattern, const std::string& text, Regex::Anchor anchor) {
  try {
    const auto groups = Regex(pattern, Regex::Dialect::kPython).Match(text, anchor);
    if (!groups) return nullptr;
    json spans = json::array();
    for (const auto& g : *groups) spans.push_back(g ? json{g->begin, g->end} : json(nullptr));
    return spans;
  } catch (const adapter_job::Error& e) {
    return {{"error", e.what()}};
  }
}

json StdRegex(const std::string& pattern, const std::string& text, Regex::Anchor anchor) {
  try {
    const std::regex regex(pattern);
    std::smatch m;
    bool found = false;
    if (anchor == Regex::Anchor::kFull) {
      found = std::regex_match(text, m, regex);
    } else {
      const auto flags = anchor == Regex::Anchor::kStart ? std::regex_constants::match_continuous
                                                         : std::regex_constants::match_default;
      found = std::regex_search(text, m, regex, flags);
    }
    if (!found) return nullptr;
    json spans = json::array();
    for (std::size_t i = 0; i < m.size(); ++i) {
      const auto begin = static_cast<std::size_t>(m[i].first - text.begin());
      const auto end = static_cast<std::size_t>(m[i].second - text.begin());
      spans.push_back(m[i].matched ? json{begin, end} : json(nullptr));
    }
    return spans;
  } catch (const std::regex_error& e) {
    return {{"error", e.what()}};
  }
}

}  // namespace

int main() {
  std::string line;
  while (std::getline(std::cin, line)) {
    const json request = json::parse(line);
    const std::string anchor_name = request.at("anchor");
    const Regex::Anchor anchor = anchor_name == "fullmatch" ? Regex::Anchor::kFull
                                 : anchor_name == "match"   ? Regex::Anchor::kStart
                                                            : Regex::Anchor::kSearch;
    const std::string pattern = request.at("pattern");
    const std::string text = request.at("text");
    std::cout << json{{"pcre2", Pcre2(pattern, text, anchor)},
                      {"std_regex", StdRegex(pattern, text, anchor)}}
                     .dump()
              << '\n';
  }
  return 0;
}
