// The 5-trits-per-byte codec: the reference's bytes, round trips, and every rejection.
#include <random>
#include <vector>

#include <ATen/ATen.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "server/core/trits.h"
#include "tests/unit/test_util.h"

namespace tscale {
namespace {

using ::testing::HasSubstr;
using testing::StatusIs;

TEST(TritsTest, MatchesTheReferenceBytesForEveryGoldenLength) {
  auto file = checkpoint::SafetensorsFile::ReadFile(testing::TestData("golden/pack_codec.safetensors"));
  ASSERT_TRUE(file.ok()) << file.status();
  const auto lengths = nlohmann::json::parse(file->metadata().at("lengths"));
  ASSERT_GE(lengths.size(), 10u);
  for (int64_t n : lengths) {
    const std::string p = "len" + std::to_string(n);
    const at::Tensor trits = testing::ToTensor(*file->Find(p + ".trits"));
    const at::Tensor packed = testing::ToTensor(*file->Find(p + ".packed"));
    const int64_t pad = testing::ToTensor(*file->Find(p + ".pad")).item<int64_t>();
    ASSERT_EQ(trits.numel(), n);
    EXPECT_EQ(core::TritPad(n), pad) << n;
    EXPECT_EQ(core::PackedBytes(n), packed.numel()) << n;

    auto got = core::PackTernary(trits);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_TRUE(at::equal(*got, packed)) << "pack, n=" << n;

    auto back = core::UnpackTernary(packed, n);
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_TRUE(at::equal(*back, trits)) << "unpack, n=" << n;
  }
}

TEST(TritsTest, ByteFormatIsBase3FirstTritLeastSignificant) {
  std::vector<int8_t> trits = {1, -1, 0, 1, 1};  // digits 2,0,1,2,2
  std::vector<uint8_t> packed(1);
  ASSERT_TRUE(core::PackTrits(trits, absl::MakeSpan(packed)).ok());
  EXPECT_EQ(packed[0], 2 + 0 * 3 + 1 * 9 + 2 * 27 + 2 * 81);
  std::vector<int8_t> all_plus(5, 1);
  ASSERT_TRUE(core::PackTrits(all_plus, absl::MakeSpan(packed)).ok());
  EXPECT_EQ(packed[0], 242);
  // Padding digits are 0: a single +1 trit is the byte 2.
  std::vector<int8_t> one = {1};
  ASSERT_TRUE(core::PackTrits(one, absl::MakeSpan(packed)).ok());
  EXPECT_EQ(packed[0], 2);
}

TEST(TritsTest, RoundTripsRandomSequencesOfEveryLength) {
  std::mt19937 rng(7);
  for (int n = 0; n <= 300; ++n) {
    std::vector<int8_t> trits(n);
    for (auto& t : trits) t = static_cast<int8_t>(static_cast<int>(rng() % 3) - 1);
    std::vector<uint8_t> packed(core::PackedBytes(n));
    ASSERT_TRUE(core::PackTrits(trits, absl::MakeSpan(packed)).ok());
    for (uint8_t b : packed) ASSERT_LE(b, core::kMaxPackedByte);
    std::vector<int8_t> back(n);
    ASSERT_TRUE(core::UnpackTrits(packed, absl::MakeSpan(back)).ok());
    EXPECT_EQ(back, trits) << n;
  }
}

TEST(TritsTest, EveryValidByteRoundTrips) {
  for (int b = 0; b <= 242; ++b) {
    std::vector<uint8_t> packed = {static_cast<uint8_t>(b)};
    std::vector<int8_t> trits(5);
    ASSERT_TRUE(core::UnpackTrits(packed, absl::MakeSpan(trits)).ok()) << b;
    std::vector<uint8_t> again(1);
    ASSERT_TRUE(core::PackTrits(trits, absl::MakeSpan(again)).ok());
    EXPECT_EQ(again[0], b);
  }
}

TEST(TritsTest, RejectsBytesAbove242) {
  for (int b = 243; b <= 255; ++b) {
    std::vector<uint8_t> packed = {0, static_cast<uint8_t>(b)};
    std::vector<int8_t> trits(10);
    EXPECT_THAT(core::UnpackTrits(packed, absl::MakeSpan(trits), "fc.T_packed"),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         HasSubstr("fc.T_packed[1]: expected a byte <= 242, got " +
                                   std::to_string(b))));
  }
  // Also in the last, partly padded byte.
  std::vector<uint8_t> packed = {250};
  std::vector<int8_t> trits(3);
  EXPECT_THAT(core::UnpackTrits(packed, absl::MakeSpan(trits)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("expected a byte <= 242")));
}

TEST(TritsTest, RejectsNonZeroPaddingDigits) {
  // 3 trits: digits 3 and 4 are padding; 81 sets digit 4.
  std::vector<uint8_t> packed = {81};
  std::vector<int8_t> trits(3);
  EXPECT_THAT(core::UnpackTrits(packed, absl::MakeSpan(trits), "norm.T_packed"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("norm.T_packed[0]: padding digits must be 0")));
}

TEST(TritsTest, RejectsSizeMismatches) {
  std::vector<uint8_t> packed(3);
  std::vector<int8_t> trits(16);  // needs 4 bytes
  EXPECT_THAT(core::UnpackTrits(packed, absl::MakeSpan(trits), "x"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("x: expected 4 bytes for 16 trits, got 3")));
  EXPECT_THAT(core::PackTrits(trits, absl::MakeSpan(packed)),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("packed: expected 4 bytes for 16 trits, got 3")));
}

TEST(TritsTest, RejectsValuesThatAreNotTrits) {
  std::vector<int8_t> trits = {0, 1, 2};
  std::vector<uint8_t> packed(1);
  EXPECT_THAT(core::PackTrits(trits, absl::MakeSpan(packed)),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("trits[2]: expected -1, 0 or 1, got 2")));
  EXPECT_THAT(core::PackTernary(at::zeros({4}, at::kFloat)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("expected an int8 tensor")));
  EXPECT_THAT(core::UnpackTernary(at::zeros({2}, at::kChar), 10),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("expected a 1-D uint8 tensor")));
}

}  // namespace
}  // namespace tscale
