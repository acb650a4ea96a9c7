// Validation and dispatch for InjectLayer / ExtractLayer / PrefetchL2 (layer 2 of STYLE.md 12).
#include <cudaTypedefs.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "kvdn/kernels/paged_kv.h"
#include "src/cuda_status.h"
#include "src/paged_copy.cuh"
#include "src/paged_copy_tma.cuh"

namespace kvdn::kernels {
namespace {

bool Aligned(const void* p, uintptr_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

std::atomic<CopyKernel> g_copy_kernel{CopyKernel::kAuto};
constexpr int kCachedDevices = 16;
// Per device: 0 not looked at yet, -1 no bulk copies there, else its multiprocessors.
std::atomic<int> g_bulk_sms[kCachedDevices];

// The current device's multiprocessors where the bulk-copy kernels may run (sm_90 and later,
// their shared memory granted, not switched off by SetCopyKernel), else 0.
int BulkCopySms() {
  if (g_copy_kernel.load(std::memory_order_relaxed) == CopyKernel::kVector) return 0;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kCachedDevices) {
    (void)cudaGetLastError();
    return 0;
  }
  int v = g_bulk_sms[dev].load(std::memory_order_relaxed);
  if (v == 0) {
    int major = 0, sms = 0;
    const bool ok =
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess &&
        major >= 9 && sms > 0 && detail::PrepareTmaCopyKernels() == cudaSuccess;
    if (!ok) (void)cudaGetLastError();  // not sticky: the vector kernel serves
    v = ok ? sms : -1;
    g_bulk_sms[dev].store(v, std::memory_order_relaxed);
  }
  return v > 0 ? v : 0;
}

// The driver's cuTensorMapEncodeTiled (through the runtime, so kvdn does not link libcuda), or
// null where the driver lacks it.
PFN_cuTensorMapEncodeTiled_v12000 TensorMapEncoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault,
                                         &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// The tensor maps of an HND cache with pages of more than one token (paged_copy_tma.cuh): the
// cache as (row in 8-byte elements, head, slot, page), strides (block_size rows, a row, a page).
// False where the tensor-map kernels cannot serve it (the box limits: a row of at most 256
// elements, at most 256 heads; a token's row a multiple of 128 bytes for shared memory
// alignment, at most two stages; or the driver refuses the map).
bool HndTmaSetUp(const PagedKvLayer& c, int64_t row_bytes, detail::HndTmaMaps* maps,
                 detail::HndTmaParams* p) {
  const int64_t row_all = row_bytes * c.num_kv_heads;
  if (row_bytes % 16 != 0 || row_bytes / 8 > 256 || c.num_kv_heads > 256 || row_all % 128 != 0 ||
      row_all > 2 * detail::kBulkCopyStageBytes || !Aligned(c.k, 16) || !Aligned(c.v, 16)) {
    return false;
  }
  const PFN_cuTensorMapEncodeTiled_v12000 encode = TensorMapEncoder();
  if (encode == nullptr) return false;
  const int64_t tile = std::clamp<int64_t>(detail::kBulkCopyStageBytes / row_all, 1,
                                           std::min<int64_t>(c.block_size, 256));
  const cuuint64_t dims[4] = {
      static_cast<cuuint64_t>(row_bytes / 8), static_cast<cuuint64_t>(c.num_kv_heads),
      static_cast<cuuint64_t>(c.block_size), static_cast<cuuint64_t>(c.num_blocks)};
  const cuuint64_t strides[3] = {static_cast<cuuint64_t>(row_bytes * c.block_size),
                                 static_cast<cuuint64_t>(row_bytes),
                                 static_cast<cuuint64_t>(row_all * c.block_size)};
  const cuuint32_t tile_box[4] = {static_cast<cuuint32_t>(row_bytes / 8),
                                  static_cast<cuuint32_t>(c.num_kv_heads),
                                  static_cast<cuuint32_t>(tile), 1};
  const cuuint32_t slot_box[4] = {tile_box[0], tile_box[1], 1, 1};
  const cuuint32_t unit[4] = {1, 1, 1, 1};
  auto make = [&](CUtensorMap* m, void* base, const cuuint32_t* box) {
    return encode(m, CU_TENSOR_MAP_DATA_TYPE_UINT64, 4, base, dims, strides, box, unit,
                  CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE,
                  CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
  };
  if (!make(&maps->k_tile, c.k, tile_box) || !make(&maps->v_tile, c.v, tile_box) ||
      !make(&maps->k_slot, c.k, slot_box) || !make(&maps->v_slot, c.v, slot_box)) {
    return false;
  }
  p->num_blocks = c.num_blocks;
  p->block_size = c.block_size;
  p->tile_slots = static_cast<int32_t>(tile);
  p->row_all = static_cast<int32_t>(row_all);
  return true;
}

// The kernel for a (valid) cache whose rows of `row_bytes` are 16-byte aligned on both sides;
// `*sms` the multiprocessors for the TMA kernels, `*maps` / `*tma` set for kTensorMap.
CopyPath PlanAligned(const PagedKvLayer& c, int64_t row_bytes, int* sms, detail::HndTmaMaps* maps,
                     detail::HndTmaParams* tma) {
  *sms = BulkCopySms();
  if (*sms == 0) return CopyPath::kVector;
  // A token's heads are contiguous in NHD, NHD-combined, and HND with one-token pages (where
  // [page, head, 1, dim] is [page, 1, head, dim]): whole token rows move as one bulk copy.
  if (c.layout != PagedKvLayout::kHnd || c.block_size == 1) {
    return detail::BulkCopyRowsPerStage(row_bytes * c.num_kv_heads) > 0 ? CopyPath::kBulkRows
                                                                        : CopyPath::kVector;
  }
  return HndTmaSetUp(c, row_bytes, maps, tma) ? CopyPath::kTensorMap : CopyPath::kVector;
}

absl::Status ValidateCache(const PagedKvLayer& c) {
  if (c.k == nullptr) return absl::InvalidArgumentError("cache.k is null");
  if (c.layout == PagedKvLayout::kNhdCombined) {
    if (c.v != nullptr) {
      return absl::InvalidArgumentError("cache.v must be null for the combined NHD layout");
    }
  } else if (c.layout == PagedKvLayout::kNhd || c.layout == PagedKvLayout::kHnd) {
    if (c.v == nullptr) return absl::InvalidArgumentError("cache.v is null");
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("cache.layout ", static_cast<int>(c.layout), " is not a PagedKvLayout"));
  }
  if (c.num_blocks < 1 || c.block_size < 1 || c.num_kv_heads < 1 || c.head_dim < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("cache shape needs num_blocks, block_size, num_kv_heads, head_dim >= 1; got ",
                     c.num_blocks, ", ", c.block_size, ", ", c.num_kv_heads, ", ", c.head_dim));
  }
  if (DtypeSize(c.dtype) == 0) return absl::InvalidArgumentError("cache.dtype is not a Dtype");
  return absl::OkStatus();
}

absl::Status ValidateRange(const PagedKvLayer& c, const TokenRange& r) {
  if (r.num_tokens < 0 || r.first_token < 0) {
    return absl::InvalidArgumentError(absl::StrCat("token range [", r.first_token, ", +",
                                                   r.num_tokens, ") has a negative bound"));
  }
  if (r.num_tokens > 0 && r.block_table == nullptr) {
    return absl::InvalidArgumentError("range.block_table is null");
  }
  const int64_t end = int64_t{r.first_token} + r.num_tokens;
  if (end > int64_t{r.block_table_len} * c.block_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tokens up to position ", end, " need ", (end + c.block_size - 1) / c.block_size,
        " block-table entries; the table has ", r.block_table_len));
  }
  return absl::OkStatus();
}

