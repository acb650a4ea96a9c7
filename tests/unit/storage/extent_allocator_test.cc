#include "kvdn/storage/extent_allocator.h"

#include <map>
#include <random>

#include "gtest/gtest.h"
#include "kvdn/testing/status_matchers.h"

namespace kvdn::storage {
namespace {

using ::kvdn::testing::StatusIs;

TEST(ExtentAllocatorTest, RandomAllocFreeNeverOverlapsAndCoalescesBack) {
  constexpr uint64_t kCap = 64 << 20, kAlign = 4096;
  ExtentAllocator a(kCap, kAlign);
  std::map<uint64_t, uint64_t> live;  // offset -> size asked
  std::mt19937_64 rng(42);
  const uint64_t sizes[] = {1 << 20, 4 << 20, 300000, 4096, 1, 8 << 20};
  for (int step = 0; step < 20000; ++step) {
    if (live.empty() || rng() % 3 != 0) {
      const uint64_t size = sizes[rng() % 6];
      auto off = a.Allocate(size);
      if (!off.ok()) {
        EXPECT_THAT(off, StatusIs(absl::StatusCode::kResourceExhausted));
        continue;
      }
      EXPECT_EQ(*off % kAlign, 0u);
      EXPECT_LE(*off + a.RoundUp(size), kCap);
      // No overlap with its neighbours.
      auto next = live.lower_bound(*off);
      if (next != live.end()) {
        EXPECT_LE(*off + a.RoundUp(size), next->first);
      }
      if (next != live.begin()) {
        auto prev = std::prev(next);
        EXPECT_LE(prev->first + a.RoundUp(prev->second), *off);
      }
      live[*off] = size;
    } else {
      auto it = live.begin();
      std::advance(it, rng() % live.size());
      ASSERT_OK(a.Free(it->first, it->second));
      live.erase(it);
    }
    uint64_t used = 0;
    for (auto& [o, s] : live) used += a.RoundUp(s);
    ASSERT_EQ(a.allocated_bytes(), used);
  }
  for (auto& [o, s] : live) ASSERT_OK(a.Free(o, s));
  EXPECT_EQ(a.allocated_bytes(), 0u);
  EXPECT_EQ(a.free_extent_count(), 1u);
  EXPECT_EQ(a.largest_free_extent(), kCap);
}

TEST(ExtentAllocatorTest, BestFitReusesExactHole) {
  ExtentAllocator a(16 << 20, 4096);
  (void)*a.Allocate(4 << 20);
  const uint64_t y = *a.Allocate(1 << 20);
  (void)*a.Allocate(4 << 20);
  ASSERT_OK(a.Free(y, 1 << 20));
  // Free: a 1 MiB hole at 4 MiB and 7 MiB at the end. The 1 MiB request takes the exact hole.
  EXPECT_EQ(*a.Allocate(1 << 20), y);
}

TEST(ExtentAllocatorTest, ExhaustionAndDoubleFree) {
  ExtentAllocator a(1 << 20, 4096);
  const uint64_t x = *a.Allocate(1 << 20);
  EXPECT_THAT(a.Allocate(1), StatusIs(absl::StatusCode::kResourceExhausted));
  ASSERT_OK(a.Free(x, 1 << 20));
  EXPECT_THAT(a.Free(x, 1 << 20), StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_THAT(a.Free(3, 10), StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_THAT(a.Free(0, 2 << 20), StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_EQ(a.allocated_bytes(), 0u);
}

}  // namespace
}  // namespace kvdn::storage
