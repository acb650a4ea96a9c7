// The tensor-core decode kernel behind PagedDecodeAttention (STYLE.md 12, layer 1).
//
// Same grid, splits, workspace and combine as the CUDA-core kernel (decode_attention.cuh): one CTA
// per (kv head, split, sequence), 4 warps. What differs is how a warp reads and computes:
//   - K/V move in tiles of 16 tokens (this kv head's 256-byte rows): cp.async 16-byte copies into
//     a warp-private ring of kTcStages (2-4) shared-memory stages (XOR-swizzled so ldmatrix is free
//     of bank conflicts), kTcStages - 1 tiles in flight while the warp computes on one. Bytes in
//     flight no longer cost registers.
//   - Transposed products on mma.sync.m16n8k16 (bf16/fp16 in, fp32 accumulate): S^T = K Q^T and
//     O^T += V^T P^T, the tile's 16 tokens (or 16 of O's dims) as the M rows and the kv head's G
//     query heads as the N columns (padded to 8: columns >= G are zeros, never stored). A 16-token
//     tile is 16 MMAs and 16 ldmatrix (instead of ~1000 CUDA-core instructions, and half the MMAs
//     of Q as M, which would pad 16 rows for at most 8 heads).
//   - Online softmax (base 2) on the S^T fragments; P^T reaches the PV MMA's B operand through
//     two in-register transposes (movmatrix).
// Warp w takes the split's tiles w, w + 4, ...; the 4 warps' (m, l, O) merge in shared memory.
//
// Fragment layouts (PTX ISA, mma.m16n8k16, g = lane / 4, t = lane % 4):
//   A (16x16, row): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B (16x8, col):  b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g)
//   C (16x8, f32):  c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1)
// So a lane holds scores and outputs of heads 2t and 2t + 1, and the B operand P^T needs
// (tokens 2t.., head g): the transpose of C's (token g, heads 2t..) 8x8 halves.
#ifndef KVDN_KERNELS_SRC_DECODE_ATTENTION_TC_CUH_
#define KVDN_KERNELS_SRC_DECODE_ATTENTION_TC_CUH_

#include <algorithm>
#include <type_traits>

#include "src/decode_attention.cuh"

namespace kvdn::kernels::detail {

inline constexpr int kTcTile = 16;                          // tokens per tile
inline constexpr int kTcRowBytes = kHeadDim * 2;            // one K or V row of one kv head
inline constexpr int kTcTileBytes = kTcTile * kTcRowBytes;  // 4 KiB (K or V)
inline constexpr int kTcStageBytes = 2 * kTcTileBytes;      // K then V
inline constexpr int kTcDefaultStages = 3;                  // per warp; see kernels/README.md
inline constexpr float kTcRescaleSlack = 8.f;               // log2 units; see the loop
constexpr size_t TcSmemBytes(int stages) { return size_t{kDecodeWarps} * stages * kTcStageBytes; }

// The PTX type of T in mma (bf16 or f16): d += A B, all four accumulator registers in place.
#define KVDN_MMA_M16N8K16(TYPE)                                             \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE       \
               ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};" \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])             \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))

template <typename T>
struct Mma {
  static __device__ __forceinline__ void Run4(float* d, const uint32_t* a, uint32_t b0,
                                              uint32_t b1) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      KVDN_MMA_M16N8K16("bf16");
    } else {
      KVDN_MMA_M16N8K16("f16");
    }
  }
  // Two floats as one packed register of T (lo in the low half).
  static __device__ __forceinline__ uint32_t Pack(float lo, float hi) {
    uint32_t u;
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
      memcpy(&u, &h, 4);
    } else {
      const __half2 h = __floats2half2_rn(lo, hi);
      memcpy(&u, &h, 4);
    }
    return u;
  }
};
#undef KVDN_MMA_M16N8K16

