#include "adapter_job/checkpoint/zip_reader.h"

#include "adapter_job/core/checked_math.h"
#include "adapter_job/core/error.h"

namespace adapter_job::checkpoint {
namespace {

constexpr uint32_t kLocalHeaderSignature = 0x04034b50;        // 4.3.7
constexpr uint32_t kCentralHeaderSignature = 0x02014b50;      // 4.3.12
constexpr uint32_t kEndOfCentralSignature = 0x06054b50;       // 4.3.16
constexpr uint32_t kZip64EndOfCentralSignature = 0x06064b50;  // 4.3.14
constexpr uint32_t kZip64LocatorSignature = 0x07064b50;       // 4.3.15
constexpr uint16_t kZip64ExtraId = 0x0001;                    // 4.5.3
constexpr std::size_t kEndOfCentralSize = 22;
constexpr std::size_t kZip64LocatorSize = 20;
constexpr std::size_t kCentralHeaderSize = 46;
constexpr std::size_t kLocalHeaderSize = 30;

// Bounds-checked little-endian reads over the archive.
class Reader {
 public:
  explicit Reader(std::span<const std::byte> bytes) : bytes_(bytes) {}

  uint64_t Uint(uint64_t offset, std::size_t width, const char* what) const {
    if (offset > bytes_.size() || width > bytes_.size() - offset) {
      Fail("zip: {} at offset {} is past the end of the {}-byte archive", what, offset,
           bytes_.size());
    }
    uint64_t v = 0;
    for (std::size_t i = 0; i < width; ++i) {
      v |= static_cast<uint64_t>(bytes_[offset + i]) << (8 * i);
    }
    return v;
  }
  std::string_view Text(uint64_t offset, uint64_t length, const char* what) const {
    if (offset > bytes_.size() || length > bytes_.size() - offset) {
      Fail("zip: {} at offset {} is past the end of the {}-byte archive", what, offset,
           bytes_.size());
    }
    return {reinterpret_cast<const char*>(bytes_.data() + offset),
            static_cast<std::size_t>(length)};
  }

