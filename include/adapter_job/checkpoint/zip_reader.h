// The subset of ZIP that torch.save writes: STORED members located through the central
// directory (the local headers of PyTorch archives carry zero sizes), with Zip64 records.
// Section numbers refer to PKWARE's APPNOTE.TXT 6.3.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace adapter_job::checkpoint {

struct ZipMember {
  std::string name;
  uint64_t data_offset = 0;  // from the start of the archive bytes
  uint64_t size = 0;
};

class ZipArchive {
 public:
  // Throws FormatError("zip: ...") on anything malformed, compressed or out of bounds.
  static ZipArchive Parse(std::span<const std::byte> archive);

  const std::vector<ZipMember>& members() const { return members_; }
  const ZipMember* Find(std::string_view name) const;
  std::span<const std::byte> Data(const ZipMember& member) const {
    return archive_.subspan(member.data_offset, member.size);
  }

 private:
  std::span<const std::byte> archive_;
  std::vector<ZipMember> members_;
};

}  // namespace adapter_job::checkpoint
