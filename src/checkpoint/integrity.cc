#include "adapter_job/checkpoint/integrity.h"

#include <algorithm>
#include <memory>
#include <vector>

#include "adapter_job/core/error.h"
#include "adapter_job/core/file.h"
#include "adapter_job/core/sha256.h"

namespace adapter_job::checkpoint {
namespace {

namespace fs = std::filesystem;

bool IsSha256Hex(const std::string& digest) {
  if (digest.size() != 64) return false;
  for (const char c : digest) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'))) return false;
  }
  return true;
}

std::string Lower(std::string text) {
  for (char& c : text) {
    if (c >= 'A' && c <= 'F') c = static_cast<char>(c - 'A' + 'a');
  }
  return text;
}

// A listed name must stay inside the iteration directory: the manifest is input like any other.
void CheckName(const std::string& name, const fs::path& manifest_file) {
  const fs::path path(name);
  bool escapes = name.empty() || path.is_absolute();
  for (const auto& part : path) escapes = escapes || part == "..";
  if (escapes) {
    Fail("{}: files.'{}' is not a path inside the iteration directory", manifest_file.string(),
         name);
  }
}

}  // namespace

std::string Sha256File(const fs::path& file) {
  const ReadOnlyFile input = ReadOnlyFile::Open(file);
  Sha256 digest;
  std::vector<std::byte> buffer(std::size_t{1} << 20);
  for (uint64_t offset = 0; offset < input.size(); offset += buffer.size()) {
    const std::span<std::byte> piece(buffer.data(),
                                     std::min<uint64_t>(buffer.size(), input.size() - offset));
    input.ReadExact(offset, piece);
    digest.Update(piece);
  }
  return digest.HexDigest();
}

std::size_t CheckIntegrity(const IntegrityManifest& manifest, const fs::path& iteration_dir,
                           int first, int stride) {
  const fs::path manifest_file = iteration_dir / "integrity.json";
  // Only sha256 counts as verified: a weaker digest (md5, crc) would let a damaged file pass.
  if (manifest.algorithm != "sha256") {
    Fail("{}: algorithm is '{}'; only \"sha256\" is checked, so the checkpoint cannot be verified",
         manifest_file.string(), manifest.algorithm);
  }
  if (manifest.files.empty()) Fail("{}: files lists no file", manifest_file.string());
  for (const auto& [name, digest] : manifest.files) {
    CheckName(name, manifest_file);
    if (!IsSha256Hex(digest)) {
      Fail("{}: files.'{}' is '{}', not a sha256 digest (64 hex digits)", manifest_file.string(),
           name, digest);
    }
  }
  std::size_t index = 0;
  std::size_t checked = 0;
  for (const auto& [name, digest] : manifest.files) {
    if (static_cast<int>(index++ % static_cast<std::size_t>(std::max(stride, 1))) != first)
      continue;
    const fs::path file = iteration_dir / name;
    std::error_code ec;
    if (!fs::is_regular_file(file, ec)) {
      Fail("{} lists '{}', but '{}' is {}", manifest_file.string(), name, file.string(),
           fs::exists(file, ec) ? "not a regular file" : "missing");
    }
    const std::string actual = Sha256File(file);
    if (actual != Lower(digest)) {
      Fail("'{}' does not match {}: its sha256 is {}, the manifest says {}", file.string(),
           manifest_file.string(), actual, Lower(digest));
    }
    ++checked;
  }
  return checked;
}

}  // namespace adapter_job::checkpoint
