// The verification prompts, encoded without the plugin: an export's --dry-run shows them, and the
// plugin runs the same code, so what the dry run shows is what verification will run.
#include <string_view>

#include "adapter_job/core/error.h"
#include "adapter_job/tokenizer/tokenizer.h"
#include "adapter_job/verify/verify.h"

namespace adapter_job::verify {
namespace {

// A logits check needs a sentence or two. These caps keep a mistaken prompt (a whole file) from
// exhausting memory: encoding took ~1 KB per input byte (a 20 MB prompt was killed at 23.7 GB),
// and the forward pass grows with the square of the length.
constexpr std::size_t kMaxPromptBytes = std::size_t{64} << 10;
constexpr std::size_t kMaxPromptTokens = 8192;

std::string Abbreviated(std::string_view text) {
  constexpr std::size_t kShown = 40;
  return text.size() <= kShown ? std::string(text) : std::string(text.substr(0, kShown)) + "...";
}

}  // namespace

std::vector<PromptResult> ResolvePrompts(const VerifyOptions& options,
                                         const tokenizer::Tokenizer* tokenizer,
                                         int64_t vocab_size) {
  std::vector<std::string> prompts = options.prompts;
  std::vector<std::vector<int64_t>> prompt_ids = options.prompt_ids;
  bool synthetic_ids = false;
  if (prompts.empty() && prompt_ids.empty()) {
    if (tokenizer != nullptr) {
      prompts.push_back(kDefaultPrompt);
    } else {
      // No tokenizer and no prompt: 16 ids spread over the vocabulary stand in for text.
      std::vector<int64_t> ids;
      for (int64_t i = 1; i <= 16; ++i) ids.push_back(i * 7919 % vocab_size);
      prompt_ids.push_back(std::move(ids));
      synthetic_ids = true;
    }
  }
  std::vector<PromptResult> resolved;
  for (const auto& text : prompts) {
    if (tokenizer == nullptr)
      Fail("'{}' has no tokenizer.json to encode the prompt; pass --prompt-ids",
           options.hf_model.string());
    if (text.size() > kMaxPromptBytes) {
      Fail("prompt '{}' is {} bytes, more than the {} allowed (a logits check needs a sentence)",
           Abbreviated(text), text.size(), kMaxPromptBytes);
    }
    resolved.push_back({text, tokenizer->Encode(text), {}, {}, false});
  }
  for (const auto& ids : prompt_ids) resolved.push_back({"", ids, {}, {}, synthetic_ids});
  for (const auto& p : resolved) {
    if (p.token_ids.empty()) Fail("prompt '{}' encodes to no tokens", p.prompt);
    if (p.token_ids.size() > kMaxPromptTokens) {
      Fail("prompt '{}' has {} tokens, more than the {} allowed (a logits check needs a sentence)",
           Abbreviated(p.prompt), p.token_ids.size(), kMaxPromptTokens);
    }
    for (int64_t id : p.token_ids) {
      if (id < 0 || id >= vocab_size)
        Fail("token id {} is outside the vocabulary of {}", id, vocab_size);
    }
  }
  return resolved;
}

std::optional<tokenizer::Tokenizer> OpenTokenizer(const std::filesystem::path& model_dir) {
  std::error_code ec;
  if (!std::filesystem::exists(model_dir / "tokenizer.json", ec)) return std::nullopt;
  return tokenizer::Tokenizer::FromFile(model_dir / "tokenizer.json");
}

}  // namespace adapter_job::verify
