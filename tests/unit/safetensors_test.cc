#include "server/checkpoint/safetensors.h"

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tscale::checkpoint {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Pair;
using ::testing::StartsWith;

MATCHER_P2(StatusIs, code, message_matcher,
           absl::StrCat("has code ", absl::StatusCodeToString(code), " and a matching message")) {
  return arg.code() == code &&
         testing::ExplainMatchResult(message_matcher, std::string(arg.message()), result_listener);
}

constexpr DType kAllDTypes[] = {DType::kU8,  DType::kI8,   DType::kI32, DType::kI64,
                                DType::kF32, DType::kBF16, DType::kF16};

std::string Le64(uint64_t value) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((value >> (8 * i)) & 0xFF);
  return out;
}

// A file with the given header text (no padding) and data section.
std::string RawFile(absl::string_view header, absl::string_view data) {
  return absl::StrCat(Le64(header.size()), header, data);
}

absl::Status ParseStatus(std::string bytes) {
  return SafetensorsFile::Parse(std::move(bytes)).status();
}

// Expects Parse to fail with InvalidArgument and a message containing `message`.
void ExpectInvalid(absl::string_view header, absl::string_view data, absl::string_view message) {
  EXPECT_THAT(ParseStatus(RawFile(header, data)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(std::string(message))))
      << "header: " << header;
}

std::string RandomBytes(std::mt19937& rng, size_t n) {
  std::uniform_int_distribution<int> byte(0, 255);
  std::string out(n, '\0');
  for (char& ch : out) ch = static_cast<char>(byte(rng));
  return out;
}

int64_t NumelOf(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t dim : shape) n *= dim;
  return n;
}

std::string TestDataDir() {
  const char* dir = std::getenv("TSCALE_TEST_DATA");
  return dir != nullptr && dir[0] != '\0' ? dir : "tests/data";
}

std::string GoldenPath(absl::string_view name) {
  return absl::StrCat(TestDataDir(), "/golden/", name, ".safetensors");
}

int64_t ReadI64(absl::string_view bytes) {
  uint64_t value = 0;
  for (int i = 7; i >= 0; --i) value = (value << 8) | static_cast<unsigned char>(bytes[i]);
  return static_cast<int64_t>(value);
}

std::string TempPath(absl::string_view name) {
  return absl::StrCat(testing::TempDir(), "/safetensors_test_", getpid(), "_", name);
}

// Header JSON text of a serialized file, without the padding.
std::string HeaderText(const std::string& file) {
  const uint64_t n = ReadI64(absl::string_view(file).substr(0, 8));
  std::string header = file.substr(8, n);
  while (!header.empty() && header.back() == ' ') header.pop_back();
  return header;
}

// ---------------------------------------------------------------------------------------------
// DType helpers.

TEST(DTypeTest, NamesSizesAndParsing) {
  const std::map<DType, std::pair<std::string, size_t>> expected = {
      {DType::kU8, {"U8", 1}},   {DType::kI8, {"I8", 1}},   {DType::kI32, {"I32", 4}},
      {DType::kI64, {"I64", 8}}, {DType::kF32, {"F32", 4}}, {DType::kBF16, {"BF16", 2}},
      {DType::kF16, {"F16", 2}},
  };
  for (DType dtype : kAllDTypes) {
    EXPECT_EQ(DTypeName(dtype), expected.at(dtype).first);
    EXPECT_EQ(DTypeSize(dtype), expected.at(dtype).second);
    absl::StatusOr<DType> parsed = ParseDType(DTypeName(dtype));
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(*parsed, dtype);
  }
}

TEST(DTypeTest, ParseUnknownNamesTheString) {
  EXPECT_THAT(ParseDType("F64").status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("unknown dtype 'F64'")));
  EXPECT_THAT(ParseDType("f32").status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("'f32'")));
  EXPECT_THAT(ParseDType("").status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("expected one of U8")));
}

TEST(TensorViewTest, Numel) {
  EXPECT_EQ((TensorView{DType::kF32, {}, {}}).numel(), 1);
  EXPECT_EQ((TensorView{DType::kF32, {2, 3}, {}}).numel(), 6);
  EXPECT_EQ((TensorView{DType::kF32, {4, 0, 7}, {}}).numel(), 0);
}

// ---------------------------------------------------------------------------------------------
// Writer + reader round trips.

TEST(SafetensorsRoundTripTest, EveryDTypeScalarZeroSizeAndMetadata) {
  std::mt19937 rng(7);
  SafetensorsWriter writer;
  struct Expected {
    DType dtype;
    std::vector<int64_t> shape;
    std::string data;
  };
  std::map<std::string, Expected> expected;
  auto add = [&](const std::string& name, DType dtype, std::vector<int64_t> shape) {
    const std::string data = RandomBytes(rng, NumelOf(shape) * DTypeSize(dtype));
    ASSERT_TRUE(writer.Add(name, dtype, shape, data).ok()) << name;
    expected[name] = Expected{dtype, std::move(shape), data};
  };
  for (DType dtype : kAllDTypes) {
    const std::string base = std::string(DTypeName(dtype));
    add(base + ".matrix", dtype, {3, 5});
    add(base + ".scalar", dtype, {});
    add(base + ".empty", dtype, {0});
    add(base + ".empty2d", dtype, {4, 0});
    add(base + ".odd", dtype, {7});
  }
  writer.SetMetadata("format", "tscale");
  writer.SetMetadata("empty", "");
  writer.SetMetadata("json", R"({"a": [1, 2]})");
  writer.SetMetadata("format", "tscale-v1");  // overwrites

  const std::string bytes = writer.Serialize();
  absl::StatusOr<SafetensorsFile> file = SafetensorsFile::Parse(bytes);
  ASSERT_TRUE(file.ok()) << file.status();

  EXPECT_THAT(file->metadata(), ElementsAre(Pair("empty", ""), Pair("format", "tscale-v1"),
                                            Pair("json", R"({"a": [1, 2]})")));
  ASSERT_EQ(file->tensors().size(), expected.size());
  for (const auto& [name, want] : expected) {
    const TensorView* view = file->Find(name);
    ASSERT_NE(view, nullptr) << name;
    EXPECT_EQ(view->dtype, want.dtype) << name;
    EXPECT_EQ(view->shape, want.shape) << name;
    EXPECT_EQ(view->data, want.data) << name;
    EXPECT_EQ(view->numel(), NumelOf(want.shape)) << name;
    EXPECT_EQ(view->data.size(), static_cast<size_t>(view->numel()) * DTypeSize(view->dtype));
  }
  EXPECT_EQ(file->Find("F32.scalar")->numel(), 1);
  EXPECT_EQ(file->Find("F32.empty2d")->numel(), 0);
  EXPECT_EQ(file->data_section(), writer.DataSection());
  EXPECT_EQ((8 + file->header_bytes()) % 8, 0u);
  EXPECT_EQ(8 + file->header_bytes() + file->data_section().size(), bytes.size());
}