template <bool kInject>
absl::Status Copy(void* chunk, const PagedKvLayer& c, const TokenRange& r, cudaStream_t stream) {
  if (absl::Status st = ValidateCache(c); !st.ok()) return st;
  if (absl::Status st = ValidateRange(c, r); !st.ok()) return st;
  if (r.num_tokens > 0 && chunk == nullptr) {
    return absl::InvalidArgumentError(kInject ? "src is null" : "dst is null");
  }
  detail::PagedCopyParams p{};
  p.chunk = chunk;
  p.k = c.k;
  p.v = c.v;
  p.block_table = r.block_table;
  p.block_table_len = r.block_table_len;
  p.num_blocks = c.num_blocks;
  p.block_size = c.block_size;
  p.heads = c.num_kv_heads;
  p.first_token = r.first_token;
  p.num_tokens = r.num_tokens;
  p.layout = static_cast<int32_t>(c.layout);
  const int64_t row_bytes = int64_t{c.head_dim} * static_cast<int64_t>(DtypeSize(c.dtype));
  // The widest vector every row start is aligned to.
  const bool ptrs16 = Aligned(chunk, 16) && Aligned(c.k, 16) && (!c.v || Aligned(c.v, 16));
  const bool ptrs4 = Aligned(chunk, 4) && Aligned(c.k, 4) && (!c.v || Aligned(c.v, 4));
  const bool ptrs2 = Aligned(chunk, 2) && Aligned(c.k, 2) && (!c.v || Aligned(c.v, 2));
  cudaError_t e;
  if (row_bytes % 16 == 0 && ptrs16) {
    p.row_vecs = static_cast<int32_t>(row_bytes / 16);
    int sms = 0;
    detail::HndTmaMaps maps;
    detail::HndTmaParams tma{};
    switch (PlanAligned(c, row_bytes, &sms, &maps, &tma)) {
      case CopyPath::kBulkRows:
        e = detail::LaunchPagedCopyBulk<kInject>(p, sms, stream);
        break;
      case CopyPath::kTensorMap:
        tma.block_table = r.block_table;
        e = detail::LaunchHndTmaCopy<kInject>(maps, tma, chunk, r.first_token, r.num_tokens, sms,
                                              stream);
        break;
      default:
        e = detail::LaunchPagedCopy<uint4, kInject>(p, stream);
    }
  } else if (row_bytes % 4 == 0 && ptrs4) {
    p.row_vecs = static_cast<int32_t>(row_bytes / 4);
    e = detail::LaunchPagedCopy<uint32_t, kInject>(p, stream);
  } else if (row_bytes % 2 == 0 && ptrs2) {
    p.row_vecs = static_cast<int32_t>(row_bytes / 2);
    e = detail::LaunchPagedCopy<uint16_t, kInject>(p, stream);
  } else {
    p.row_vecs = static_cast<int32_t>(row_bytes);
    e = detail::LaunchPagedCopy<uint8_t, kInject>(p, stream);
  }
  return CudaStatus(e, kInject ? "InjectLayer launch" : "ExtractLayer launch");
}

}  // namespace

