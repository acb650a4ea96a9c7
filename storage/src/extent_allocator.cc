#include "kvdn/storage/extent_allocator.h"

#include <iterator>

#include "absl/strings/str_cat.h"

namespace kvdn::storage {

ExtentAllocator::ExtentAllocator(uint64_t capacity, uint64_t alignment)
    : capacity_(capacity), alignment_(alignment) {
  if (capacity_ > 0) Insert(0, capacity_);
}

void ExtentAllocator::Insert(uint64_t offset, uint64_t len) {
  by_offset_.insert({offset, len});
  by_size_.insert({len, offset});
}

void ExtentAllocator::Erase(uint64_t offset, uint64_t len) {
  by_offset_.erase({offset, len});
  by_size_.erase({len, offset});
}

absl::StatusOr<uint64_t> ExtentAllocator::Allocate(uint64_t size) {
  const uint64_t want = RoundUp(size == 0 ? 1 : size);
  auto it = by_size_.lower_bound({want, 0});
  if (it == by_size_.end()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("no free extent of ", want, " bytes (", capacity_ - allocated_,
                     " bytes free, largest extent ", largest_free_extent(), ")"));
  }
  const auto [len, offset] = *it;
  Erase(offset, len);
  if (len > want) Insert(offset + want, len - want);
  allocated_ += want;
  return offset;
}

absl::Status ExtentAllocator::Free(uint64_t offset, uint64_t size) {
  uint64_t len = RoundUp(size == 0 ? 1 : size);
  if (offset % alignment_ != 0 || offset + len > capacity_ || offset + len < offset) {
    return absl::FailedPreconditionError(
        absl::StrCat("free of [", offset, ", +", len, ") is outside the region or misaligned"));
  }
  auto next = by_offset_.lower_bound({offset, 0});
  if (next != by_offset_.end() && next->first < offset + len) {
    return absl::FailedPreconditionError(
        absl::StrCat("free of [", offset, ", +", len, ") overlaps a free extent"));
  }
  // Read both neighbours before erasing anything: btree erase invalidates iterators.
  bool merge_next = false, merge_prev = false;
  uint64_t noff = 0, nlen = 0, poff = 0, plen = 0;
  if (next != by_offset_.end()) {
    noff = next->first;
    nlen = next->second;
    merge_next = noff == offset + len;
  }
  if (next != by_offset_.begin()) {
    auto prev = std::prev(next);
    poff = prev->first;
    plen = prev->second;
    if (poff + plen > offset) {
      return absl::FailedPreconditionError(
          absl::StrCat("free of [", offset, ", +", len, ") overlaps a free extent"));
    }
    merge_prev = poff + plen == offset;
  }
  allocated_ -= len;
  uint64_t start = offset;
  if (merge_next) {
    Erase(noff, nlen);
    len += nlen;
  }
  if (merge_prev) {
    Erase(poff, plen);
    start = poff;
    len += plen;
  }
  Insert(start, len);
  return absl::OkStatus();
}

uint64_t ExtentAllocator::largest_free_extent() const {
  return by_size_.empty() ? 0 : by_size_.rbegin()->first;
}

}  // namespace kvdn::storage
