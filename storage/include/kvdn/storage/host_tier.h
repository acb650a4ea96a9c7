// HostTier: chunk bytes in one host arena (mmap'd once at start, 2 MiB-aligned and advised for
// transparent huge pages, pre-faulted, optionally shared memory engines may map, pinned with
// cudaHostRegister when a GPU is present so H2D/D2H copies run at full speed and, later, registered
// once with UCX). Allocation is an ExtentAllocator over the arena: no malloc per chunk.
#ifndef KVDN_STORAGE_HOST_TIER_H_
#define KVDN_STORAGE_HOST_TIER_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "kvdn/storage/memory_tier.h"

namespace kvdn::storage {

struct HostTierOptions {
  uint64_t capacity_bytes = uint64_t{1} << 30;  // rounded up to alignment
  uint64_t alignment = 4096;                    // power of two, >= 64
  WatermarkOptions watermarks;
  bool prefault = true;  // touch every page at start (MAP_POPULATE): no page faults on the hot path
  // With prefault: do it on a background thread, so Create returns at once (a daemon serves while a
  // large arena is faulted in; pages touched first by a writer simply fault then). Ignored when the
  // arena is pinned for a GPU (registration faults it in).
  bool prefault_in_background = false;
  bool pin_for_gpu = true;  // cudaHostRegister the arena when a CUDA device is present
  // Back the arena with a memfd (shared memory) instead of private anonymous memory, so that
  // engines on this node can map it read-only (fd()) and copy leased chunks to their GPU straight
  // out of it. Shared memory gets transparent huge pages only where the kernel allows them for
  // shmem (/sys/kernel/mm/transparent_hugepage/shmem_enabled: advise or always).
  bool shared = false;
};

// Thread-safe (see MemoryTier).
class HostTier final : public MemoryTier {
 public:
  // INVALID_ARGUMENT for bad options; RESOURCE_EXHAUSTED if the arena cannot be mapped.
  static absl::StatusOr<std::unique_ptr<HostTier>> Create(const HostTierOptions& options);
  ~HostTier() override;

  TierKind kind() const override { return TierKind::kHost; }
  TierCaps caps() const override { return {.host_addressable = true}; }
  bool pinned() const { return pinned_; }
  uint64_t prefaulted_bytes() const override { return prefaulted_.load(std::memory_order_relaxed); }
  // The arena, for registering it once with a transport.
  uint8_t* arena_base() const { return base_; }
  // With HostTierOptions.shared: the memfd holding the arena (the arena is its bytes from offset
  // 0), and a random nonzero id naming this arena among any a restarted daemon makes; -1 and 0
  // otherwise.
  int fd() const { return fd_; }
  uint64_t arena_id() const { return arena_id_; }

  absl::Status CopyIn(const MemoryBlock& block, uint64_t offset, ByteSpan src) override;
  absl::Status CopyOut(const MemoryBlock& block, uint64_t offset,
                       MutableByteSpan dst) const override;
  // The block's bytes, host-addressable.
  MutableByteSpan Bytes(const MemoryBlock& block) const {
    return MutableByteSpan(base_ + block.offset, block.size);
  }

 private:
  HostTier(uint8_t* base, uint64_t capacity, const HostTierOptions& options, bool pinned,
           void* mapping, uint64_t mapping_bytes, int fd);
  const int fd_;
  const uint64_t arena_id_;
  void* const mapping_;  // the whole mmap, of which the arena is the huge-page-aligned part
  const uint64_t mapping_bytes_;
  const bool pinned_;
  std::atomic<bool> stop_prefault_{false};
  std::atomic<uint64_t> prefaulted_{0};
  std::thread prefault_thread_;
};

}  // namespace kvdn::storage

#endif  // KVDN_STORAGE_HOST_TIER_H_
