// Kernels behind PagedDecodeAttention (STYLE.md 12, layer 1).
//
// Main kernel: one CTA per (KV split, kv head, sequence), 4 warps. The CTA serves the G query
// heads that share its kv head (GQA), so each K/V row is read once for all of them. A half-warp
// works on one token at a time: its 16 lanes hold 8 of the 128 dims each (one 16-byte load per
// row), so a warp covers two tokens per step and keeps U steps of K and V loads in flight. Warp w
// takes the split's blocks w, w+4, ...; with kPrefetch it first issues an L2 bulk prefetch of the
// K and V rows (this kv head) of the block it takes next. Online softmax (base 2) per half-warp;
// the 8 half-warps merge through shared memory. With one split the CTA writes the output;
// otherwise a normalized partial output and its log2-sum-exp go to the workspace, and the
// combine kernel merges the splits. The combine is launched as a programmatic dependent of the
// main kernel (Hopper): it is scheduled while the main kernel runs and waits in
// griddepcontrol.wait for its results, so no launch gap separates the two.
#ifndef KVDN_KERNELS_SRC_DECODE_ATTENTION_CUH_
#define KVDN_KERNELS_SRC_DECODE_ATTENTION_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "src/l2_prefetch.cuh"

namespace kvdn::kernels::detail {

inline constexpr int kHeadDim = 128;
inline constexpr int kDecodeWarps = 4;
inline constexpr int kDecodeThreads = kDecodeWarps * 32;

struct DecodeParams {
  const void* q;
  const void* k;
  const void* v;
  const int32_t* block_tables;
  const int32_t* context_lens;
  void* out;
  // Partial results of splits: uniform splits [batch][q_heads][num_splits] rows, packed splits
  // [q_heads][work_items] rows (see PackedSplits); 128 floats each in ws_o, one in ws_lse.
  float* ws_o;
  float* ws_lse;
  int32_t batch;
  int32_t q_heads;
  int32_t kv_heads;
  int32_t block_size;
  int32_t num_blocks;
  int32_t max_blocks_per_seq;
  int32_t max_context_len;  // context_lens are clamped to [0, max_context_len]
  int32_t num_splits;       // uniform splits: per sequence (packed: of the longest sequence)
  int32_t split_tokens;
  int32_t work_items;  // > 0: packed splits, this many launched per kv head (tensor-core kernel)
  int32_t prefetch_distance;  // blocks ahead, per warp (>= 1)
  int32_t layout;             // PagedKvLayout (the tensor-core kernel reads all three)
  float scale_log2;           // softmax scale * log2(e)
};

template <typename T>
struct Vec8;  // 8 elements of T in one 16-byte load
template <>
struct Vec8<__nv_bfloat16> {
  static __device__ __forceinline__ void ToFloat(const uint4& u, float* f) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 x = __bfloat1622float2(h[i]);
      f[2 * i] = x.x;
      f[2 * i + 1] = x.y;
    }
  }
  static __device__ __forceinline__ __nv_bfloat16 FromFloat(float x) { return __float2bfloat16(x); }
};
template <>
struct Vec8<__half> {
  static __device__ __forceinline__ void ToFloat(const uint4& u, float* f) {
    const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 x = __half22float2(h[i]);
      f[2 * i] = x.x;
      f[2 * i + 1] = x.y;
    }
  }
  static __device__ __forceinline__ __half FromFloat(float x) { return __float2half(x); }
};

