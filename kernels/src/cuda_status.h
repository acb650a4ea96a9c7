// Internal to kernels/: a CUDA error as an absl::Status.
#ifndef KVDN_KERNELS_SRC_CUDA_STATUS_H_
#define KVDN_KERNELS_SRC_CUDA_STATUS_H_

#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace kvdn::kernels {

// OK for cudaSuccess; otherwise INTERNAL naming `what` and CUDA's message.
inline absl::Status CudaStatus(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorString(e)));
}

}  // namespace kvdn::kernels

#endif  // KVDN_KERNELS_SRC_CUDA_STATUS_H_
