#include "adapter_job/checkpoint/pickle.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "adapter_job/core/error.h"
#include "pickle_builder.h"

namespace adapter_job::pickle {
namespace {

using ::testing::HasSubstr;
using testing::PickleBuilder;

TEST(Pickle, DataclassWithMemoAndFrames) {
  // What DCP writes for a dataclass: NEWOBJ + BUILD(dict), with memoized globals and strings,
  // split over two FRAMEs.
  PickleBuilder b;
  b.Proto(4)
      .Frame(10)
      .StackGlobal("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata")
      .Memoize()
      .Op(')')
      .Op(0x81)
      .Memoize()
      .Op('}')
      .Frame(4)
      .Mark()
      .Str("offsets")
      .Int1(3)
      .Str("sizes")
      .BinGet(0)  // the memoized class: any value may be a dict value
      .Op('u')
      .Op('b')
      .Stop();
  const Document doc = Unpickle(b.bytes());
  const Value& root = doc.root();
  ASSERT_TRUE(root.IsInstanceOf("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"));
  EXPECT_TRUE(root.newobj);
  EXPECT_EQ(AsInt(*FindAttribute(root, "offsets"), "offsets"), 3);
  EXPECT_TRUE(FindAttribute(root, "sizes")
                  ->IsGlobal("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"));
  EXPECT_EQ(FindAttribute(root, "missing"), nullptr);
}

TEST(Pickle, Long1CoversLargeAndNegativeAndHugeIntegers) {
  PickleBuilder b;
  const uint8_t five_tib[] = {0x00, 0x00, 0x00, 0x00, 0x00, 0x05};  // 5 << 40
  const uint8_t minus_two[] = {0xfe};
  const uint8_t int64_max[] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f};
  const uint8_t two_pow_64[] = {0, 0, 0, 0, 0, 0, 0, 0, 0x01};
  const uint8_t padded_one[] = {0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0};
  b.Proto(2)
      .Mark()
      .Long1(five_tib)
      .Long1(minus_two)
      .Long1(int64_max)
      .Long1(two_pow_64)
      .Long1(padded_one)
      .Long1({})
      .Op('t')
      .Stop();
  const Document doc = Unpickle(b.bytes());
  const auto& items = doc.root().items;
  ASSERT_EQ(items.size(), 6u);
  EXPECT_EQ(items[0]->integer, int64_t{5} << 40);
  EXPECT_EQ(items[1]->integer, -2);
  EXPECT_EQ(items[2]->integer, INT64_MAX);
  EXPECT_EQ(items[3]->kind, Kind::kBigInt);
  EXPECT_EQ(items[4]->integer, 1);
  EXPECT_EQ(items[5]->integer, 0);
}

TEST(Pickle, NonStringDictKeysAreKept) {
  PickleBuilder b;
  b.Proto(4).Op('}').Mark().StackGlobal("m", "Key").Op(')').Op(0x81).Str("value").Op('u').Stop();
  const Document doc = Unpickle(b.bytes());
  ASSERT_EQ(doc.root().entries.size(), 1u);
  EXPECT_TRUE(doc.root().entries[0].first->IsInstanceOf("m", "Key"));
  EXPECT_EQ(doc.root().entries[0].second->text, "value");
}

TEST(Pickle, DangerousGlobalsStayInertData) {
  // pickle.loads of this would run os.system('touch ...'); here it is only a description.
  PickleBuilder b;
  b.Proto(2)
      .TextGlobal("os", "system")
      .Mark()
      .Str("touch /tmp/adapter_job_pwned")
      .Op('t')
      .Op('R')
      .Stop();
  const Document doc = Unpickle(b.bytes());
  EXPECT_TRUE(doc.root().IsInstanceOf("os", "system"));
  EXPECT_EQ(doc.root().args->items[0]->text, "touch /tmp/adapter_job_pwned");
  EXPECT_EQ(Describe(doc.root()), "os.system('touch /tmp/adapter_job_pwned',)");
}

TEST(Pickle, SelfReferencingContainerNeitherLeaksNorRecursesForever) {
  PickleBuilder b;
  b.Proto(4).Op(']').Memoize().BinGet(0).Op('a').Stop();  // l = []; l.append(l)
  const Document doc = Unpickle(b.bytes());
  ASSERT_EQ(doc.root().items.size(), 1u);
  EXPECT_EQ(doc.root().items[0], &doc.root());
  EXPECT_THAT(Describe(doc.root()), HasSubstr("..."));
}

TEST(Pickle, OrderedDictAndProtocol2BytesBecomePlainData) {
  PickleBuilder b;
  b.Proto(2)
      .TextGlobal("collections", "OrderedDict")
      .Op(')')
      .Op('R')
      .Mark()
      .Str("k")
      .TextGlobal("_codecs", "encode")
      .Mark()
      .Str(
          "\xc3\xbf"
          "a")
      .Str("latin1")
      .Op('t')
      .Op('R')
      .Op('u')
      .Stop();
  const Document doc = Unpickle(b.bytes());
  ASSERT_EQ(doc.root().kind, Kind::kDict);
  const Value* v = FindKey(doc.root(), "k");
  ASSERT_NE(v, nullptr);
  EXPECT_EQ(v->kind, Kind::kBytes);
  EXPECT_EQ(v->text, std::string("\xff"
                                 "a"));
}

TEST(Pickle, PersistentIdsAndPutGet) {
  PickleBuilder b;
  b.Proto(2).Mark().Str("storage").Op('t').Op('q').U8(7).Op('Q').Op('h').U8(7).Op(0x86).Stop();
  const Document doc = Unpickle(b.bytes());
  ASSERT_EQ(doc.root().items.size(), 2u);
  EXPECT_EQ(doc.root().items[0]->kind, Kind::kPersistentId);
  EXPECT_EQ(doc.root().items[0]->state->items[0]->text, "storage");
  EXPECT_EQ(doc.root().items[1]->kind, Kind::kTuple);
}

struct BadCase {
  const char* name;
  std::vector<uint8_t> bytes;
  const char* message;
  friend void PrintTo(const BadCase& c, std::ostream* os) { *os << c.name; }
};

class PickleErrors : public ::testing::TestWithParam<BadCase> {};

TEST_P(PickleErrors, AreFormatErrorsWithPosition) {
  const auto& c = GetParam();
  std::vector<std::byte> bytes;
  for (uint8_t v : c.bytes) bytes.push_back(static_cast<std::byte>(v));
  try {
    Unpickle(bytes);
    FAIL() << "accepted " << c.name;
  } catch (const FormatError& e) {
    EXPECT_THAT(e.what(), HasSubstr(c.message)) << c.name;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Malformed, PickleErrors,
    ::testing::Values(
        BadCase{"empty", {}, "truncated"}, BadCase{"no stop", {0x80, 4, 'N'}, "truncated"},
        BadCase{"string past end", {0x80, 4, 0x8c, 10, 'a'}, "truncated"},
        BadCase{"unknown opcode", {0x80, 4, 0xff}, "unknown opcode"},
        BadCase{"memo miss", {0x80, 4, 'h', 3, '.'}, "memo index 3"},
        BadCase{"underflow", {0x80, 4, 'R', '.'}, "stack underflow"},
        BadCase{"two values at stop", {0x80, 4, 'N', 'N', '.'}, "2 values"},
        BadCase{"unclosed mark", {0x80, 4, '(', 'N', '.'}, "unclosed MARK"},
        BadCase{"protocol 6", {0x80, 6, 'N', '.'}, "protocol 6"},
        BadCase{"frame past end", {0x95, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 'N', '.'}, "truncated"},
        BadCase{"ext code", {0x80, 2, 0x82, 1, '.'}, "extension"},
        BadCase{"bad utf8", {0x80, 4, 0x8c, 1, 0xff, '.'}, "UTF-8"},
        BadCase{"build on int", {0x80, 4, 'K', 1, '}', 'b', '.'}, "BUILD on a int"},
        BadCase{"append to int", {0x80, 4, 'K', 1, 'N', 'a', '.'}, "appending to a int"},
        BadCase{"reduce non tuple", {0x80, 4, 'N', 'N', 'R', '.'}, "not a tuple"},
        // Damaged text lines are quoted as text: a message of raw bytes is not UTF-8 (found by
        // test_bad_checkpoints' random .metadata, once in about 70 runs).
        BadCase{"binary INT line",
                {'I', 0xff, 0xfe, '1', '\\', '\n', '.'},
                "pickle: '\\xff\\xfe1\\x5c' is not an integer"},
        BadCase{
            "binary FLOAT line", {'F', 0x80, 'x', '\n', '.'}, "pickle: '\\x80x' is not a float"},
        BadCase{"long PUT line",
                {'N', 'p', 0xc3, 'a', 'a', 'a', 'a', 'a', 'a', 'a', 'a', 'a', 'a', 'a', 'a',
                 'a', 'a', 'a',  'a', 'a', 'a', 'a', 'a', 'a', 'a', 'a', 'a', 'a', 'a', 'a',
                 'a', 'a', 'a',  'a', 'a', 'a', 'a', 'a', 'a', 'a', 'a', 'a', 'a', '\n'},
                "bad PUT index '\\xc3aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'..."}),
    [](const auto& test_info) {
      std::string name = test_info.param.name;
      for (char& ch : name) ch = std::isalnum(static_cast<unsigned char>(ch)) ? ch : '_';
      return name;
    });

TEST(Pickle, ErrorsNameTheOpcodeOffset) {
  PickleBuilder b;
  b.Proto(4).Op('N').Op('h').U8(9);
  try {
    Unpickle(b.bytes());
    FAIL();
  } catch (const FormatError& e) {
    EXPECT_THAT(e.what(), HasSubstr("at byte 3"));
  }
}

// Memory stays proportional to the input: at most one value per 4 bytes (a 20 MB stream of
// EMPTY_LIST opcodes took 3.9 GB), and immutable values (None, booleans, small ints, the empty
// tuple) are shared rather than allocated per opcode.
TEST(Pickle, ValuesAreBoundedByTheInputSize) {
  PickleBuilder lists;
  lists.Proto(4).Op(']');
  for (int i = 0; i < 100000; ++i) lists.Op(']').Op('a');  // append an empty list, 2 bytes each
  lists.Stop();
  try {
    Unpickle(lists.bytes());
    ADD_FAILURE() << "expected the value cap";
  } catch (const FormatError& e) {
    EXPECT_THAT(e.what(), HasSubstr("values in 200004 bytes"));
  }

  PickleBuilder shared;
  shared.Proto(4).Op(']').Mark();
  for (int i = 0; i < 100000; ++i) shared.Int1(7).Op('N').Op(0x88).Op(')');
  shared.Op('e').Stop();
  const Document doc = Unpickle(shared.bytes());
  const auto& items = doc.root().items;
  ASSERT_EQ(items.size(), 400000u);
  for (std::size_t i = 4; i < items.size(); ++i) ASSERT_EQ(items[i], items[i % 4]) << i;
  EXPECT_EQ(AsInt(*items[0], "int"), 7);
  EXPECT_TRUE(items[1]->Is(Kind::kNone));
  EXPECT_TRUE(AsBool(*items[2], "bool"));
  EXPECT_TRUE(items[3]->Is(Kind::kTuple) && items[3]->items.empty());
}

}  // namespace
}  // namespace adapter_job::pickle
