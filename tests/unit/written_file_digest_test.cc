// The run report's digest of an adapter written out of order: hashed while it is written, it must
// equal the sha256 of the finished file whatever the order and pace of the writes.
#include "adapter_job/writer/written_file_digest.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

#include "adapter_job/core/error.h"
#include "adapter_job/safetensors/safetensors.h"
#include "scratch_directory.h"

namespace adapter_job::writer {
namespace {

class WrittenFileDigestTest : public testing::ScratchDirectoryTest {};

std::span<const std::byte> Bytes(const std::string& text) { return std::as_bytes(std::span(text)); }

// FIPS 180-2's long example, "a" a million times, written back to front in ten pieces: the digest
// may hash only what Final() declared, so nothing is hashed until the first piece lands.
TEST_F(WrittenFileDigestTest, MatchesTheStandardsVectorForAFileWrittenBackToFront) {
  const std::string a(1'000'000, 'a');
  OutputFile file = OutputFile::CreateUnnamed(root_);
  file.Resize(a.size());
  WrittenFileDigest digest(file);
  const std::size_t piece = a.size() / 10;
  for (std::size_t i = 10; i-- > 0;) {
    file.WriteAt(i * piece, Bytes(a).subspan(i * piece, piece));
    digest.Final(i == 0 ? a.size() : 0);
  }
  EXPECT_EQ(digest.Finish(a.size()),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

// A safetensors file of 40 MB (several of the digest's read pieces) whose 64 tensors arrive in a
// shuffled order, each followed by StreamWriter's written prefix, as the PEFT sink does.
TEST_F(WrittenFileDigestTest, FollowsAStreamWriterFedInAnyOrder) {
  constexpr int kTensors = 64;
  constexpr int64_t kFloats = 160'000;  // 640 KB each
  std::vector<safetensors::TensorSpec> specs;
  std::vector<std::vector<float>> data(kTensors);
  std::mt19937 random(7);
  for (int i = 0; i < kTensors; ++i) {
    specs.push_back({"layers." + std::to_string(i) + ".weight", DType::kFloat32, {kFloats}});
    data[i].resize(kFloats);
    for (float& x : data[i]) x = static_cast<float>(random()) / 1e9f;
  }
  std::vector<int> order(kTensors);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), random);

  OutputFile file = OutputFile::CreateUnnamed(root_);
  safetensors::StreamWriter writer(file, specs, std::nullopt);
  WrittenFileDigest digest(file);
  uint64_t prefix = writer.written_prefix();
  digest.Final(prefix);
  for (const int i : order) {
    writer.Write(specs[i].name, std::as_bytes(std::span(data[i])));
    EXPECT_GE(writer.written_prefix(), prefix) << "the written prefix never shrinks";
    prefix = writer.written_prefix();
    digest.Final(prefix);
  }
  writer.Finish();
  ASSERT_EQ(prefix, writer.file_size());

  // The reference: the same file's bytes as the reference layout puts them, hashed in one go.
  std::vector<safetensors::TensorSpec> sorted = specs;
  std::string whole = safetensors::SerializeHeader(sorted, std::nullopt);
  for (const auto& spec : sorted) {
    const int i = std::stoi(spec.name.substr(7));
    whole.append(reinterpret_cast<const char*>(data[i].data()), data[i].size() * sizeof(float));
  }
  ASSERT_EQ(whole.size(), writer.file_size());
  EXPECT_EQ(digest.Finish(writer.file_size()), Sha256Hex(whole));
}

TEST_F(WrittenFileDigestTest, StreamWritersPrefixStopsAtTheFirstTensorNotWrittenInFileOrder) {
  OutputFile file = OutputFile::CreateUnnamed(root_);
  const std::vector<safetensors::TensorSpec> specs = {
      {"b", DType::kFloat32, {2}}, {"a", DType::kFloat32, {2}}, {"c", DType::kFloat32, {2}}};
  safetensors::StreamWriter writer(file, specs, std::nullopt);
  const uint64_t header = writer.file_size() - 24;  // a, b, c: 8 bytes each, in that order
  const float two[2] = {1, 2};
  EXPECT_EQ(writer.written_prefix(), header);
  writer.Write("b", std::as_bytes(std::span(two)));
  EXPECT_EQ(writer.written_prefix(), header) << "'a' comes first in the file";
  writer.Write("a", std::as_bytes(std::span(two)));
  EXPECT_EQ(writer.written_prefix(), header + 16);
  writer.Write("c", std::as_bytes(std::span(two)));
  EXPECT_EQ(writer.written_prefix(), writer.file_size());
}

TEST_F(WrittenFileDigestTest, AFileShorterThanDeclaredIsAnErrorNotADigest) {
  OutputFile file = OutputFile::CreateUnnamed(root_);
  file.Write(std::string_view("short"));
  WrittenFileDigest digest(file);
  digest.Final(5);
  EXPECT_THROW(digest.Finish(100), IoError);
}

TEST_F(WrittenFileDigestTest, AnAbandonedDigestStopsItsThread) {
  OutputFile file = OutputFile::CreateUnnamed(root_);
  file.Write(std::string(3 << 20, 'x'));
  // Never finished: the destructor must not wait for more (a hang fails by ctest's timeout).
  WrittenFileDigest digest(file);
  digest.Final(1 << 20);
}

}  // namespace
}  // namespace adapter_job::writer
