#include "kvdn/storage/tiered_store.h"

#include <atomic>
#include <cstring>
#include <thread>
#include <vector>

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

constexpr uint64_t kMiB = 1 << 20;

class TieredStoreTest : public ::testing::Test {
 protected:
  TieredStoreOptions Options(uint64_t host_bytes, bool with_disk,
                             uint64_t disk_bytes = 1ull << 30) {
    TieredStoreOptions o;
    o.host.capacity_bytes = host_bytes;
    o.host.watermarks = {.high_watermark = 0.9, .low_watermark = 0.6};
    if (with_disk) {
      o.disk = DiskTierOptions{.path = dir_.Sub("disk"), .capacity_bytes = disk_bytes};
    }
    o.maintenance_interval = absl::ZeroDuration();  // tests drive maintenance
    o.clock = &clock_;
    return o;
  }
  static std::vector<uint8_t> Chunk(uint64_t seed, uint64_t bytes = kMiB) {
    return RandomChunk(testing::InfoForBytes(bytes), seed);
  }
  static void ExpectGet(TieredStore& s, const ChunkKey& k, const std::vector<uint8_t>& want) {
    std::vector<uint8_t> got(want.size());
    auto n = s.Get(k, MutableByteSpan(got));
    ASSERT_TRUE(n.ok()) << n.status();
    ASSERT_EQ(*n, want.size());
    EXPECT_EQ(std::memcmp(got.data(), want.data(), want.size()), 0);
  }
  // Puts 20 1-MiB chunks (keys 0..19) into an 8-MiB host tier with a disk tier, running
  // maintenance after each, so the oldest are demoted to disk.
  static void PutPastTheHostWatermark(TieredStore& s, std::vector<std::vector<uint8_t>>* chunks) {
    for (int i = 0; i < 20; ++i) {
      chunks->push_back(Chunk(i));
      ASSERT_OK(s.Put(KeyFor(i), chunks->back()));
      s.RunMaintenance();
    }
  }
  testing::TempDir dir_;
  FakeClock clock_;
};

TEST_F(TieredStoreTest, PutGetRoundTripIsBitIdentical) {
  ASSERT_OK_AND_ASSIGN(auto s, TieredStore::Open(Options(64 * kMiB, false)));
  for (int i = 0; i < 10; ++i) {
    const auto c = Chunk(i, 100000 + 333333 * i);
    ASSERT_OK(s->Put(KeyFor(i), c));
    ExpectGet(*s, KeyFor(i), c);
  }
  const StoreStats st = s->Stats();
  EXPECT_EQ(st.tier(TierKind::kHost).chunks, 10u);
  EXPECT_EQ(st.tier(TierKind::kHost).hits, 10u);
  EXPECT_EQ(st.commits, 10u);
  EXPECT_FALSE(st.tier(TierKind::kDisk).present);
}

TEST_F(TieredStoreTest, TwoPhasePut) {
  ASSERT_OK_AND_ASSIGN(auto s, TieredStore::Open(Options(16 * kMiB, false)));
  const auto c = Chunk(1);
  ASSERT_OK_AND_ASSIGN(Reservation r, s->Reserve(KeyFor(1), c.size()));
  EXPECT_EQ(r.buffer.size(), c.size());
  // Invisible until committed.
  EXPECT_EQ(s->Lookup({KeyFor(1)}).matched, 0u);
  EXPECT_THAT(s->Reserve(KeyFor(1), c.size()),
              StatusIs(absl::StatusCode::kAborted, HasSubstr("being written")));
  std::memcpy(r.buffer.data(), c.data(), c.size());
  const uint64_t checksum = DecodeChunkHeader(c)->payload_checksum;
  ASSERT_OK(s->Commit(r.id, checksum));
  EXPECT_EQ(s->Lookup({KeyFor(1)}).matched, 1u);
  ExpectGet(*s, KeyFor(1), c);
  EXPECT_THAT(s->Reserve(KeyFor(1), c.size()),
              StatusIs(absl::StatusCode::kAlreadyExists, HasSubstr("is stored")));
  EXPECT_THAT(s->Commit(r.id, checksum), StatusIs(absl::StatusCode::kNotFound));
}

TEST_F(TieredStoreTest, CommitRefusesCorruptOrMismatchedChunksAndFreesTheMemory) {
  ASSERT_OK_AND_ASSIGN(auto s, TieredStore::Open(Options(16 * kMiB, false)));
  const auto c = Chunk(2);
  const uint64_t checksum = DecodeChunkHeader(c)->payload_checksum;
  // Payload corrupted in transit.
  ASSERT_OK_AND_ASSIGN(Reservation r1, s->Reserve(KeyFor(2), c.size()));
  std::memcpy(r1.buffer.data(), c.data(), c.size());
  r1.buffer[c.size() / 2] ^= 1;
  EXPECT_THAT(s->Commit(r1.id, checksum),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("payload checksum mismatch")));
  // Writer's checksum differs from the header's.
  ASSERT_OK_AND_ASSIGN(Reservation r2, s->Reserve(KeyFor(2), c.size()));
  std::memcpy(r2.buffer.data(), c.data(), c.size());
  EXPECT_THAT(s->Commit(r2.id, checksum + 1),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("does not match")));
  // Not a chunk at all / wrong size for the reservation.
  ASSERT_OK_AND_ASSIGN(Reservation r3, s->Reserve(KeyFor(2), c.size() + 64));
  std::memcpy(r3.buffer.data(), c.data(), c.size());
  EXPECT_THAT(s->Commit(r3.id, checksum),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("trailing")));
  EXPECT_EQ(s->Lookup({KeyFor(2)}).matched, 0u);
  const StoreStats st = s->Stats();
  EXPECT_EQ(st.commit_failures, 3u);
  EXPECT_EQ(st.tier(TierKind::kHost).used_bytes, 0u);
  EXPECT_EQ(st.reservations_active, 0u);
  // Put of a corrupt chunk is refused too.
  auto bad = c;
  bad[kChunkHeaderBytes + 7] ^= 2;
  EXPECT_THAT(s->Put(KeyFor(2), bad), StatusIs(absl::StatusCode::kDataLoss));
  bad[0] = 0;
  EXPECT_THAT(s->Put(KeyFor(2), bad), StatusIs(absl::StatusCode::kInvalidArgument));
  ASSERT_OK(s->Put(KeyFor(2), c));
  ExpectGet(*s, KeyFor(2), c);
}

