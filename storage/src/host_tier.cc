#include "kvdn/storage/host_tier.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <random>

#include "absl/strings/str_cat.h"
#include "kvdn/common/logging.h"
#include "src/cuda_runtime.h"

namespace kvdn::storage {
namespace {

uint64_t RandomArenaId() {
  std::random_device rd;
  uint64_t id = 0;
  while (id == 0) id = (uint64_t{rd()} << 32) ^ rd();
  return id;
}

}  // namespace

absl::StatusOr<std::unique_ptr<HostTier>> HostTier::Create(const HostTierOptions& options) {
  KVDN_RETURN_IF_ERROR(options.watermarks.Validate());
  const uint64_t a = options.alignment;
  if (a < 64 || (a & (a - 1)) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("host tier alignment ", a, " must be a power of two >= 64"));
  }
  if (options.capacity_bytes == 0) {
    return absl::InvalidArgumentError("host tier capacity_bytes is 0");
  }
  const uint64_t capacity = (options.capacity_bytes + a - 1) & ~(a - 1);
  // Over-map by 2 MiB so the arena can start on a huge-page boundary.
  constexpr uint64_t kHuge = 2 << 20;
  const int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
  void* raw = mmap(nullptr, capacity + kHuge, PROT_READ | PROT_WRITE, flags, -1, 0);
  if (raw == MAP_FAILED) {
    return absl::ResourceExhaustedError(
        absl::StrCat("host tier: mmap of ", capacity, " bytes failed: ", std::strerror(errno)));
  }
  void* p = static_cast<uint8_t*>(raw) + (kHuge - reinterpret_cast<uintptr_t>(raw) % kHuge) % kHuge;
  int fd = -1;
  if (options.shared) {
    // The memfd's bytes replace the aligned part of the reservation (MAP_FIXED), so the arena
    // keeps its huge-page alignment.
    fd = memfd_create("kvdn-host-tier", MFD_CLOEXEC);
    absl::Status st;
    if (fd < 0) {
      st = absl::ResourceExhaustedError(
          absl::StrCat("host tier: memfd_create failed: ", std::strerror(errno)));
    } else if (ftruncate(fd, static_cast<off_t>(capacity)) != 0) {
      st = absl::ResourceExhaustedError(absl::StrCat("host tier: sizing the shared arena to ",
                                                     capacity, " bytes: ", std::strerror(errno)));
    } else if (mmap(p, capacity, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED | MAP_NORESERVE, fd,
                    0) == MAP_FAILED) {
      st = absl::ResourceExhaustedError(
          absl::StrCat("host tier: mapping the shared arena: ", std::strerror(errno)));
    }
    if (!st.ok()) {
      if (fd >= 0) close(fd);
      munmap(raw, capacity + kHuge);
      return st;
    }
  }
  // Ask for transparent huge pages *before* faulting the arena in, so the faults allocate 2 MiB
  // pages: multi-MiB chunk copies then take 1/512 of the TLB misses. Advisory; failure is fine.
  madvise(p, capacity, MADV_HUGEPAGE);
  const bool gpu_pins = options.pin_for_gpu && cuda::DeviceCount() > 0;
  const bool background = options.prefault && options.prefault_in_background && !gpu_pins;
  if (options.prefault && !background) {
    // Touch every page now (MADV_POPULATE_WRITE where the kernel has it): no faults on the hot
    // path.
    if (madvise(p, capacity, 23 /* MADV_POPULATE_WRITE */) != 0) {
      for (uint64_t off = 0; off < capacity; off += 4096)
        static_cast<volatile uint8_t*>(p)[off] = 0;
    }
  }
  bool pinned = false;
  if (options.pin_for_gpu && cuda::DeviceCount() > 0) {
    if (absl::Status s = cuda::RegisterHost(p, capacity); s.ok()) {
      pinned = true;
    } else {
      spdlog::warn("host tier: could not pin the arena for the GPU ({}); H2D copies will stage",
                   s.message());
    }
  }
  std::unique_ptr<HostTier> tier(
      new HostTier(static_cast<uint8_t*>(p), capacity, options, pinned, raw, capacity + kHuge, fd));
  // Faulted in above, or by the GPU registration.
  if ((options.prefault && !background) || pinned) tier->prefaulted_.store(capacity);
  if (background) {
    HostTier* t = tier.get();
    tier->prefault_thread_ = std::thread([t, p, capacity] {
      constexpr uint64_t kStep = 64 << 20;
      for (uint64_t off = 0; off < capacity && !t->stop_prefault_.load(); off += kStep) {
        const uint64_t n = std::min(kStep, capacity - off);
        uint8_t* at = static_cast<uint8_t*>(p) + off;
        if (madvise(at, n, 23 /* MADV_POPULATE_WRITE */) != 0) {
          // Older kernels: a read-modify-write of one byte per page faults it in without
          // changing what a concurrent writer put there.
          for (uint64_t o = 0; o < n; o += 4096) {
            auto* b = reinterpret_cast<std::atomic<uint8_t>*>(at + o);
            b->fetch_add(0, std::memory_order_relaxed);
          }
        }
        t->prefaulted_.store(off + n, std::memory_order_relaxed);
      }
    });
  }
  return tier;
}

HostTier::HostTier(uint8_t* base, uint64_t capacity, const HostTierOptions& options, bool pinned,
                   void* mapping, uint64_t mapping_bytes, int fd)
    : MemoryTier(base, capacity, options.alignment, options.watermarks),
      fd_(fd),
      arena_id_(fd >= 0 ? RandomArenaId() : 0),
      mapping_(mapping),
      mapping_bytes_(mapping_bytes),
      pinned_(pinned) {}

HostTier::~HostTier() {
  stop_prefault_.store(true);
  if (prefault_thread_.joinable()) prefault_thread_.join();
  if (pinned_) (void)cuda::UnregisterHost(base_);
  munmap(mapping_, mapping_bytes_);
  if (fd_ >= 0) close(fd_);
}

absl::Status HostTier::CopyIn(const MemoryBlock& block, uint64_t offset, ByteSpan src) {
  KVDN_RETURN_IF_ERROR(CheckRange(block, offset, src.size()));
  if (!src.empty()) std::memcpy(base_ + block.offset + offset, src.data(), src.size());
  return absl::OkStatus();
}

absl::Status HostTier::CopyOut(const MemoryBlock& block, uint64_t offset,
                               MutableByteSpan dst) const {
  KVDN_RETURN_IF_ERROR(CheckRange(block, offset, dst.size()));
  if (!dst.empty()) std::memcpy(dst.data(), base_ + block.offset + offset, dst.size());
  return absl::OkStatus();
}

}  // namespace kvdn::storage
