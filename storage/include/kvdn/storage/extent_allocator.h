// ExtentAllocator: hands out byte ranges of one fixed region (a host arena or a GPU pool) by
// offset.
//
// Best fit over free extents kept in two B-trees (by size and by offset), so an exact-size hole,
// the common case for the few chunk sizes one model produces, is found in O(log n) and freed
// neighbours coalesce at once. Sizes are rounded up to `alignment`. No memory is allocated per
// chunk beyond the B-tree entries of free extents. Not thread-safe: the owning tier serialises
// calls.
#ifndef KVDN_STORAGE_EXTENT_ALLOCATOR_H_
#define KVDN_STORAGE_EXTENT_ALLOCATOR_H_

#include <cstdint>
#include <utility>

#include "absl/container/btree_set.h"
#include "kvdn/common/status.h"

namespace kvdn::storage {

class ExtentAllocator {
 public:
  // REQUIRES: alignment is a power of two; capacity is a multiple of alignment.
  ExtentAllocator(uint64_t capacity, uint64_t alignment);

  // Offset of a free range of at least `size` bytes (rounded up to alignment). RESOURCE_EXHAUSTED
  // when no free extent is large enough (free bytes may still exceed size if fragmented).
  absl::StatusOr<uint64_t> Allocate(uint64_t size);
  // Returns [offset, offset + RoundUp(size)) to the free set. FAILED_PRECONDITION (and no change)
  // if that range is not wholly allocated: a double free or a wrong size.
  absl::Status Free(uint64_t offset, uint64_t size);

  uint64_t RoundUp(uint64_t size) const { return (size + alignment_ - 1) & ~(alignment_ - 1); }
  uint64_t capacity() const { return capacity_; }
  uint64_t allocated_bytes() const { return allocated_; }
  uint64_t largest_free_extent() const;
  size_t free_extent_count() const { return by_offset_.size(); }

 private:
  void Insert(uint64_t offset, uint64_t len);
  void Erase(uint64_t offset, uint64_t len);

  const uint64_t capacity_;
  const uint64_t alignment_;
  uint64_t allocated_ = 0;
  absl::btree_set<std::pair<uint64_t, uint64_t>> by_offset_;  // (offset, len)
  absl::btree_set<std::pair<uint64_t, uint64_t>> by_size_;    // (len, offset)
};

}  // namespace kvdn::storage

#endif  // KVDN_STORAGE_EXTENT_ALLOCATOR_H_
