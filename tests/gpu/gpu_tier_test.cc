#include "kvdn/storage/gpu_tier.h"

#include <cstring>

#include "gtest/gtest.h"
#include "kvdn/storage/tiered_store.h"
#include "kvdn/testing/chunks.h"
#include "kvdn/testing/status_matchers.h"

namespace kvdn::storage {
namespace {

using ::kvdn::testing::KeyFor;
using ::kvdn::testing::StatusIs;
using ::testing::HasSubstr;

constexpr uint64_t kMiB = 1 << 20;

class GpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!GpuAvailable()) GTEST_SKIP() << "no CUDA device";
  }
};

TEST_F(GpuTest, PoolCopiesRoundTripOnRandomSizes) {
  ASSERT_OK_AND_ASSIGN(auto gpu, GpuTier::Create({.capacity_bytes = 96 * kMiB}));
  EXPECT_TRUE(gpu->caps().device_memory);
  EXPECT_FALSE(gpu->caps().host_addressable);
  for (uint64_t size :
       {uint64_t{1}, uint64_t{4095}, uint64_t{4097}, uint64_t{1000003}, 32 * kMiB + 64}) {
    const auto data = testing::RandomBytes(size, size);
    ASSERT_OK_AND_ASSIGN(MemoryBlock b, gpu->Allocate(size));
    ASSERT_OK(gpu->CopyIn(b, 0, data));
    std::vector<uint8_t> back(size, 0xCD);
    ASSERT_OK(gpu->CopyOut(b, 0, MutableByteSpan(back)));
    EXPECT_EQ(std::memcmp(back.data(), data.data(), size), 0) << size;
    // A sub-range at an odd offset.
    if (size > 100) {
      std::vector<uint8_t> part(size / 3);
      ASSERT_OK(gpu->CopyOut(b, 7, MutableByteSpan(part)));
      EXPECT_EQ(std::memcmp(part.data(), data.data() + 7, part.size()), 0);
    }
    ASSERT_OK(gpu->Free(b));
  }
  EXPECT_EQ(gpu->used_bytes(), 0u);
  ASSERT_OK_AND_ASSIGN(std::string handle, gpu->ExportIpcHandle());
  EXPECT_EQ(handle.size(), 64u);
}

