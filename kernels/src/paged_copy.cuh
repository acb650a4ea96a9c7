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

// ---- Bulk-copy (TMA) variant, sm_90+ ----
// The same copies through each SM's bulk asynchronous copy unit: one warp per CTA keeps
// kBulkCopyStages stages of `rows_per_stage` (kv, token) rows in shared memory, loads signalled
// by an mbarrier's transaction count, stores tracked as bulk groups; no data passes through
// registers. The chunk side of a stage is one contiguous copy; the cache side one copy per row:
// layouts where all heads of a token's row are contiguous: NHD, NHD-combined, and HND with
// one-token pages. (HND with larger pages, tried: a copy per (row, head) of 256 bytes read
// 0.83-0.96x the vector kernel; transposing each stage in shared memory, for a copy per
// (head, run of rows in a page), 0.61-0.90x;
// bench/results/kernels-2026-12-02-bulk-copy.md.) Rows start 16-byte aligned (the launcher
// checks). Persistent: a CTA serves stages cta, cta + ctas, ...
inline constexpr int kBulkCopyStages = 4;
inline constexpr int kBulkCopyStageBytes = 16 << 10;
inline constexpr int kBulkCopyCtasPerSm = 3;

// (kv, token) rows per stage for rows of `row_all` bytes (all heads), or 0 when a row is larger
// than two stages' bytes (the vector kernel then serves).
inline int BulkCopyRowsPerStage(int64_t row_all) {
  if (row_all <= 0 || row_all > 2 * kBulkCopyStageBytes) return 0;
  return row_all >= kBulkCopyStageBytes ? 1 : static_cast<int>(kBulkCopyStageBytes / row_all);
}

// Dynamic shared memory of a bulk-copy CTA: kBulkCopyStages stages of `rows` rows of `row_all`.
inline size_t BulkCopySmem(int rows, int64_t row_all) {
  return static_cast<size_t>(kBulkCopyStages * rows * row_all);
}

__device__ __forceinline__ uint32_t SharedAddress(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// PTX of the TMA kernels (sm_90+): bulk copies global -> shared completing on an mbarrier's
// transaction count, shared -> global in bulk groups, and the stage pipeline they share.
__device__ __forceinline__ void BulkLoad(uint32_t dst, const void* src, uint32_t bytes,
                                         uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, "
      "[%3];" ::"r"(dst),
      "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}

__device__ __forceinline__ void BulkStore(void* dst, uint32_t src, uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst), "r"(src),
               "r"(bytes)
               : "memory");
}

// Arrives on `bar` expecting `bytes` more of transactions (0: the phase ends with this arrival
// once nothing is pending).
__device__ __forceinline__ void ExpectTx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
               : "memory");
}

