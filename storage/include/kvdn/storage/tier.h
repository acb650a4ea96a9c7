// Tier: a place chunks can live. Three kinds, fastest first: GPU memory, pinned host memory, local
// disk. A tier says what it can do through caps() (STYLE.md 7); TieredStore (tiered_store.h)
// composes them.
#ifndef KVDN_STORAGE_TIER_H_
#define KVDN_STORAGE_TIER_H_

#include <cstdint>

#include "absl/strings/string_view.h"
#include "kvdn/common/status.h"

namespace kvdn::storage {

// Ordered fastest to slowest; demotion goes down this list, promotion up.
enum class TierKind : uint8_t { kGpu = 0, kHost = 1, kDisk = 2 };
inline constexpr int kNumTierKinds = 3;
absl::string_view TierKindName(TierKind kind);

struct TierCaps {
  bool persistent = false;        // contents survive a restart of the process
  bool host_addressable = false;  // the CPU can load/store a chunk's bytes through a pointer
  bool device_memory = false;     // bytes live in GPU memory
};

// Capacity limits shared by every tier. Eviction starts above high_watermark * capacity and stops
// at or below low_watermark * capacity. REQUIRES: 0 < low <= high <= 1.
struct WatermarkOptions {
  double high_watermark = 0.90;
  double low_watermark = 0.80;
  absl::Status Validate() const;
};

// Thread-safe: every method may be called concurrently.
class Tier {
 public:
  virtual ~Tier() = default;
  virtual TierKind kind() const = 0;
  virtual TierCaps caps() const = 0;
  virtual uint64_t capacity_bytes() const = 0;
  // Bytes in use now (memory tiers: allocated, including reservations; disk: stored chunk bytes).
  virtual uint64_t used_bytes() const = 0;
  virtual const WatermarkOptions& watermarks() const = 0;

  uint64_t high_watermark_bytes() const {
    return static_cast<uint64_t>(watermarks().high_watermark *
                                 static_cast<double>(capacity_bytes()));
  }
  uint64_t low_watermark_bytes() const {
    return static_cast<uint64_t>(watermarks().low_watermark *
                                 static_cast<double>(capacity_bytes()));
  }
};

}  // namespace kvdn::storage

#endif  // KVDN_STORAGE_TIER_H_