__device__ __forceinline__ uint4 LoadStreaming(const void* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

// Where a split's results go. `direct`: the sequence has only this split, so the CTA writes the
// output itself; otherwise query head h's partial output is workspace row `row + h * head_stride`.
struct SplitOut {
  bool direct;
  int64_t row;
  int64_t head_stride;
};
// Uniform splits: every sequence has p.num_splits, rows [b][q head][split].
__device__ __forceinline__ SplitOut UniformSplitOut(const DecodeParams& p, int b, int split) {
  return {p.num_splits == 1, int64_t{b} * p.q_heads * p.num_splits + split, p.num_splits};
}

// Stores element d of query head `head`'s result for sequence b's split `so`: the output itself
// or the normalized partial output and (d == 0) its log2-sum-exp for the combine (-inf: the split
// saw no token).
template <typename T>
__device__ __forceinline__ void StoreSplitResult(const DecodeParams& p, int b, const SplitOut& so,
                                                 int head, int d, float val, float lse) {
  if (so.direct) {
    T* out = static_cast<T*>(p.out);
    out[(int64_t{b} * p.q_heads + head) * kHeadDim + d] = Vec8<T>::FromFloat(val);
  } else {
    const int64_t row = so.row + head * so.head_stride;
    p.ws_o[row * kHeadDim + d] = val;
    if (d == 0) p.ws_lse[row] = lse;
  }
}

// The result of a split without tokens (a short or empty sequence) for the G query heads from
// q_head0: zeros, weight 0 in the combine. Called by every thread of the CTA.
template <typename T, int G>
__device__ __forceinline__ void StoreEmptySplit(const DecodeParams& p, int b, const SplitOut& so,
                                                int q_head0) {
  for (int i = threadIdx.x; i < G * kHeadDim; i += blockDim.x) {
    StoreSplitResult<T>(p, b, so, q_head0 + i / kHeadDim, i % kHeadDim, 0.f, -INFINITY);
  }
}

// Packed splits (p.work_items > 0; the tensor-core kernel): sequence b's context, clamped to
// [0, max_context_len], is cut into n_b = max(1, ceil(len_b / tokens)) splits, numbered in
// sequence order: sequence b's are items first_b .. first_b + n_b - 1, so a long sequence gets
// many CTAs and a short one one, and no CTA is launched for nothing. tokens = p.split_tokens
// unless the items would not fit the p.work_items launched (ceil(sum_context_lens / split_tokens)
// + batch: the caller's sum understated the lengths); then tokens = k x p.split_tokens with
// k = ceil(items / (work_items - batch)), which fits (each n_b shrinks to ceil(n_b / k) <= n_b / k
// + 1). Every CTA of the main kernel and of the combine derives the same numbering from
// context_lens: a block-wide scan, whose cost (one pass over batch lengths, L2 hits) is paid in
// packed mode only.
struct PackedSplits {
  int tokens;  // per split
  int b;       // the sequence found; -1 if `item` is past the last split
  int first;   // its first item
  int count;   // its splits
};

__device__ __forceinline__ long long BlockExclusiveSum(long long x, long long* total,
                                                       long long* s_warp) {
  static_assert(kDecodeThreads == 128, "four warps");
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  long long incl = x;
#pragma unroll
  for (int o = 1; o < 32; o *= 2) {
    const long long y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  __syncthreads();  // s_warp may still be read by a previous scan
  if (lane == 31) s_warp[warp] = incl;
  __syncthreads();
  long long before = 0, all = 0;
#pragma unroll
  for (int w = 0; w < kDecodeWarps; ++w) {
    before += w < warp ? s_warp[w] : 0;
    all += s_warp[w];
  }
  *total = all;
  return before + incl - x;
}

// The split that packed item `item` names (seq < 0), or sequence `seq`'s splits (item ignored).
// Called by all kDecodeThreads threads of the CTA, none having returned.
__device__ __forceinline__ PackedSplits FindPackedSplits(const DecodeParams& p, long long item,
                                                         int seq) {
  __shared__ long long s_warp[kDecodeWarps];
  __shared__ int s_found[3];
  const int per = (p.batch + kDecodeThreads - 1) / kDecodeThreads;
  const int lo = min(static_cast<int>(threadIdx.x) * per, p.batch);
  const int hi = min(lo + per, p.batch);
  long long tokens = p.split_tokens;
  auto splits_of = [&](int b) -> long long {
    const int len = min(max(p.context_lens[b], 0), p.max_context_len);
    return len == 0 ? 1 : (len + tokens - 1) / tokens;
  };
  long long mine = 0, total;
  for (int b = lo; b < hi; ++b) mine += splits_of(b);
  long long before = BlockExclusiveSum(mine, &total, s_warp);
  if (total > p.work_items) {
    const long long room = p.work_items - p.batch;  // >= 1: the planner launches more
    tokens =
        min((total + room - 1) / room * tokens, static_cast<long long>(max(p.max_context_len, 1)));
    mine = 0;
    for (int b = lo; b < hi; ++b) mine += splits_of(b);
    before = BlockExclusiveSum(mine, &total, s_warp);
  }
  if (threadIdx.x == 0) s_found[0] = -1;
  __syncthreads();
  for (int b = lo; b < hi; ++b) {
    const long long n = splits_of(b);
    if (seq < 0 ? item >= before && item < before + n : b == seq) {
      s_found[0] = b;
      s_found[1] = static_cast<int>(before);
      s_found[2] = static_cast<int>(n);
    }
    before += n;
  }
  __syncthreads();
  return {static_cast<int>(tokens), s_found[0], s_found[1], s_found[2]};
}

// The end of a split for the G query heads from q_head0: merges kParts partial results (a running
// max m, sum l and unnormalized output o over each part's share of the split's tokens, read
// through m_of(part, g), l_of(part, g), o_of(part, g, d)) and stores the split's result. Thread d
// of the CTA does dimension d. A split whose tokens all had bad block-table entries (every m
// -inf) stores zeros with weight 0. Both kernels end with it; only their shared-memory layouts
// differ.
template <typename T, int G, int kParts, typename MOf, typename LOf, typename OOf>
__device__ __forceinline__ void MergePartsAndStore(const DecodeParams& p, int b, const SplitOut& so,
                                                   int q_head0, MOf m_of, LOf l_of, OOf o_of) {
  const int d = threadIdx.x;  // kDecodeThreads == kHeadDim
#pragma unroll
  for (int g = 0; g < G; ++g) {
    float mx = -INFINITY;
#pragma unroll
    for (int h = 0; h < kParts; ++h) mx = fmaxf(mx, m_of(h, g));
    float lsum = 0.f, acc = 0.f;
#pragma unroll
    for (int h = 0; h < kParts; ++h) {
      const float mh = m_of(h, g);
      const float w = mh == -INFINITY ? 0.f : exp2f(mh - mx);
      lsum += l_of(h, g) * w;
      acc += o_of(h, g, d) * w;
    }
    StoreSplitResult<T>(p, b, so, q_head0 + g, d, lsum > 0.f ? acc / lsum : 0.f,
                        lsum > 0.f ? mx + log2f(lsum) : -INFINITY);
  }
}

// How a warp splits one K/V row: kLanes lanes per token, kDims dims per lane (kDims / 8 16-byte
// loads per row), kTokens tokens per warp step, U steps in flight. Large groups keep 16 lanes per
// token (registers: q and the accumulators are G x kDims floats per lane); smaller groups use 8,
// which halves the shuffle reduction and the softmax work per token.
template <int G, int kLanesPerToken>
struct DecodeShape {
  static constexpr int kLanes = kLanesPerToken;
  static constexpr int kDims = kHeadDim / kLanes;
  static constexpr int kVecs = kDims / 8;
  static constexpr int kTokens = 32 / kLanes;
  static constexpr int kGroups = kDecodeWarps * kTokens;  // token groups per CTA
  static constexpr int U = G * kDims >= 64 ? 2 : 4;
  static_assert(kGroups * G * kHeadDim * 4 <= 32768, "merge buffer over 32 KiB");
};

template <typename T, int G, int kLanes, bool kPrefetch>
__global__ void __launch_bounds__(kDecodeThreads) PagedDecodeKernel(DecodeParams p) {
  using S = DecodeShape<G, kLanes>;
  constexpr int U = S::U;
  constexpr int kDims = S::kDims;
  // kv heads vary fastest in the grid: the CTAs of one (sequence, split) run side by side and
  // read the same KV blocks (each its head's rows), so DRAM sees whole blocks, not 256-byte rows
  // strided by num_kv_heads x 256 bytes at different times.
  const int kvh = blockIdx.x;
  const int split = blockIdx.y;
  const int b = blockIdx.z;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int grp = lane / S::kLanes;  // which token of the warp's step
  const int sub = lane % S::kLanes;  // dims [sub * kDims, (sub + 1) * kDims)
  const int hw = warp * S::kTokens + grp;

  const int start = split * p.split_tokens;
  const int q_head0 = kvh * G;
  const int32_t* table = p.block_tables + int64_t{b} * p.max_blocks_per_seq;
  const int bs = p.block_size;
  const int first_blk = start / bs;
  // NOTE: q and this warp's first block-table entry do not depend on the context length, so
  // they are loaded before it: three dependent global loads at the CTA's start become one.
  uint4 qraw[G][S::kVecs];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const T* q = static_cast<const T*>(p.q) + (int64_t{b} * p.q_heads + q_head0 + g) * kHeadDim;
#pragma unroll
    for (int w = 0; w < S::kVecs; ++w) {
      qraw[g][w] = *reinterpret_cast<const uint4*>(q + sub * kDims + w * 8);
    }
  }
  const int32_t first_phys = first_blk + warp < p.max_blocks_per_seq ? table[first_blk + warp] : -1;
  const int ctx = min(p.context_lens[b], p.max_context_len);
  const SplitOut so = UniformSplitOut(p, b, split);
  const int end = min(ctx, start + p.split_tokens);

  // The combine kernel (a programmatic dependent when there are splits) may be scheduled as
  // soon as every CTA of this grid has started; it waits for this grid's results itself.
  GridLaunchDependents();

  __shared__ float s_m[S::kGroups][G];
  __shared__ float s_l[S::kGroups][G];
  __shared__ float s_acc[S::kGroups][G][kHeadDim];

  if (start >= end) {  // an empty split (short sequence) or an empty sequence
    StoreEmptySplit<T, G>(p, b, so, q_head0);
    return;
  }

  // q for the group, pre-scaled into the base-2 domain.
  float qf[G][kDims];
#pragma unroll
  for (int g = 0; g < G; ++g) {
#pragma unroll
    for (int w = 0; w < S::kVecs; ++w) Vec8<T>::ToFloat(qraw[g][w], &qf[g][w * 8]);
#pragma unroll
    for (int e = 0; e < kDims; ++e) qf[g][e] *= p.scale_log2;
  }

  float m[G], l[G], acc[G][kDims];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < kDims; ++e) acc[g][e] = 0.f;
  }

  const int last_blk = (end - 1) / bs;
  const int64_t row_stride = int64_t{p.kv_heads} * kHeadDim;  // elements between slots
  const T* kbase = static_cast<const T*>(p.k) + int64_t{kvh} * kHeadDim + sub * kDims;
  const T* vbase = static_cast<const T*>(p.v) + int64_t{kvh} * kHeadDim + sub * kDims;

  for (int blk = first_blk + warp; blk <= last_blk; blk += kDecodeWarps) {
    const int64_t phys = blk == first_blk + warp ? first_phys : table[blk];
    if (phys < 0 || phys >= p.num_blocks) continue;  // a bad table entry reads nothing
    if (kPrefetch) {
      // The block this warp reads `prefetch_distance` iterations ahead (on its first iteration,
      // every one up to there): each of the kv-head CTAs that read it asks L2 for one contiguous
      // 1/num_kv_heads of its K and of its V (two bulk prefetches per CTA and block), so together
      // they fetch it whole, in a few large requests.
      const int first = blk == first_blk + warp ? 1 : p.prefetch_distance;
      for (int k = first; lane < 2 && k <= p.prefetch_distance; ++k) {
        const int next = blk + k * kDecodeWarps;
        if (next > last_blk) break;
        const int64_t pn = table[next];
        if (pn >= 0 && pn < p.num_blocks) {
          const int64_t block_elems = int64_t{bs} * row_stride;
          const int64_t slice = int64_t{bs} * kHeadDim;  // block_elems / kv_heads
          const T* base = static_cast<const T*>(lane == 0 ? p.k : p.v);
          PrefetchL2Bytes(base + pn * block_elems + kvh * slice,
                          static_cast<uint32_t>(slice * sizeof(T)));
        }
      }
    }
    const int tok0 = max(start, blk * bs);
    const int tok1 = min(end, (blk + 1) * bs);
    // The whole warp runs the same steps (the shuffles below need every lane).
    for (int t0 = tok0; t0 < tok1; t0 += S::kTokens * U) {
      const int t = t0 + grp;
      uint4 kr[U][S::kVecs], vr[U][S::kVecs];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int tt = t + S::kTokens * u;
#pragma unroll
        for (int w = 0; w < S::kVecs; ++w) {
          kr[u][w] = make_uint4(0, 0, 0, 0);
          vr[u][w] = make_uint4(0, 0, 0, 0);
        }
        if (tt < tok1) {
          const int64_t off = (phys * bs + (tt - blk * bs)) * row_stride;
#pragma unroll
          for (int w = 0; w < S::kVecs; ++w) {
            kr[u][w] = LoadStreaming(kbase + off + w * 8);
            vr[u][w] = LoadStreaming(vbase + off + w * 8);
          }
        }
      }
      float s[U][G];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        float kf[kDims];
#pragma unroll
        for (int w = 0; w < S::kVecs; ++w) Vec8<T>::ToFloat(kr[u][w], &kf[w * 8]);
#pragma unroll
        for (int g = 0; g < G; ++g) {
          float d = 0.f;
#pragma unroll
          for (int e = 0; e < kDims; ++e) d = fmaf(qf[g][e], kf[e], d);
          s[u][g] = d;
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int g = 0; g < G; ++g) {
#pragma unroll
          for (int o = S::kLanes / 2; o >= 1; o /= 2) {
            s[u][g] += __shfl_xor_sync(0xffffffffu, s[u][g], o);
          }
          if (t + S::kTokens * u >= tok1) s[u][g] = -INFINITY;
        }
      }
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float mx = m[g];
#pragma unroll
        for (int u = 0; u < U; ++u) mx = fmaxf(mx, s[u][g]);
        // m = -inf, mx finite: 0. Both -inf (no valid token yet for this group): keep.
        const float alpha = mx == -INFINITY ? 1.f : exp2f(m[g] - mx);
        m[g] = mx;
        l[g] *= alpha;
