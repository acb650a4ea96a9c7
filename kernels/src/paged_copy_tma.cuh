// Tensor-map (TMA) copies for the HND layout with pages of more than one token (layer 1 of
// STYLE.md 12). Shapes are validated, and the tensor maps encoded, by paged_copy.cu.
//
// In HND a page is [heads][block_size][row]: a token's heads lie block_size rows apart, while the
// chunk keeps them together ([2][num_tokens][heads][row]). The transposition is left to the
// SM's tensor memory accelerator: the cache is described to it as a 4-D tensor whose dimensions
// are listed (row, head, slot, page) -- strides (1, block_size rows, 1 row, a page) -- so a box
// of (row, all heads, `tile_slots` slots, one page) lands in shared memory as
// [slot][head][row], which is the chunk's order: the chunk side of a tile is one contiguous 1-D
// bulk copy. Pages are cut into tiles of `tile_slots` slots. A tile whose slots all lie in the
// token range moves as one box; a tile the range cuts (its first or last page) moves token by
// token through a second map whose box is one slot. A box that runs past the page's last slot
// (block_size not a multiple of tile_slots) is clipped by the hardware: loads fill zeros there,
// stores skip it. One warp per CTA, kBulkCopyStages stages in flight, persistent over tiles;
// the pipeline is RunBulkStages (paged_copy.cuh).
#ifndef KVDN_KERNELS_SRC_PAGED_COPY_TMA_CUH_
#define KVDN_KERNELS_SRC_PAGED_COPY_TMA_CUH_

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "src/paged_copy.cuh"

namespace kvdn::kernels::detail {

struct HndTmaParams {
  const int32_t* block_table;
  int32_t num_blocks;
  int32_t block_size;
  int32_t tile_slots;  // slots per tile (box dimension 2 of the tile maps)
  int32_t row_all;     // bytes of one token's heads (a chunk row), a multiple of 128
};

// The four maps: K and V caches, each with a tile box (row, heads, tile_slots, 1) and a one-slot
// box (row, heads, 1, 1). __grid_constant__ keeps them in parameter space, where TMA reads them.
struct HndTmaMaps {
  CUtensorMap k_tile;
  CUtensorMap v_tile;
  CUtensorMap k_slot;
  CUtensorMap v_slot;
};

template <bool kInject>
__device__ __forceinline__ void HndTmaCopyTiles(const HndTmaParams& p, const HndTmaMaps& maps,
                                                char* chunk, int32_t first_token,
                                                int32_t num_tokens, int64_t cta, int64_t ctas) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(128) unsigned char tma_smem[];
  __shared__ __align__(8) uint64_t bars[kBulkCopyStages];
  if (num_tokens <= 0) return;
  const int lane = static_cast<int>(threadIdx.x);
  const int bs = p.block_size;
  const int first_page = first_token / bs;
  const int pages = (first_token + num_tokens - 1) / bs - first_page + 1;
  const int tiles_per_page = (bs + p.tile_slots - 1) / p.tile_slots;
  const int64_t per_kv = int64_t{pages} * tiles_per_page;
  const int64_t tiles = 2 * per_kv;
  const int64_t mine = tiles > cta ? (tiles - cta + ctas - 1) / ctas : 0;
  if (mine == 0) return;
  const int64_t row_all = p.row_all;
  const int64_t stage_bytes = int64_t{p.tile_slots} * row_all;
  const uint32_t s0 = SharedAddress(tma_smem), b0 = SharedAddress(bars);