TEST(SafetensorsRoundTripTest, EmptyWriter) {
  SafetensorsWriter writer;
  const std::string bytes = writer.Serialize();
  EXPECT_EQ(HeaderText(bytes), "{}");
  EXPECT_EQ(bytes.size() % 8, 0u);
  absl::StatusOr<SafetensorsFile> file = SafetensorsFile::Parse(bytes);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_THAT(file->tensors(), IsEmpty());
  EXPECT_THAT(file->metadata(), IsEmpty());
  EXPECT_THAT(file->data_section(), IsEmpty());
  EXPECT_THAT(writer.DataSection(), IsEmpty());
}

TEST(SafetensorsWriterTest, HeaderIsCompactJsonPaddedWithSpaces) {
  SafetensorsWriter writer;
  ASSERT_TRUE(writer.Add("x", DType::kU8, {2}, "ab").ok());
  const std::string bytes = writer.Serialize();
  EXPECT_EQ(HeaderText(bytes), R"({"x":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})");
  const uint64_t n = ReadI64(absl::string_view(bytes).substr(0, 8));
  EXPECT_EQ((8 + n) % 8, 0u);
  EXPECT_EQ(bytes.size(), 8 + n + 2);
  EXPECT_EQ(bytes.substr(8 + n), "ab");
  // No metadata was set, so no "__metadata__" entry is written.
  EXPECT_THAT(HeaderText(bytes), ::testing::Not(HasSubstr("__metadata__")));
}

TEST(SafetensorsWriterTest, MetadataComesFirstAndScalarShapeIsEmptyArray) {
  SafetensorsWriter writer;
  ASSERT_TRUE(writer.Add("s", DType::kI64, {}, Le64(3)).ok());
  writer.SetMetadata("k", "v");
  EXPECT_EQ(HeaderText(writer.Serialize()),
            R"({"__metadata__":{"k":"v"},"s":{"dtype":"I64","shape":[],"data_offsets":[0,8]}})");
}

TEST(SafetensorsWriterTest, HeaderAlignmentForManyNameLengths) {
  for (int length = 1; length <= 24; ++length) {
    SafetensorsWriter writer;
    ASSERT_TRUE(writer.Add(std::string(length, 'n'), DType::kF32, {1}, "abcd").ok());
    const std::string bytes = writer.Serialize();
    absl::StatusOr<SafetensorsFile> file = SafetensorsFile::Parse(bytes);
    ASSERT_TRUE(file.ok()) << file.status();
    EXPECT_EQ((8 + file->header_bytes()) % 8, 0u) << length;
    EXPECT_EQ(bytes.size(), 8 + file->header_bytes() + 4) << length;
    EXPECT_EQ(file->Find(std::string(length, 'n'))->data, "abcd");
  }
}

TEST(SafetensorsWriterTest, LayoutIsByDecreasingElementSizeThenName) {
  SafetensorsWriter writer;
  // Added in an order unrelated to the layout.
  ASSERT_TRUE(writer.Add("a", DType::kU8, {3}, "aaa").ok());
  ASSERT_TRUE(writer.Add("g", DType::kI8, {1}, "g").ok());
  ASSERT_TRUE(writer.Add("e", DType::kBF16, {1}, "ee").ok());
  ASSERT_TRUE(writer.Add("c", DType::kF16, {3}, "cccccc").ok());
  ASSERT_TRUE(writer.Add("f", DType::kI32, {2}, "ffffffff").ok());
  ASSERT_TRUE(writer.Add("d", DType::kF32, {1}, "dddd").ok());
  ASSERT_TRUE(writer.Add("b", DType::kI64, {1}, "bbbbbbbb").ok());
  ASSERT_TRUE(writer.Add("B", DType::kI64, {0}, "").ok());

  // I64 (B, b), then 4-byte (d, f), then 2-byte (c, e), then 1-byte (a, g).
  EXPECT_EQ(writer.DataSection(), "bbbbbbbbddddffffffffcccccceeaaag");
  const std::string bytes = writer.Serialize();
  absl::StatusOr<SafetensorsFile> file = SafetensorsFile::Parse(bytes);
  ASSERT_TRUE(file.ok()) << file.status();
  const absl::string_view data = file->data_section();
  EXPECT_EQ(data, writer.DataSection());
  const std::map<std::string, size_t> expected_offsets = {
      {"B", 0}, {"b", 0}, {"d", 8}, {"f", 12}, {"c", 20}, {"e", 26}, {"a", 28}, {"g", 31}};
  for (const auto& [name, offset] : expected_offsets) {
    const TensorView* view = file->Find(name);
    ASSERT_NE(view, nullptr) << name;
    const size_t actual = static_cast<size_t>(view->data.data() - data.data());
    EXPECT_EQ(actual, offset) << name;
    // Relative to the file start too, since the data section is 8-aligned.
    const size_t in_file = 8 + file->header_bytes() + actual;
    EXPECT_EQ(in_file % DTypeSize(view->dtype), 0u) << name;
  }
  EXPECT_THAT(HeaderText(bytes), StartsWith(R"({"B":{"dtype":"I64","shape":[0],)"));
}