// The 8x8 matrix of 16-bit elements whose fragment (row g, columns 2t..2t+1) this lane holds,
// transposed: the result holds (row g, columns 2t..2t+1) of the transpose.
__device__ __forceinline__ uint32_t MovTrans(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x));
  return y;
}

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared without passing through registers; src_bytes 0 writes zeros.
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
}
// The same, all 16 bytes (no zero fill, no source-size operand).
__device__ __forceinline__ void CpAsync16Full(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

__device__ __forceinline__ void LdMatrixX4(uint32_t addr, uint32_t* r) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void LdMatrixX4Trans(uint32_t addr, uint32_t* r) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// Byte offset of 16-byte chunk `chunk` (0..15) of row `row` (0..15) in a K or V tile: chunks
// XOR-swizzled by the row so the 8 rows one ldmatrix reads sit in 8 different bank groups.
__device__ __forceinline__ uint32_t TileOffset(int row, int chunk) {
  return static_cast<uint32_t>(row * kTcRowBytes + ((chunk ^ (row & 7)) << 4));
}

// The paged layouts (PagedKvLayout), for one kv head's rows: a block's K (or V) region holds
// block_size x kv_heads rows of 128 elements in all three,
//   kNhd (0):         k, v [blocks][block_size][kv_heads][128]: rows of a head kv_heads apart
//   kNhdCombined (1): k [blocks][2][block_size][kv_heads][128]: the same, K then V per block
//   kHnd (2):         k, v [blocks][kv_heads][block_size][128]: a head's rows adjacent
// and the kvh-th contiguous block_size x 128 slice of it is what CTA kvh prefetches.
template <typename T>
__device__ __forceinline__ const T* BlockRegion(const DecodeParams& p, int kv, int64_t phys) {
  const int64_t block_elems = int64_t{p.block_size} * p.kv_heads * kHeadDim;
  if (p.layout == 1) return static_cast<const T*>(p.k) + (phys * 2 + kv) * block_elems;
  return static_cast<const T*>(kv == 0 ? p.k : p.v) + phys * block_elems;
}
// Elements from a block region to (kv head, slot)'s row; rows of consecutive slots are
// SlotStride apart.
__device__ __forceinline__ int64_t SlotStride(const DecodeParams& p) {
  return p.layout == 2 ? kHeadDim : int64_t{p.kv_heads} * kHeadDim;
}
__device__ __forceinline__ int64_t RowInBlock(const DecodeParams& p, int kvh, int slot) {
  return p.layout == 2 ? (int64_t{kvh} * p.block_size + slot) * kHeadDim
                       : int64_t{slot} * SlotStride(p) + int64_t{kvh} * kHeadDim;
}

// kAligned: block_size % 16 == 0, so a tile (aligned to the split's start, itself a multiple of
// block_size) lies within one block: one block-table entry per tile. Otherwise each row looks up
// its own block. kPrefetch (aligned only): when a warp queues a tile that opens a block, it asks
// L2 for the block its next tile opens, this CTA's 1/num_kv_heads slice of its K and V (the
// kv-head CTAs of a split run together, so they fetch it whole).
template <typename T, int G, bool kAligned, bool kPrefetch, int kTcStages>
__global__ void __launch_bounds__(kDecodeThreads) PagedDecodeTcKernel(DecodeParams p) {
  static_assert(G <= 8, "a group beyond 8 query heads would need a second N tile");
  extern __shared__ __align__(128) unsigned char smem[];
  const int kvh = blockIdx.x;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;  // fragment row (query head of the group when < G)
  const int t4 = lane % 4;

  GridLaunchDependents();

  // Uniform splits: (split, sequence) = (blockIdx.y, blockIdx.z). Packed: blockIdx.y and .z
  // number the item, whose sequence and split a scan of context_lens finds.
  int split, b, split_tokens = p.split_tokens;
  SplitOut so;
  if (p.work_items > 0) {
    const long long item = static_cast<long long>(blockIdx.z) * gridDim.y + blockIdx.y;
    const PackedSplits ps = FindPackedSplits(p, item, -1);
    if (ps.b < 0) return;  // past the last split (the sum of lengths was an upper bound)
    b = ps.b;
    split = static_cast<int>(item - ps.first);
    split_tokens = ps.tokens;
    so = {ps.count == 1, item, p.work_items};
  } else {
    split = blockIdx.y;
    b = blockIdx.z;
    so = UniformSplitOut(p, b, split);
  }

  const int start = split * split_tokens;
  const int q_head0 = kvh * G;
  const int32_t* table = p.block_tables + int64_t{b} * p.max_blocks_per_seq;
  const int bs = p.block_size;
  const int64_t slot_stride = SlotStride(p);  // elements between a head's rows in a block

  // Q^T as the B operand (k = dims, n = heads), 8 k-steps of 16 dims: b0 = q[g][16k + 2t..],
  // b1 = q[g][16k + 8 + 2t..]; heads g >= G are zeros.
  uint32_t qb0[8], qb1[8];
  {
    const uint32_t* q = reinterpret_cast<const uint32_t*>(
        static_cast<const T*>(p.q) + (int64_t{b} * p.q_heads + q_head0 + min(g, G - 1)) * kHeadDim);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      qb0[k] = g < G ? q[8 * k + t4] : 0u;
      qb1[k] = g < G ? q[8 * k + 4 + t4] : 0u;
    }
  }
  const int ctx = min(p.context_lens[b], p.max_context_len);
  const int end = min(ctx, start + split_tokens);

  if (start >= end) {  // an empty split (short sequence) or an empty sequence
    StoreEmptySplit<T, G>(p, b, so, q_head0);
    return;
  }

  const int num_tiles = (end - start + kTcTile - 1) / kTcTile;
  unsigned char* ring = smem + warp * (kTcStages * kTcStageBytes);
  // This lane copies chunk (lane % 16) of rows lane / 16 + 2i, i = 0..7, of each K and V tile.
  const int cp_chunk = lane % 16;
  const int cp_row0 = lane / 16;

  // Queues the copy of tile `tile` (of this split) into stage `stage` and returns the mask of its
  // rows that hold a token (inside [start, end) with a valid block-table entry).
  // Aligned: the block-table entries of this warp's tiles, 32 at a time, one per lane (lane i:
  // the warp's tile 32 * table_window + i), so queueing a tile reads its entry by a shuffle
  // instead of waiting on a dependent global load (under a saturated memory system that wait
  // is the longest step of a small split's loop).
  int32_t table_entry = -1;
  int table_window = -1;
  auto issue = [&](int tile, int stage) -> uint32_t {
    const int t0 = start + tile * kTcTile;
    const uint32_t sk = SmemAddr(ring + stage * kTcStageBytes);
    const uint32_t sv = sk + kTcTileBytes;
    uint32_t valid = 0;
    if constexpr (kAligned) {
      const int k = (tile - warp) / kDecodeWarps;  // this warp's k-th tile (warp-uniform)
      if (k / 32 != table_window) {
        table_window = k / 32;
        const int mine = warp + (32 * table_window + lane) * kDecodeWarps;
        table_entry = mine < num_tiles ? table[(start + mine * kTcTile) / bs] : -1;
      }
      const int64_t phys = __shfl_sync(0xffffffffu, table_entry, k % 32);
      const bool ok = phys >= 0 && phys < p.num_blocks;
      // This tile's first row of K and of V (the block's first, for a bad entry: never read).
      const int64_t row0 = ok ? RowInBlock(p, kvh, t0 % bs) : 0;
      const T* krow = BlockRegion<T>(p, 0, ok ? phys : 0) + row0 + cp_chunk * 8;
      const T* vrow = BlockRegion<T>(p, 1, ok ? phys : 0) + row0 + cp_chunk * 8;
      if constexpr (kPrefetch) {
        // The block this warp's next tile opens (tiles w, w+4, ...): ask L2 for it now.
        const int t_next = t0 + kDecodeWarps * kTcTile;
        if (lane < 2 && t_next < end && t_next % bs == 0) {
          const int64_t pn = table[t_next / bs];
          if (pn >= 0 && pn < p.num_blocks) {
            const int64_t slice = int64_t{bs} * kHeadDim;  // elements: 1/kv_heads of a block
            PrefetchL2Bytes(BlockRegion<T>(p, lane, pn) + kvh * slice,
                            static_cast<uint32_t>(slice * sizeof(T)));
          }
        }
      }
      if (ok && t0 + kTcTile <= end) {
        // A whole tile (every tile but a split's last): no per-row predicates.
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int r = cp_row0 + 2 * i;
          CpAsync16Full(sk + TileOffset(r, cp_chunk), krow + r * slot_stride);
          CpAsync16Full(sv + TileOffset(r, cp_chunk), vrow + r * slot_stride);
        }
        return 0xffffu;
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int r = cp_row0 + 2 * i;
        const bool live = ok && t0 + r < end;
        const int64_t off = live ? r * slot_stride : 0;
        CpAsync16(sk + TileOffset(r, cp_chunk), krow + off, live ? 16 : 0);
        CpAsync16(sv + TileOffset(r, cp_chunk), vrow + off, live ? 16 : 0);
      }
      const int n = min(kTcTile, end - t0);
      valid = ok ? (1u << n) - 1u : 0u;
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int r = cp_row0 + 2 * i;
        const int tok = t0 + r;
        int64_t phys = -1;
        if (tok < end) phys = table[tok / bs];
        const bool live = phys >= 0 && phys < p.num_blocks;
        const int64_t off = live ? RowInBlock(p, kvh, tok % bs) + cp_chunk * 8 : 0;
        CpAsync16(sk + TileOffset(r, cp_chunk), BlockRegion<T>(p, 0, live ? phys : 0) + off,
                  live ? 16 : 0);
        CpAsync16(sv + TileOffset(r, cp_chunk), BlockRegion<T>(p, 1, live ? phys : 0) + off,
                  live ? 16 : 0);
      }
      // Row r's validity, decided by lane r (rows 0..15).
      bool live = false;
      if (lane < kTcTile && t0 + lane < end) {
        const int64_t ph = table[(t0 + lane) / bs];
        live = ph >= 0 && ph < p.num_blocks;
      }
      valid = __ballot_sync(0xffffffffu, live) & 0xffffu;
    }
    return valid;
  };

  // Tiles this warp reads: warp, warp + 4, ...; the ring holds kTcStages of them. vq[i] is the
  // row mask of the tile i places ahead of the one computed next (a queue kept in registers:
  // shifted, never indexed at run time).
  uint32_t vq[kTcStages];
