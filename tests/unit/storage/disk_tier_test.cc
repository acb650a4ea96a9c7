#include "kvdn/storage/disk_tier.h"

#include <cstring>
#include <filesystem>
#include <fstream>

#include "absl/container/flat_hash_map.h"
#include "gtest/gtest.h"
#include "kvdn/common/hash.h"
#include "kvdn/testing/chunks.h"
#include "kvdn/testing/status_matchers.h"

namespace kvdn::storage {
namespace {

using ::kvdn::testing::KeyFor;
using ::kvdn::testing::RandomChunk;
using ::kvdn::testing::StatusIs;
using ::testing::HasSubstr;

class DiskTierTest : public ::testing::Test {
 protected:
  DiskTierOptions Options() { return {.path = dir_.Sub("db"), .capacity_bytes = 1 << 30}; }
  testing::TempDir dir_;
};

TEST_F(DiskTierTest, WriteReadRoundTripAndReopen) {
  absl::flat_hash_map<int, std::vector<uint8_t>> chunks;
  {
    ASSERT_OK_AND_ASSIGN(auto disk, DiskTier::Open(Options()));
    EXPECT_TRUE(disk->caps().persistent);
    uint64_t total = 0;
    for (int i = 0; i < 12; ++i) {
      chunks[i] = RandomChunk(testing::InfoForBytes(50000 + 37000 * i), i);
      ASSERT_OK(disk->Write(KeyFor(i), chunks[i]));
      total += chunks[i].size();
    }
    EXPECT_EQ(disk->chunk_count(), 12u);
    EXPECT_EQ(disk->used_bytes(), total);
  }
  ASSERT_OK_AND_ASSIGN(auto disk, DiskTier::Open(Options()));
  EXPECT_EQ(disk->chunk_count(), 12u);
  for (auto& [i, want] : chunks) {
    std::vector<uint8_t> got(want.size() + 10);
    ASSERT_OK_AND_ASSIGN(uint64_t n, disk->Read(KeyFor(i), MutableByteSpan(got)));
    ASSERT_EQ(n, want.size());
    EXPECT_EQ(std::memcmp(got.data(), want.data(), n), 0);
    ASSERT_OK_AND_ASSIGN(DiskChunkMeta m, disk->Stat(KeyFor(i)));
    EXPECT_EQ(m.stored_bytes, want.size());
    EXPECT_EQ(m.key, KeyFor(i));
  }
  int seen = 0;
  ASSERT_OK(disk->ForEach([&](const DiskChunkMeta&) { return ++seen < 5; }));
  EXPECT_EQ(seen, 5);
}

TEST_F(DiskTierTest, MissesDeletesAndSmallBuffers) {
  ASSERT_OK_AND_ASSIGN(auto disk, DiskTier::Open(Options()));
  std::vector<uint8_t> buf(1 << 20);
  EXPECT_THAT(disk->Read(KeyFor(1), MutableByteSpan(buf)), StatusIs(absl::StatusCode::kNotFound));
  const auto c = RandomChunk(testing::InfoForBytes(200000), 1);
  ASSERT_OK(disk->Write(KeyFor(1), c));
  EXPECT_THAT(disk->Read(KeyFor(1), MutableByteSpan(buf.data(), 100)),
              StatusIs(absl::StatusCode::kOutOfRange, HasSubstr("destination holds 100")));
  ASSERT_OK(disk->Delete(KeyFor(1)));
  EXPECT_EQ(disk->used_bytes(), 0u);
  EXPECT_EQ(disk->chunk_count(), 0u);
  EXPECT_OK(disk->Delete(KeyFor(1)));
  EXPECT_THAT(disk->Stat(KeyFor(1)), StatusIs(absl::StatusCode::kNotFound));
}

TEST_F(DiskTierTest, RejectsMalformedChunks) {
  ASSERT_OK_AND_ASSIGN(auto disk, DiskTier::Open(Options()));
  auto c = RandomChunk(testing::InfoForBytes(10000), 1);
  c[0] = 'Z';
  EXPECT_THAT(disk->Write(KeyFor(1), c), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(disk->chunk_count(), 0u);
}

TEST_F(DiskTierTest, PayloadFailingItsChecksumIsDroppedCountedAndNeverReturned) {
  ASSERT_OK_AND_ASSIGN(auto disk, DiskTier::Open(Options()));
  auto c = RandomChunk(testing::InfoForBytes(100000), 1);
  c[kChunkHeaderBytes + 500] ^= 0x40;  // header intact, payload no longer matches its checksum
  ASSERT_OK(disk->Write(KeyFor(1), c));
  std::vector<uint8_t> buf(c.size(), 0xEE);
  EXPECT_THAT(disk->Read(KeyFor(1), MutableByteSpan(buf)),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("dropped")));
  EXPECT_EQ(buf, std::vector<uint8_t>(c.size(), 0xEE));  // nothing written to the caller
  EXPECT_EQ(disk->checksum_failures(), 1u);
  EXPECT_THAT(disk->Read(KeyFor(1), MutableByteSpan(buf)), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_EQ(disk->chunk_count(), 0u);
}

TEST_F(DiskTierTest, BitRotInABlobFileIsDetected) {
  const auto c = RandomChunk(testing::InfoForBytes(300000), 2);
  {
    ASSERT_OK_AND_ASSIGN(auto disk, DiskTier::Open(Options()));
    ASSERT_OK(disk->Write(KeyFor(2), c));
  }
  // Flip one byte in the middle of the chunk's bytes inside the blob file.
  int flipped = 0;
  for (const auto& f : std::filesystem::directory_iterator(Options().path)) {
    if (f.path().extension() != ".blob") continue;
    std::fstream io(f.path(), std::ios::in | std::ios::out | std::ios::binary);
    std::string all((std::istreambuf_iterator<char>(io)), {});
    const size_t at = all.find(std::string(reinterpret_cast<const char*>(c.data()) + 1000, 64));
    ASSERT_NE(at, std::string::npos);
    io.seekp(static_cast<std::streamoff>(at + 10));
    io.put(static_cast<char>(all[at + 10] ^ 0x01));
    ++flipped;
  }
  ASSERT_EQ(flipped, 1);
  ASSERT_OK_AND_ASSIGN(auto disk, DiskTier::Open(Options()));
  std::vector<uint8_t> buf(c.size());
  EXPECT_THAT(disk->Read(KeyFor(2), MutableByteSpan(buf)), StatusIs(absl::StatusCode::kDataLoss));
  EXPECT_EQ(disk->checksum_failures(), 1u);
  EXPECT_THAT(disk->Read(KeyFor(2), MutableByteSpan(buf)), StatusIs(absl::StatusCode::kNotFound));
}

TEST_F(DiskTierTest, ReadManyMatchesReadForEveryKey) {
  ASSERT_OK_AND_ASSIGN(auto disk, DiskTier::Open(Options()));
  std::vector<std::vector<uint8_t>> want;
  std::vector<ChunkKey> keys;
  for (int i = 0; i < 9; ++i) {
    want.push_back(RandomChunk(testing::InfoForBytes(40000 + 91000 * i), 100 + i));
    keys.push_back(KeyFor(100 + i));
    if (i != 4) ASSERT_OK(disk->Write(keys.back(), want.back()));  // key 4 is missing
  }
  for (int depth : {1, 3, 16}) {
    std::vector<std::vector<uint8_t>> bufs(keys.size(), std::vector<uint8_t>(1 << 20, 0xAB));
    std::vector<MutableByteSpan> dsts(bufs.begin(), bufs.end());
    auto got = disk->ReadMany(keys, dsts, depth);
    ASSERT_EQ(got.size(), keys.size());
    for (size_t i = 0; i < keys.size(); ++i) {
      if (i == 4) {
        EXPECT_THAT(got[i], StatusIs(absl::StatusCode::kNotFound));
        continue;
      }
      ASSERT_TRUE(got[i].ok()) << got[i].status();
      ASSERT_EQ(*got[i], want[i].size());
      EXPECT_EQ(std::memcmp(bufs[i].data(), want[i].data(), want[i].size()), 0) << i;
    }
  }
  std::vector<uint8_t> one(10);
  auto mismatched = disk->ReadMany(keys, {MutableByteSpan(one)});
  EXPECT_THAT(mismatched[0], StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("differ")));
}

TEST_F(DiskTierTest, BadOptions) {
  EXPECT_THAT(DiskTier::Open({.path = ""}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(DiskTier::Open({.path = dir_.Sub("x"), .capacity_bytes = 0}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(DiskTier::Open({.path = "/proc/kvdn-cannot-create"}),
              StatusIs(absl::StatusCode::kUnavailable));
}

TEST_F(DiskTierTest, SecondOpenOfTheSameDirectoryFails) {
  ASSERT_OK_AND_ASSIGN(auto disk, DiskTier::Open(Options()));
  EXPECT_THAT(DiskTier::Open(Options()), StatusIs(absl::StatusCode::kUnavailable));
}

}  // namespace
}  // namespace kvdn::storage
