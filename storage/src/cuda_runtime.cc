#include "src/cuda_runtime.h"

#include "absl/strings/str_cat.h"

#if KVDN_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace kvdn::storage::cuda {

#if KVDN_WITH_CUDA
namespace {

absl::Status ToStatus(cudaError_t err, absl::string_view what) {
  if (err == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(
      absl::StrCat(what, ": ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ")"));
}

}  // namespace

int DeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

absl::Status RegisterHost(void* ptr, size_t len) {
  return ToStatus(cudaHostRegister(ptr, len, cudaHostRegisterPortable), "cudaHostRegister");
}

absl::Status UnregisterHost(void* ptr) {
  return ToStatus(cudaHostUnregister(ptr), "cudaHostUnregister");
}

absl::StatusOr<void*> DeviceMalloc(int device, size_t len) {
  if (absl::Status s = ToStatus(cudaSetDevice(device), "cudaSetDevice"); !s.ok()) return s;
  void* p = nullptr;
  if (absl::Status s = ToStatus(cudaMalloc(&p, len), absl::StrCat("cudaMalloc(", len, ")"));
      !s.ok()) {
    return absl::ResourceExhaustedError(s.message());
  }
  return p;
}

absl::Status DeviceFree(int device, void* ptr) {
  if (absl::Status s = ToStatus(cudaSetDevice(device), "cudaSetDevice"); !s.ok()) return s;
  return ToStatus(cudaFree(ptr), "cudaFree");
}

absl::Status CopyHostToDevice(int device, void* dst, const void* src, size_t len) {
  if (absl::Status s = ToStatus(cudaSetDevice(device), "cudaSetDevice"); !s.ok()) return s;
  return ToStatus(cudaMemcpy(dst, src, len, cudaMemcpyHostToDevice), "cudaMemcpy H2D");
}

absl::Status CopyDeviceToHost(int device, void* dst, const void* src, size_t len) {
  if (absl::Status s = ToStatus(cudaSetDevice(device), "cudaSetDevice"); !s.ok()) return s;
  return ToStatus(cudaMemcpy(dst, src, len, cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
}

absl::StatusOr<std::string> IpcHandle(int device, void* base) {
  if (absl::Status s = ToStatus(cudaSetDevice(device), "cudaSetDevice"); !s.ok()) return s;
  cudaIpcMemHandle_t h;
  if (absl::Status s = ToStatus(cudaIpcGetMemHandle(&h, base), "cudaIpcGetMemHandle"); !s.ok()) {
    return s;
  }
  return std::string(reinterpret_cast<const char*>(&h), sizeof(h));
}

absl::StatusOr<std::string> DeviceUuid(int device) {
  cudaDeviceProp prop{};
  if (absl::Status s = ToStatus(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
      !s.ok()) {
    return s;
  }
  return std::string(reinterpret_cast<const char*>(&prop.uuid), sizeof(prop.uuid));
}

#else  // !KVDN_WITH_CUDA

namespace {
absl::Status NoCuda() {
  return absl::FailedPreconditionError("kvdn was built without CUDA (no nvcc at configure time)");
}
}  // namespace

int DeviceCount() { return 0; }
absl::Status RegisterHost(void*, size_t) { return NoCuda(); }
absl::Status UnregisterHost(void*) { return NoCuda(); }
absl::StatusOr<void*> DeviceMalloc(int, size_t) { return NoCuda(); }
absl::Status DeviceFree(int, void*) { return NoCuda(); }
absl::Status CopyHostToDevice(int, void*, const void*, size_t) { return NoCuda(); }
absl::Status CopyDeviceToHost(int, void*, const void*, size_t) { return NoCuda(); }
absl::StatusOr<std::string> IpcHandle(int, void*) { return NoCuda(); }
absl::StatusOr<std::string> DeviceUuid(int) { return NoCuda(); }

#endif

}  // namespace kvdn::storage::cuda
