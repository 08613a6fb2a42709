// torch.save archives built by hand, opcode by opcode as torch/serialization.py writes them
// (protocol 2: _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks), storage
// a persistent id ('storage', <class>, key, location, numel) naming member <prefix>/data/<key>).
// Expected values are written out by hand: strided views are read element by element.
#include "adapter_job/checkpoint/torch_save.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <bit>
#include <cstring>

#include "adapter_job/core/error.h"
#include "pickle_builder.h"
#include "zip_builder.h"

namespace adapter_job::checkpoint {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using testing::PickleBuilder;
using testing::ZipBuilder;

struct Spec {
  std::string storage_class = "FloatStorage";  // "UntypedStorage" for _rebuild_tensor_v3
  int64_t storage_numel = 6;
  int64_t offset = 0;
  std::vector<int64_t> size = {2, 3};
  std::vector<int64_t> stride = {3, 1};
  std::string v3_dtype;  // "bfloat16" etc.: use _rebuild_tensor_v3
  bool as_parameter = false;
};

PickleBuilder& Tuple(PickleBuilder& b, const std::vector<int64_t>& values) {
  b.Mark();
  for (int64_t v : values) b.Int4(static_cast<int32_t>(v));
  return b.Op('t');
}

std::string TensorPickle(const Spec& s) {
  PickleBuilder b;
  b.Proto(2);
  if (s.as_parameter) b.TextGlobal("torch._utils", "_rebuild_parameter").Mark();
  b.TextGlobal("torch._utils", s.v3_dtype.empty() ? "_rebuild_tensor_v2" : "_rebuild_tensor_v3");
  b.Mark();
  // The storage, by persistent id.
  b.Mark().Str("storage").TextGlobal("torch", s.storage_class).Str("0").Str("cpu");
  b.Int4(static_cast<int32_t>(s.storage_numel)).Op('t').Op('Q');
  b.Int4(static_cast<int32_t>(s.offset));
  Tuple(b, s.size);
  Tuple(b, s.stride);
  b.Op(0x89);                                                  // requires_grad=False
  b.TextGlobal("collections", "OrderedDict").Op(')').Op('R');  // backward hooks
  if (!s.v3_dtype.empty()) b.TextGlobal("torch", s.v3_dtype);
  b.Op('t').Op('R');
  if (s.as_parameter) {
    b.Op(0x89).TextGlobal("collections", "OrderedDict").Op(')').Op('R').Op('t').Op('R');
  }
  b.Stop();
  const auto& bytes = b.bytes();
  return {reinterpret_cast<const char*>(bytes.data()), bytes.size()};
}

std::string Floats(const std::vector<float>& values, bool big_endian = false) {
  std::string out;
  for (float v : values) {
    uint32_t bits = std::bit_cast<uint32_t>(v);
    for (int i = 0; i < 4; ++i) {
      const int shift = big_endian ? 8 * (3 - i) : 8 * i;
      out.push_back(static_cast<char>((bits >> shift) & 0xff));
    }
  }
  return out;
}

std::vector<std::byte> Archive(const std::string& pickle, const std::string& storage,
                               const std::string& prefix = "archive",
                               const std::string& byteorder = "") {
  ZipBuilder zip;
  zip.Add(prefix + "/data.pkl", pickle);
  if (!byteorder.empty()) zip.Add(prefix + "/byteorder", byteorder);
  zip.Add(prefix + "/data/0", storage);
  zip.Add(prefix + "/version", "3\n");
  return zip.Finish(false);
}

std::vector<float> Values(const Tensor& t) {
  std::vector<float> out(t.data.size() / 4);
  std::memcpy(out.data(), t.data.data(), t.data.size());
  return out;
}

std::string ErrorOf(const std::vector<std::byte>& archive) {
  try {
    ReadTorchSaveTensor(archive);
  } catch (const FormatError& e) {
    return e.what();
  }
  return "(no error)";
}

const std::vector<float> kStorage = {0, 1, 2, 3, 4, 5};

TEST(TorchSave, ReadsAContiguousTensor) {
  const Tensor t = ReadTorchSaveTensor(Archive(TensorPickle({}), Floats(kStorage)));
  EXPECT_EQ(t.dtype, DType::kFloat32);
  EXPECT_THAT(t.shape, ElementsAre(2, 3));
  EXPECT_THAT(Values(t), ElementsAre(0, 1, 2, 3, 4, 5));
}

TEST(TorchSave, HonoursStridesAndStorageOffset) {
  Spec transposed;  // t().contiguous() of the [2, 3] above: element (i, j) is storage[i + 3 j]
  transposed.size = {3, 2};
  transposed.stride = {1, 3};
  EXPECT_THAT(Values(ReadTorchSaveTensor(Archive(TensorPickle(transposed), Floats(kStorage)))),
              ElementsAre(0, 3, 1, 4, 2, 5));
  Spec tail;
  tail.offset = 4;
  tail.size = {2};
  tail.stride = {1};
  EXPECT_THAT(Values(ReadTorchSaveTensor(Archive(TensorPickle(tail), Floats(kStorage)))),
              ElementsAre(4, 5));
  Spec column;  // column 1 of the [2, 3]: storage[1], storage[4]
  column.offset = 1;
  column.size = {2};
  column.stride = {3};
  EXPECT_THAT(Values(ReadTorchSaveTensor(Archive(TensorPickle(column), Floats(kStorage)))),
              ElementsAre(1, 4));
}

TEST(TorchSave, ReadsV3UntypedStoragesAndParameters) {
  Spec v3;
  v3.storage_class = "UntypedStorage";
  v3.storage_numel = 4;  // bytes
  v3.size = {2};
  v3.stride = {1};
  v3.v3_dtype = "bfloat16";
  // bf16 1.0 = 0x3f80, -2.0 = 0xc000, little-endian.
  const std::string bf16 = {'\x80', '\x3f', '\x00', '\xc0'};
  const Tensor t = ReadTorchSaveTensor(Archive(TensorPickle(v3), bf16));
  EXPECT_EQ(t.dtype, DType::kBFloat16);
  EXPECT_THAT(t.shape, ElementsAre(2));
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(t.data.data()), t.data.size()), bf16);

  Spec parameter;
  parameter.as_parameter = true;
  EXPECT_THAT(Values(ReadTorchSaveTensor(Archive(TensorPickle(parameter), Floats(kStorage)))),
              ElementsAre(0, 1, 2, 3, 4, 5));
}

