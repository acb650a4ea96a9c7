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

// One CTA's share: kTokens (kv, token) rows-of-all-heads from `first_pair` on; each thread keeps
// kTokens vectors in flight (all loads, then all stores). kInject: chunk -> cache; else cache ->
// chunk.
template <typename Vec, int kTokens, bool kInject>
__device__ __forceinline__ void PagedCopyRows(const PagedCopyParams& p, int64_t first_pair) {
  const int vecs_per_token = p.heads * p.row_vecs;
  const int64_t pairs = 2 * int64_t{p.num_tokens};  // (kv, token), K first
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
      // NOTE: both directions stream (evict-first loads and stores: every byte is touched
      // once): inject measured 80% of a device-to-device copy with default caching, the chunk
      // polluting L2 for the writes.
      buf[i] = kInject ? __ldcs(chunk + chunk_off) : __ldcs(base[i] + dst_off[i]);
    }
#pragma unroll
    for (int i = 0; i < kTokens; ++i) {
      if (base[i] == nullptr) continue;
      const int64_t chunk_off = (first_pair + i) * vecs_per_token + j;
      if (kInject) {
        __stcs(base[i] + dst_off[i], buf[i]);
      } else {
        __stcs(chunk + chunk_off, buf[i]);
      }
    }
  }
}

template <typename Vec, int kTokens, bool kInject>
__global__ void __launch_bounds__(256) PagedCopyKernel(PagedCopyParams p) {
  PagedCopyRows<Vec, kTokens, kInject>(p, int64_t{blockIdx.x} * kTokens);
}

// Many chunks' layer `layer` in one launch: CTA row y serves source y, whose payload holds the
// whole chunk ([layer][K|V][token][heads][row_vecs]); `p` has the cache, the table and the row
// shape, its chunk / first_token / num_tokens come from the source.
struct ChunkSourceDev {
  const void* payload;
  int32_t first_token;
  int32_t num_tokens;
};

template <typename Vec, int kTokens>
__global__ void __launch_bounds__(256)
    InjectChunksKernel(PagedCopyParams p, const ChunkSourceDev* sources, int32_t layer) {
  const ChunkSourceDev src = sources[blockIdx.y];
  const int64_t first_pair = int64_t{blockIdx.x} * kTokens;
  if (first_pair >= 2 * int64_t{src.num_tokens}) return;
  p.first_token = src.first_token;
  p.num_tokens = src.num_tokens;
  p.chunk = const_cast<Vec*>(static_cast<const Vec*>(src.payload)) +
            int64_t{layer} * 2 * src.num_tokens * p.heads * p.row_vecs;
  PagedCopyRows<Vec, kTokens, true>(p, first_pair);
}

inline constexpr int kCopyTokensPerCta = 8;

template <typename Vec>
cudaError_t LaunchInjectChunks(const PagedCopyParams& p, const ChunkSourceDev* sources,
                               int32_t count, int32_t max_tokens, int32_t layer,
                               cudaStream_t stream) {
  if (count == 0 || max_tokens == 0) return cudaSuccess;
  const int64_t ctas = (2 * int64_t{max_tokens} + kCopyTokensPerCta - 1) / kCopyTokensPerCta;
  if (ctas > 0x7fffffff || count > 65535) return cudaErrorInvalidValue;
  const int vecs_per_token = p.heads * p.row_vecs;
  const int threads = vecs_per_token >= 256 ? 256 : ((vecs_per_token + 31) / 32) * 32;
  InjectChunksKernel<Vec, kCopyTokensPerCta>
      <<<dim3(static_cast<unsigned>(ctas), static_cast<unsigned>(count)), threads, 0, stream>>>(
          p, sources, layer);
  return cudaGetLastError();
}

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