TEST(SafetensorsWriterTest, DataSectionIsWhatSerializeWrites) {
  SafetensorsWriter writer;
  ASSERT_TRUE(writer.Add("w", DType::kF32, {2}, "12345678").ok());
  ASSERT_TRUE(writer.Add("v", DType::kU8, {1}, "z").ok());
  writer.SetMetadata("m", "x");
  const std::string bytes = writer.Serialize();
  const std::string data = writer.DataSection();
  ASSERT_GE(bytes.size(), data.size());
  EXPECT_EQ(bytes.substr(bytes.size() - data.size()), data);
  EXPECT_EQ(8 + ReadI64(bytes.substr(0, 8)) + data.size(), bytes.size());
}

TEST(SafetensorsWriterTest, RejectsEmptyName) {
  SafetensorsWriter writer;
  EXPECT_THAT(writer.Add("", DType::kU8, {1}, "x"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("empty tensor name")));
}

TEST(SafetensorsWriterTest, RejectsReservedName) {
  SafetensorsWriter writer;
  EXPECT_THAT(
      writer.Add("__metadata__", DType::kU8, {1}, "x"),
      StatusIs(absl::StatusCode::kInvalidArgument,
               HasSubstr("tensor '__metadata__': names starting with \"__\" are reserved")));
  EXPECT_THAT(writer.Add("__x", DType::kU8, {1}, "x"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("'__x'")));
  // A single leading underscore is fine.
  EXPECT_TRUE(writer.Add("_x", DType::kU8, {1}, "x").ok());
}

TEST(SafetensorsWriterTest, RejectsDuplicateName) {
  SafetensorsWriter writer;
  ASSERT_TRUE(writer.Add("t", DType::kU8, {1}, "x").ok());
  EXPECT_THAT(
      writer.Add("t", DType::kI8, {2}, "xy"),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("tensor 't' is already present")));
}

TEST(SafetensorsWriterTest, RejectsDataSizeMismatch) {
  SafetensorsWriter writer;
  EXPECT_THAT(writer.Add("fc.E", DType::kF32, {2, 3}, std::string(23, 'x')),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("tensor 'fc.E': data has 23 bytes, expected 24 (F32 [2, 3])")));
  EXPECT_THAT(writer.Add("s", DType::kI64, {}, "1234"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("data has 4 bytes, expected 8 (I64 [])")));
}

TEST(SafetensorsWriterTest, RejectsNegativeDim) {
  SafetensorsWriter writer;
  EXPECT_THAT(writer.Add("neg", DType::kU8, {2, -1}, ""),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("tensor 'neg': shape[1] is -1, expected a non-negative")));
}

TEST(SafetensorsWriterTest, RejectsByteSizeOverflow) {
  SafetensorsWriter writer;
  EXPECT_THAT(writer.Add("big", DType::kF32, {int64_t{1} << 40, int64_t{1} << 40}, ""),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("tensor 'big': byte size of F32 [1099511627776, 1099511627776] "
                                 "overflows")));
  // numel fits in int64 but numel * 8 does not.
  EXPECT_THAT(writer.Add("big8", DType::kI64, {int64_t{1} << 61}, ""),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("'big8'")));
}

TEST(SafetensorsWriterTest, RejectsNameThatIsNotUtf8) {
  SafetensorsWriter writer;
  EXPECT_THAT(writer.Add("bad\xFFname", DType::kU8, {1}, "x"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("not valid UTF-8")));
}

TEST(SafetensorsWriterTest, FailedAddLeavesWriterUnchanged) {
  SafetensorsWriter writer;
  ASSERT_TRUE(writer.Add("ok", DType::kU8, {1}, "x").ok());
  ASSERT_FALSE(writer.Add("bad", DType::kU8, {2}, "x").ok());
  EXPECT_EQ(writer.DataSection(), "x");
  EXPECT_TRUE(writer.Add("bad", DType::kU8, {2}, "xy").ok());
}

TEST(SafetensorsFileTest, ViewsSurviveMoveAndCopy) {
  SafetensorsWriter writer;
  ASSERT_TRUE(writer.Add("t", DType::kI32, {2}, "abcdefgh").ok());
  std::optional<SafetensorsFile> copy;
  std::optional<SafetensorsFile> moved;
  {
    absl::StatusOr<SafetensorsFile> file = SafetensorsFile::Parse(writer.Serialize());
    ASSERT_TRUE(file.ok()) << file.status();
    copy.emplace(*file);
    moved.emplace(*std::move(file));
  }  // the StatusOr holding the original is gone
  EXPECT_EQ(copy->Find("t")->data, "abcdefgh");
  EXPECT_EQ(moved->Find("t")->data, "abcdefgh");
  moved.reset();
  EXPECT_EQ(copy->Find("t")->data, "abcdefgh");
  EXPECT_EQ(copy->data_section(), "abcdefgh");
}

TEST(SafetensorsFileTest, FindAbsentIsNull) {
  absl::StatusOr<SafetensorsFile> file = SafetensorsFile::Parse(
      RawFile(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})", "x"));
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_NE(file->Find("a"), nullptr);
  EXPECT_EQ(file->Find("b"), nullptr);
  EXPECT_EQ(file->Find(""), nullptr);
  EXPECT_EQ(file->Find("__metadata__"), nullptr);
}

// ---------------------------------------------------------------------------------------------
// Golden files produced by the Python reference (safetensors' own writer).

absl::StatusOr<SafetensorsFile> ReadGolden(absl::string_view name) {
  return SafetensorsFile::ReadFile(GoldenPath(name));
}