#pragma unroll
  for (int s = 0; s < kTcStages; ++s) vq[s] = 0u;
#pragma unroll
  for (int s = 0; s < kTcStages - 1; ++s) {
    const int tile = warp + s * kDecodeWarps;
    if (tile < num_tiles) vq[s] = issue(tile, s);
    CpAsyncCommit();
  }

  // Per lane: the two query heads 2t, 2t + 1 of its fragment columns (heads >= G are padding:
  // their q is zero, so their scores are 0 and finite, and they are never stored).
  float m[2] = {-INFINITY, -INFINITY};  // running max per head (base 2, scaled), lanes agree
  float l[2] = {0.f, 0.f};              // this lane's part of each head's row sum
  float o[8][4];  // O^T: o[j][0..1] = (dim 16j + g, heads 2t..2t+1), o[j][2..3] = dim 16j + g + 8
#pragma unroll
  for (int j = 0; j < 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;

  int it = 0;
  for (int tile = warp; tile < num_tiles; tile += kDecodeWarps, ++it) {
    // Queue the tile kTcStages - 1 ahead into the stage computed on last iteration.
    {
      const int ahead = tile + (kTcStages - 1) * kDecodeWarps;
      const int st = (it + kTcStages - 1) % kTcStages;
      __syncwarp();  // every lane is done reading that stage
      vq[kTcStages - 1] = ahead < num_tiles ? issue(ahead, st) : 0u;
      CpAsyncCommit();
    }
    CpAsyncWait<kTcStages - 1>();  // this tile's group has landed (this lane's copies)
    __syncwarp();                  // ... and every other lane's
    const int st = it % kTcStages;
    const uint32_t sk = SmemAddr(ring + st * kTcStageBytes);
    const uint32_t sv = sk + kTcTileBytes;
    const uint32_t vmask = vq[0];
#pragma unroll
    for (int s = 0; s < kTcStages - 1; ++s) vq[s] = vq[s + 1];

    // S^T = K Q^T: the 16 tokens as M, the heads as N, 8 k-steps of 16 dims; K's 16x16 blocks
    // by ldmatrix (a0: tokens 0-7 / dims 0-7, a1: tokens 8-15, a2, a3: dims 8-15). Two
    // accumulators (even and odd k-steps) halve the dependent MMA chain.
    float sa[4] = {0.f, 0.f, 0.f, 0.f}, sb[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      uint32_t ka[4];
      LdMatrixX4(sk + TileOffset((lane / 8 % 2) * 8 + lane % 8, 2 * k + lane / 16), ka);
      Mma<T>::Run4(k % 2 ? sb : sa, ka, qb0[k], qb1[k]);
    }
    // Scores of tokens g (c0, c1) and g + 8 (c2, c3) for heads 2t, 2t + 1.
    float sc[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int tok = g + (c / 2) * 8;
      sc[c] = (vmask >> tok) & 1u ? (sa[c] + sb[c]) * p.scale_log2 : -INFINITY;
    }
    // Lazy rescaling: a head's running max m moves (and its O column and l are rescaled) only
    // when a score exceeds it by more than kTcRescaleSlack (log2 units), so P = 2^(s - m) <= 2^8
    // (exact range in fp16 and bf16). The test needs no reduction (each lane compares its own
    // scores with m, which the lanes of a column agree on); only a tile that moves some max pays
    // for the max over the tile's tokens (three shuffles per head). A head with no valid token yet
    // has m = -inf: its first finite score always moves it.
    const bool grow0 = fmaxf(sc[0], sc[2]) > m[0] + kTcRescaleSlack;
    const bool grow1 = fmaxf(sc[1], sc[3]) > m[1] + kTcRescaleSlack;
    if (__any_sync(0xffffffffu, grow0 || grow1)) {  // warp-uniform branch
      float mx[2] = {fmaxf(sc[0], sc[2]), fmaxf(sc[1], sc[3])};
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int x = 4; x < 32; x *= 2)
          mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], x));
      }
      float alpha[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const bool grow = mx[h] > m[h] + kTcRescaleSlack;  // the same in every lane of the column
        alpha[h] = grow ? exp2f(m[h] - mx[h]) : 1.f;
        if (grow) m[h] = mx[h];
        l[h] *= alpha[h];
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        o[j][0] *= alpha[0];
        o[j][1] *= alpha[1];
        o[j][2] *= alpha[0];
        o[j][3] *= alpha[1];
      }
    }
    float pr[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) pr[c] = sc[c] == -INFINITY ? 0.f : exp2f(sc[c] - m[c % 2]);
    l[0] += pr[0] + pr[2];
    l[1] += pr[1] + pr[3];
    // P^T as the B operand (k = tokens, n = heads): the packed (token, head-pair) fragments of
    // the two 8x8 halves, transposed in registers.
    const uint32_t pb0 = MovTrans(Mma<T>::Pack(pr[0], pr[1]));  // tokens 0-7
    const uint32_t pb1 = MovTrans(Mma<T>::Pack(pr[2], pr[3]));  // tokens 8-15
    // O^T += V^T P^T, 8 m-tiles of 16 dims; V^T's fragments by ldmatrix.trans (a0: dims 0-7 /
    // tokens 0-7, a1: dims 8-15, a2, a3: tokens 8-15).
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      uint32_t va[4];
      LdMatrixX4Trans(sv + TileOffset((lane / 16) * 8 + lane % 8, 2 * j + lane / 8 % 2), va);
      Mma<T>::Run4(o[j], va, pb0, pb1);
    }
  }
  CpAsyncWait<0>();  // no copy may land in the ring after it is reused below

  // Row sums over the column's 8 lanes; then the 4 warps merge through shared memory (the
  // ring, reused).
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int x = 4; x < 32; x *= 2) l[h] += __shfl_xor_sync(0xffffffffu, l[h], x);
  }
  __syncthreads();
  float* s_m = reinterpret_cast<float*>(smem);  // [warps][8]
  float* s_l = s_m + kDecodeWarps * 8;          // [warps][8]
  float* s_o = s_l + kDecodeWarps * 8;          // [warps][8][128]
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int head = 2 * t4 + h;
    if (head < G) {
      if (g == 0) {
        s_m[warp * 8 + head] = m[h];
        s_l[warp * 8 + head] = l[h];
      }
      float* row = s_o + (warp * 8 + head) * kHeadDim;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        row[16 * j + g] = o[j][h];
        row[16 * j + g + 8] = o[j][2 + h];
      }
    }
  }
  __syncthreads();
  MergePartsAndStore<T, G, kDecodeWarps>(
      p, b, so, q_head0, [&](int w, int gg) { return s_m[w * 8 + gg]; },
      [&](int w, int gg) { return s_l[w * 8 + gg]; },
      [&](int w, int gg, int d) { return s_o[(w * 8 + gg) * kHeadDim + d]; });
}

