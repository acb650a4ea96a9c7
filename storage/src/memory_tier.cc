#include "kvdn/storage/memory_tier.h"

#include "absl/strings/str_cat.h"

namespace kvdn::storage {

absl::string_view TierKindName(TierKind kind) {
  switch (kind) {
    case TierKind::kGpu:
      return "gpu";
    case TierKind::kHost:
      return "host";
    case TierKind::kDisk:
      return "disk";
  }
  return "unknown";
}

absl::Status WatermarkOptions::Validate() const {
  if (!(low_watermark > 0 && low_watermark <= high_watermark && high_watermark <= 1.0)) {
    return absl::InvalidArgumentError(absl::StrCat("watermarks must satisfy 0 < low (",
                                                   low_watermark, ") <= high (", high_watermark,
                                                   ") <= 1"));
  }
  return absl::OkStatus();
}

MemoryTier::MemoryTier(uint8_t* base, uint64_t capacity, uint64_t alignment,
                       WatermarkOptions watermarks)
    : base_(base), capacity_(capacity), watermarks_(watermarks), alloc_(capacity, alignment) {}

absl::StatusOr<MemoryBlock> MemoryTier::Allocate(uint64_t size) {
  MutexLock lock(&mu_);
  auto offset = alloc_.Allocate(size);
  if (!offset.ok()) {
    return absl::ResourceExhaustedError(
        absl::StrCat(TierKindName(kind()), " tier: ", offset.status().message()));
  }
  return MemoryBlock{*offset, size};
}

absl::Status MemoryTier::Free(const MemoryBlock& block) {
  MutexLock lock(&mu_);
  return alloc_.Free(block.offset, block.size);
}

uint64_t MemoryTier::used_bytes() const {
  MutexLock lock(&mu_);
  return alloc_.allocated_bytes();
}

uint64_t MemoryTier::RoundUp(uint64_t size) const {
  MutexLock lock(&mu_);
  return alloc_.RoundUp(size);
}

uint64_t MemoryTier::largest_free_extent() const {
  MutexLock lock(&mu_);
  return alloc_.largest_free_extent();
}

absl::Status MemoryTier::CheckRange(const MemoryBlock& block, uint64_t offset, uint64_t len) {
  if (offset > block.size || len > block.size - offset) {
    return absl::InvalidArgumentError(absl::StrCat(
        "copy of [", offset, ", +", len, ") falls outside a block of ", block.size, " bytes"));
  }
  return absl::OkStatus();
}

}  // namespace kvdn::storage