#pragma unroll
        for (int e = 0; e < kDims; ++e) acc[g][e] *= alpha;
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (t + S::kTokens * u >= tok1) continue;
        float vf[kDims];
#pragma unroll
        for (int w = 0; w < S::kVecs; ++w) Vec8<T>::ToFloat(vr[u][w], &vf[w * 8]);
#pragma unroll
        for (int g = 0; g < G; ++g) {
          const float pr = exp2f(s[u][g] - m[g]);
          l[g] += pr;
#pragma unroll
          for (int e = 0; e < kDims; ++e) acc[g][e] = fmaf(pr, vf[e], acc[g][e]);
        }
      }
    }
  }

  // Merge the token groups.
#pragma unroll
  for (int g = 0; g < G; ++g) {
    if (sub == 0) {
      s_m[hw][g] = m[g];
      s_l[hw][g] = l[g];
    }
#pragma unroll
    for (int e = 0; e < kDims; ++e) s_acc[hw][g][sub * kDims + e] = acc[g][e];
  }
  __syncthreads();
  MergePartsAndStore<T, G, S::kGroups>(
      p, b, so, q_head0, [&](int h, int g) { return s_m[h][g]; },
      [&](int h, int g) { return s_l[h][g]; }, [&](int h, int g, int d) { return s_acc[h][g][d]; });
}