template <typename T, int G, bool kAligned, bool kPrefetch, int kStages>
cudaError_t LaunchDecodeTc(const DecodeParams& p, int batch, cudaStream_t stream) {
  auto* kernel = PagedDecodeTcKernel<T, G, kAligned, kPrefetch, kStages>;
  constexpr size_t kSmem = TcSmemBytes(kStages);
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(kSmem));
  if (e != cudaSuccess) return e;
  // Packed splits: the items over y (at most 65535) and z.
  constexpr int kMaxY = 65535;
  const dim3 grid = p.work_items > 0 ? dim3(p.kv_heads, std::min(p.work_items, kMaxY),
                                            (p.work_items + kMaxY - 1) / kMaxY)
                                     : dim3(p.kv_heads, p.num_splits, batch);
  kernel<<<grid, kDecodeThreads, kSmem, stream>>>(p);
  e = cudaGetLastError();
  if (e != cudaSuccess || (p.num_splits == 1 && p.work_items == 0)) return e;
  return LaunchCombine<T>(p, batch, stream);
}

template <typename T, int G, int kStages>
cudaError_t DecodeTcOccupancy(int* ctas_per_sm) {
  auto* kernel = PagedDecodeTcKernel<T, G, true, false, kStages>;
  constexpr size_t kSmem = TcSmemBytes(kStages);
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(kSmem));
  if (e != cudaSuccess) return e;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(ctas_per_sm, kernel, kDecodeThreads, kSmem);
}

}  // namespace kvdn::kernels::detail

#endif  // KVDN_KERNELS_SRC_DECODE_ATTENTION_TC_CUH_
