// The one L2 prefetch instruction kvdn's kernels use, and the grid-dependency controls.
#ifndef KVDN_KERNELS_SRC_L2_PREFETCH_CUH_
#define KVDN_KERNELS_SRC_L2_PREFETCH_CUH_

#include <cstdint>

namespace kvdn::kernels::detail {

// Asks L2 to fetch [p, p + bytes) without waiting for it. sm_90: one bulk prefetch
// (cp.async.bulk.prefetch.L2; p 16-byte aligned, bytes a multiple of 16). Older GPUs: one
// ordinary prefetch of the line at p.
__device__ __forceinline__ void PrefetchL2Bytes(const void* p, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
#else
  (void)bytes;
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#endif
}

// Programmatic dependent launch (sm_90; no-ops before): GridLaunchDependents lets the grid
// launched after this one on the stream with programmaticStreamSerializationAllowed be
// scheduled once every CTA of this grid has called it (or exited); GridDependencyWait, in that
// dependent grid, blocks until the grid before it has completed and its writes are visible.
__device__ __forceinline__ void GridLaunchDependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void GridDependencyWait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

}  // namespace kvdn::kernels::detail

#endif  // KVDN_KERNELS_SRC_L2_PREFETCH_CUH_
