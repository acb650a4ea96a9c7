#include "kvdn/common/hash.h"

#include <random>

#include "gtest/gtest.h"
#include "kvdn/testing/chunks.h"
#include "kvdn/testing/status_matchers.h"

namespace kvdn {
namespace {

using ::kvdn::testing::StatusIs;
using ::testing::HasSubstr;

TEST(Hash128Test, HexRoundTripOnRandomValues) {
  std::mt19937_64 rng(7);
  for (int i = 0; i < 1000; ++i) {
    const Hash128 h{rng(), rng()};
    const std::string hex = h.ToHex();
    ASSERT_EQ(hex.size(), 32u);
    ASSERT_OK_AND_ASSIGN(Hash128 back, Hash128::FromHex(hex));
    EXPECT_EQ(back, h);
    // Canonical form is big-endian high then low.
    const auto c = h.Canonical();
    EXPECT_EQ(c[0], static_cast<uint8_t>(h.high >> 56));
    EXPECT_EQ(c[15], static_cast<uint8_t>(h.low));
  }
}

TEST(Hash128Test, FromHexRejectsBadInput) {
  EXPECT_THAT(Hash128::FromHex("abc"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("32 hex digits, got 3")));
  EXPECT_THAT(Hash128::FromHex(std::string(31, '0') + "g"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("position 31")));
}

TEST(Xxh3Test, StreamEqualsOneShotForAnySplit) {
  const auto data = testing::RandomBytes(1 << 20, 3);
  std::mt19937_64 rng(11);
  for (int trial = 0; trial < 20; ++trial) {
    Xxh3_64Stream s;
    size_t off = 0;
    while (off < data.size()) {
      const size_t n = std::min<size_t>(data.size() - off, rng() % 300000);
      s.Update(ByteSpan(data).subspan(off, n));
      off += n;
    }
    EXPECT_EQ(s.Digest(), Xxh3_64(data));
  }
}

TEST(Xxh3Test, OneBitFlipChangesHash) {
  auto data = testing::RandomBytes(4096, 5);
  const uint64_t a = Xxh3_64(data);
  const Hash128 b = Xxh3_128(data);
  data[1234] ^= 0x10;
  EXPECT_NE(Xxh3_64(data), a);
  EXPECT_NE(Xxh3_128(data), b);
}

}  // namespace
}  // namespace kvdn