void SetCopyKernel(CopyKernel kernel) { g_copy_kernel.store(kernel, std::memory_order_relaxed); }

CopyPath PlannedCopyPath(const PagedKvLayer& c) {
  if (!ValidateCache(c).ok()) return CopyPath::kVector;
  const int64_t row_bytes = int64_t{c.head_dim} * static_cast<int64_t>(DtypeSize(c.dtype));
  if (row_bytes % 16 != 0 || !Aligned(c.k, 16) || (c.v && !Aligned(c.v, 16))) {
    return CopyPath::kVector;
  }
  int sms = 0;
  detail::HndTmaMaps maps;
  detail::HndTmaParams tma{};
  return PlanAligned(c, row_bytes, &sms, &maps, &tma);
}

const char* CopyPathName(CopyPath path) {
  switch (path) {
    case CopyPath::kVector:
      return "vector";
    case CopyPath::kBulkRows:
      return "bulk rows";
    case CopyPath::kTensorMap:
      return "tensor map";
  }
  return "?";
}

const char* LayoutName(PagedKvLayout layout) {
  switch (layout) {
    case PagedKvLayout::kNhd:
      return "NHD";
    case PagedKvLayout::kNhdCombined:
      return "NHD-combined";
    case PagedKvLayout::kHnd:
      return "HND";
  }
  return "?";
}

uint64_t ChunkLayerBytes(const PagedKvLayer& c, int32_t num_tokens) {
  return 2ull * static_cast<uint64_t>(num_tokens) * static_cast<uint64_t>(c.num_kv_heads) *
         static_cast<uint64_t>(c.head_dim) * DtypeSize(c.dtype);
}

