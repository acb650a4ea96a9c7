#include "kvdn/storage/gpu_tier.h"

#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "src/cuda_runtime.h"

namespace kvdn::storage {

bool GpuAvailable() { return cuda::DeviceCount() > 0; }

absl::StatusOr<std::unique_ptr<GpuTier>> GpuTier::Create(const GpuTierOptions& options) {
  KVDN_RETURN_IF_ERROR(options.watermarks.Validate());
  const uint64_t a = options.alignment;
  if (a < 256 || (a & (a - 1)) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("gpu tier alignment ", a, " must be a power of two >= 256"));
  }
  if (options.capacity_bytes == 0)
    return absl::InvalidArgumentError("gpu tier capacity_bytes is 0");
  const int n = cuda::DeviceCount();
  if (n == 0) {
    return absl::FailedPreconditionError(
        "gpu tier: no CUDA device is usable (or kvdn was built without CUDA)");
  }
  if (options.device < 0 || options.device >= n) {
    return absl::InvalidArgumentError(
        absl::StrCat("gpu tier: device ", options.device, " does not exist; there are ", n));
  }
  GpuTierOptions o = options;
  o.capacity_bytes = (options.capacity_bytes + a - 1) & ~(a - 1);
  // Looked up once: every GPU-tier descriptor carries it, and cudaGetDeviceProperties per chunk
  // was work for nothing (not measurable in a 128-chunk GetDescriptors call on the H200 host).
  KVDN_ASSIGN_OR_RETURN(std::string uuid, cuda::DeviceUuid(o.device));
  KVDN_ASSIGN_OR_RETURN(void* p, cuda::DeviceMalloc(o.device, o.capacity_bytes));
  return std::unique_ptr<GpuTier>(new GpuTier(static_cast<uint8_t*>(p), o, std::move(uuid)));
}

GpuTier::GpuTier(uint8_t* base, const GpuTierOptions& options, std::string uuid)
    : MemoryTier(base, options.capacity_bytes, options.alignment, options.watermarks),
      device_(options.device),
      uuid_(std::move(uuid)) {}

GpuTier::~GpuTier() { (void)cuda::DeviceFree(device_, base_); }

absl::Status GpuTier::CopyIn(const MemoryBlock& block, uint64_t offset, ByteSpan src) {
  KVDN_RETURN_IF_ERROR(CheckRange(block, offset, src.size()));
  if (src.empty()) return absl::OkStatus();
  return cuda::CopyHostToDevice(device_, base_ + block.offset + offset, src.data(), src.size());
}

absl::Status GpuTier::CopyOut(const MemoryBlock& block, uint64_t offset,
                              MutableByteSpan dst) const {
  KVDN_RETURN_IF_ERROR(CheckRange(block, offset, dst.size()));
  if (dst.empty()) return absl::OkStatus();
  return cuda::CopyDeviceToHost(device_, dst.data(), base_ + block.offset + offset, dst.size());
}

absl::Status GpuTier::CopyToHost(const void* device_ptr, MutableByteSpan dst) const {
  const auto* p = static_cast<const uint8_t*>(device_ptr);
  if (p < base_ || p > base_ + capacity_ ||
      dst.size() > static_cast<uint64_t>(base_ + capacity_ - p)) {
    return absl::InvalidArgumentError(
        absl::StrCat("device range of ", dst.size(), " bytes is not inside the gpu tier's pool"));
  }
  if (dst.empty()) return absl::OkStatus();
  return cuda::CopyDeviceToHost(device_, dst.data(), p, dst.size());
}

absl::StatusOr<std::string> GpuTier::ExportIpcHandle() const {
  return cuda::IpcHandle(device_, base_);
}

}  // namespace kvdn::storage