// CommitHashed: the writer's own hash of the payload stands in for Commit's pass; a hash that is
// not the header's checksum is DATA_LOSS with the memory freed, a matching one publishes the
// chunk, and an unknown reservation is NOT_FOUND as with Commit.
TEST_F(TieredStoreTest, CommitHashedTrustsOnlyAHashThatMatchesTheHeader) {
  ASSERT_OK_AND_ASSIGN(auto s, TieredStore::Open(Options(16 * kMiB, false)));
  const auto c = Chunk(3);
  const uint64_t checksum = DecodeChunkHeader(c)->payload_checksum;
  const uint64_t hash = Xxh3_64(ByteSpan(c).subspan(kChunkHeaderBytes));
  ASSERT_EQ(hash, checksum);
  ASSERT_OK_AND_ASSIGN(Reservation r1, s->Reserve(KeyFor(3), c.size()));
  std::memcpy(r1.buffer.data(), c.data(), c.size());
  EXPECT_THAT(s->CommitHashed(r1.id, checksum, hash ^ 1),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("its header says")));
  EXPECT_EQ(s->Lookup({KeyFor(3)}).matched, 0u);
  StoreStats st = s->Stats();
  EXPECT_EQ(st.commit_failures, 1u);
  EXPECT_EQ(st.tier(TierKind::kHost).checksum_failures, 1u);
  EXPECT_EQ(st.tier(TierKind::kHost).used_bytes, 0u);
  EXPECT_EQ(st.reservations_active, 0u);
  EXPECT_THAT(s->CommitHashed(r1.id, checksum, hash), StatusIs(absl::StatusCode::kNotFound));
  // A header that is not the one the writer's checksum names is still refused.
  ASSERT_OK_AND_ASSIGN(Reservation r2, s->Reserve(KeyFor(3), c.size()));
  std::memcpy(r2.buffer.data(), c.data(), c.size());
  EXPECT_THAT(s->CommitHashed(r2.id, checksum + 1, checksum + 1),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("does not match")));
  ASSERT_OK_AND_ASSIGN(Reservation r3, s->Reserve(KeyFor(3), c.size()));
  std::memcpy(r3.buffer.data(), c.data(), c.size());
  ChunkKey key;
  ASSERT_OK(s->CommitHashed(r3.id, checksum, hash, &key));
  EXPECT_EQ(key, KeyFor(3));
  ExpectGet(*s, KeyFor(3), c);
}