absl::Status InjectLayer(const void* src, const PagedKvLayer& cache, const TokenRange& range,
                         cudaStream_t stream) {
  return Copy<true>(const_cast<void*>(src), cache, range, stream);
}

absl::Status InjectChunkLayer(absl::Span<const ChunkSource> sources,
                              const ChunkSource* device_sources, int32_t layer,
                              const PagedKvLayer& c, const int32_t* block_table,
                              int32_t block_table_len, cudaStream_t stream, CopyKernel kernel) {
  static_assert(sizeof(ChunkSource) == sizeof(detail::ChunkSourceDev));
  if (absl::Status st = ValidateCache(c); !st.ok()) return st;
  if (sources.size() > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(sources.size(), " sources; at most 65535"));
  }
  if (layer < 0) return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " is negative"));
  if (!sources.empty() && device_sources == nullptr) {
    return absl::InvalidArgumentError("device_sources is null");
  }
  const int64_t row_bytes = int64_t{c.head_dim} * static_cast<int64_t>(DtypeSize(c.dtype));
  // The widest vector every payload, every cache tensor and the row size allow.
  uintptr_t align = 16;
  while (align > 1 && row_bytes % static_cast<int64_t>(align) != 0) align /= 2;
  int32_t max_tokens = 0;
  for (size_t i = 0; i < sources.size(); ++i) {
    const ChunkSource& src = sources[i];
    const TokenRange r{block_table, block_table_len, src.first_token, src.num_tokens};
    if (absl::Status st = ValidateRange(c, r); !st.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("sources[", i, "]: ", st.message()));
    }
    if (src.num_tokens > 0 && src.payload == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("sources[", i, "].payload is null"));
    }
    while (align > 1 && !Aligned(src.payload, align)) align /= 2;
    max_tokens = std::max(max_tokens, src.num_tokens);
  }
  while (align > 1 && !(Aligned(c.k, align) && (!c.v || Aligned(c.v, align)))) align /= 2;
  detail::PagedCopyParams p{};
  p.k = c.k;
  p.v = c.v;
  p.block_table = block_table;
  p.block_table_len = block_table_len;
  p.num_blocks = c.num_blocks;
  p.block_size = c.block_size;
  p.heads = c.num_kv_heads;
  p.layout = static_cast<int32_t>(c.layout);
  p.row_vecs = static_cast<int32_t>(row_bytes / static_cast<int64_t>(align));
  const auto* dev = reinterpret_cast<const detail::ChunkSourceDev*>(device_sources);
  const auto n = static_cast<int32_t>(sources.size());
  cudaError_t e;
  switch (align) {
    case 16: {
      int sms = 0;
      detail::HndTmaMaps maps;
      detail::HndTmaParams tma{};
      const CopyPath path = kernel == CopyKernel::kVector
                                ? CopyPath::kVector
                                : PlanAligned(c, row_bytes, &sms, &maps, &tma);
      switch (path) {
        case CopyPath::kBulkRows:
          e = detail::LaunchInjectChunksBulk(p, dev, n, max_tokens, layer, sms, stream);
          break;
        case CopyPath::kTensorMap:
          tma.block_table = block_table;
          e = detail::LaunchHndTmaInjectChunks(maps, tma, dev, n, max_tokens, layer, sms, stream);
          break;
        default:
          e = detail::LaunchInjectChunks<uint4>(p, dev, n, max_tokens, layer, stream);
      }
      break;
    }
    case 8:
      e = detail::LaunchInjectChunks<uint2>(p, dev, n, max_tokens, layer, stream);
      break;
    case 4:
      e = detail::LaunchInjectChunks<uint32_t>(p, dev, n, max_tokens, layer, stream);
      break;
    case 2:
      e = detail::LaunchInjectChunks<uint16_t>(p, dev, n, max_tokens, layer, stream);
      break;
    default:
      e = detail::LaunchInjectChunks<uint8_t>(p, dev, n, max_tokens, layer, stream);
  }
  return CudaStatus(e, "InjectChunkLayer launch");
}

absl::Status ExtractLayer(const PagedKvLayer& cache, const TokenRange& range, void* dst,
                          cudaStream_t stream) {
  return Copy<false>(dst, cache, range, stream);
}

