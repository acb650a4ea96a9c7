#include "kvdn/storage/host_tier.h"

#include <sys/mman.h>
#include <sys/stat.h>

#include <chrono>
#include <cstring>
#include <thread>

#include "gtest/gtest.h"
#include "kvdn/testing/chunks.h"
#include "kvdn/testing/status_matchers.h"

namespace kvdn::storage {
namespace {

using ::kvdn::testing::StatusIs;
using ::testing::HasSubstr;

TEST(HostTierTest, AllocateCopyAndFree) {
  ASSERT_OK_AND_ASSIGN(auto tier, HostTier::Create({.capacity_bytes = 8 << 20}));
  EXPECT_EQ(tier->kind(), TierKind::kHost);
  EXPECT_TRUE(tier->caps().host_addressable);
  EXPECT_FALSE(tier->caps().persistent);
  const auto data = testing::RandomBytes(1000003, 1);
  ASSERT_OK_AND_ASSIGN(MemoryBlock b, tier->Allocate(data.size()));
  ASSERT_OK(tier->CopyIn(b, 0, data));
  std::vector<uint8_t> back(data.size());
  ASSERT_OK(tier->CopyOut(b, 0, MutableByteSpan(back)));
  EXPECT_EQ(back, data);
  EXPECT_EQ(std::memcmp(tier->Bytes(b).data(), data.data(), data.size()), 0);
  EXPECT_EQ(tier->used_bytes(), tier->RoundUp(data.size()));
  ASSERT_OK(tier->Free(b));
  EXPECT_EQ(tier->used_bytes(), 0u);
  EXPECT_THAT(tier->Free(b), StatusIs(absl::StatusCode::kFailedPrecondition));
}

// A shared arena is the memfd's bytes from offset 0: what the tier writes, a second read-only
// mapping of the fd (what an engine maps through /proc/<pid>/fd/<fd>) reads at the block's
// offset. Each arena gets its own nonzero id; a private arena has neither fd nor id.
TEST(HostTierTest, ASharedArenaIsItsMemfdsBytes) {
  ASSERT_OK_AND_ASSIGN(auto tier, HostTier::Create({.capacity_bytes = 8 << 20, .shared = true}));
  ASSERT_GE(tier->fd(), 0);
  EXPECT_NE(tier->arena_id(), 0u);
  struct stat st {};
  ASSERT_EQ(fstat(tier->fd(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), tier->capacity_bytes());
  const auto data = testing::RandomBytes(300001, 7);
  ASSERT_OK_AND_ASSIGN(MemoryBlock filler, tier->Allocate(4096));
  ASSERT_OK_AND_ASSIGN(MemoryBlock b, tier->Allocate(data.size()));
  ASSERT_OK(tier->CopyIn(b, 0, data));
  void* view = mmap(nullptr, tier->capacity_bytes(), PROT_READ, MAP_SHARED, tier->fd(), 0);
  ASSERT_NE(view, MAP_FAILED);
  EXPECT_EQ(std::memcmp(static_cast<uint8_t*>(view) + b.offset, data.data(), data.size()), 0);
  munmap(view, tier->capacity_bytes());
  ASSERT_OK(tier->Free(b));
  ASSERT_OK(tier->Free(filler));
  ASSERT_OK_AND_ASSIGN(auto other, HostTier::Create({.capacity_bytes = 4 << 20, .shared = true}));
  EXPECT_NE(other->arena_id(), tier->arena_id());
  ASSERT_OK_AND_ASSIGN(auto plain, HostTier::Create({.capacity_bytes = 4 << 20}));
  EXPECT_EQ(plain->fd(), -1);
  EXPECT_EQ(plain->arena_id(), 0u);
}

TEST(HostTierTest, CopiesOutsideTheBlockAreRefused) {
  ASSERT_OK_AND_ASSIGN(auto tier, HostTier::Create({.capacity_bytes = 1 << 20}));
  ASSERT_OK_AND_ASSIGN(MemoryBlock b, tier->Allocate(100));
  std::vector<uint8_t> buf(50);
  EXPECT_THAT(tier->CopyIn(b, 60, buf),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("outside a block of 100")));
  EXPECT_THAT(tier->CopyOut(b, ~uint64_t{0}, MutableByteSpan(buf)),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(HostTierTest, CapacityIsEnforced) {
  ASSERT_OK_AND_ASSIGN(auto tier, HostTier::Create({.capacity_bytes = 4 << 20}));
  ASSERT_OK_AND_ASSIGN(MemoryBlock a, tier->Allocate(3 << 20));
  EXPECT_THAT(tier->Allocate(2 << 20),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("host tier")));
  ASSERT_OK(tier->Free(a));
  EXPECT_OK(tier->Allocate(4 << 20));
}

TEST(HostTierTest, BadOptions) {
  EXPECT_THAT(HostTier::Create({.capacity_bytes = 0}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("capacity")));
  EXPECT_THAT(HostTier::Create({.capacity_bytes = 1 << 20, .alignment = 1000}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("alignment")));
  EXPECT_THAT(HostTier::Create({.capacity_bytes = 1 << 20,
                                .watermarks = {.high_watermark = 0.5, .low_watermark = 0.7}}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("watermarks")));
}

// prefaulted_bytes: the whole arena at once when faulted in by Create, growing to it when faulted
// in on the background thread, none with prefault off.
TEST(HostTierTest, PrefaultedBytesReportTheArenaFaultedIn) {
  const uint64_t cap = 160 << 20;  // more than one 64 MiB step of the background thread
  ASSERT_OK_AND_ASSIGN(auto now, HostTier::Create({.capacity_bytes = cap, .pin_for_gpu = false}));
  EXPECT_EQ(now->prefaulted_bytes(), cap);
  ASSERT_OK_AND_ASSIGN(
      auto off, HostTier::Create({.capacity_bytes = cap, .prefault = false, .pin_for_gpu = false}));
  EXPECT_EQ(off->prefaulted_bytes(), 0u);
  ASSERT_OK_AND_ASSIGN(
      auto bg, HostTier::Create(
                   {.capacity_bytes = cap, .prefault_in_background = true, .pin_for_gpu = false}));
  uint64_t last = 0;
  for (int i = 0; i < 2000 && bg->prefaulted_bytes() < cap; ++i) {
    const uint64_t p = bg->prefaulted_bytes();
    EXPECT_GE(p, last);  // never goes back
    EXPECT_LE(p, cap);
    last = p;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(bg->prefaulted_bytes(), cap);
}

}  // namespace
}  // namespace kvdn::storage