TEST(SafetensorsGoldenTest, PackCodec) {
  absl::StatusOr<SafetensorsFile> file = ReadGolden("pack_codec");
  ASSERT_TRUE(file.ok()) << file.status();
  ASSERT_EQ(file->metadata().count("lengths"), 1u);
  const TensorView* packed = file->Find("len5.packed");
  ASSERT_NE(packed, nullptr);
  EXPECT_EQ(packed->dtype, DType::kU8);
  EXPECT_THAT(packed->shape, ElementsAre(1));
  EXPECT_EQ(packed->data.size(), 1u);

  // "[1, 2, 4, ...]": every length has trits, packed bytes (5 trits per byte) and a scalar pad.
  absl::string_view lengths = file->metadata().at("lengths");
  ASSERT_TRUE(absl::ConsumePrefix(&lengths, "["));
  ASSERT_TRUE(absl::ConsumeSuffix(&lengths, "]"));
  int checked = 0;
  for (absl::string_view item : absl::StrSplit(lengths, ", ")) {
    int64_t n = 0;
    ASSERT_TRUE(absl::SimpleAtoi(item, &n)) << item;
    const std::string prefix = absl::StrCat("len", n);
    const TensorView* trits = file->Find(prefix + ".trits");
    const TensorView* bytes = file->Find(prefix + ".packed");
    const TensorView* pad = file->Find(prefix + ".pad");
    ASSERT_NE(trits, nullptr) << prefix;
    ASSERT_NE(bytes, nullptr) << prefix;
    ASSERT_NE(pad, nullptr) << prefix;
    EXPECT_EQ(trits->dtype, DType::kI8);
    EXPECT_THAT(trits->shape, ElementsAre(n));
    for (char t : trits->data) {
      EXPECT_THAT(static_cast<int>(static_cast<int8_t>(t)), testing::AnyOf(-1, 0, 1));
    }
    EXPECT_EQ(bytes->dtype, DType::kU8);
    EXPECT_THAT(bytes->shape, ElementsAre((n + 4) / 5));
    EXPECT_EQ(pad->dtype, DType::kI64);
    EXPECT_THAT(pad->shape, IsEmpty());
    EXPECT_EQ(pad->numel(), 1);
    EXPECT_EQ(ReadI64(pad->data), (5 - n % 5) % 5) << prefix;
    ++checked;
  }
  EXPECT_EQ(checked, 11);
  EXPECT_EQ(file->tensors().size(), 3u * checked);
}

TEST(SafetensorsGoldenTest, LinearBasic) {
  absl::StatusOr<SafetensorsFile> file = ReadGolden("linear_basic");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->metadata().count("spec"), 1u);
  EXPECT_EQ(file->metadata().at("layers"), R"(["fc"])");

  const TensorView* e = file->Find("init.fc.E");
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(e->dtype, DType::kI8);
  EXPECT_THAT(e->shape, ElementsAre(96));
  EXPECT_EQ(e->data.size(), 96u);

  const TensorView* pad = file->Find("init.fc._T_pad");
  ASSERT_NE(pad, nullptr);
  EXPECT_EQ(pad->dtype, DType::kI64);
  EXPECT_THAT(pad->shape, IsEmpty());
  EXPECT_EQ(pad->numel(), 1);
  ASSERT_EQ(pad->data.size(), 8u);
  EXPECT_EQ(ReadI64(pad->data), 3);  // 48 * 64 trits padded to a multiple of 5

  const TensorView* t_shape = file->Find("init.fc._T_shape");
  ASSERT_NE(t_shape, nullptr);
  EXPECT_THAT(t_shape->shape, ElementsAre(2));
  EXPECT_EQ(ReadI64(t_shape->data.substr(0, 8)), 48);
  EXPECT_EQ(ReadI64(t_shape->data.substr(8, 8)), 64);

  const TensorView* x = file->Find("step0.x");
  ASSERT_NE(x, nullptr);
  EXPECT_EQ(x->dtype, DType::kF32);
  EXPECT_THAT(x->shape, ElementsAre(8, 64));
}

TEST(SafetensorsGoldenTest, AllFilesParseAndSurviveRewriting) {
  for (const char* name :
       {"pack_codec", "linear_basic", "linear_ragged_bias", "linear_gs16", "mlp", "grad_accum"}) {
    SCOPED_TRACE(name);
    absl::StatusOr<SafetensorsFile> file = ReadGolden(name);
    ASSERT_TRUE(file.ok()) << file.status();
    EXPECT_FALSE(file->tensors().empty());
    EXPECT_EQ((8 + file->header_bytes()) % 8, 0u);

    SafetensorsWriter writer;
    for (const auto& [key, value] : file->metadata()) writer.SetMetadata(key, value);
    for (const auto& [tensor, view] : file->tensors()) {
      ASSERT_TRUE(writer.Add(tensor, view.dtype, view.shape, std::string(view.data)).ok())
          << tensor;
    }
    absl::StatusOr<SafetensorsFile> again = SafetensorsFile::Parse(writer.Serialize());
    ASSERT_TRUE(again.ok()) << again.status();
    EXPECT_EQ(again->metadata(), file->metadata());
    ASSERT_EQ(again->tensors().size(), file->tensors().size());
    for (const auto& [tensor, view] : file->tensors()) {
      const TensorView* other = again->Find(tensor);
      ASSERT_NE(other, nullptr) << tensor;
      EXPECT_EQ(other->dtype, view.dtype) << tensor;
      EXPECT_EQ(other->shape, view.shape) << tensor;
      EXPECT_EQ(other->data, view.data) << tensor;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Malformed inputs: each gives InvalidArgument naming what is wrong.

TEST(SafetensorsMalformedTest, EmptyInput) {
  EXPECT_THAT(ParseStatus(""), StatusIs(absl::StatusCode::kInvalidArgument,
                                        HasSubstr("input has 0 bytes, too short")));
}

TEST(SafetensorsMalformedTest, ShorterThanLengthPrefix) {
  EXPECT_THAT(ParseStatus(std::string("\x02\0\0\0\0", 5)),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("input has 5 bytes, too short for the 8-byte header length")));
}

TEST(SafetensorsMalformedTest, HeaderLengthBeyondInput) {
  EXPECT_THAT(ParseStatus(Le64(100) + "{}"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("header length 100 exceeds the 2 bytes after the length prefix")));
  EXPECT_THAT(ParseStatus(Le64(1)),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("header length 1 exceeds the 0 bytes after the length prefix")));
}

TEST(SafetensorsMalformedTest, HeaderLength2Pow63) {
  EXPECT_THAT(ParseStatus(Le64(uint64_t{1} << 63) + "{}"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("header length 9223372036854775808 exceeds the limit of "
                                 "100000000 bytes")));
  EXPECT_THAT(ParseStatus(Le64(~uint64_t{0}) + "{}"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("header length 18446744073709551615 exceeds the limit")));
}

TEST(SafetensorsMalformedTest, HeaderLengthAboveMax) {
  EXPECT_THAT(ParseStatus(Le64(kMaxHeaderBytes + 1) + "{}"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("header length 100000001 exceeds the limit of 100000000 bytes")));
  // Exactly the maximum is allowed by the limit, so the input's size is what rejects it.
  EXPECT_THAT(ParseStatus(Le64(kMaxHeaderBytes) + "{}"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("exceeds the 2 bytes after the length prefix")));
}

TEST(SafetensorsMalformedTest, EmptyHeader) {
  ExpectInvalid("", "", "safetensors header: invalid JSON");
}

TEST(SafetensorsMalformedTest, JsonSyntaxError) {
  ExpectInvalid(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]})", "x", "invalid JSON");
  ExpectInvalid(R"({"a" 1})", "", "invalid JSON");
  ExpectInvalid(R"({"a":1,})", "", "invalid JSON");
}