absl::Status PrefetchL2(const PagedKvLayer& c, const TokenRange& r, uint64_t l2_budget_bytes,
                        cudaStream_t stream, uint64_t* bytes) {
  if (absl::Status st = ValidateCache(c); !st.ok()) return st;
  if (absl::Status st = ValidateRange(c, r); !st.ok()) return st;
  const int64_t row_bytes = int64_t{c.head_dim} * static_cast<int64_t>(DtypeSize(c.dtype));
  const int64_t block_bytes = row_bytes * c.num_kv_heads * c.block_size;
  if (block_bytes % 16 != 0 || !Aligned(c.k, 16) || (c.v && !Aligned(c.v, 16))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "L2 prefetch needs 16-byte aligned blocks: block_size x kv_heads x head_dim x element = ",
        block_bytes, " bytes"));
  }
  // Whole blocks covering the range, in token order, within the budget.
  int64_t first = 0, count = 0;
  if (r.num_tokens > 0) {
    first = r.first_token / c.block_size;
    count = (int64_t{r.first_token} + r.num_tokens - 1) / c.block_size - first + 1;
  }
  if (l2_budget_bytes != 0) {
    count = std::min<int64_t>(count, static_cast<int64_t>(l2_budget_bytes) / (2 * block_bytes));
  }
  if (bytes != nullptr) *bytes = static_cast<uint64_t>(count * 2 * block_bytes);
  detail::PrefetchParams p{};
  p.k = static_cast<const char*>(c.k);
  p.v = static_cast<const char*>(c.v);
  p.block_table = r.block_table;
  p.num_blocks = c.num_blocks;
  p.block_size = c.block_size;
  p.block_bytes = block_bytes;
  p.first_block = static_cast<int32_t>(first);
  p.num_table_blocks = static_cast<int32_t>(count);
  p.layout = static_cast<int32_t>(c.layout);
  return CudaStatus(detail::LaunchPrefetch(p, stream), "PrefetchL2 launch");
}

absl::Status PrefetchL2Batch(const PagedKvLayer& c, const int32_t* block_tables,
                             int32_t max_blocks_per_seq, const int32_t* context_lens, int32_t batch,
                             uint64_t l2_budget_bytes, cudaStream_t stream, uint64_t* bytes) {
  if (absl::Status st = ValidateCache(c); !st.ok()) return st;
  if (batch < 1 || max_blocks_per_seq < 1) {
    return absl::InvalidArgumentError(absl::StrCat("batch ", batch, " and max_blocks_per_seq ",
                                                   max_blocks_per_seq, " must be >= 1"));
  }
  if (block_tables == nullptr || context_lens == nullptr) {
    return absl::InvalidArgumentError("block_tables and context_lens must be non-null");
  }
  const int64_t row_bytes = int64_t{c.head_dim} * static_cast<int64_t>(DtypeSize(c.dtype));
  const int64_t block_bytes = row_bytes * c.num_kv_heads * c.block_size;
  if (block_bytes % 16 != 0 || !Aligned(c.k, 16) || (c.v && !Aligned(c.v, 16))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "L2 prefetch needs 16-byte aligned blocks: block_size x kv_heads x head_dim x element = ",
        block_bytes, " bytes"));
  }
  int64_t per_seq = max_blocks_per_seq;
  if (l2_budget_bytes != 0) {
    per_seq = std::min<int64_t>(per_seq,
                                static_cast<int64_t>(l2_budget_bytes) / batch / (2 * block_bytes));
  }
  if (bytes != nullptr) *bytes = static_cast<uint64_t>(per_seq * batch * 2 * block_bytes);
  detail::BatchPrefetchParams p{};
  p.k = static_cast<const char*>(c.k);
  p.v = static_cast<const char*>(c.v);
  p.block_tables = block_tables;
  p.context_lens = context_lens;
  p.batch = batch;
  p.max_blocks_per_seq = max_blocks_per_seq;
  p.max_blocks = static_cast<int32_t>(per_seq);
  p.num_blocks = c.num_blocks;
  p.block_size = c.block_size;
  p.block_bytes = block_bytes;
  p.layout = static_cast<int32_t>(c.layout);
  return CudaStatus(detail::LaunchBatchPrefetch(p, stream), "PrefetchL2Batch launch");
}

}  // namespace kvdn::kernels
