// Test tool: tokenizer::Tokenizer over JSON lines, so one process serves many probes.
//
//   tokenize TOKENIZER_JSON < requests > responses
//
// Each request line is {"text": "...", "add_special_tokens": true} or
// {"ids": [...], "skip_special_tokens": false} (the flags optional, defaults as shown); each
// response line is {"ids": [...]} or {"text": "..."}, or {"error": "..."} for a request that
// failed. A tokenizer.json that does not load ends the tool with exit code 2.
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>

#include "adapter_job/core/error.h"
#include "adapter_job/tokenizer/tokenizer.h"

using adapter_job::tokenizer::Tokenizer;
using nlohmann::json;

namespace {

json Answer(const Tokenizer& tokenizer, const json& request) {
  if (request.contains("text")) {
    return {{"ids", tokenizer.Encode(request.at("text").get<std::string>(),
                                     request.value("add_special_tokens", true))}};
  }
  if (request.contains("ids")) {
    const auto ids = request.at("ids").get<std::vector<int64_t>>();
    return {{"text", tokenizer.Decode(ids, request.value("skip_special_tokens", false))}};
  }
  return {{"error", "a request needs \"text\" or \"ids\""}};
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: tokenize TOKENIZER_JSON < requests.jsonl\n");
    return 2;
  }
  try {
    const Tokenizer tokenizer = Tokenizer::FromFile(argv[1]);
    std::string line;
    while (std::getline(std::cin, line)) {
      json response;
      try {
        response = Answer(tokenizer, json::parse(line));
      } catch (const std::exception& e) {
        response = {{"error", e.what()}};
      }
      std::cout << response.dump(-1, ' ', false, json::error_handler_t::replace) << '\n';
    }
    std::cout.flush();
    return 0;
  } catch (const adapter_job::Error& e) {
    std::fprintf(stderr, "tokenize: error: %s\n", e.what());
    return static_cast<int>(e.exit_code());
  }
}