inline constexpr int kCombineThreads = kHeadDim;  // one CTA per (sequence, q head)
inline constexpr int kCombineWarps = kCombineThreads / 32;
inline constexpr int kCombineChunk = 1024;  // split weights staged in shared memory at a time

__device__ __forceinline__ float BlockReduce(float x, bool is_max, float* scratch) {
#pragma unroll
  for (int o = 16; o >= 1; o /= 2) {
    const float y = __shfl_xor_sync(0xffffffffu, x, o);
    x = is_max ? fmaxf(x, y) : x + y;
  }
  __syncthreads();  // scratch may still be read by a previous reduction
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = x;
  __syncthreads();
  x = scratch[0];
#pragma unroll
  for (int w = 1; w < kCombineWarps; ++w) x = is_max ? fmaxf(x, scratch[w]) : x + scratch[w];
  return x;
}

// Merges the splits of one (sequence, q head): weights 2^(lse_s - max). All loads of a step are
// independent: the lse values by thread, then each warp sums a quarter of the splits' partial
// outputs (a lane holds 4 dims), and the warps' sums meet in shared memory.
// Packed splits: a sequence with one split has its output from the main kernel already.
template <typename T>
__global__ void __launch_bounds__(kCombineThreads) CombineSplitsKernel(DecodeParams p) {
  static_assert(kCombineThreads == kDecodeThreads, "FindPackedSplits scans with 128 threads");
  int64_t row0 = int64_t{blockIdx.x} * p.num_splits;  // blockIdx.x = b * q_heads + h
  int splits = p.num_splits;
  if (p.work_items > 0) {
    // Only context_lens is read: this runs before the main kernel's results are waited for.
    const PackedSplits ps = FindPackedSplits(p, 0, static_cast<int>(blockIdx.x / p.q_heads));
    if (ps.count == 1) return;
    row0 = int64_t{blockIdx.x % p.q_heads} * p.work_items + ps.first;
    splits = ps.count;
  }
  GridDependencyWait();  // the main kernel's partial outputs are complete and visible
  const int t = threadIdx.x;
  const int warp = t / 32;
  const int lane = t % 32;
  __shared__ float s_w[kCombineChunk];
  __shared__ float s_red[kCombineWarps];
  __shared__ float4 s_acc[kCombineWarps][32];

  float mx = -INFINITY;
  for (int s = t; s < splits; s += kCombineThreads) mx = fmaxf(mx, p.ws_lse[row0 + s]);
  mx = BlockReduce(mx, true, s_red);
  float wsum = 0.f;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int c0 = 0; c0 < splits; c0 += kCombineChunk) {
    const int n = min(kCombineChunk, splits - c0);
    __syncthreads();  // s_w of the previous chunk is read
    for (int s = t; s < n; s += kCombineThreads) {
      const float lse = p.ws_lse[row0 + c0 + s];
      // An empty split (lse = -inf), or every split empty: weight 0.
      const float w = lse == -INFINITY ? 0.f : exp2f(lse - mx);
      s_w[s] = w;
      wsum += w;
    }
    __syncthreads();
    const float4* o = reinterpret_cast<const float4*>(p.ws_o + (row0 + c0) * kHeadDim) + lane;
#pragma unroll 4
    for (int s = warp; s < n; s += kCombineWarps) {
      const float w = s_w[s];
      const float4 v = o[int64_t{s} * (kHeadDim / 4)];
      acc.x = fmaf(w, v.x, acc.x);
      acc.y = fmaf(w, v.y, acc.y);
      acc.z = fmaf(w, v.z, acc.z);
      acc.w = fmaf(w, v.w, acc.w);
    }
  }
  wsum = BlockReduce(wsum, false, s_red);
  s_acc[warp][lane] = acc;
  __syncthreads();
  const float* a = reinterpret_cast<const float*>(&s_acc[0][0]);
  float o = 0.f;
