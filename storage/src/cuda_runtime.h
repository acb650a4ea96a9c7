// The few CUDA runtime calls storage/ makes, behind plain functions so that only cuda_runtime.cc
// depends on KVDN_WITH_CUDA (STYLE.md 5). Without CUDA every call reports FAILED_PRECONDITION.
#ifndef KVDN_STORAGE_SRC_CUDA_RUNTIME_H_
#define KVDN_STORAGE_SRC_CUDA_RUNTIME_H_

#include <cstddef>
#include <string>

#include "kvdn/common/status.h"

namespace kvdn::storage::cuda {

// Number of usable CUDA devices; 0 when built without CUDA or when no driver/device is present.
int DeviceCount();

absl::Status RegisterHost(void* ptr, size_t len);  // cudaHostRegister (portable)
absl::Status UnregisterHost(void* ptr);
absl::StatusOr<void*> DeviceMalloc(int device, size_t len);
absl::Status DeviceFree(int device, void* ptr);
absl::Status CopyHostToDevice(int device, void* dst, const void* src, size_t len);
absl::Status CopyDeviceToHost(int device, void* dst, const void* src, size_t len);
// cudaIpcGetMemHandle of an allocation's base, as its raw 64 bytes.
absl::StatusOr<std::string> IpcHandle(int device, void* base);
// The device's UUID (cudaDeviceProp.uuid, 16 raw bytes): names one GPU across processes, whose
// device ordinals differ with CUDA_VISIBLE_DEVICES.
absl::StatusOr<std::string> DeviceUuid(int device);

}  // namespace kvdn::storage::cuda

#endif  // KVDN_STORAGE_SRC_CUDA_RUNTIME_H_