  // Tile `it` of this CTA: where it lies and which of its slots the range covers.
  struct Tile {
    int kv;
    int32_t block;      // -1: nothing to move (no slot in range, or the entry is out of range)
    int slot0;          // first slot of the tile (box coordinate)
    int lo_slot;        // first slot in range
    int rows;           // slots in range, from lo_slot on
    bool whole;         // every slot of the tile is in range: one box
    int64_t chunk_row;  // the chunk row of lo_slot
  };
  auto tile_at = [&](int64_t it) {
    Tile t{};
    const int64_t w = cta + it * ctas;
    t.kv = w >= per_kv ? 1 : 0;
    const int64_t rem = w - t.kv * per_kv;
    const int page = first_page + static_cast<int>(rem / tiles_per_page);
    t.slot0 = static_cast<int>(rem % tiles_per_page) * p.tile_slots;
    const int slot_end = t.slot0 + p.tile_slots < bs ? t.slot0 + p.tile_slots : bs;
    const int64_t page_pos = int64_t{page} * bs;
    const int64_t lo = page_pos + t.slot0 > first_token ? page_pos + t.slot0 : first_token;
    const int64_t end = int64_t{first_token} + num_tokens;
    const int64_t hi = page_pos + slot_end < end ? page_pos + slot_end : end;
    t.block = -1;
    if (hi <= lo) return t;
    const int32_t block = p.block_table[page];
    if (block < 0 || block >= p.num_blocks) return t;
    t.block = block;
    t.lo_slot = static_cast<int>(lo - page_pos);
    t.rows = static_cast<int>(hi - lo);
    t.whole = t.lo_slot == t.slot0 && t.rows == slot_end - t.slot0;
    t.chunk_row = int64_t{t.kv} * num_tokens + (lo - first_token);
    return t;
  };
  auto map_of = [&](int kv, bool whole) -> uint64_t {
    const CUtensorMap* m =
        whole ? (kv == 0 ? &maps.k_tile : &maps.v_tile) : (kv == 0 ? &maps.k_slot : &maps.v_slot);
    return reinterpret_cast<uint64_t>(m);
  };
  auto box_load = [&](uint32_t dst, uint64_t map, int slot, int32_t block, uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
        "[%0], [%1, {%2, %3, %4, %5}], [%6];" ::"r"(dst),
        "l"(map), "r"(0), "r"(0), "r"(slot), "r"(block), "r"(bar)
        : "memory");
  };
  auto box_store = [&](uint64_t map, int slot, int32_t block, uint32_t src) {
    asm volatile(
        "cp.async.bulk.tensor.4d.global.shared::cta.tile.bulk_group [%0, {%1, %2, %3, %4}], "
        "[%5];" ::"l"(map),
        "r"(0), "r"(0), "r"(slot), "r"(block), "r"(src)
        : "memory");
  };
  const auto row_u32 = static_cast<uint32_t>(row_all);
  auto issue_loads = [&](int64_t it) {
    const int s = static_cast<int>(it % kBulkCopyStages);
    const uint32_t buf = s0 + static_cast<uint32_t>(s * stage_bytes), bar = b0 + 8 * s;
    const Tile t = tile_at(it);
    if (t.block < 0) {
      if (lane == 0) ExpectTx(bar, 0);  // the phase completes with nothing in flight
      return;
    }
    if (kInject) {  // the chunk's rows of the tile are contiguous: one copy
      if (lane == 0) {
        const auto bytes = static_cast<uint32_t>(t.rows * row_all);
        ExpectTx(bar, bytes);
        BulkLoad(buf, chunk + t.chunk_row * row_all, bytes, bar);
      }
    } else if (t.whole) {
      // The box counts all its bytes, those past the page's last slot (zero-filled) too.
      if (lane == 0) {
        ExpectTx(bar, static_cast<uint32_t>(stage_bytes));
        box_load(buf, map_of(t.kv, true), t.slot0, t.block, bar);
      }
    } else {
      // Copies may complete before the expectation is set: the phase cannot end before lane 0
      // arrives, and the transaction count may pass below zero meanwhile.
      if (lane == 0) ExpectTx(bar, static_cast<uint32_t>(t.rows) * row_u32);
      for (int r = lane; r < t.rows; r += 32) {
        box_load(buf + static_cast<uint32_t>(r) * row_u32, map_of(t.kv, false), t.lo_slot + r,
                 t.block, bar);
      }
    }
  };
  auto issue_stores = [&](int64_t it) {
    const int s = static_cast<int>(it % kBulkCopyStages);
    const uint32_t buf = s0 + static_cast<uint32_t>(s * stage_bytes);
    const Tile t = tile_at(it);
    if (t.block >= 0) {
      if (!kInject) {
        if (lane == 0) {
          BulkStore(chunk + t.chunk_row * row_all, buf, static_cast<uint32_t>(t.rows * row_all));
        }
      } else if (t.whole) {
        if (lane == 0) box_store(map_of(t.kv, true), t.slot0, t.block, buf);
      } else {
        for (int r = lane; r < t.rows; r += 32) {
          box_store(map_of(t.kv, false), t.lo_slot + r, t.block,
                    buf + static_cast<uint32_t>(r) * row_u32);
        }
      }
    }
  };
  RunBulkStages(mine, b0, issue_loads, issue_stores);
#endif
}

