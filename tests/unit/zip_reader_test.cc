#include "adapter_job/checkpoint/zip_reader.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "adapter_job/core/error.h"

namespace adapter_job::checkpoint {
namespace {

using ::testing::HasSubstr;

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

std::string Text(std::span<const std::byte> bytes) {
  return {reinterpret_cast<const char*>(bytes.data()), bytes.size()};
}

TEST(ZipReader, FindsMembersThroughCentralDirectory) {
  for (bool zip64 : {false, true}) {
    ZipBuilder b;
    b.Add("archive/data.pkl", "pickle bytes");
    b.Add("archive/data/0", std::string(100, 'x'));
    const auto bytes = b.Finish(zip64);
    const ZipArchive zip = ZipArchive::Parse(bytes);
    ASSERT_EQ(zip.members().size(), 2u);
    EXPECT_EQ(Text(zip.Data(*zip.Find("archive/data.pkl"))), "pickle bytes");
    EXPECT_EQ(Text(zip.Data(*zip.Find("archive/data/0"))), std::string(100, 'x'));
    EXPECT_EQ(zip.Find("archive/data/1"), nullptr);
  }
}

void ExpectError(std::vector<std::byte> bytes, const std::string& message) {
  try {
    ZipArchive::Parse(bytes);
    FAIL() << "accepted an archive that should fail with: " << message;
  } catch (const FormatError& e) {
    EXPECT_THAT(e.what(), HasSubstr(message));
  }
}

TEST(ZipReader, RejectsBrokenArchives) {
  ZipBuilder good;
  good.Add("archive/data.pkl", "abc");
  const auto bytes = good.Finish(false);

  ExpectError({}, "too small");
  ExpectError({bytes.begin(), bytes.end() - 30}, "no end of central directory");

  auto bad_cd = bytes;
  const std::size_t cd = bytes.size() - 22 - 46 - 16;
  bad_cd[cd] = std::byte{0};  // central directory signature
  ExpectError(bad_cd, "bad central directory signature");

  auto cd_past_end = bytes;
  cd_past_end[bytes.size() - 22 + 16] = std::byte{0xff};  // central directory offset
  ExpectError(cd_past_end, "past the end");

  ZipBuilder compressed;
  compressed.Add("archive/data.pkl", "abc", /*method=*/8);
  ExpectError(compressed.Finish(false), "compression method 8");

  auto count = bytes;
  count[bytes.size() - 22 + 10] = std::byte{200};  // 200 entries in a 1-entry directory
  ExpectError(count, "cannot fit");
}

}  // namespace
}  // namespace adapter_job::checkpoint