TEST(SafetensorsMalformedTest, TrailingGarbageAfterJson) {
  ExpectInvalid(R"({} x)", "", "invalid JSON");
}

TEST(SafetensorsMalformedTest, NulByteInHeader) {
  // nlohmann alone would treat the NUL as the end of the input and accept what follows.
  ExpectInvalid(std::string("{}\0\0", 4), "", "invalid JSON: NUL byte at header offset 2");
  ExpectInvalid(std::string("{}\0garbage", 10), "", "NUL byte at header offset 2");
  ExpectInvalid(std::string("{\"a\0\":1}", 8), "", "NUL byte at header offset 3");
}

TEST(SafetensorsMalformedTest, CommentsAreNotJson) {
  ExpectInvalid("{} // comment", "", "invalid JSON");
}

TEST(SafetensorsMalformedTest, InvalidUtf8InHeader) {
  ExpectInvalid("{\"a\xFF\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", "x",
                "invalid JSON");
}

TEST(SafetensorsMalformedTest, TopLevelNotObject) {
  ExpectInvalid("[1, 2]", "", "expected a JSON object at the top level, got array");
  ExpectInvalid("\"text\"", "", "expected a JSON object at the top level, got \"text\"");
  ExpectInvalid("null", "", "expected a JSON object at the top level, got null");
}

TEST(SafetensorsMalformedTest, DuplicateTopLevelKey) {
  ExpectInvalid(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                R"("a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})",
                "x", "duplicate key 'a' at the top level");
}

TEST(SafetensorsMalformedTest, DuplicateMetadataKey) {
  ExpectInvalid(R"({"__metadata__":{"k":"1"},"__metadata__":{"k":"2"}})", "",
                "duplicate key '__metadata__' at the top level");
  ExpectInvalid(R"({"__metadata__":{"k":"1","k":"2"}})", "", "duplicate key 'k' in '__metadata__'");
}

TEST(SafetensorsMalformedTest, DuplicateFieldInEntry) {
  ExpectInvalid(R"({"a":{"dtype":"U8","dtype":"I8","shape":[1],"data_offsets":[0,1]}})", "x",
                "duplicate key 'dtype' in 'a'");
}

TEST(SafetensorsMalformedTest, DeepNesting) {
  const std::string deep =
      absl::StrCat("{\"a\":", std::string(100000, '['), std::string(100000, ']'), "}");
  ExpectInvalid(deep, "", "JSON nested deeper than 16 levels");
  // Unbalanced: the parser must not be reached either.
  ExpectInvalid(std::string(1000000, '['), "", "JSON nested deeper than 16 levels");
  // Brackets inside strings do not count.
  ExpectInvalid(absl::StrCat("{\"", std::string(100, '['), "\":1}"), "",
                "expected an object with dtype, shape and data_offsets, got 1");
}

TEST(SafetensorsMalformedTest, EntryNotObject) {
  ExpectInvalid(R"({"w":[1,2]})", "",
                "tensor 'w': expected an object with dtype, shape and data_offsets, got array");
  ExpectInvalid(R"({"w":"F32"})", "", "tensor 'w': expected an object");
}

TEST(SafetensorsMalformedTest, MissingDType) {
  ExpectInvalid(R"({"w":{"shape":[1],"data_offsets":[0,1]}})", "x",
                "tensor 'w': missing field 'dtype'");
}

TEST(SafetensorsMalformedTest, MissingShape) {
  ExpectInvalid(R"({"w":{"dtype":"U8","data_offsets":[0,1]}})", "x",
                "tensor 'w': missing field 'shape'");
}

TEST(SafetensorsMalformedTest, MissingDataOffsets) {
  ExpectInvalid(R"({"w":{"dtype":"U8","shape":[1]}})", "x",
                "tensor 'w': missing field 'data_offsets'");
}

TEST(SafetensorsMalformedTest, UnknownField) {
  ExpectInvalid(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"extra":0}})", "x",
                "tensor 'w': unknown field 'extra' (expected dtype, shape and data_offsets)");
}

TEST(SafetensorsMalformedTest, UnknownDType) {
  ExpectInvalid(R"({"w":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})", std::string(8, 'x'),
                "tensor 'w': unknown dtype 'F64'");
  ExpectInvalid(R"({"w":{"dtype":"u8","shape":[1],"data_offsets":[0,1]}})", "x",
                "tensor 'w': unknown dtype 'u8'");
}