template <bool kInject>
__global__ void __launch_bounds__(32)
    HndTmaCopyKernel(const __grid_constant__ HndTmaMaps maps, HndTmaParams p, void* chunk,
                     int32_t first_token, int32_t num_tokens) {
  HndTmaCopyTiles<kInject>(p, maps, static_cast<char*>(chunk), first_token, num_tokens, blockIdx.x,
                           gridDim.x);
}

__global__ void __launch_bounds__(32)
    HndTmaInjectChunksKernel(const __grid_constant__ HndTmaMaps maps, HndTmaParams p,
                             const ChunkSourceDev* sources, int32_t layer) {
  const ChunkSourceDev src = sources[blockIdx.y];
  char* chunk = const_cast<char*>(static_cast<const char*>(src.payload)) +
                int64_t{layer} * 2 * src.num_tokens * p.row_all;
  HndTmaCopyTiles<true>(p, maps, chunk, src.first_token, src.num_tokens, blockIdx.x, gridDim.x);
}

// Lets the TMA copy kernels (bulk rows, paged_copy.cuh, and tensor maps) take their shared
// memory, up to kBulkCopyStages x 2 stages' bytes, on the current device; once per device before
// their first launch.
inline cudaError_t PrepareTmaCopyKernels() {
  constexpr int kMax = kBulkCopyStages * 2 * kBulkCopyStageBytes;
  for (const void* k : {reinterpret_cast<const void*>(PagedCopyBulkKernel<true>),
                        reinterpret_cast<const void*>(PagedCopyBulkKernel<false>),
                        reinterpret_cast<const void*>(InjectChunksBulkKernel),
                        reinterpret_cast<const void*>(HndTmaCopyKernel<true>),
                        reinterpret_cast<const void*>(HndTmaCopyKernel<false>),
                        reinterpret_cast<const void*>(HndTmaInjectChunksKernel)}) {
    if (cudaError_t e = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, kMax);
        e != cudaSuccess) {
      return e;
    }
  }
  return cudaSuccess;
}

// Tiles of the range [first_token, first_token + num_tokens): 2 x pages x tiles per page.
inline int64_t HndTmaTiles(const HndTmaParams& p, int32_t first_token, int32_t num_tokens) {
  if (num_tokens <= 0) return 0;
  const int64_t pages =
      (int64_t{first_token} + num_tokens - 1) / p.block_size - first_token / p.block_size + 1;
  return 2 * pages * ((p.block_size + p.tile_slots - 1) / p.tile_slots);
}

// PrepareTmaCopyKernels has run on this device; `sms`: its multiprocessors.
template <bool kInject>
cudaError_t LaunchHndTmaCopy(const HndTmaMaps& maps, const HndTmaParams& p, void* chunk,
                             int32_t first_token, int32_t num_tokens, int sms,
                             cudaStream_t stream) {
  const int64_t tiles = HndTmaTiles(p, first_token, num_tokens);
  if (tiles == 0) return cudaSuccess;
  const int64_t max_ctas = int64_t{sms} * kBulkCopyCtasPerSm;
  const size_t smem = BulkCopySmem(p.tile_slots, p.row_all);
  HndTmaCopyKernel<kInject>
      <<<static_cast<unsigned>(tiles < max_ctas ? tiles : max_ctas), 32, smem, stream>>>(
          maps, p, chunk, first_token, num_tokens);
  return cudaGetLastError();
}

inline cudaError_t LaunchHndTmaInjectChunks(const HndTmaMaps& maps, const HndTmaParams& p,
                                            const ChunkSourceDev* sources, int32_t count,
                                            int32_t max_tokens, int32_t layer, int sms,
                                            cudaStream_t stream) {
  if (count == 0 || max_tokens == 0) return cudaSuccess;
  if (count > 65535) return cudaErrorInvalidValue;
  // A source's tiles: at most those of max_tokens starting mid-page (one page more).
  const int64_t tiles = HndTmaTiles(p, p.block_size - 1, max_tokens);
  int64_t per_source = (int64_t{sms} * kBulkCopyCtasPerSm + count - 1) / count;
  if (per_source > tiles) per_source = tiles;
  const size_t smem = BulkCopySmem(p.tile_slots, p.row_all);
  HndTmaInjectChunksKernel<<<dim3(static_cast<unsigned>(per_source), static_cast<unsigned>(count)),
                             32, smem, stream>>>(maps, p, sources, layer);
  return cudaGetLastError();
}

}  // namespace kvdn::kernels::detail

#endif  // KVDN_KERNELS_SRC_PAGED_COPY_TMA_CUH_
