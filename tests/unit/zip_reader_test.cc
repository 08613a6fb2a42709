#include "adapter_job/checkpoint/zip_reader.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "adapter_job/core/error.h"
#include "zip_builder.h"

namespace adapter_job::checkpoint {
namespace {

using ::testing::HasSubstr;

using testing::ZipBuilder;

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
