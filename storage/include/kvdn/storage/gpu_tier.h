// GpuTier: chunk bytes in one device-memory pool (cudaMalloc once at start), carved by the same
// ExtentAllocator as the host tier. The pool can be exported to same-node engines with a CUDA IPC
// handle (ExportIpcHandle) plus a block's offset.
#ifndef KVDN_STORAGE_GPU_TIER_H_
#define KVDN_STORAGE_GPU_TIER_H_

#include <cstdint>
#include <memory>
#include <string>

#include "kvdn/storage/memory_tier.h"

namespace kvdn::storage {

struct GpuTierOptions {
  int device = 0;
  uint64_t capacity_bytes = uint64_t{1} << 30;
  uint64_t alignment = 4096;  // power of two, >= 256
  WatermarkOptions watermarks;
};

// True when kvdn was built with CUDA and a device is usable now.
bool GpuAvailable();

// Thread-safe (see MemoryTier). Copies are synchronous cudaMemcpy calls.
class GpuTier final : public MemoryTier {
 public:
  // FAILED_PRECONDITION without CUDA or without a device; INVALID_ARGUMENT for bad options;
  // RESOURCE_EXHAUSTED if cudaMalloc of the pool fails.
  static absl::StatusOr<std::unique_ptr<GpuTier>> Create(const GpuTierOptions& options);
  ~GpuTier() override;

  TierKind kind() const override { return TierKind::kGpu; }
  TierCaps caps() const override { return {.device_memory = true}; }
  int device() const { return device_; }

  absl::Status CopyIn(const MemoryBlock& block, uint64_t offset, ByteSpan src) override;
  absl::Status CopyOut(const MemoryBlock& block, uint64_t offset,
                       MutableByteSpan dst) const override;
  // Copies device bytes at `device_ptr` (e.g. a Lease's) into host memory. INVALID_ARGUMENT unless
  // [device_ptr, device_ptr + dst.size()) lies inside this pool.
  absl::Status CopyToHost(const void* device_ptr, MutableByteSpan dst) const;
  // The pool's cudaIpcMemHandle_t (64 raw bytes); a peer opens it and adds a block's offset.
  absl::StatusOr<std::string> ExportIpcHandle() const;
  // The GPU's UUID (16 raw bytes), by which a process on the same node finds the same device.
  const std::string& DeviceUuid() const { return uuid_; }

 private:
  GpuTier(uint8_t* base, const GpuTierOptions& options, std::string uuid);
  const int device_;
  const std::string uuid_;  // DeviceUuid(), looked up by Create
};

}  // namespace kvdn::storage

#endif  // KVDN_STORAGE_GPU_TIER_H_
