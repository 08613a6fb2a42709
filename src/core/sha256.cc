#include "adapter_job/core/sha256.h"

#include <openssl/evp.h>

#include "adapter_job/core/error.h"

namespace adapter_job {

void Sha256::FreeContext::operator()(evp_md_ctx_st* context) const { EVP_MD_CTX_free(context); }

Sha256::Sha256() : context_(EVP_MD_CTX_new()) {
  if (!context_ || EVP_DigestInit_ex(context_.get(), EVP_sha256(), nullptr) != 1)
    Fail<IoError>("OpenSSL cannot start a sha256 digest");
}

void Sha256::Update(std::span<const std::byte> bytes) {
  if (EVP_DigestUpdate(context_.get(), bytes.data(), bytes.size()) != 1)
    Fail<IoError>("OpenSSL failed while computing a sha256");
}

std::string Sha256::HexDigest() {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  if (EVP_DigestFinal_ex(context_.get(), digest, &length) != 1)
    Fail<IoError>("OpenSSL failed to finish a sha256");
  static constexpr char kHex[] = "0123456789abcdef";
  std::string hex;
  for (unsigned int i = 0; i < length; ++i) {
    hex += kHex[digest[i] >> 4];
    hex += kHex[digest[i] & 0xF];
  }
  return hex;
}

std::string Sha256Hex(std::string_view text) {
  Sha256 digest;
  digest.Update(text);
  return digest.HexDigest();
}

}  // namespace adapter_job