TEST_F(GpuTest, CapacityAndBadOptions) {
  ASSERT_OK_AND_ASSIGN(auto gpu, GpuTier::Create({.capacity_bytes = 8 * kMiB}));
  EXPECT_THAT(gpu->Allocate(9 * kMiB), StatusIs(absl::StatusCode::kResourceExhausted));
  MemoryBlock b = *gpu->Allocate(kMiB);
  std::vector<uint8_t> buf(16);
  EXPECT_THAT(gpu->CopyIn(b, kMiB - 8, buf), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(gpu->CopyToHost(reinterpret_cast<void*>(16), MutableByteSpan(buf)),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(GpuTier::Create({.device = 99, .capacity_bytes = kMiB}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(GpuTier::Create({.capacity_bytes = 1ull << 50}),
              StatusIs(absl::StatusCode::kResourceExhausted));
}

TEST_F(GpuTest, HostArenaIsPinned) {
  ASSERT_OK_AND_ASSIGN(auto host, HostTier::Create({.capacity_bytes = 8 * kMiB}));
  EXPECT_TRUE(host->pinned());
}

TEST_F(GpuTest, StorePromotesToGpuForGpuReadersAndDemotesUnderPressure) {
  TieredStoreOptions o;
  o.host.capacity_bytes = 64 * kMiB;
  o.gpu = GpuTierOptions{.capacity_bytes = 4 * kMiB + 64 * 1024};
  o.maintenance_interval = absl::ZeroDuration();
  ASSERT_OK_AND_ASSIGN(auto s, TieredStore::Open(o));
  std::vector<std::vector<uint8_t>> chunks;
  for (int i = 0; i < 8; ++i) {
    chunks.push_back(testing::RandomChunk(testing::InfoForBytes(kMiB), i));
    ASSERT_OK(s->Put(KeyFor(i), chunks.back()));
  }
  // A GPU reader pulls each chunk into the GPU tier; only ~4 fit, older ones demote to host.
  for (int i = 0; i < 8; ++i) {
    ASSERT_OK_AND_ASSIGN(Lease l, s->Acquire(KeyFor(i), {.accept_gpu = true}));
    ASSERT_EQ(l.tier, TierKind::kGpu) << i;
    std::vector<uint8_t> back(l.size);
    ASSERT_OK(s->gpu_tier()->CopyToHost(l.device_ptr, MutableByteSpan(back)));
    EXPECT_EQ(std::memcmp(back.data(), chunks[i].data(), l.size), 0) << i;
    ASSERT_OK(s->Release(l.id));
  }
  StoreStats st = s->Stats();
  EXPECT_EQ(st.tier(TierKind::kGpu).promotions, 8u);
  EXPECT_GE(st.tier(TierKind::kGpu).demotions, 4u);
  EXPECT_LE(st.tier(TierKind::kGpu).used_bytes, o.gpu->capacity_bytes);
  EXPECT_EQ(s->Lookup({KeyFor(7)}).tiers[0], TierKind::kGpu);
  EXPECT_EQ(s->Lookup({KeyFor(0)}).tiers[0], TierKind::kHost);
  // A host reader of a GPU-resident chunk gets it moved back to host memory, intact.
  std::vector<uint8_t> got(chunks[7].size());
  ASSERT_OK(s->Get(KeyFor(7), MutableByteSpan(got)));
  EXPECT_EQ(got, chunks[7]);
  EXPECT_EQ(s->Lookup({KeyFor(7)}).tiers[0], TierKind::kHost);
  // While a GPU reader holds a chunk, a host reader is told to retry rather than wait.
  ASSERT_OK_AND_ASSIGN(Lease g, s->Acquire(KeyFor(6), {.accept_gpu = true}));
  ASSERT_EQ(g.tier, TierKind::kGpu);
  EXPECT_THAT(s->Get(KeyFor(6), MutableByteSpan(got)), StatusIs(absl::StatusCode::kUnavailable));
  ASSERT_OK(s->Release(g.id));
  ASSERT_OK(s->Get(KeyFor(6), MutableByteSpan(got)));
  EXPECT_EQ(got, chunks[6]);
  // A GPU reader that may not block (kvdnd's gRPC thread) is told to retry where the chunk would
  // be promoted (a copy), and counts no hit or miss; on a thread that may block it is promoted.
  ASSERT_EQ(s->Lookup({KeyFor(6)}).tiers[0], TierKind::kHost);
  const uint64_t promotions = s->Stats().tier(TierKind::kGpu).promotions;
  EXPECT_TRUE(
      IsWouldBlock(s->Acquire(KeyFor(6), {.accept_gpu = true, .may_block = false}).status()));
  EXPECT_EQ(s->Stats().tier(TierKind::kGpu).promotions, promotions);
  ASSERT_OK_AND_ASSIGN(Lease p, s->Acquire(KeyFor(6), {.accept_gpu = true}));
  EXPECT_EQ(p.tier, TierKind::kGpu);
  ASSERT_OK(s->Release(p.id));
  // Already in the GPU tier: leased at once without blocking.
  ASSERT_OK_AND_ASSIGN(Lease q, s->Acquire(KeyFor(6), {.accept_gpu = true, .may_block = false}));
  EXPECT_EQ(q.tier, TierKind::kGpu);
  ASSERT_OK(s->Release(q.id));
}

// namespace_gpu_share: one tenant reading many chunks in place (each promoted into the GPU tier)
// demotes its own GPU chunks past its share, never the other tenant's; without the share the
// other's go first (least recently used). With all its GPU chunks leased, a tenant at its share
// is handed host copies (promotion is opportunistic), and every chunk reads back identical.
TEST_F(GpuTest, ANamespacePastItsGpuShareDemotesItsOwnChunks) {
  for (double share : {1.0, 0.5}) {
    SCOPED_TRACE(share);
    TieredStoreOptions o;
    o.host.capacity_bytes = 64 * kMiB;
    o.gpu = GpuTierOptions{.capacity_bytes = 8 * kMiB};
    o.maintenance_interval = absl::ZeroDuration();
    o.namespace_gpu_share = share;
    ASSERT_OK_AND_ASSIGN(auto s, TieredStore::Open(o));
    std::vector<std::vector<uint8_t>> quiet, noisy;
    auto read_in_place = [&](const ChunkKey& key, const std::vector<uint8_t>& want) {
      ASSERT_OK_AND_ASSIGN(Lease l, s->Acquire(key, {.accept_gpu = true}));
      ASSERT_EQ(l.tier, TierKind::kGpu) << key.ToString();
      std::vector<uint8_t> back(l.size);
      ASSERT_OK(s->gpu_tier()->CopyToHost(l.device_ptr, MutableByteSpan(back)));
      EXPECT_EQ(back, want) << key.ToString();
      ASSERT_OK(s->Release(l.id));
    };
    for (int i = 0; i < 2; ++i) {
      quiet.push_back(testing::RandomChunk(testing::InfoForBytes(kMiB), 100 + i));
      ASSERT_OK(s->Put(KeyFor(i, "quiet"), quiet.back()));
      read_in_place(KeyFor(i, "quiet"), quiet.back());
    }
    const uint64_t share_bytes = static_cast<uint64_t>(share * double(o.gpu->capacity_bytes));
    for (int i = 0; i < 16; ++i) {
      noisy.push_back(testing::RandomChunk(testing::InfoForBytes(kMiB), 200 + i));
      ASSERT_OK(s->Put(KeyFor(i, "noisy"), noisy.back()));
      read_in_place(KeyFor(i, "noisy"), noisy.back());
      if (share < 1) {
        EXPECT_LE(s->NamespaceBytes(TierKind::kGpu, "noisy"), share_bytes);
        ASSERT_OK(s->CheckNamespaceListsForTest());
      }
    }
    int quiet_in_gpu = 0;
    for (int i = 0; i < 2; ++i) {
      quiet_in_gpu += s->Lookup({KeyFor(i, "quiet")}).tiers[0] == TierKind::kGpu ? 1 : 0;
    }
    if (share == 1) {
      EXPECT_EQ(quiet_in_gpu, 0);  // the control: the global LRU demoted them
      EXPECT_EQ(s->NamespaceBytes(TierKind::kGpu, "noisy"), 0u);  // not tracked
      continue;
    }
    EXPECT_EQ(quiet_in_gpu, 2);  // untouched by the noisy tenant
    EXPECT_EQ(s->NamespaceBytes(TierKind::kGpu, "quiet"), 2 * quiet[0].size());
    const uint64_t noisy_gpu = s->NamespaceBytes(TierKind::kGpu, "noisy");
    EXPECT_GT(noisy_gpu + quiet[0].size(), share_bytes);  // it still uses its share
    // The noisy tenant's GPU chunks all leased: its next reader gets the host copy, and the
    // quiet tenant's chunks stay where they are.
    std::vector<Lease> held;
    for (int i = 15; i >= 0; --i) {
      if (s->Lookup({KeyFor(i, "noisy")}).tiers[0] != TierKind::kGpu) continue;
      ASSERT_OK_AND_ASSIGN(Lease l, s->Acquire(KeyFor(i, "noisy"), {.accept_gpu = true}));
      ASSERT_EQ(l.tier, TierKind::kGpu);
      held.push_back(l);
    }
    EXPECT_EQ(held.size() * noisy[0].size(), noisy_gpu);
    ASSERT_OK_AND_ASSIGN(Lease h, s->Acquire(KeyFor(0, "noisy"), {.accept_gpu = true}));
    EXPECT_EQ(h.tier, TierKind::kHost);
    EXPECT_EQ(std::vector<uint8_t>(h.host_bytes.begin(), h.host_bytes.end()), noisy[0]);
    ASSERT_OK(s->Release(h.id));
    for (const Lease& l : held) ASSERT_OK(s->Release(l.id));
    EXPECT_EQ(s->NamespaceBytes(TierKind::kGpu, "quiet"), 2 * quiet[0].size());
    // Everything reads back identical, in place and through host memory.
    for (int i = 0; i < 2; ++i) read_in_place(KeyFor(i, "quiet"), quiet[i]);
    for (int i = 0; i < 16; ++i) {
      std::vector<uint8_t> got(noisy[i].size());
      ASSERT_OK(s->Get(KeyFor(i, "noisy"), MutableByteSpan(got)));
      EXPECT_EQ(got, noisy[i]) << i;
    }
    ASSERT_OK(s->CheckNamespaceListsForTest());
    EXPECT_EQ(
        s->NamespaceBytes(TierKind::kGpu, "noisy") + s->NamespaceBytes(TierKind::kGpu, "quiet"),
        s->Stats().tier(TierKind::kGpu).bytes);
  }
}

// A chunk larger than a namespace's GPU share is read from host memory; a bad share is refused.
TEST_F(GpuTest, AChunkLargerThanTheGpuShareIsReadFromHostMemory) {
  TieredStoreOptions o;
  o.host.capacity_bytes = 64 * kMiB;
  o.gpu = GpuTierOptions{.capacity_bytes = 8 * kMiB};
  o.maintenance_interval = absl::ZeroDuration();
  o.namespace_gpu_share = 0.125;  // 1 MiB
  ASSERT_OK_AND_ASSIGN(auto s, TieredStore::Open(o));
  const auto big = testing::RandomChunk(testing::InfoForBytes(2 * kMiB), 7);
  ASSERT_OK(s->Put(KeyFor(0, "t"), big));
  ASSERT_OK_AND_ASSIGN(Lease l, s->Acquire(KeyFor(0, "t"), {.accept_gpu = true}));
  EXPECT_EQ(l.tier, TierKind::kHost);
  ASSERT_OK(s->Release(l.id));
  EXPECT_EQ(s->NamespaceBytes(TierKind::kGpu, "t"), 0u);
  EXPECT_EQ(s->Stats().tier(TierKind::kGpu).promotions, 0u);
  o.namespace_gpu_share = 1.5;
  EXPECT_THAT(TieredStore::Open(o).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("namespace_gpu_share 1.5")));
}

}  // namespace
}  // namespace kvdn::storage
