// kvdn::kernels — moving KV between kvdn's chunks and an inference engine's paged KV cache on the
// GPU, and warming the GPU's L2 with the pages an attention kernel reads next.
//
// A chunk's payload is layer-major, `[layer][K|V][token][kv_head][dim]` (ARCHITECTURE.md), so one
// layer of a chunk is one contiguous range: K for all its tokens, then V. The engine's cache is
// paged: a sequence's token at position p lives in block `block_table[p / block_size]`, slot
// `p % block_size`. Three layouts are understood (PagedKvLayout).
//
// Thread-safety: the functions only enqueue work on the caller's stream; they never synchronize.
// Pointers are device pointers (or managed/host-mapped memory the device can address).
#ifndef KVDN_KERNELS_PAGED_KV_H_
#define KVDN_KERNELS_PAGED_KV_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "kvdn/common/chunk_key.h"

namespace kvdn::kernels {

enum class PagedKvLayout : uint8_t {
  // vLLM: separate K and V tensors, each [num_blocks, block_size, num_kv_heads, head_dim].
  kNhd = 0,
  // vLLM (some backends): one tensor [num_blocks, 2, block_size, num_kv_heads, head_dim]
  // (K at [:, 0], V at [:, 1]); `v` is unused and must be null.
  kNhdCombined = 1,
  // FlashInfer / SGLang: separate K and V tensors, each [num_pages, num_kv_heads, page_size,
  // head_dim].
  kHnd = 2,
};
const char* LayoutName(PagedKvLayout layout);

// Which kernel InjectLayer, ExtractLayer and InjectChunkLayer run; process-wide, for benchmarks
// and tests (all must give the same bytes). kAuto: on sm_90 and later, where every row is
// 16-byte aligned and a token's row over all heads is at most 32 KiB, Hopper's TMA (one warp per
// CTA streaming through shared memory): bulk copies of whole token rows where a token's heads
// are contiguous in the cache (NHD, NHD-combined, HND with one-token pages), tensor-map copies
// that transpose HND pages; elsewhere, and always with kVector, 16/8/4/2/1-byte vector loads and
// stores.
enum class CopyKernel : uint8_t { kAuto = 0, kVector = 1 };
void SetCopyKernel(CopyKernel kernel);

struct PagedKvLayer;
// The kernel kAuto picks for `cache` on the current device when the chunk side is 16-byte
// aligned (InjectLayer / ExtractLayer; InjectChunkLayer when every payload is): for tests,
// benchmarks and logs.
enum class CopyPath : uint8_t { kVector = 0, kBulkRows = 1, kTensorMap = 2 };
CopyPath PlannedCopyPath(const PagedKvLayer& cache);
const char* CopyPathName(CopyPath path);

// One layer of an engine's paged KV cache, described without copying it.
struct PagedKvLayer {
  void* k = nullptr;
  void* v = nullptr;  // null for kNhdCombined
  PagedKvLayout layout = PagedKvLayout::kNhd;
  int32_t num_blocks = 0;
  int32_t block_size = 0;  // tokens per block (page), any value >= 1
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  Dtype dtype = Dtype::kBFloat16;
};

// Which tokens of a sequence one call moves: `num_tokens` tokens starting at sequence position
// `first_token`, through `block_table` (device int32, `block_table_len` entries: block ids for
// positions [0, block_table_len * block_size)).
struct TokenRange {
  const int32_t* block_table = nullptr;
  int32_t block_table_len = 0;
  int32_t first_token = 0;
  int32_t num_tokens = 0;
};

// Bytes of one chunk layer for `num_tokens` tokens: 2 * num_tokens * kv_heads * head_dim * elem.
uint64_t ChunkLayerBytes(const PagedKvLayer& cache, int32_t num_tokens);

// Copies one chunk layer (`src`, contiguous `[K|V][token][kv_head][dim]`, ChunkLayerBytes bytes)
// into the cache's blocks for `range`, bit for bit. Block-table entries outside
// [0, num_blocks) are skipped (nothing is written for those tokens) rather than written out of
// bounds. INVALID_ARGUMENT for a bad shape, a range past the block table, or a null pointer;
// INTERNAL with CUDA's message when the launch fails.
absl::Status InjectLayer(const void* src, const PagedKvLayer& cache, const TokenRange& range,
                         cudaStream_t stream);

// A whole chunk payload in device memory (`[layer][K|V][token][kv_head][dim]` for num_tokens
// tokens) and the sequence positions its tokens take.
struct ChunkSource {
  const void* payload = nullptr;
  int32_t first_token = 0;
  int32_t num_tokens = 0;
};

// InjectLayer for layer `layer` of many chunks in one launch (chunks that lie apart in device
// memory, e.g. in kvdnd's GPU tier). `sources` is checked here; `device_sources` holds the same
// entries in device memory (the caller uploads them once for every layer and keeps them until
// the launches have run). INVALID_ARGUMENT as InjectLayer for any source, for a null or
// misaligned payload (every payload aligned alike, to the row's vector width), for more than
// 65535 sources or a negative layer. Payloads may lie in page-locked host memory mapped for the
// device (cudaHostRegister): the kernel then reads them over PCIe. Pass `kernel` kVector for
// those: its many outstanding loads read host memory at 87% of the copy engines' H2D ceiling,
// the bulk-copy kernel at 64% (H200, 32K Llama-3-8B tokens from kvdnd's mapped host tier;
// bench/results/connector-2026-12-03-mapped-host-tier.md). kAuto: as SetCopyKernel says.
absl::Status InjectChunkLayer(absl::Span<const ChunkSource> sources,
                              const ChunkSource* device_sources, int32_t layer,
                              const PagedKvLayer& cache, const int32_t* block_table,
                              int32_t block_table_len, cudaStream_t stream,
                              CopyKernel kernel = CopyKernel::kAuto);

// The inverse: gathers `range` from the cache into `dst` (contiguous chunk layer). Tokens whose
// block-table entry is out of range are left unwritten in `dst`.
absl::Status ExtractLayer(const PagedKvLayer& cache, const TokenRange& range, void* dst,
                          cudaStream_t stream);

// Prefetches into L2 the K and V of the whole blocks that `range` covers (in token order), as
// many blocks as fit `l2_budget_bytes` (0: no limit), one cp.async.bulk.prefetch.L2 per block's K
// and V (sm_90; a plain one-line prefetch on older GPUs). For engines that keep their own
// attention kernel: enqueue it on a side stream as the previous layer's attention starts. Returns
// the bytes it asked for in `*bytes` when not null. Nothing is written. INVALID_ARGUMENT when a
// block is not a multiple of 16 bytes or the cache is not 16-byte aligned.
absl::Status PrefetchL2(const PagedKvLayer& cache, const TokenRange& range,
                        uint64_t l2_budget_bytes, cudaStream_t stream, uint64_t* bytes = nullptr);

// PrefetchL2 for a whole batch in one launch, from the tensors an engine's attention already
// takes: `block_tables` [batch][max_blocks_per_seq] and `context_lens` [batch] (device int32).
// Every block holding one of the first context_lens[b] tokens of each sequence is prefetched
// (K and V), as many as `l2_budget_bytes` allows when nonzero (the budget is split evenly over
// the sequences). `*bytes` (when not null) gets the most it may ask for. INVALID_ARGUMENT as
// PrefetchL2, or for batch < 1 or max_blocks_per_seq < 1.
absl::Status PrefetchL2Batch(const PagedKvLayer& cache, const int32_t* block_tables,
                             int32_t max_blocks_per_seq, const int32_t* context_lens, int32_t batch,
                             uint64_t l2_budget_bytes, cudaStream_t stream,
                             uint64_t* bytes = nullptr);

}  // namespace kvdn::kernels

#endif  // KVDN_KERNELS_PAGED_KV_H_