// The stage pipeline of a one-warp TMA copy CTA over its `mine` work items: kBulkCopyStages
// mbarriers at shared address `b0` (initialised here, one arrival per phase), item it in stage
// it % kBulkCopyStages. issue_loads(it) starts item it's loads (lane 0 arrives with their bytes);
// issue_stores(it) starts its stores once they landed; a bulk group per item, and a stage is
// refilled once the stores of the item it held have read it.
template <typename Loads, typename Stores>
__device__ __forceinline__ void RunBulkStages(int64_t mine, uint32_t b0, Loads&& issue_loads,
                                              Stores&& issue_stores) {
  if (threadIdx.x == 0) {
    for (int s = 0; s < kBulkCopyStages; ++s) {
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(b0 + 8 * s));
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncwarp();
  for (int64_t it = 0; it < kBulkCopyStages - 1 && it < mine; ++it) issue_loads(it);
  for (int64_t it = 0; it < mine; ++it) {
    if (it + kBulkCopyStages - 1 < mine) {
      // The stage refilled now held iteration it - 1: its stores must have read it.
      asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
      __syncwarp();
      issue_loads(it + kBulkCopyStages - 1);
    }
    const uint32_t bar = b0 + 8 * static_cast<uint32_t>(it % kBulkCopyStages);
    const auto parity = static_cast<uint32_t>((it / kBulkCopyStages) & 1);
    uint32_t done = 0;
    while (!done) {
      asm volatile(
          "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, "
          "0, p; }"
          : "=r"(done)
          : "r"(bar), "r"(parity)
          : "memory");
    }
    issue_stores(it);
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
  }
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

template <bool kInject>
__device__ __forceinline__ void PagedCopyBulkRows(const PagedCopyParams& p, int rows_per_stage,
                                                  int64_t cta, int64_t ctas) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(128) unsigned char bulk_smem[];
  __shared__ __align__(8) uint64_t bars[kBulkCopyStages];
  const int lane = static_cast<int>(threadIdx.x);
  const int64_t pairs = 2 * int64_t{p.num_tokens};  // (kv, token) rows, K first
  const int64_t row_all = int64_t{p.row_vecs} * 16 * p.heads;
  const int64_t stage_bytes = rows_per_stage * row_all;
  const int64_t stages = (pairs + rows_per_stage - 1) / rows_per_stage;
  const int64_t mine = stages > cta ? (stages - cta + ctas - 1) / ctas : 0;
  if (mine == 0) return;
  const uint32_t s0 = SharedAddress(bulk_smem), b0 = SharedAddress(bars);
  const auto row_u32 = static_cast<uint32_t>(row_all);
  char* chunk = static_cast<char*>(p.chunk);
  // The cache address of row q (all its heads), or null where its block-table entry is out of
  // range.
  auto cache_at = [&](int64_t q) -> char* {
    const int kv = q >= p.num_tokens ? 1 : 0;
    const int64_t pos = p.first_token + (q - int64_t{kv} * p.num_tokens);
    const int32_t block = p.block_table[pos / p.block_size];
    if (block < 0 || block >= p.num_blocks) return nullptr;
    char* base = static_cast<char*>(kv == 0 || p.layout == 1 ? p.k : p.v);
    return base + CacheRowOffset(p, kv, block, static_cast<int>(pos % p.block_size), 0) * 16;
  };
  auto issue_loads = [&](int64_t it) {
    const int s = static_cast<int>(it % kBulkCopyStages);
    const int64_t q0 = (cta + it * ctas) * rows_per_stage;
    const int rows = static_cast<int>(pairs - q0 < rows_per_stage ? pairs - q0 : rows_per_stage);
    const uint32_t buf = s0 + static_cast<uint32_t>(s * stage_bytes), bar = b0 + 8 * s;
    if (kInject) {  // the chunk's rows are contiguous: one copy
      if (lane == 0) {
        const auto bytes = static_cast<uint32_t>(rows * row_all);
        ExpectTx(bar, bytes);
        BulkLoad(buf, chunk + q0 * row_all, bytes, bar);
      }
      return;
    }
    uint32_t bytes = 0;
    for (int r = lane; r < rows; r += 32) {
      if (const char* src = cache_at(q0 + r)) {
        BulkLoad(buf + static_cast<uint32_t>(r * row_all), src, row_u32, bar);
        bytes += row_u32;
      }
    }
    // Copies may complete before the expectation is set: the phase cannot end before lane 0
    // arrives, and the transaction count may pass below zero meanwhile.
    bytes = __reduce_add_sync(0xffffffffu, bytes);
    if (lane == 0) ExpectTx(bar, bytes);
  };
  auto issue_stores = [&](int64_t it) {
    const int s = static_cast<int>(it % kBulkCopyStages);
    const int64_t q0 = (cta + it * ctas) * rows_per_stage;
    const int rows = static_cast<int>(pairs - q0 < rows_per_stage ? pairs - q0 : rows_per_stage);
    const uint32_t buf = s0 + static_cast<uint32_t>(s * stage_bytes);
    if (kInject) {
      for (int r = lane; r < rows; r += 32) {
        if (char* dst = cache_at(q0 + r))
          BulkStore(dst, buf + static_cast<uint32_t>(r * row_all), row_u32);
      }
    } else {
      // Rows whose entry is out of range were not loaded and are left unwritten in the chunk.
      bool all = true;
      for (int r = lane; r < rows; r += 32) all = all && cache_at(q0 + r) != nullptr;
      if (__all_sync(0xffffffffu, all)) {
        if (lane == 0) BulkStore(chunk + q0 * row_all, buf, static_cast<uint32_t>(rows * row_all));
      } else {
        for (int r = lane; r < rows; r += 32) {
          if (cache_at(q0 + r) != nullptr) {
            BulkStore(chunk + (q0 + r) * row_all, buf + static_cast<uint32_t>(r * row_all),
                      static_cast<uint32_t>(row_all));
          }
        }
      }
    }
  };
  RunBulkStages(mine, b0, issue_loads, issue_stores);
#endif
}

template <bool kInject>
__global__ void __launch_bounds__(32) PagedCopyBulkKernel(PagedCopyParams p, int rows_per_stage) {
  PagedCopyBulkRows<kInject>(p, rows_per_stage, blockIdx.x, gridDim.x);
}

__global__ void __launch_bounds__(32)
    InjectChunksBulkKernel(PagedCopyParams p, const ChunkSourceDev* sources, int32_t layer,
                           int rows_per_stage) {
  const ChunkSourceDev src = sources[blockIdx.y];
  p.first_token = src.first_token;
  p.num_tokens = src.num_tokens;
  p.chunk = const_cast<char*>(static_cast<const char*>(src.payload)) +
            int64_t{layer} * 2 * src.num_tokens * p.heads * p.row_vecs * 16;
  PagedCopyBulkRows<true>(p, rows_per_stage, blockIdx.x, gridDim.x);
}

// A token's heads contiguous in the cache (NHD, NHD-combined, HND with one-token pages),
// p.row_vecs counts 16-byte vectors (rows 16-byte aligned),
// BulkCopyRowsPerStage of the row is not 0, PrepareTmaCopyKernels (paged_copy_tma.cuh) has run on
// this device; `sms`:
// the device's multiprocessors.
template <bool kInject>
cudaError_t LaunchPagedCopyBulk(const PagedCopyParams& p, int sms, cudaStream_t stream) {
  const int64_t pairs = 2 * int64_t{p.num_tokens};
  if (pairs == 0) return cudaSuccess;
  const int64_t row_all = int64_t{p.row_vecs} * 16 * p.heads;
  const int rows = BulkCopyRowsPerStage(row_all);
  const int64_t stages = (pairs + rows - 1) / rows;
  const int64_t max_ctas = int64_t{sms} * kBulkCopyCtasPerSm;
  const size_t smem = BulkCopySmem(rows, row_all);
  PagedCopyBulkKernel<kInject>
      <<<static_cast<unsigned>(stages < max_ctas ? stages : max_ctas), 32, smem, stream>>>(p, rows);
  return cudaGetLastError();
}

inline cudaError_t LaunchInjectChunksBulk(const PagedCopyParams& p, const ChunkSourceDev* sources,
                                          int32_t count, int32_t max_tokens, int32_t layer, int sms,
                                          cudaStream_t stream) {
  if (count == 0 || max_tokens == 0) return cudaSuccess;
  if (count > 65535) return cudaErrorInvalidValue;
  const int64_t row_all = int64_t{p.row_vecs} * 16 * p.heads;
  const int rows = BulkCopyRowsPerStage(row_all);
  const int64_t stages = (2 * int64_t{max_tokens} + rows - 1) / rows;
  // About kBulkCopyCtasPerSm CTAs per SM over all sources, at least one per source.
  int64_t per_source = (int64_t{sms} * kBulkCopyCtasPerSm + count - 1) / count;
  if (per_source > stages) per_source = stages;
  const size_t smem = BulkCopySmem(rows, row_all);
  InjectChunksBulkKernel<<<dim3(static_cast<unsigned>(per_source), static_cast<unsigned>(count)),
                           32, smem, stream>>>(p, sources, layer, rows);
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