// L2 prefetch of the whole blocks (pages) that hold tokens [first_token, first_token + n): one
// bulk prefetch per block for K and one for V. In all three layouts a block's K (and its V) is
// one contiguous range of `block_bytes`: NHD and HND [block][...], combined [block][K|V][...].
// NOTE: whole blocks, not rows: 256-byte bulk prefetches per row swamped the copy engine (a
// 64 MiB prefetch took 0.6 ms and stalled the attention beside it; bench/results).
struct PrefetchParams {
  const char* k;
  const char* v;
  const int32_t* block_table;
  int32_t num_blocks;
  int32_t block_size;
  int64_t block_bytes;  // one block's K (or V): block_size x heads x row bytes
  int32_t first_block;  // index into block_table
  int32_t num_table_blocks;
  int32_t layout;
};

__global__ void PrefetchKernel(PrefetchParams p) {
  const int64_t ops = 2 * int64_t{p.num_table_blocks};
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < ops;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int kv = static_cast<int>(i & 1);
    const int32_t block = p.block_table[p.first_block + (i >> 1)];
    if (block < 0 || block >= p.num_blocks) continue;
    const char* addr = p.layout == 1 ? p.k + (int64_t{block} * 2 + kv) * p.block_bytes
                                     : (kv == 0 ? p.k : p.v) + int64_t{block} * p.block_bytes;
    // Bulk prefetches take up to 2^32 - 16 bytes; blocks are far smaller.
    PrefetchL2Bytes(addr, static_cast<uint32_t>(p.block_bytes));
  }
}

inline cudaError_t LaunchPrefetch(const PrefetchParams& p, cudaStream_t stream) {
  const int64_t ops = 2 * int64_t{p.num_table_blocks};
  if (ops == 0) return cudaSuccess;
  const int64_t ctas = (ops + 127) / 128;
  PrefetchKernel<<<static_cast<unsigned>(ctas < 1024 ? ctas : 1024), 128, 0, stream>>>(p);
  return cudaGetLastError();
}

// The batched form: one op per (sequence, block, K|V) for the blocks under context_lens[b],
// at most `max_blocks` per sequence.
struct BatchPrefetchParams {
  const char* k;
  const char* v;
  const int32_t* block_tables;
  const int32_t* context_lens;
  int32_t batch;
  int32_t max_blocks_per_seq;
  int32_t max_blocks;  // budget per sequence
  int32_t num_blocks;
  int32_t block_size;
  int64_t block_bytes;
  int32_t layout;
};

__global__ void BatchPrefetchKernel(BatchPrefetchParams p) {
  const int64_t ops = int64_t{p.batch} * p.max_blocks * 2;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < ops;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int kv = static_cast<int>(i & 1);
    const int64_t j = i >> 1;
    const int b = static_cast<int>(j / p.max_blocks);
    const int blk = static_cast<int>(j % p.max_blocks);
    const int ctx = p.context_lens[b];
    if (blk >= (ctx + p.block_size - 1) / p.block_size || blk >= p.max_blocks_per_seq) continue;
    const int32_t block = p.block_tables[int64_t{b} * p.max_blocks_per_seq + blk];
    if (block < 0 || block >= p.num_blocks) continue;
    const char* addr = p.layout == 1 ? p.k + (int64_t{block} * 2 + kv) * p.block_bytes
                                     : (kv == 0 ? p.k : p.v) + int64_t{block} * p.block_bytes;
    PrefetchL2Bytes(addr, static_cast<uint32_t>(p.block_bytes));
  }
}

inline cudaError_t LaunchBatchPrefetch(const BatchPrefetchParams& p, cudaStream_t stream) {
  const int64_t ops = int64_t{p.batch} * p.max_blocks * 2;
  if (ops == 0) return cudaSuccess;
  const int64_t ctas = (ops + 127) / 128;
  BatchPrefetchKernel<<<static_cast<unsigned>(ctas < 1024 ? ctas : 1024), 128, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace kvdn::kernels::detail

#endif  // KVDN_KERNELS_SRC_PAGED_COPY_CUH_
