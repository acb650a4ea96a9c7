// Kernels behind InjectLayer / ExtractLayer / PrefetchL2 (layer 1 of STYLE.md 12: params struct,
// __global__ kernels, launchers returning cudaError_t). Shapes are validated by paged_copy.cu.
#ifndef KVDN_KERNELS_SRC_PAGED_COPY_CUH_
#define KVDN_KERNELS_SRC_PAGED_COPY_CUH_

#include <cuda_runtime.h>

#include <cstdint>

#include "src/l2_prefetch.cuh"

namespace kvdn::kernels::detail {

// One layer copy between a contiguous chunk layer and a paged cache.
//   chunk:  [2 (K, V)][num_tokens][heads][row_vecs]            (vectors of type Vec)
//   kNhd:   k/v [num_blocks][block_size][heads][row_vecs]
//   kNhdCombined: k [num_blocks][2][block_size][heads][row_vecs]
//   kHnd:   k/v [num_blocks][heads][block_size][row_vecs]
// A "row" is one token's head_dim elements of one head (row_vecs vectors).
struct PagedCopyParams {
  void* chunk;
  void* k;
  void* v;
  const int32_t* block_table;
  int32_t block_table_len;
  int32_t num_blocks;
  int32_t block_size;
  int32_t heads;
  int32_t row_vecs;
  int32_t first_token;
  int32_t num_tokens;
  int32_t layout;  // PagedKvLayout
};

// Vector offset of (kv, slot, head) row start in the cache for `block`; `*base` is K or V.
__device__ __forceinline__ int64_t CacheRowOffset(const PagedCopyParams& p, int kv, int64_t block,
                                                  int slot, int head) {
  switch (p.layout) {
    case 1:  // kNhdCombined
      return (((block * 2 + kv) * p.block_size + slot) * p.heads + head) * int64_t{p.row_vecs};
    case 2:  // kHnd
      return ((block * p.heads + head) * p.block_size + slot) * int64_t{p.row_vecs};
    default:  // kNhd
      return ((block * p.block_size + slot) * p.heads + head) * int64_t{p.row_vecs};
  }
}

// Each CTA moves kTokens (kv, token) rows-of-all-heads; each thread keeps kTokens vectors in
// flight (all loads, then all stores). kInject: chunk -> cache; else cache -> chunk.
template <typename Vec, int kTokens, bool kInject>
__global__ void __launch_bounds__(256) PagedCopyKernel(PagedCopyParams p) {
  const int vecs_per_token = p.heads * p.row_vecs;
  const int64_t pairs = 2 * int64_t{p.num_tokens};  // (kv, token), K first
  const int64_t first_pair = int64_t{blockIdx.x} * kTokens;
  Vec* chunk = static_cast<Vec*>(p.chunk);
  for (int j = threadIdx.x; j < vecs_per_token; j += blockDim.x) {
    const int head = j / p.row_vecs;
    const int vec = j - head * p.row_vecs;
    Vec buf[kTokens];
    int64_t dst_off[kTokens];
    Vec* base[kTokens];
#pragma unroll
    for (int i = 0; i < kTokens; ++i) {
      const int64_t q = first_pair + i;
      base[i] = nullptr;
      if (q >= pairs) continue;
      const int kv = q >= p.num_tokens ? 1 : 0;
      const int64_t t = q - int64_t{kv} * p.num_tokens;
      const int64_t pos = p.first_token + t;
      const int32_t block = p.block_table[pos / p.block_size];
      if (block < 0 || block >= p.num_blocks) continue;  // skipped, never out of bounds
      const int slot = static_cast<int>(pos % p.block_size);
      base[i] = static_cast<Vec*>(kv == 0 || p.layout == 1 ? p.k : p.v);
      dst_off[i] = CacheRowOffset(p, kv, block, slot, head) + vec;
      const int64_t chunk_off = q * vecs_per_token + j;
      // NOTE: inject streams the chunk through (evict-first loads and stores): measured 80% of
      // a device-to-device copy with default caching, the chunk polluting L2 for the writes.
      buf[i] = kInject ? __ldcs(chunk + chunk_off) : base[i][dst_off[i]];
    }
#pragma unroll
    for (int i = 0; i < kTokens; ++i) {
      if (base[i] == nullptr) continue;
      const int64_t chunk_off = (first_pair + i) * vecs_per_token + j;
      if (kInject) {
        __stcs(base[i] + dst_off[i], buf[i]);
      } else {
        chunk[chunk_off] = buf[i];
      }
    }
  }
}

inline constexpr int kCopyTokensPerCta = 8;

template <typename Vec, bool kInject>
cudaError_t LaunchPagedCopy(const PagedCopyParams& p, cudaStream_t stream) {
  const int64_t pairs = 2 * int64_t{p.num_tokens};
  if (pairs == 0) return cudaSuccess;
  const int64_t ctas = (pairs + kCopyTokensPerCta - 1) / kCopyTokensPerCta;
  if (ctas > 0x7fffffff) return cudaErrorInvalidValue;
  const int vecs_per_token = p.heads * p.row_vecs;
  const int threads = vecs_per_token >= 256 ? 256 : ((vecs_per_token + 31) / 32) * 32;
  PagedCopyKernel<Vec, kCopyTokensPerCta, kInject>
      <<<static_cast<unsigned>(ctas), threads, 0, stream>>>(p);
  return cudaGetLastError();
}

// L2 prefetch of whole rows (K and V) of the blocks covering [first_token, first_token + n):
// one bulk prefetch per (kv, token, head) row in the NHD/HND layouts. `row_bytes` is a multiple
// of 16 and rows are 16-byte aligned (checked by the caller).
struct PrefetchParams {
  const char* k;
  const char* v;
  const int32_t* block_table;
  int32_t num_blocks;
  int32_t block_size;
  int32_t heads;
  int32_t row_bytes;
  int32_t first_token;
  int32_t num_tokens;
  int32_t layout;
};

__global__ void PrefetchKernel(PrefetchParams p) {
  const int64_t rows = 2 * int64_t{p.num_tokens} * p.heads;
  for (int64_t r = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; r < rows;
       r += int64_t{gridDim.x} * blockDim.x) {
    const int head = static_cast<int>(r % p.heads);
    const int64_t q = r / p.heads;
    const int kv = q >= p.num_tokens ? 1 : 0;
    const int64_t pos = p.first_token + (q - int64_t{kv} * p.num_tokens);
    const int32_t block = p.block_table[pos / p.block_size];
    if (block < 0 || block >= p.num_blocks) continue;
    const int slot = static_cast<int>(pos % p.block_size);
    int64_t row;
    switch (p.layout) {
      case 1:
        row = ((int64_t{block} * 2 + kv) * p.block_size + slot) * p.heads + head;
        break;
      case 2:
        row = (int64_t{block} * p.heads + head) * p.block_size + slot;
        break;
      default:
        row = (int64_t{block} * p.block_size + slot) * p.heads + head;
    }
    const char* base = kv == 0 || p.layout == 1 ? p.k : p.v;
    PrefetchL2Bytes(base + row * p.row_bytes, static_cast<uint32_t>(p.row_bytes));
  }
}

inline cudaError_t LaunchPrefetch(const PrefetchParams& p, cudaStream_t stream) {
  const int64_t rows = 2 * int64_t{p.num_tokens} * p.heads;
  if (rows == 0) return cudaSuccess;
  const int64_t ctas = (rows + 255) / 256;
  PrefetchKernel<<<static_cast<unsigned>(ctas < 4096 ? ctas : 4096), 256, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace kvdn::kernels::detail

#endif  // KVDN_KERNELS_SRC_PAGED_COPY_CUH_