TEST_F(TieredStoreTest, BadReservations) {
  ASSERT_OK_AND_ASSIGN(auto s, TieredStore::Open(Options(4 * kMiB, false)));
  EXPECT_THAT(s->Reserve(KeyFor(1), 10), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(s->Reserve(KeyFor(1), 2ull << 30), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(s->Reserve(KeyFor(1, "bad/ns"), kMiB), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(s->Reserve(KeyFor(1), 5 * kMiB), StatusIs(absl::StatusCode::kResourceExhausted));
  EXPECT_THAT(s->Commit(12345, 0), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(s->Abort(12345), StatusIs(absl::StatusCode::kNotFound));
}

TEST_F(TieredStoreTest, ReservationsExpire) {
  ASSERT_OK_AND_ASSIGN(auto s, TieredStore::Open(Options(16 * kMiB, false)));
  const auto c = Chunk(3);
  ASSERT_OK_AND_ASSIGN(Reservation r, s->Reserve(KeyFor(3), c.size()));
  std::memcpy(r.buffer.data(), c.data(), c.size());
  clock_.Advance(absl::Seconds(31));
  EXPECT_THAT(s->Commit(r.id, DecodeChunkHeader(c)->payload_checksum),
              StatusIs(absl::StatusCode::kAborted, HasSubstr("expired")));
  // Expired by maintenance, too, and the key is free again.
  ASSERT_OK_AND_ASSIGN(Reservation r2, s->Reserve(KeyFor(3), c.size()));
  clock_.Advance(absl::Seconds(31));
  s->RunMaintenance();
  EXPECT_EQ(s->Stats().tier(TierKind::kHost).used_bytes, 0u);
  EXPECT_EQ(s->Stats().reservations_expired, 2u);
  EXPECT_THAT(s->Commit(r2.id, 0), StatusIs(absl::StatusCode::kAborted));
  ASSERT_OK(s->Put(KeyFor(3), c));
}

TEST_F(TieredStoreTest, LookupFindsTheLongestPrefixPerNamespace) {
  ASSERT_OK_AND_ASSIGN(auto s, TieredStore::Open(Options(64 * kMiB, false)));
  const ModelSpec spec{"m", 4, 8, 128, Dtype::kBFloat16, 16};
  std::vector<int32_t> tokens(16 * 6);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>(i * 7);
  ASSERT_OK_AND_ASSIGN(auto keys, ChunkKeysForTokens("tenant-a", spec, tokens));
  for (int i : {0, 1, 2, 4}) ASSERT_OK(s->Put(keys[i], Chunk(i, 100000)));
  const LookupResult r = s->Lookup(keys);
  EXPECT_EQ(r.matched, 3u);
  EXPECT_EQ(r.tiers, std::vector<TierKind>(3, TierKind::kHost));
  ASSERT_OK_AND_ASSIGN(auto other, ChunkKeysForTokens("tenant-b", spec, tokens));
  EXPECT_EQ(s->Lookup(other).matched, 0u);
  EXPECT_EQ(s->Lookup({}).matched, 0u);
}

TEST_F(TieredStoreTest, LeasesPinChunksAndExpire) {
  // Room for 4 chunks of 1 MiB; each Put beyond evicts the least recently used unleased chunk.
  ASSERT_OK_AND_ASSIGN(auto s, TieredStore::Open(Options(4 * kMiB + 64 * 1024, false)));
  const auto c0 = Chunk(0);
  ASSERT_OK(s->Put(KeyFor(0), c0));
  ASSERT_OK_AND_ASSIGN(Lease l, s->Acquire(KeyFor(0), {.ttl = absl::Seconds(10)}));
  EXPECT_EQ(l.tier, TierKind::kHost);
  EXPECT_EQ(std::memcmp(l.host_bytes.data(), c0.data(), c0.size()), 0);
  for (int i = 1; i < 12; ++i) ASSERT_OK(s->Put(KeyFor(i), Chunk(i)));
  // Chunk 0 survived eleven evicting puts because it is leased, and its bytes are intact.
  EXPECT_EQ(std::memcmp(l.host_bytes.data(), c0.data(), c0.size()), 0);
  EXPECT_EQ(s->Lookup({KeyFor(0)}).matched, 1u);
  EXPECT_EQ(s->Lookup({KeyFor(1)}).matched, 0u);  // no disk tier: evicted means dropped
  EXPECT_GT(s->Stats().tier(TierKind::kHost).evictions, 0u);
  ASSERT_OK(s->Release(l.id));
  EXPECT_THAT(s->Release(l.id), StatusIs(absl::StatusCode::kNotFound));

  ASSERT_OK_AND_ASSIGN(Lease l2, s->Acquire(KeyFor(0), {.ttl = absl::Seconds(5)}));
  clock_.Advance(absl::Seconds(6));
  s->RunMaintenance();
  EXPECT_EQ(s->Stats().leases_expired, 1u);
  EXPECT_THAT(s->Release(l2.id), StatusIs(absl::StatusCode::kAborted, HasSubstr("expired")));
  // An expired lease no longer pins.
  for (int i = 20; i < 26; ++i) ASSERT_OK(s->Put(KeyFor(i), Chunk(i)));
  EXPECT_EQ(s->Lookup({KeyFor(0)}).matched, 0u);
}

TEST_F(TieredStoreTest, EverythingLeasedMeansResourceExhausted) {
  ASSERT_OK_AND_ASSIGN(auto s, TieredStore::Open(Options(2 * kMiB + 64 * 1024, false)));
  ASSERT_OK(s->Put(KeyFor(0), Chunk(0)));
  ASSERT_OK(s->Put(KeyFor(1), Chunk(1)));
  ASSERT_OK_AND_ASSIGN(Lease a, s->Acquire(KeyFor(0)));
  ASSERT_OK_AND_ASSIGN(Lease b, s->Acquire(KeyFor(1)));
  EXPECT_THAT(s->Put(KeyFor(2), Chunk(2)),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("leased")));
  ASSERT_OK(s->Release(a.id));
  ASSERT_OK(s->Put(KeyFor(2), Chunk(2)));
  ASSERT_OK(s->Release(b.id));
}

TEST_F(TieredStoreTest, DeleteOfALeasedChunkHidesItAndFreesAtRelease) {
  ASSERT_OK_AND_ASSIGN(auto s, TieredStore::Open(Options(16 * kMiB, true)));
  const auto c = Chunk(5);
  ASSERT_OK(s->Put(KeyFor(5), c));
  ASSERT_OK_AND_ASSIGN(Lease l, s->Acquire(KeyFor(5)));
  ASSERT_OK(s->Delete(KeyFor(5)));
  EXPECT_EQ(s->Lookup({KeyFor(5)}).matched, 0u);
  EXPECT_THAT(s->Acquire(KeyFor(5)), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(s->Delete(KeyFor(5)), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(s->Reserve(KeyFor(5), c.size()), StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_EQ(std::memcmp(l.host_bytes.data(), c.data(), c.size()), 0);  // still intact
  ASSERT_OK(s->Release(l.id));
  EXPECT_EQ(s->Stats().tier(TierKind::kHost).used_bytes, 0u);
  ASSERT_OK(s->Put(KeyFor(5), c));
}

TEST_F(TieredStoreTest, WatermarkEvictionDemotesToDiskAndHitsPromote) {
  ASSERT_OK_AND_ASSIGN(auto s, TieredStore::Open(Options(8 * kMiB, true)));
  std::vector<std::vector<uint8_t>> chunks;
  ASSERT_NO_FATAL_FAILURE(PutPastTheHostWatermark(*s, &chunks));
  StoreStats st = s->Stats();
  EXPECT_LE(st.tier(TierKind::kHost).used_bytes, 8 * kMiB * 9 / 10);
  EXPECT_GT(st.tier(TierKind::kHost).demotions, 0u);
  EXPECT_GT(st.tier(TierKind::kDisk).chunks, 0u);
  // Every chunk is still stored, in host memory or on disk, and reads back bit-identical.
  const LookupResult r = [&] {
    std::vector<ChunkKey> keys;
    for (int i = 0; i < 20; ++i) keys.push_back(KeyFor(i));
    return s->Lookup(keys);
  }();
  // Lookup stops at the first absent key; all are present.
  EXPECT_EQ(r.matched, 20u);
  EXPECT_EQ(r.tiers[0], TierKind::kDisk);
  EXPECT_EQ(r.tiers[19], TierKind::kHost);
  ExpectGet(*s, KeyFor(0), chunks[0]);  // a disk hit, promoted
  st = s->Stats();
  EXPECT_EQ(st.tier(TierKind::kDisk).hits, 1u);
  EXPECT_EQ(st.tier(TierKind::kHost).misses, 1u);
  EXPECT_EQ(st.tier(TierKind::kHost).promotions, 1u);
  EXPECT_EQ(s->Lookup({KeyFor(0)}).tiers[0], TierKind::kHost);
  for (int i = 0; i < 20; ++i) ExpectGet(*s, KeyFor(i), chunks[i]);
}

// One tenant writing far more than the host tier holds: with namespace_host_share it pushes out
// its own chunks (to disk), never the other tenant's; without it, the other's go first (they
// are the least recently used). Every chunk reads back identical either way.
TEST_F(TieredStoreTest, ANamespacePastItsHostShareEvictsItsOwnChunks) {
  for (double share : {1.0, 0.5}) {
    SCOPED_TRACE(share);
    testing::TempDir dir;
    TieredStoreOptions o = Options(16 * kMiB, true);
    o.disk->path = dir.Sub("disk");
    o.namespace_host_share = share;
    ASSERT_OK_AND_ASSIGN(auto s, TieredStore::Open(o));
    std::vector<std::vector<uint8_t>> quiet, noisy;
    for (int i = 0; i < 4; ++i) {
      quiet.push_back(Chunk(100 + i));
      ASSERT_OK(s->Put(KeyFor(i, "quiet"), quiet.back()));
    }
    for (int i = 0; i < 40; ++i) {
      noisy.push_back(Chunk(200 + i));
      ASSERT_OK(s->Put(KeyFor(i, "noisy"), noisy.back()));
      s->RunMaintenance();
      if (share < 1) {
        EXPECT_LE(s->NamespaceBytes(TierKind::kHost, "noisy"), 8 * kMiB);
      }
    }
    int quiet_in_host = 0;
    for (int i = 0; i < 4; ++i) {
      quiet_in_host += s->Where(KeyFor(i, "quiet")) == TierKind::kHost ? 1 : 0;
    }
    if (share < 1) {
      EXPECT_EQ(quiet_in_host, 4);  // untouched by the noisy tenant
      EXPECT_GT(s->NamespaceBytes(TierKind::kHost, "noisy"), 4 * kMiB);  // it still uses its share
      EXPECT_EQ(s->NamespaceBytes(TierKind::kHost, "quiet"), 4 * (quiet[0].size()));
    } else {
      EXPECT_EQ(quiet_in_host, 0);  // the control: global LRU demoted them all
      EXPECT_EQ(s->NamespaceBytes(TierKind::kHost, "noisy"), 0u);  // not tracked
    }
    for (int i = 0; i < 4; ++i) ExpectGet(*s, KeyFor(i, "quiet"), quiet[i]);
    for (int i = 0; i < 40; ++i) ExpectGet(*s, KeyFor(i, "noisy"), noisy[i]);
  }
}

// Past its share a namespace gives up its own least recently used chunk: a read makes a chunk
// recent in its namespace's list as in the tier's (the lists stay in one order throughout).
TEST_F(TieredStoreTest, ANamespacePastItsShareEvictsItsOwnLeastRecentlyUsedChunk) {
  testing::TempDir dir;
  TieredStoreOptions o = Options(16 * kMiB, true);
  o.disk->path = dir.Sub("disk");
  o.namespace_host_share = 0.5;  // 8 MiB: 7 chunks of 1 MiB and their headers
  ASSERT_OK_AND_ASSIGN(auto s, TieredStore::Open(o));
  std::vector<std::vector<uint8_t>> mine;
  for (int i = 0; i < 7; ++i) {
    mine.push_back(Chunk(300 + i));
    ASSERT_OK(s->Put(KeyFor(i, "mine"), mine.back()));
    ASSERT_OK(s->Put(KeyFor(i, "other"), Chunk(400 + i)));  // interleaved in the tier's list
    ASSERT_OK(s->CheckNamespaceListsForTest());
  }
  ExpectGet(*s, KeyFor(0, "mine"), mine[0]);  // chunk 0 is now its namespace's most recent
  ASSERT_OK(s->CheckNamespaceListsForTest());
  mine.push_back(Chunk(307));
  ASSERT_OK(s->Put(KeyFor(7, "mine"), mine.back()));  // past the share: one of its own goes
  ASSERT_OK(s->CheckNamespaceListsForTest());
  EXPECT_EQ(s->Where(KeyFor(0, "mine")), TierKind::kHost);
  EXPECT_EQ(s->Where(KeyFor(1, "mine")), TierKind::kDisk);  // its least recently used
  for (int i = 2; i < 8; ++i) EXPECT_EQ(s->Where(KeyFor(i, "mine")), TierKind::kHost) << i;
  for (int i = 0; i < 7; ++i) EXPECT_EQ(s->Where(KeyFor(i, "other")), TierKind::kHost) << i;
  for (int i = 0; i < 8; ++i) ExpectGet(*s, KeyFor(i, "mine"), mine[i]);
  ASSERT_OK(s->CheckNamespaceListsForTest());
}

// Chunks on their way into the host tier (promotions from disk, eight at once) count in their
// namespace's share while they move, so however many move together the namespace never holds
// more than its share of the tier's memory, nor ends up with more linked.
TEST_F(TieredStoreTest, ChunksMovingIntoTheHostTierCountInTheirNamespacesShare) {
  testing::TempDir dir;
  TieredStoreOptions o = Options(32 * kMiB, true);
  o.disk->path = dir.Sub("disk");
  o.namespace_host_share = 0.25;  // 8 MiB: 7 chunks of 1 MiB with their headers and alignment
  ASSERT_OK_AND_ASSIGN(auto s, TieredStore::Open(o));
  constexpr int kChunks = 32;
  std::vector<std::vector<uint8_t>> chunks;
  for (int i = 0; i < kChunks; ++i) {
    chunks.push_back(Chunk(500 + i));
    ASSERT_OK(s->Put(KeyFor(i, "t"), chunks.back()));  // most of them end up on disk
  }
  const uint64_t share = 8 * kMiB;
  std::atomic<bool> done{false};
  std::atomic<uint64_t> max_used{0};
  std::thread monitor([&] {
    while (!done.load()) {  // the tier's memory in use: all of it is this namespace's
      const uint64_t used = s->Stats().tier(TierKind::kHost).used_bytes;
      uint64_t seen = max_used.load();
      while (used > seen && !max_used.compare_exchange_weak(seen, used)) {
      }
    }
  });
  std::vector<std::thread> readers;
  std::atomic<int> bad{0};
  for (int t = 0; t < 8; ++t) {
    readers.emplace_back([&, t] {
      std::vector<uint8_t> buf(2 * kMiB);
      for (int round = 0; round < 10; ++round) {
        for (int i = (t * 5 + round) % kChunks, n = 0; n < 8; ++n, i = (i + 1) % kChunks) {
          auto got = s->Get(KeyFor(i, "t"), MutableByteSpan(buf));
          if (!got.ok() && !absl::IsUnavailable(got.status()) &&
              !absl::IsResourceExhausted(got.status())) {
            ++bad;
          } else if (got.ok() && std::memcmp(buf.data(), chunks[i].data(), *got) != 0) {
            ++bad;
          }
        }
      }
    });
  }
  for (auto& r : readers) r.join();
  done = true;
  monitor.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_LE(max_used.load(), share) << "the namespace held more than its share while moving";
  EXPECT_LE(s->NamespaceBytes(TierKind::kHost, "t"), share);
  EXPECT_EQ(s->NamespaceBytes(TierKind::kHost, "t"), s->Stats().tier(TierKind::kHost).bytes);
  EXPECT_OK(s->CheckNamespaceListsForTest());
}

// The disk tier's share: a tenant whose chunks flow through the host tier to disk, far past the
// disk tier's size, evicts its own disk chunks, never the other tenant's; without the share the
// other's go first (they are the least recently used there). The bytes counted match the tier.
TEST_F(TieredStoreTest, ANamespacePastItsDiskShareEvictsItsOwnDiskChunks) {
  for (double share : {1.0, 0.5}) {
    SCOPED_TRACE(share);
    testing::TempDir dir;
    TieredStoreOptions o = Options(4 * kMiB, true, /*disk_bytes=*/16 * kMiB);
    o.disk->path = dir.Sub("disk");
    o.namespace_disk_share = share;
    ASSERT_OK_AND_ASSIGN(auto s, TieredStore::Open(o));
    std::vector<std::vector<uint8_t>> quiet, noisy;
    for (int i = 0; i < 4; ++i) {
      quiet.push_back(Chunk(600 + i));
      ASSERT_OK(s->Put(KeyFor(i, "quiet"), quiet.back()));
    }
    ASSERT_OK(s->PersistToDisk().status());  // the quiet tenant's chunks are on disk
    for (int i = 0; i < 60; ++i) {
      noisy.push_back(Chunk(700 + i));
      ASSERT_OK(s->Put(KeyFor(i, "noisy"), noisy.back()));
      s->RunMaintenance();
      if (share < 1) {
        EXPECT_LE(s->NamespaceBytes(TierKind::kDisk, "noisy"), 8 * kMiB);
      }
    }
    ASSERT_OK(s->CheckNamespaceListsForTest());
    std::vector<uint8_t> buf(2 * kMiB);
    int quiet_left = 0;
    for (int i = 0; i < 4; ++i) {
      auto got = s->Get(KeyFor(i, "quiet"), MutableByteSpan(buf));
      if (got.ok()) {
        ++quiet_left;
        EXPECT_EQ(std::memcmp(buf.data(), quiet[i].data(), quiet[i].size()), 0);
      } else {
        EXPECT_TRUE(absl::IsNotFound(got.status())) << got.status();
      }
    }
    if (share < 1) {
      EXPECT_EQ(quiet_left, 4);  // untouched by the noisy tenant
      EXPECT_GT(s->NamespaceBytes(TierKind::kDisk, "noisy"),
                4 * kMiB);  // which still uses its share
      EXPECT_EQ(
          s->NamespaceBytes(TierKind::kDisk, "noisy") + s->NamespaceBytes(TierKind::kDisk, "quiet"),
          s->Stats().tier(TierKind::kDisk).bytes);
    } else {
      EXPECT_EQ(quiet_left, 0);  // the control: the disk LRU dropped them
      EXPECT_EQ(s->NamespaceBytes(TierKind::kDisk, "noisy"), 0u);  // not tracked
    }
  }
}

TEST_F(TieredStoreTest, ANamespaceShareRefusesWhatCannotFitPrecisely) {
  TieredStoreOptions o = Options(8 * kMiB, false);
  o.namespace_host_share = 0.25;  // 2 MiB
  ASSERT_OK_AND_ASSIGN(auto s, TieredStore::Open(o));
  // A chunk larger than the share.
  EXPECT_THAT(s->Put(KeyFor(1, "t"), Chunk(1, 3 * kMiB)),
              StatusIs(absl::StatusCode::kResourceExhausted,
                       HasSubstr("larger than namespace \"t\"'s share of the host tier")));
  // The share full of leased chunks: the next write of that namespace is refused, another's is not.
  const auto c = Chunk(2, kMiB - 4096);
  ASSERT_OK(s->Put(KeyFor(2, "t"), c));
  ASSERT_OK(s->Put(KeyFor(3, "t"), c));
  ASSERT_OK_AND_ASSIGN(Lease l2, s->Acquire(KeyFor(2, "t")));
  ASSERT_OK_AND_ASSIGN(Lease l3, s->Acquire(KeyFor(3, "t")));
  EXPECT_THAT(s->Put(KeyFor(4, "t"), c),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("namespace \"t\" holds")));
  EXPECT_OK(s->Put(KeyFor(4, "u"), c));
  // Released, its oldest chunk goes (no disk tier: dropped) to make room.
  ASSERT_OK(s->Release(l2.id));
  ASSERT_OK(s->Release(l3.id));
  EXPECT_OK(s->Put(KeyFor(4, "t"), c));
  EXPECT_FALSE(s->Where(KeyFor(2, "t")).has_value());
  EXPECT_TRUE(s->Where(KeyFor(3, "t")).has_value());
  // Reservations count: an aborted one gives its bytes back.
  ASSERT_OK_AND_ASSIGN(Reservation r, s->Reserve(KeyFor(5, "v"), kMiB));
  EXPECT_EQ(s->NamespaceBytes(TierKind::kHost, "v"), kMiB);
  ASSERT_OK(s->Abort(r.id));
  EXPECT_EQ(s->NamespaceBytes(TierKind::kHost, "v"), 0u);
  o.namespace_host_share = 0;
  EXPECT_THAT(TieredStore::Open(o),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("namespace_host_share 0")));
}

TEST_F(TieredStoreTest, NonBlockingAcquireServesMemoryAndRefusesDiskReads) {
  ASSERT_OK_AND_ASSIGN(auto s, TieredStore::Open(Options(8 * kMiB, true)));
  std::vector<std::vector<uint8_t>> chunks;
  ASSERT_NO_FATAL_FAILURE(PutPastTheHostWatermark(*s, &chunks));
  ASSERT_EQ(s->Lookup({KeyFor(0)}).tiers[0], TierKind::kDisk);
  AcquireOptions nb;
  nb.may_block = false;
  const StoreStats before = s->Stats();
  // On disk only: would block, and nothing is counted or promoted.
  auto l = s->Acquire(KeyFor(0), nb);
  EXPECT_TRUE(IsWouldBlock(l.status())) << l.status();
  EXPECT_EQ(s->Stats().tier(TierKind::kDisk).hits, before.tier(TierKind::kDisk).hits);
  EXPECT_EQ(s->Lookup({KeyFor(0)}).tiers[0], TierKind::kDisk);
  // In host memory: leased at once, bit-identical.
  ASSERT_OK_AND_ASSIGN(Lease h, s->Acquire(KeyFor(19), nb));
  ASSERT_EQ(h.size, chunks[19].size());
  EXPECT_EQ(std::memcmp(h.host_bytes.data(), chunks[19].data(), h.size), 0);
  ASSERT_OK(s->Release(h.id));
  // Absent: NOT_FOUND as usual, not "would block".
  auto missing = s->Acquire(KeyFor(99), nb);
  EXPECT_THAT(missing.status(), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_FALSE(IsWouldBlock(missing.status()));
  // The blocking call then promotes it.
  ExpectGet(*s, KeyFor(0), chunks[0]);
  ASSERT_OK_AND_ASSIGN(Lease p, s->Acquire(KeyFor(0), nb));
  ASSERT_OK(s->Release(p.id));
}

TEST_F(TieredStoreTest, NonBlockingReserveEvictsOnlyWhatNeedsNoDiskWrite) {
  const uint64_t two_mib_chunk = Chunk(0, 2 * kMiB).size();
  for (bool with_disk : {true, false}) {
    SCOPED_TRACE(with_disk ? "with a disk tier" : "without a disk tier");
    ASSERT_OK_AND_ASSIGN(auto s, TieredStore::Open(Options(4 * kMiB + 256 * 1024, with_disk)));
    for (int i = 0; i < 3; ++i) ASSERT_OK(s->Put(KeyFor(i), Chunk(i)));
    const StoreStats before = s->Stats();
    ReserveOptions nb;
    nb.may_block = false;
    auto r = s->Reserve(KeyFor(7), two_mib_chunk, nb);
    if (with_disk) {
      // Room means demoting a chunk to disk first: would block, and nothing moved.
      EXPECT_TRUE(IsWouldBlock(r.status())) << r.status();
      const StoreStats after = s->Stats();
      EXPECT_EQ(after.tier(TierKind::kHost).evictions, before.tier(TierKind::kHost).evictions);
      EXPECT_EQ(after.tier(TierKind::kHost).chunks, 3u);
      EXPECT_EQ(s->Lookup({KeyFor(0), KeyFor(1), KeyFor(2)}).matched, 3u);
      // The blocking call demotes and reserves.
      r = s->Reserve(KeyFor(7), two_mib_chunk);
      ASSERT_OK(r.status());
      EXPECT_GT(s->Stats().tier(TierKind::kHost).demotions, 0u);
    } else {
      // Eviction drops chunks (no disk to write): done inline.
      ASSERT_OK(r.status());
      EXPECT_GT(s->Stats().tier(TierKind::kHost).evictions, 0u);
    }
    const std::vector<uint8_t> c = Chunk(70, 2 * kMiB);
    ASSERT_EQ(c.size(), two_mib_chunk);
    std::memcpy(r->buffer.data(), c.data(), c.size());
    ASSERT_OK_AND_ASSIGN(ChunkView v, DecodeChunk(c, false));
    ASSERT_OK(s->Commit(r->id, v.header.payload_checksum));
    ExpectGet(*s, KeyFor(7), c);
    // A key already stored is ALREADY_EXISTS, not "would block".
    auto again = s->Reserve(KeyFor(7), two_mib_chunk, nb);
    EXPECT_THAT(again.status(), StatusIs(absl::StatusCode::kAlreadyExists));
  }
}

TEST_F(TieredStoreTest, DiskWatermarkDropsTheOldest) {
  ASSERT_OK_AND_ASSIGN(auto s, TieredStore::Open(Options(4 * kMiB, true, 6 * kMiB)));
  for (int i = 0; i < 16; ++i) {
    ASSERT_OK(s->Put(KeyFor(i), Chunk(i)));
    s->RunMaintenance();
  }
  const StoreStats st = s->Stats();
  EXPECT_LE(st.tier(TierKind::kDisk).used_bytes, 6 * kMiB);
  EXPECT_GT(st.tier(TierKind::kDisk).evictions, 0u);
  EXPECT_EQ(s->Lookup({KeyFor(0)}).matched, 0u);
  EXPECT_EQ(s->Lookup({KeyFor(15)}).matched, 1u);
}

TEST_F(TieredStoreTest, RestartKeepsDiskChunks) {
  std::vector<std::vector<uint8_t>> chunks;
  {
    ASSERT_OK_AND_ASSIGN(auto s, TieredStore::Open(Options(4 * kMiB, true)));
    for (int i = 0; i < 10; ++i) {
      chunks.push_back(Chunk(i));
      ASSERT_OK(s->Put(KeyFor(i), chunks.back()));
      s->RunMaintenance();
    }
  }
  ASSERT_OK_AND_ASSIGN(auto s, TieredStore::Open(Options(4 * kMiB, true)));
  const uint64_t on_disk = s->Stats().tier(TierKind::kDisk).chunks;
  EXPECT_GE(on_disk, 6u);  // at least those demoted before the restart
  for (int i = 0; i < 10; ++i) {
    if (s->Lookup({KeyFor(i)}).matched == 0) continue;  // was only in memory
    ExpectGet(*s, KeyFor(i), chunks[i]);
  }
  ExpectGet(*s, KeyFor(0), chunks[0]);
}

TEST_F(TieredStoreTest, CorruptDiskChunkIsDroppedNotReturned) {
  ASSERT_OK_AND_ASSIGN(auto s, TieredStore::Open(Options(4 * kMiB, true)));
  auto bad = Chunk(9);
  bad[kChunkHeaderBytes + 11] ^= 4;
  ASSERT_OK(s->disk_tier()->Write(KeyFor(9), bad));  // as if it rotted on disk
  // Reopen so the store indexes it.
  s.reset();
  ASSERT_OK_AND_ASSIGN(s, TieredStore::Open(Options(4 * kMiB, true)));
  EXPECT_EQ(s->Lookup({KeyFor(9)}).matched, 1u);
  std::vector<uint8_t> buf(bad.size());
  EXPECT_THAT(s->Get(KeyFor(9), MutableByteSpan(buf)), StatusIs(absl::StatusCode::kDataLoss));
  EXPECT_EQ(s->Lookup({KeyFor(9)}).matched, 0u);
  const StoreStats st = s->Stats();
  EXPECT_EQ(st.tier(TierKind::kDisk).checksum_failures, 1u);
  EXPECT_EQ(st.tier(TierKind::kHost).used_bytes, 0u);
}

TEST_F(TieredStoreTest, GetIntoASmallBufferIsOutOfRange) {
  ASSERT_OK_AND_ASSIGN(auto s, TieredStore::Open(Options(4 * kMiB, false)));
  ASSERT_OK(s->Put(KeyFor(1), Chunk(1)));
  std::vector<uint8_t> small(100);
  EXPECT_THAT(s->Get(KeyFor(1), MutableByteSpan(small)), StatusIs(absl::StatusCode::kOutOfRange));
  EXPECT_EQ(s->Stats().leases_active, 0u);
  EXPECT_THAT(s->Get(KeyFor(2), MutableByteSpan(small)), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(s->Acquire(KeyFor(1), {.ttl = absl::ZeroDuration()}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("ttl")));
  EXPECT_EQ(s->Stats().leases_active, 0u);
}

TEST_F(TieredStoreTest, BadOptionsFailAtOpen) {
  TieredStoreOptions o = Options(4 * kMiB, false);
  o.reservation_ttl = absl::ZeroDuration();
  EXPECT_THAT(TieredStore::Open(o),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("reservation_ttl")));
  o = Options(4 * kMiB, false);
  o.max_lease_ttl = -absl::Seconds(1);
  EXPECT_THAT(TieredStore::Open(o), StatusIs(absl::StatusCode::kInvalidArgument));
  o = Options(0, false);
  EXPECT_THAT(TieredStore::Open(o),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("capacity")));
  o = Options(4 * kMiB, true);
  o.disk->watermarks = {.high_watermark = 0.5, .low_watermark = 0.9};
  EXPECT_THAT(TieredStore::Open(o),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("watermarks")));
}

TEST_F(TieredStoreTest, GpuTierWithoutAGpuFailsClearly) {
  if (GpuAvailable()) GTEST_SKIP() << "a GPU is present; covered by tests/gpu";
  TieredStoreOptions o = Options(4 * kMiB, false);
  o.gpu = GpuTierOptions{};
  EXPECT_THAT(TieredStore::Open(o),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("no CUDA device")));
}

}  // namespace
}  // namespace kvdn::storage