TEST(SafetensorsMalformedTest, DTypeNotString) {
  ExpectInvalid(R"({"w":{"dtype":1,"shape":[1],"data_offsets":[0,1]}})", "x",
                "tensor 'w': dtype must be a string, got 1");
}

TEST(SafetensorsMalformedTest, ShapeNotArray) {
  ExpectInvalid(R"({"w":{"dtype":"U8","shape":3,"data_offsets":[0,3]}})", "xxx",
                "tensor 'w': shape must be an array of non-negative integers, got 3");
  ExpectInvalid(R"({"w":{"dtype":"U8","shape":{"0":3},"data_offsets":[0,3]}})", "xxx",
                "shape must be an array of non-negative integers, got object");
}

TEST(SafetensorsMalformedTest, ShapeNegative) {
  ExpectInvalid(R"({"w":{"dtype":"U8","shape":[2,-1],"data_offsets":[0,0]}})", "",
                "tensor 'w': shape[1] must be a non-negative integer up to INT64_MAX, got -1");
}

TEST(SafetensorsMalformedTest, ShapeFloat) {
  ExpectInvalid(R"({"w":{"dtype":"U8","shape":[2.0],"data_offsets":[0,2]}})", "xx",
                "tensor 'w': shape[0] must be a non-negative integer up to INT64_MAX, got 2.0");
  ExpectInvalid(R"({"w":{"dtype":"U8","shape":[1e0],"data_offsets":[0,1]}})", "x",
                "shape[0] must be a non-negative integer");
}

TEST(SafetensorsMalformedTest, ShapeAboveInt64Max) {
  ExpectInvalid(R"({"w":{"dtype":"U8","shape":[9223372036854775808],"data_offsets":[0,0]}})", "",
                "shape[0] must be a non-negative integer up to INT64_MAX, got "
                "9223372036854775808");
  // Beyond uint64 nlohmann gives a float; still rejected.
  ExpectInvalid(R"({"w":{"dtype":"U8","shape":[1,99999999999999999999],"data_offsets":[0,0]}})", "",
                "shape[1] must be a non-negative integer");
}

TEST(SafetensorsMalformedTest, ShapeNonNumber) {
  ExpectInvalid(R"({"w":{"dtype":"U8","shape":["2"],"data_offsets":[0,2]}})", "xx",
                "shape[0] must be a non-negative integer up to INT64_MAX, got \"2\"");
  ExpectInvalid(R"({"w":{"dtype":"U8","shape":[[2]],"data_offsets":[0,2]}})", "xx",
                "shape[0] must be a non-negative integer up to INT64_MAX, got array");
  ExpectInvalid(R"({"w":{"dtype":"U8","shape":[true],"data_offsets":[0,1]}})", "x", "got true");
}

TEST(SafetensorsMalformedTest, ByteSizeOverflow) {
  // numel = 2^62 fits, but 2^62 * 4 bytes does not.
  ExpectInvalid(R"({"w":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,0]}})", "",
                "tensor 'w': byte size of F32 [4611686018427387904] overflows 64 bits");
  // numel itself overflows.
  ExpectInvalid(R"({"w":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,0]}})", "",
                "tensor 'w': byte size of U8 [4294967296, 4294967296] overflows 64 bits");
}

TEST(SafetensorsMalformedTest, DataOffsetsNotArrayOfTwo) {
  ExpectInvalid(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":1}})", "x",
                "tensor 'w': data_offsets must be an array of two unsigned integers "
                "[begin, end], got 1");
  ExpectInvalid(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}})", "x",
                "data_offsets must be an array of two unsigned integers [begin, end], got an "
                "array of 3");
  ExpectInvalid(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[]}})", "x", "got an array of 0");
}

TEST(SafetensorsMalformedTest, DataOffsetsNotUnsigned) {
  ExpectInvalid(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[-1,0]}})", "x",
                "tensor 'w': data_offsets[0] must be an unsigned integer, got -1");
  ExpectInvalid(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1.0]}})", "x",
                "tensor 'w': data_offsets[1] must be an unsigned integer, got 1.0");
  ExpectInvalid(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,"1"]}})", "x",
                "data_offsets[1] must be an unsigned integer, got \"1\"");
  ExpectInvalid(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,18446744073709551616]}})", "x",
                "data_offsets[1] must be an unsigned integer");
}

TEST(SafetensorsMalformedTest, DataOffsetsBeginAfterEnd) {
  ExpectInvalid(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[2,1]}})", "xx",
                "tensor 'w': data_offsets [2, 1]: begin is after end");
}

TEST(SafetensorsMalformedTest, DataOffsetsBeyondDataSection) {
  ExpectInvalid(R"({"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})", "xxx",
                "tensor 'w': data_offsets [0, 4] end beyond the data section of 3 bytes");
  ExpectInvalid(R"({"w":{"dtype":"U8","shape":[0],)"
                R"("data_offsets":[18446744073709551615,18446744073709551615]}})",
                "", "end beyond the data section of 0 bytes");
}

TEST(SafetensorsMalformedTest, SpanDoesNotMatchShape) {
  ExpectInvalid(R"({"fc.E":{"dtype":"I8","shape":[24],"data_offsets":[0,25]}})",
                std::string(25, 'x'),
                "safetensors header: tensor 'fc.E': data_offsets span 25 bytes, expected 24 "
                "(I8 [24])");
  ExpectInvalid(R"({"s":{"dtype":"I64","shape":[],"data_offsets":[0,4]}})", "xxxx",
                "tensor 's': data_offsets span 4 bytes, expected 8 (I64 [])");
  ExpectInvalid(R"({"z":{"dtype":"F32","shape":[3,0],"data_offsets":[0,4]}})", "xxxx",
                "tensor 'z': data_offsets span 4 bytes, expected 0 (F32 [3, 0])");
}

