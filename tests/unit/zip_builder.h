// Builds zip archives by hand for unit tests (torch.save files, malformed archives).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace adapter_job::testing {

// Writes a STORED archive the way PyTorch's writer does: local headers with zero sizes, the
// real sizes in the central directory, optionally Zip64 end records.
class ZipBuilder {
 public:
  void Add(const std::string& name, const std::string& data, uint16_t method = 0) {
    entries_.push_back({name, data, out_.size(), method});
    U32(0x04034b50), U16(0), U16(0x0808), U16(method), U16(0), U16(0), U32(0), U32(0), U32(0);
    U16(static_cast<uint16_t>(name.size())), U16(4), Raw(name);
    U16(0x4246), U16(0);  // an empty "FB" padding field, as torch writes
    Raw(data);
  }
  std::vector<std::byte> Finish(bool zip64) {
    const uint64_t cd_offset = out_.size();
    for (const auto& e : entries_) {
      U32(0x02014b50), U16(0), U16(0), U16(0x0808), U16(e.method), U16(0), U16(0), U32(0);
      U32(static_cast<uint32_t>(e.data.size())), U32(static_cast<uint32_t>(e.data.size()));
      U16(static_cast<uint16_t>(e.name.size())), U16(0), U16(0), U16(0), U16(0), U32(0);
      U32(static_cast<uint32_t>(e.offset)), Raw(e.name);
    }
    const uint64_t cd_size = out_.size() - cd_offset;
    if (zip64) {
      const uint64_t record = out_.size();
      U32(0x06064b50), U64(44), U16(0), U16(0), U32(0), U32(0), U64(entries_.size()),
          U64(entries_.size()), U64(cd_size), U64(cd_offset);
      U32(0x07064b50), U32(0), U64(record), U32(1);
    }
    U32(0x06054b50), U16(0), U16(0), U16(static_cast<uint16_t>(entries_.size()));
    U16(static_cast<uint16_t>(entries_.size())), U32(static_cast<uint32_t>(cd_size));
    U32(zip64 ? 0xffffffff : static_cast<uint32_t>(cd_offset)), U16(0);
    return out_;
  }

 private:
  struct Entry {
    std::string name, data;
    uint64_t offset;
    uint16_t method;
  };
  int U16(uint16_t v) { return Le(v, 2); }
  int U32(uint32_t v) { return Le(v, 4); }
  int U64(uint64_t v) { return Le(v, 8); }
  int Le(uint64_t v, int n) {
    for (int i = 0; i < n; ++i) out_.push_back(static_cast<std::byte>(v >> (8 * i)));
    return 0;
  }
  int Raw(const std::string& s) {
    for (char c : s) out_.push_back(static_cast<std::byte>(c));
    return 0;
  }
  std::vector<Entry> entries_;
  std::vector<std::byte> out_;
};

}  // namespace adapter_job::testing