#pragma unroll
  for (int w = 0; w < kCombineWarps; ++w) o += a[w * kHeadDim + t];
  T* out = static_cast<T*>(p.out);
  out[int64_t{blockIdx.x} * kHeadDim + t] = Vec8<T>::FromFloat(wsum > 0.f ? o / wsum : 0.f);
}

// Enqueues the combine of the splits (p.num_splits > 1, or packed) after the main kernel on
// `stream`.
template <typename T>
cudaError_t LaunchCombine(const DecodeParams& p, int batch, cudaStream_t stream) {
  // Programmatic dependent launch: the combine may start before the main kernel ends (it waits
  // for it in GridDependencyWait), so its launch latency hides behind the main kernel.
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(batch * p.q_heads));
  cfg.blockDim = dim3(kCombineThreads);
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, CombineSplitsKernel<T>, p);
}

template <typename T, int G, int kLanes, bool kPrefetch>
cudaError_t LaunchDecode(const DecodeParams& p, int batch, cudaStream_t stream) {
  const dim3 grid(p.kv_heads, p.num_splits, batch);
  PagedDecodeKernel<T, G, kLanes, kPrefetch><<<grid, kDecodeThreads, 0, stream>>>(p);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess || p.num_splits == 1) return e;
  return LaunchCombine<T>(p, batch, stream);
}

template <typename T, int G, int kLanes, bool kPrefetch>
cudaError_t DecodeOccupancy(int* ctas_per_sm) {
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      ctas_per_sm, PagedDecodeKernel<T, G, kLanes, kPrefetch>, kDecodeThreads, 0);
}

}  // namespace kvdn::kernels::detail

#endif  // KVDN_KERNELS_SRC_DECODE_ATTENTION_CUH_