TEST(SafetensorsMalformedTest, HoleBetweenTensors) {
  ExpectInvalid(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},)"
                R"("b":{"dtype":"U8","shape":[2],"data_offsets":[3,5]}})",
                "xxxxx",
                "tensor 'b': begins at byte 3 but the end of tensor 'a' is at byte 2 (a hole of "
                "1 bytes");
}

TEST(SafetensorsMalformedTest, FirstTensorNotAtZero) {
  ExpectInvalid(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}})", "xxx",
                "tensor 'a': begins at byte 1 but the start of the data section is at byte 0");
}

TEST(SafetensorsMalformedTest, OverlappingTensors) {
  ExpectInvalid(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                R"("b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}})",
                "xxxxxx",
                "tensor 'b': begins at byte 2 but the end of tensor 'a' is at byte 4 (tensors "
                "overlap)");
}

TEST(SafetensorsMalformedTest, TwoTensorsShareTheSameBytes) {
  ExpectInvalid(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                R"("b":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}})",
                "xxxx", "tensor 'b': begins at byte 0 but the end of tensor 'a' is at byte 4");
}

TEST(SafetensorsMalformedTest, ZeroSizeTensorInsideAnother) {
  ExpectInvalid(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                R"("z":{"dtype":"F32","shape":[0],"data_offsets":[2,2]}})",
                "xxxx", "tensor 'z': begins at byte 2 but the end of tensor 'a' is at byte 4");
}

TEST(SafetensorsMalformedTest, TrailingBytesInDataSection) {
  ExpectInvalid(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})", "xxxx",
                "tensors cover 2 bytes but the data section has 4 bytes (2 trailing bytes");
}

TEST(SafetensorsMalformedTest, DataWithoutTensors) {
  ExpectInvalid("{}", "xx", "tensors cover 0 bytes but the data section has 2 bytes");
  ExpectInvalid(R"({"__metadata__":{}})", "x",
                "tensors cover 0 bytes but the data section has 1 bytes");
}

TEST(SafetensorsMalformedTest, MetadataNotObject) {
  ExpectInvalid(R"({"__metadata__":["a","b"]})", "",
                "'__metadata__' must be an object of string values, got array");
  ExpectInvalid(R"({"__metadata__":"a"})", "",
                "'__metadata__' must be an object of string values, got \"a\"");
}

TEST(SafetensorsMalformedTest, MetadataValueNotString) {
  ExpectInvalid(R"({"__metadata__":{"steps":6}})", "",
                "'__metadata__' value of key 'steps' must be a string, got 6");
  ExpectInvalid(R"({"__metadata__":{"a":"x","n":null}})", "",
                "value of key 'n' must be a string, got null");
  ExpectInvalid(R"({"__metadata__":{"o":{"x":"y"}}})", "",
                "value of key 'o' must be a string, got object");
}

TEST(SafetensorsMalformedTest, LongNamesAreTruncatedInMessages) {
  const std::string name(10000, 'n');
  const absl::Status status = ParseStatus(RawFile(absl::StrCat("{\"", name, "\":1}"), ""));
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument,
                               HasSubstr("nnnn'...: expected an object")));
  EXPECT_LT(status.message().size(), 400u);
}

// ---------------------------------------------------------------------------------------------
// Well-formed edge cases.

TEST(SafetensorsParseTest, ZeroSizeTensorsAnywhereOnTheChain) {
  absl::StatusOr<SafetensorsFile> file =
      SafetensorsFile::Parse(RawFile(R"({"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},)"
                                     R"("b":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},)"
                                     R"("c":{"dtype":"F32","shape":[0,3],"data_offsets":[2,2]},)"
                                     R"("d":{"dtype":"U8","shape":[1],"data_offsets":[2,3]},)"
                                     R"("e":{"dtype":"I64","shape":[5,0],"data_offsets":[3,3]},)"
                                     R"("f":{"dtype":"I64","shape":[0],"data_offsets":[3,3]}})",
                                     "xyz"));
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->tensors().size(), 6u);
  EXPECT_EQ(file->Find("b")->data, "xy");
  EXPECT_EQ(file->Find("d")->data, "z");
  EXPECT_TRUE(file->Find("e")->data.empty());
  EXPECT_EQ(file->Find("e")->numel(), 0);
}

TEST(SafetensorsParseTest, OnlyZeroSizeTensorsAndNoData) {
  absl::StatusOr<SafetensorsFile> file = SafetensorsFile::Parse(
      RawFile(R"({"a":{"dtype":"BF16","shape":[0],"data_offsets":[0,0]}})", ""));
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_THAT(file->Find("a")->shape, ElementsAre(0));
}

TEST(SafetensorsParseTest, EmptyObjectAndEmptyMetadata) {
  absl::StatusOr<SafetensorsFile> file =
      SafetensorsFile::Parse(RawFile(R"({"__metadata__":{}})", ""));
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_THAT(file->tensors(), IsEmpty());
  EXPECT_THAT(file->metadata(), IsEmpty());
}

TEST(SafetensorsParseTest, UnpaddedAndWhitespacePaddedHeaders) {
  const std::string entry = R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})";
  for (const std::string& header : {entry, entry + "   ", " \n" + entry + "\t "}) {
    absl::StatusOr<SafetensorsFile> file = SafetensorsFile::Parse(RawFile(header, "q"));
    ASSERT_TRUE(file.ok()) << file.status();
    EXPECT_EQ(file->header_bytes(), header.size());
    EXPECT_EQ(file->Find("a")->data, "q");
  }
}

TEST(SafetensorsParseTest, OffsetsNeedNotFollowKeyOrder) {
  absl::StatusOr<SafetensorsFile> file =
      SafetensorsFile::Parse(RawFile(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[2,3]},)"
                                     R"("b":{"dtype":"F16","shape":[1],"data_offsets":[0,2]}})",
                                     "xyz"));
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->Find("a")->data, "z");
  EXPECT_EQ(file->Find("b")->data, "xy");
}

// ---------------------------------------------------------------------------------------------
// Robustness: random corruption never crashes and only ever gives InvalidArgument.

