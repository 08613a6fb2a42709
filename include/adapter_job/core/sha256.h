// sha256 digests (OpenSSL's), as lower-case hex: of a checkpoint's files (integrity.json), of
// the outputs the run report lists, of text.
#pragma once

#include <cstddef>
#include <memory>
#include <span>
#include <string>
#include <string_view>

struct evp_md_ctx_st;  // OpenSSL's EVP_MD_CTX, kept out of every includer

namespace adapter_job {

// A digest fed piece by piece. Throws IoError where OpenSSL fails.
class Sha256 {
 public:
  Sha256();
  void Update(std::span<const std::byte> bytes);
  void Update(std::string_view text) { Update(std::as_bytes(std::span(text))); }
  // Ends the digest: Update and HexDigest may not be called again.
  std::string HexDigest();

 private:
  struct FreeContext {
    void operator()(evp_md_ctx_st* context) const;
  };
  std::unique_ptr<evp_md_ctx_st, FreeContext> context_;
};

std::string Sha256Hex(std::string_view text);

}  // namespace adapter_job