TEST(TorchSave, PrefixIsTheArchiveFolderAndBigEndianIsSwapped) {
  const auto archive = Archive(TensorPickle({}), Floats(kStorage, true), "__0_0", "big");
  const TorchSaveArchive opened = OpenTorchSave(archive);
  EXPECT_EQ(opened.prefix, "__0_0");
  EXPECT_TRUE(opened.big_endian);
  EXPECT_THAT(Values(ReadTorchSaveTensor(archive)), ElementsAre(0, 1, 2, 3, 4, 5));
  EXPECT_THAT(ErrorOf(Archive(TensorPickle({}), Floats(kStorage), "archive", "middle")),
              HasSubstr("byteorder member says 'middle'"));
}

TEST(TorchSave, RefusesViewsOutsideTheirStorage) {
  Spec past_end;
  past_end.offset = 1;  // 6 elements from offset 1 of 6
  EXPECT_THAT(ErrorOf(Archive(TensorPickle(past_end), Floats(kStorage))),
              HasSubstr("storage holds 6 from offset 1"));
  Spec repeated;  // stride 0 repeats one stored element
  repeated.storage_numel = 1;
  repeated.size = {4};
  repeated.stride = {0};
  EXPECT_THAT(ErrorOf(Archive(TensorPickle(repeated), Floats({7}))),
              HasSubstr("has 4 elements, but its storage holds 1"));
  Spec reaching;  // 2 elements, but stride 5 reaches element 5 of a 4-element storage
  reaching.storage_numel = 4;
  reaching.size = {2};
  reaching.stride = {5};
  EXPECT_THAT(ErrorOf(Archive(TensorPickle(reaching), Floats({0, 1, 2, 3}))),
              HasSubstr("reaches element 5 of a 4-element storage"));
  Spec negative;
  negative.stride = {3, -1};
  EXPECT_THAT(ErrorOf(Archive(TensorPickle(negative), Floats(kStorage))),
              HasSubstr("negative stride"));
  Spec ranks;
  ranks.stride = {1};
  EXPECT_THAT(ErrorOf(Archive(TensorPickle(ranks), Floats(kStorage))), HasSubstr("differ in rank"));
}

TEST(TorchSave, RefusesMissingOrShortStorage) {
  EXPECT_THAT(ErrorOf(Archive(TensorPickle({}), Floats({0, 1}))),
              HasSubstr("holds 8 bytes, but its 6 elements need 24"));
  ZipBuilder no_data;
  no_data.Add("archive/data.pkl", TensorPickle({}));
  EXPECT_THAT(ErrorOf(no_data.Finish(false)),
              HasSubstr("storage member 'archive/data/0' is missing"));
  Spec unknown;
  unknown.storage_class = "QuaternionStorage";
  EXPECT_THAT(ErrorOf(Archive(TensorPickle(unknown), Floats(kStorage))),
              HasSubstr("unknown storage class torch.QuaternionStorage"));
}

TEST(TorchSave, RefusesArchivesThatAreNotOneTensor) {
  ZipBuilder no_pickle;
  no_pickle.Add("archive/data/0", Floats(kStorage));
  EXPECT_THAT(ErrorOf(no_pickle.Finish(false)), HasSubstr("not a torch.save file"));
  ZipBuilder two;
  two.Add("a/data.pkl", TensorPickle({}));
  two.Add("b/data.pkl", TensorPickle({}));
  EXPECT_THAT(ErrorOf(two.Finish(false)), HasSubstr("two data.pkl members"));
  PickleBuilder number;
  number.Proto(2).Int1(5).Stop();
  const std::string five(reinterpret_cast<const char*>(number.bytes().data()),
                         number.bytes().size());
  EXPECT_THAT(ErrorOf(Archive(five, "")), HasSubstr("does not hold a plain tensor"));
}

}  // namespace
}  // namespace adapter_job::checkpoint