namespace kvdn::storage {
namespace {

TEST_F(TieredStoreTest, WritersHoldAReservationPastItsTtl) {
  ASSERT_OK_AND_ASSIGN(auto s, TieredStore::Open(Options(64 * kMiB, false)));
  const auto c = Chunk(1);
  ASSERT_OK_AND_ASSIGN(Reservation r, s->Reserve(KeyFor(1), c.size()));
  EXPECT_THAT(s->BeginWrite(r.id, c.size() + 1), StatusIs(absl::StatusCode::kInvalidArgument));
  ASSERT_OK_AND_ASSIGN(MutableByteSpan buf, s->BeginWrite(r.id, c.size()));
  EXPECT_THAT(s->Commit(r.id, 0), StatusIs(absl::StatusCode::kFailedPrecondition));
  clock_.Advance(absl::Minutes(5));  // past the ttl while being written
  s->RunMaintenance();
  std::memcpy(buf.data(), c.data(), c.size());
  s->EndWrite(r.id);
  // The writer's end restarted the TTL: the bytes that took 5 minutes to arrive can be committed
  // within a TTL from now.
  clock_.Advance(absl::Seconds(20));
  s->RunMaintenance();
  ASSERT_OK(s->Commit(r.id, DecodeChunkHeader(c)->payload_checksum));
  ExpectGet(*s, KeyFor(1), c);
  // Not committed within the TTL after the writer let go: expired; Commit and BeginWrite tell the
  // caller to reserve again.
  ASSERT_OK_AND_ASSIGN(r, s->Reserve(KeyFor(3), c.size()));
  ASSERT_OK_AND_ASSIGN(buf, s->BeginWrite(r.id, c.size()));
  clock_.Advance(absl::Minutes(5));
  s->EndWrite(r.id);
  clock_.Advance(absl::Minutes(5));
  s->RunMaintenance();
  EXPECT_THAT(s->Commit(r.id, DecodeChunkHeader(c)->payload_checksum),
              StatusIs(absl::StatusCode::kAborted));
  EXPECT_THAT(s->BeginWrite(r.id, c.size()), StatusIs(absl::StatusCode::kAborted));
  EXPECT_THAT(s->BeginWrite(424242, c.size()), StatusIs(absl::StatusCode::kNotFound));
  // Written and committed in time: visible.
  ASSERT_OK_AND_ASSIGN(r, s->Reserve(KeyFor(2), c.size()));
  ASSERT_OK_AND_ASSIGN(buf, s->BeginWrite(r.id, c.size()));
  std::memcpy(buf.data(), c.data(), c.size());
  s->EndWrite(r.id);
  ASSERT_OK(s->Commit(r.id, DecodeChunkHeader(c)->payload_checksum));
  ExpectGet(*s, KeyFor(2), c);
}

TEST_F(TieredStoreTest, ListDescribeAndPersistToDisk) {
  ASSERT_OK_AND_ASSIGN(auto s, TieredStore::Open(Options(64 * kMiB, true)));
  std::vector<std::vector<uint8_t>> chunks;
  for (int i = 0; i < 5; ++i) {
    chunks.push_back(Chunk(i));
    ASSERT_OK(s->Put(KeyFor(i, i < 3 ? "a" : "b"), chunks.back()));
  }
  EXPECT_EQ(s->List({}).size(), 5u);
  EXPECT_EQ(s->List({.ns = "a"}).size(), 3u);
  EXPECT_EQ(s->List({.tier = TierKind::kDisk}).size(), 0u);
  ASSERT_OK_AND_ASSIGN(Lease l, s->Acquire(KeyFor(0, "a")));
  ASSERT_OK_AND_ASSIGN(ChunkRecord rec, s->Describe(KeyFor(0, "a")));
  EXPECT_EQ(rec.leases, 1u);
  EXPECT_EQ(rec.tier, TierKind::kHost);
  EXPECT_EQ(rec.size, chunks[0].size());
  ASSERT_OK(s->Release(l.id));
  EXPECT_THAT(s->Describe(KeyFor(9, "a")), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_EQ(s->Where(KeyFor(0, "a")), TierKind::kHost);
  EXPECT_EQ(s->Where(KeyFor(9, "a")), std::nullopt);
  EXPECT_EQ(s->ChunkCount(), 5u);
  ASSERT_OK_AND_ASSIGN(uint64_t n, s->PersistToDisk());
  EXPECT_EQ(s->ChunkCount(), 5u);  // a chunk on two tiers counts once
  EXPECT_EQ(n, 5u);
  EXPECT_EQ(s->List({.tier = TierKind::kDisk}).size(), 5u);
  ASSERT_OK_AND_ASSIGN(n, s->PersistToDisk());
  EXPECT_EQ(n, 0u);  // nothing left to write
  s.reset();
  ASSERT_OK_AND_ASSIGN(s, TieredStore::Open(Options(64 * kMiB, true)));
  for (int i = 0; i < 5; ++i) ExpectGet(*s, KeyFor(i, i < 3 ? "a" : "b"), chunks[i]);
  ASSERT_OK_AND_ASSIGN(auto no_disk, TieredStore::Open(Options(64 * kMiB, false)));
  EXPECT_THAT(no_disk->PersistToDisk(), StatusIs(absl::StatusCode::kFailedPrecondition));
}

}  // namespace
}  // namespace kvdn::storage
