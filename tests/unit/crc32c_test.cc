#include "server/checkpoint/crc32c.h"

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <random>
#include <string>

#include "absl/strings/string_view.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tscale::checkpoint {
namespace {

// Bit-at-a-time CRC-32C, independent of the table implementation under test.
uint32_t ReferenceCrc32c(absl::string_view data) {
  uint32_t crc = 0xFFFFFFFFu;
  for (char ch : data) {
    crc ^= static_cast<unsigned char>(ch);
    for (int bit = 0; bit < 8; ++bit) crc = (crc & 1u) ? (crc >> 1) ^ 0x82F63B78u : crc >> 1;
  }
  return ~crc;
}

std::string RandomBytes(std::mt19937& rng, size_t n) {
  std::uniform_int_distribution<int> byte(0, 255);
  std::string out(n, '\0');
  for (char& ch : out) ch = static_cast<char>(byte(rng));
  return out;
}

TEST(Crc32cTest, CheckValue) { EXPECT_EQ(Crc32c("123456789"), 0xE3069283u); }

TEST(Crc32cTest, EmptyIsZero) {
  EXPECT_EQ(Crc32c(""), 0u);
  EXPECT_EQ(Crc32c(absl::string_view()), 0u);
}

TEST(Crc32cTest, EmptyContinuationKeepsCrc) {
  EXPECT_EQ(Crc32c("", 0xE3069283u), 0xE3069283u);
  EXPECT_EQ(Crc32c("", 0x12345678u), 0x12345678u);
}

// RFC 3720 (iSCSI), appendix B.4.
TEST(Crc32cTest, Rfc3720Vectors) {
  EXPECT_EQ(Crc32c(std::string(32, '\0')), 0x8A9136AAu);
  EXPECT_EQ(Crc32c(std::string(32, '\xFF')), 0x62A8AB43u);
  std::string ascending(32, '\0');
  std::string descending(32, '\0');
  for (int i = 0; i < 32; ++i) {
    ascending[i] = static_cast<char>(i);
    descending[i] = static_cast<char>(31 - i);
  }
  EXPECT_EQ(Crc32c(ascending), 0x46DD794Eu);
  EXPECT_EQ(Crc32c(descending), 0x113FDB5Cu);
}

TEST(Crc32cTest, MatchesBitwiseReferenceForAllSmallLengthsAndOffsets) {
  std::mt19937 rng(1);
  const std::string buffer = RandomBytes(rng, 96);
  // Covers the 8-byte loop, the byte tail and every misalignment of the input.
  for (size_t offset = 0; offset < 8; ++offset) {
    for (size_t length = 0; offset + length <= buffer.size(); ++length) {
      const absl::string_view piece = absl::string_view(buffer).substr(offset, length);
      ASSERT_EQ(Crc32c(piece), ReferenceCrc32c(piece))
          << "offset " << offset << " length " << length;
    }
  }
}

TEST(Crc32cTest, ChainingEqualsOneShotOnRandomSplits) {
  std::mt19937 rng(42);
  for (int iteration = 0; iteration < 500; ++iteration) {
    const size_t length = std::uniform_int_distribution<size_t>(0, 2000)(rng);
    const std::string data = RandomBytes(rng, length);
    const uint32_t one_shot = Crc32c(data);
    ASSERT_EQ(one_shot, ReferenceCrc32c(data));

    // Split into up to four pieces at random points (empty pieces included).
    std::uniform_int_distribution<size_t> point(0, length);
    size_t cuts[3] = {point(rng), point(rng), point(rng)};
    std::sort(std::begin(cuts), std::end(cuts));
    uint32_t chained = 0;
    size_t start = 0;
    for (size_t cut : cuts) {
      chained = Crc32c(absl::string_view(data).substr(start, cut - start), chained);
      start = cut;
    }
    chained = Crc32c(absl::string_view(data).substr(start), chained);
    ASSERT_EQ(chained, one_shot) << "iteration " << iteration << " length " << length;
  }
}

TEST(Crc32cTest, TwoPieceChaining) {
  EXPECT_EQ(Crc32c("56789", Crc32c("1234")), 0xE3069283u);
  EXPECT_EQ(Crc32c("123456789", Crc32c("")), 0xE3069283u);
}

TEST(Crc32cTest, HexIsEightLowerCaseDigits) {
  EXPECT_EQ(Crc32cHex(0xE3069283u), "e3069283");
  EXPECT_EQ(Crc32cHex(0u), "00000000");
  EXPECT_EQ(Crc32cHex(0xABCu), "00000abc");
  EXPECT_EQ(Crc32cHex(0xFFFFFFFFu), "ffffffff");
  EXPECT_EQ(Crc32cHex(Crc32c("123456789")), "e3069283");
  EXPECT_THAT(Crc32cHex(0xDEADBEEFu), testing::MatchesRegex("[0-9a-f]{8}"));
}

}  // namespace
}  // namespace tscale::checkpoint