TEST(SafetensorsFuzzTest, FlippedAndTruncatedBytesNeverCrash) {
  SafetensorsWriter writer;
  std::mt19937 rng(12345);
  ASSERT_TRUE(writer.Add("layer.w", DType::kF32, {3, 4}, RandomBytes(rng, 48)).ok());
  ASSERT_TRUE(writer.Add("layer.b", DType::kBF16, {4}, RandomBytes(rng, 8)).ok());
  ASSERT_TRUE(writer.Add("idx", DType::kI64, {2}, RandomBytes(rng, 16)).ok());
  ASSERT_TRUE(writer.Add("q", DType::kI8, {5}, RandomBytes(rng, 5)).ok());
  ASSERT_TRUE(writer.Add("n", DType::kI32, {}, RandomBytes(rng, 4)).ok());
  ASSERT_TRUE(writer.Add("e", DType::kU8, {0, 2}, "").ok());
  writer.SetMetadata("crc32c", "deadbeef");
  writer.SetMetadata("note", "x");
  const std::string valid = writer.Serialize();
  const size_t header_end = 8 + ReadI64(valid.substr(0, 8));
  ASSERT_TRUE(SafetensorsFile::Parse(valid).ok());

  const std::string json_chars = "{}[]\",:-.0123456789eE \\x";
  int ok_count = 0;
  for (int iteration = 0; iteration < 2000; ++iteration) {
    std::string bytes = valid;
    const int mode = iteration % 5;
    auto pick = [&](size_t lo, size_t hi) {
      return std::uniform_int_distribution<size_t>(lo, hi - 1)(rng);
    };
    if (mode == 0) {  // bit flips anywhere
      for (int k = 0, n = 1 + static_cast<int>(pick(0, 4)); k < n; ++k) {
        bytes[pick(0, bytes.size())] ^= static_cast<char>(1 << pick(0, 8));
      }
    } else if (mode == 1) {  // bit flips in the length prefix and header
      for (int k = 0, n = 1 + static_cast<int>(pick(0, 3)); k < n; ++k) {
        bytes[pick(0, header_end)] ^= static_cast<char>(1 << pick(0, 8));
      }
    } else if (mode == 2) {  // JSON-significant characters dropped into the header
      for (int k = 0, n = 1 + static_cast<int>(pick(0, 3)); k < n; ++k) {
        bytes[pick(8, header_end)] = json_chars[pick(0, json_chars.size())];
      }
    } else if (mode == 3) {  // truncation
      bytes.resize(pick(0, bytes.size()));
    } else {  // truncation plus a random byte
      bytes.resize(pick(1, bytes.size()));
      bytes[pick(0, bytes.size())] = static_cast<char>(pick(0, 256));
    }
    absl::StatusOr<SafetensorsFile> file = SafetensorsFile::Parse(bytes);
    if (!file.ok()) {
      ASSERT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument)
          << "iteration " << iteration << ": " << file.status();
      ASSERT_FALSE(file.status().message().empty());
      continue;
    }
    ++ok_count;
    // Whatever was accepted is internally consistent.
    const absl::string_view data = file->data_section();
    size_t covered = 0;
    for (const auto& [name, view] : file->tensors()) {
      ASSERT_EQ(view.data.size(), static_cast<size_t>(view.numel()) * DTypeSize(view.dtype));
      ASSERT_GE(view.data.data(), data.data());
      ASSERT_LE(view.data.data() + view.data.size(), data.data() + data.size());
      covered += view.data.size();
    }
    ASSERT_EQ(covered, data.size());
    ASSERT_EQ(8 + file->header_bytes() + data.size(), bytes.size());
  }
  // Flips inside tensor data keep the file valid, so some inputs must have been accepted.
  EXPECT_GT(ok_count, 0);
}

// ---------------------------------------------------------------------------------------------
// ReadFile.

TEST(SafetensorsReadFileTest, MissingFileIsNotFound) {
  const std::string path = TempPath("does_not_exist.safetensors");
  EXPECT_THAT(SafetensorsFile::ReadFile(path).status(),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr(path)));
  EXPECT_THAT(SafetensorsFile::ReadFile(path).status(),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("No such file or directory")));
}

TEST(SafetensorsReadFileTest, ReadsWhatTheWriterWrote) {
  SafetensorsWriter writer;
  ASSERT_TRUE(writer.Add("w", DType::kF32, {2, 2}, "0123456789abcdef").ok());
  ASSERT_TRUE(writer.Add("s", DType::kI64, {}, Le64(42)).ok());
  writer.SetMetadata("crc32c", "00000000");
  const std::string path = TempPath("written.safetensors");
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    const std::string bytes = writer.Serialize();
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    ASSERT_TRUE(out.good());
  }
  absl::StatusOr<SafetensorsFile> file = SafetensorsFile::ReadFile(path);
  std::remove(path.c_str());
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->metadata().at("crc32c"), "00000000");
  EXPECT_EQ(file->Find("w")->data, "0123456789abcdef");
  EXPECT_THAT(file->Find("w")->shape, ElementsAre(2, 2));
  EXPECT_EQ(ReadI64(file->Find("s")->data), 42);
  EXPECT_EQ(file->data_section(), writer.DataSection());
}

TEST(SafetensorsReadFileTest, MalformedFileNamesPathAndProblem) {
  const std::string path = TempPath("malformed.safetensors");
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out << Le64(1000) << "{}";
  }
  absl::StatusOr<SafetensorsFile> file = SafetensorsFile::ReadFile(path);
  std::remove(path.c_str());
  EXPECT_THAT(file.status(),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr(absl::StrCat(path, ": safetensors: header length 1000"))));
}

TEST(SafetensorsReadFileTest, DirectoryIsAnError) {
  EXPECT_THAT(SafetensorsFile::ReadFile(testing::TempDir()).status(),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("Is a directory")));
}

}  // namespace
}  // namespace tscale::checkpoint