 private:
  std::span<const std::byte> bytes_;
};

struct CentralDirectory {
  uint64_t entries = 0;
  uint64_t size = 0;
  uint64_t offset = 0;
};

CentralDirectory FindCentralDirectory(const Reader& in, std::size_t archive_size) {
  if (archive_size < kEndOfCentralSize) {
    Fail("zip: {} bytes is too small for an archive (no end of central directory)", archive_size);
  }
  // The EOCD record ends the archive, followed only by a comment of at most 65535 bytes.
  const std::size_t lowest =
      archive_size > kEndOfCentralSize + 0xffff ? archive_size - kEndOfCentralSize - 0xffff : 0;
  std::size_t eocd = archive_size - kEndOfCentralSize;
  while (true) {
    if (in.Uint(eocd, 4, "signature") == kEndOfCentralSignature &&
        eocd + kEndOfCentralSize + in.Uint(eocd + 20, 2, "comment length") == archive_size) {
      break;
    }
    if (eocd == lowest) Fail("zip: no end of central directory record");
    --eocd;
  }
  CentralDirectory cd;
  cd.entries = in.Uint(eocd + 10, 2, "entry count");
  cd.size = in.Uint(eocd + 12, 4, "central directory size");
  cd.offset = in.Uint(eocd + 16, 4, "central directory offset");
  if (eocd >= kZip64LocatorSize &&
      in.Uint(eocd - kZip64LocatorSize, 4, "signature") == kZip64LocatorSignature) {
    const uint64_t record = in.Uint(eocd - kZip64LocatorSize + 8, 8, "zip64 record offset");
    if (in.Uint(record, 4, "zip64 end of central directory") != kZip64EndOfCentralSignature) {
      Fail("zip: zip64 locator points at offset {}, which holds no zip64 record", record);
    }
    cd.entries = in.Uint(record + 32, 8, "zip64 entry count");
    cd.size = in.Uint(record + 40, 8, "zip64 central directory size");
    cd.offset = in.Uint(record + 48, 8, "zip64 central directory offset");
  }
  if (CheckedAdd(cd.offset, cd.size, "central directory end") > archive_size) {
    Fail("zip: central directory [{}, +{}) is past the end of the {}-byte archive", cd.offset,
         cd.size, archive_size);
  }
  if (cd.entries > cd.size / kCentralHeaderSize) {
    Fail("zip: {} entries cannot fit a {}-byte central directory", cd.entries, cd.size);
  }
  return cd;
}

}  // namespace

ZipArchive ZipArchive::Parse(std::span<const std::byte> archive) {
  const Reader in(archive);
  const CentralDirectory cd = FindCentralDirectory(in, archive.size());
  ZipArchive zip;
  zip.archive_ = archive;
  zip.members_.reserve(static_cast<std::size_t>(cd.entries));
  uint64_t at = cd.offset;
  const uint64_t cd_end = cd.offset + cd.size;
  for (uint64_t i = 0; i < cd.entries; ++i) {
    if (at + kCentralHeaderSize > cd_end) Fail("zip: central directory entry {} overruns it", i);
    if (in.Uint(at, 4, "central header") != kCentralHeaderSignature) {
      Fail("zip: bad central directory signature for entry {} at offset {}", i, at);
    }
    const uint64_t method = in.Uint(at + 10, 2, "compression method");
    uint64_t compressed = in.Uint(at + 20, 4, "compressed size");
    uint64_t uncompressed = in.Uint(at + 24, 4, "uncompressed size");
    const uint64_t name_length = in.Uint(at + 28, 2, "name length");
    const uint64_t extra_length = in.Uint(at + 30, 2, "extra length");
    const uint64_t comment_length = in.Uint(at + 32, 2, "comment length");
    uint64_t local_offset = in.Uint(at + 42, 4, "local header offset");
    const uint64_t next = at + kCentralHeaderSize + name_length + extra_length + comment_length;
    if (next > cd_end) Fail("zip: central directory entry {} overruns it", i);
    std::string name(in.Text(at + kCentralHeaderSize, name_length, "member name"));

    // 4.5.3: the Zip64 extra field holds, in order, only the fields saturated at 0xffffffff.
    uint64_t extra = at + kCentralHeaderSize + name_length;
    const uint64_t extra_end = extra + extra_length;
    while (extra + 4 <= extra_end) {
      const uint64_t id = in.Uint(extra, 2, "extra field id");
      const uint64_t size = in.Uint(extra + 2, 2, "extra field size");
      if (extra + 4 + size > extra_end) Fail("zip: extra field of member '{}' overruns", name);
      if (id == kZip64ExtraId) {
        uint64_t field = extra + 4;
        const auto take = [&](uint64_t& value) {
          if (value != 0xffffffff) return;
          if (field + 8 > extra + 4 + size) Fail("zip: zip64 extra field of '{}' is short", name);
          value = in.Uint(field, 8, "zip64 field");
          field += 8;
        };
        take(uncompressed);
        take(compressed);
        take(local_offset);
      }
      extra += 4 + size;
    }

    if (method != 0) {
      Fail("zip: member '{}' uses compression method {}; torch.save archives are STORED (0)", name,
           method);
    }
    if (compressed != uncompressed) {
      Fail("zip: STORED member '{}' has compressed size {} != uncompressed size {}", name,
           compressed, uncompressed);
    }
    if (in.Uint(local_offset, 4, "local header") != kLocalHeaderSignature) {
      Fail("zip: member '{}' has no local header at offset {}", name, local_offset);
    }
    const uint64_t local_name_length = in.Uint(local_offset + 26, 2, "local name length");
    const uint64_t local_extra_length = in.Uint(local_offset + 28, 2, "local extra length");
    if (in.Text(local_offset + kLocalHeaderSize, local_name_length, "local name") != name) {
      Fail("zip: local header at offset {} names a different member than '{}'", local_offset, name);
    }
    const uint64_t data_offset =
        local_offset + kLocalHeaderSize + local_name_length + local_extra_length;
    if (CheckedAdd(data_offset, uncompressed, "member end") > archive.size()) {
      Fail("zip: member '{}' data [{}, +{}) is past the end of the {}-byte archive", name,
           data_offset, uncompressed, archive.size());
    }
    zip.members_.push_back({std::move(name), data_offset, uncompressed});
    at = next;
  }
  return zip;
}

const ZipMember* ZipArchive::Find(std::string_view name) const {
  for (const auto& member : members_) {
    if (member.name == name) return &member;
  }
  return nullptr;
}

}  // namespace adapter_job::checkpoint
