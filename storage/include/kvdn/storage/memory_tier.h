// MemoryTier: the part HostTier and GpuTier share — one region allocated once at start, carved by
// an ExtentAllocator, with capacity and watermarks. Chunk bytes never come from malloc.
#ifndef KVDN_STORAGE_MEMORY_TIER_H_
#define KVDN_STORAGE_MEMORY_TIER_H_

#include <cstdint>

#include "absl/base/thread_annotations.h"
#include "kvdn/common/bytes.h"
#include "kvdn/common/mutex.h"
#include "kvdn/storage/extent_allocator.h"
#include "kvdn/storage/tier.h"

namespace kvdn::storage {

// A range of a memory tier's region. `size` is what was asked for; the allocator rounds it up.
struct MemoryBlock {
  uint64_t offset = 0;
  uint64_t size = 0;
};

// Thread-safe: allocation is serialised by an internal mutex (a leaf lock); copies run unlocked and
// callers must not free a block while copying to or from it.
class MemoryTier : public Tier {
 public:
  // A block of at least `size` bytes; RESOURCE_EXHAUSTED when no free extent is large enough.
  absl::StatusOr<MemoryBlock> Allocate(uint64_t size);
  // FAILED_PRECONDITION for a block that is not allocated (double free).
  absl::Status Free(const MemoryBlock& block);

  uint64_t capacity_bytes() const override { return capacity_; }
  uint64_t used_bytes() const override;
  // Bytes of the tier's memory already backed by pages. The capacity, but for a host arena still
  // being faulted in on a background thread at start (or not at all, prefault off): until then a
  // write into the rest takes page faults, and a benchmark measures the faulting.
  virtual uint64_t prefaulted_bytes() const { return capacity_; }
  const WatermarkOptions& watermarks() const override { return watermarks_; }
  // Bytes that the allocator would hand out for a request of `size`.
  uint64_t RoundUp(uint64_t size) const;
  uint64_t largest_free_extent() const;

  // Copy between host memory and [offset, offset + len) of `block`. INVALID_ARGUMENT if the range
  // does not lie inside the block; INTERNAL if the device copy fails.
  virtual absl::Status CopyIn(const MemoryBlock& block, uint64_t offset, ByteSpan src) = 0;
  virtual absl::Status CopyOut(const MemoryBlock& block, uint64_t offset,
                               MutableByteSpan dst) const = 0;

  // Address of the block's first byte: a host pointer in HostTier, a device pointer in GpuTier.
  void* Address(const MemoryBlock& block) const { return base_ + block.offset; }

 protected:
  MemoryTier(uint8_t* base, uint64_t capacity, uint64_t alignment, WatermarkOptions watermarks);
  static absl::Status CheckRange(const MemoryBlock& block, uint64_t offset, uint64_t len);

  // Constant after construction.
  uint8_t* const base_;
  const uint64_t capacity_;
  const WatermarkOptions watermarks_;

 private:
  mutable Mutex mu_;
  ExtentAllocator alloc_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvdn::storage

#endif  // KVDN_STORAGE_MEMORY_TIER_H_
