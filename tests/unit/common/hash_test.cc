#include "kvdn/common/hash.h"

#include <algorithm>
#include <random>
#include <thread>
#include <vector>

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

// Xxh3_64Blocks is XXH3-64 bit for bit, whatever the length (every path of XXH3: <= 16, <= 128,
// <= 240 bytes, block boundaries and one past them, a tail of whole stripes or not) and however
// the input is cut: ranges on block boundaries or not, added in any order from several threads,
// some never added (Finish sums those), some refused as overlapping.
TEST(Xxh3Test, BlocksInAnyOrderEqualTheWholeHash) {
  const auto data = testing::RandomBytes((1 << 20) + 4099, 7);
  std::vector<size_t> lengths = {
      0,    1,    16,   17,   128,  129,  240,  241,  255,   1023,    1024,          1025,
      1087, 1088, 1089, 2047, 2048, 2049, 4096, 8191, 65536, 1 << 20, (1 << 20) + 1, data.size()};
  std::mt19937_64 rng(13);
  for (int i = 0; i < 40; ++i) lengths.push_back(242 + rng() % (data.size() - 242));
  for (size_t len : lengths) {
    const ByteSpan in = ByteSpan(data).subspan(0, len);
    const uint64_t want = Xxh3_64(in);
    for (int trial = 0; trial < 3; ++trial) {
      // Cuts: page-aligned (as Puts in parts are cut), anywhere, or none.
      std::vector<std::pair<size_t, size_t>> ranges;
      for (size_t off = 0; off < len;) {
        size_t n = trial == 0 ? 4096 * (1 + rng() % 64) : 1 + rng() % 70000;
        n = std::min(n, len - off);
        ranges.emplace_back(off, n);
        off += n;
      }
      std::shuffle(ranges.begin(), ranges.end(), rng);
      Xxh3_64Blocks h(len);
      std::vector<std::thread> threads;
      for (size_t r = 0; r < ranges.size(); ++r) {
        if (trial == 2 && r % 3 == 0) continue;  // left to Finish
        threads.emplace_back(
            [&, r] { h.AddRange(ranges[r].first, in.subspan(ranges[r].first, ranges[r].second)); });
      }
      for (std::thread& t : threads) t.join();
      EXPECT_EQ(h.Finish(in), want) << "length " << len << ", trial " << trial;
    }
  }
  // A range that overlaps one added before, or reaches past the input, adds nothing (false); the
  // hash is still the input's.
  {
    const ByteSpan in(data);
    Xxh3_64Blocks h(in.size());
    EXPECT_TRUE(h.AddRange(4096, in.subspan(4096, 8192)));
    EXPECT_FALSE(h.AddRange(0, in.subspan(0, 4097)));
    EXPECT_FALSE(h.AddRange(12287, in.subspan(12287, 1)));
    EXPECT_FALSE(h.AddRange(4096, in.subspan(4096, 1)));
    EXPECT_FALSE(h.AddRange(in.size() - 10, ByteSpan(data.data(), 11)));
    EXPECT_TRUE(h.AddRange(0, in.subspan(0, 4096)));
    EXPECT_TRUE(h.AddRange(12288, in.subspan(12288, 5000)));
    EXPECT_EQ(h.Finish(in), Xxh3_64(in));
  }
  // A byte changed after its block was summed is not seen (the sums stand for those bytes), a
  // byte changed in the tail is: the caller sums bytes only once they are final.
  auto copy = data;
  Xxh3_64Blocks h(copy.size());
  h.AddRange(0, ByteSpan(copy));
  copy.back() ^= 1;
  EXPECT_EQ(h.Finish(ByteSpan(copy)), Xxh3_64(ByteSpan(copy)));
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
