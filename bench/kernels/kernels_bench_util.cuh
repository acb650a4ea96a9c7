// Internal to kernels_bench: error checks, data fills, the timer, the decode-shape fixture and
// the JSON writer. Included by kernels_bench.cu only.
#ifndef KVDN_BENCH_KERNELS_KERNELS_BENCH_UTIL_CUH_
#define KVDN_BENCH_KERNELS_KERNELS_BENCH_UTIL_CUH_

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kvdn/kernels/decode_attention.h"
#include "kvdn/kernels/paged_kv.h"

namespace kvdn::bench_kernels {

using namespace kvdn;
using namespace kvdn::kernels;

#define CHECK_CUDA(expr)                                                                         \
  do {                                                                                           \
    cudaError_t e_ = (expr);                                                                     \
    if (e_ != cudaSuccess) {                                                                     \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (0)
#define CHECK_OK(expr)                                                               \
  do {                                                                               \
    absl::Status s_ = (expr);                                                        \
    if (!s_.ok()) {                                                                  \
      std::fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, s_.ToString().c_str()); \
      std::exit(1);                                                                  \
    }                                                                                \
  } while (0)

__global__ void FillRandom(uint16_t* p, size_t n, uint64_t seed, bool bf16) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x) {
    uint64_t x = (i + 1) * 0x9E3779B97F4A7C15ull ^ seed;
    x ^= x >> 31;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 29;
    // Uniform in [-1, 1) as bf16/fp16 bits (no zeros-only data).
    const float f = static_cast<float>(x >> 40) / static_cast<float>(1ull << 23) - 1.0f;
    if (bf16) {
      uint32_t u;
      memcpy(&u, &f, 4);
      p[i] = static_cast<uint16_t>(u >> 16);
    } else {
      p[i] = __half_as_ushort(__float2half(f));
    }
  }
}

__device__ __forceinline__ uint4 LoadNoAllocate(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// The read-only streaming ceiling: every byte of p read once, four independent 16-byte loads
// in flight per thread (one per thread left H200's HBM3e latency exposed: 4.38 TB/s where the
// SDPA peer read 4.6 TB/s).
__global__ void StreamRead(const uint4* p, size_t n, uint4* sink) {
  constexpr int kUnroll = 4;
  uint4 acc = make_uint4(0, 0, 0, 0);
  const size_t stride = size_t{gridDim.x} * blockDim.x;
  size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x;
  for (; i + (kUnroll - 1) * stride < n; i += kUnroll * stride) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = LoadNoAllocate(p + i + u * stride);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      acc.x ^= v[u].x;
      acc.y ^= v[u].y;
      acc.z ^= v[u].z;
      acc.w ^= v[u].w;
    }
  }
  for (; i < n; i += stride) {
    const uint4 v = LoadNoAllocate(p + i);
    acc.x ^= v.x;
    acc.y ^= v.y;
    acc.z ^= v.z;
    acc.w ^= v.w;
  }
  if ((acc.x ^ acc.y ^ acc.z ^ acc.w) == 0x12345678u) sink[threadIdx.x] = acc;
}

// The same read through the copy engine of each SM (Hopper's bulk asynchronous copy, the 1-D
// form of TMA): one thread of each CTA keeps kBulkStages copies of `op_bytes` each in flight into
// shared memory, each stage signalled by an mbarrier's transaction count; the data is not looked
// at (a read ceiling). Interleaved: CTA c reads ops c, c + grid, ... of the buffer (the whole
// GPU sweeps it front to back, as StreamRead); else CTA c reads its own contiguous 1/grid of it
// (as a kernel that streams one sequence's KV per CTA). n_ops * op_bytes bytes; op_bytes a
// multiple of 16, at most kBulkStageBytes. `stages` (1..kBulkStages, default all) of the ring
// are used: the copies each CTA keeps in flight.
inline constexpr int kBulkStages = 4;
inline constexpr int kBulkStageBytes = 16 << 10;
__global__ void StreamReadBulk(const uint8_t* p, size_t n_ops, uint32_t op_bytes, bool interleaved,
                               int stages = kBulkStages) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ __align__(8) uint64_t bar[kBulkStages];
  if (threadIdx.x != 0) return;
  const uint32_t s0 = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t b0 = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  for (int s = 0; s < kBulkStages; ++s) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(b0 + 8 * s));
  }
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  auto issue = [&](size_t op, int s) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(b0 + 8 * s),
                 "r"(op_bytes)
                 : "memory");
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
            "r"(s0 + s * kBulkStageBytes),
        "l"(p + op * op_bytes), "r"(op_bytes), "r"(b0 + 8 * s)
        : "memory");
  };
  // This CTA's ops: first, first + stride, ... below last.
  const size_t per_cta = (n_ops + gridDim.x - 1) / gridDim.x;
  const size_t stride = interleaved ? gridDim.x : 1;
  const size_t first = interleaved ? blockIdx.x : blockIdx.x * per_cta;
  const size_t last = interleaved ? n_ops : (first + per_cta < n_ops ? first + per_cta : n_ops);
  size_t next = first;
  for (int s = 0; s < stages && next < last; ++s, next += stride) issue(next, s);
  uint32_t phase = 0;
  size_t done = 0;
  for (size_t op = first; op < last; op += stride, ++done) {
    const int s = static_cast<int>(done % stages);
    uint32_t ok = 0;
    while (!ok) {
      asm volatile(
          "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, "
          "0, p; }"
          : "=r"(ok)
          : "r"(b0 + 8 * s), "r"(phase)
          : "memory");
    }
    if (s == stages - 1) phase ^= 1;
    if (next < last) {
      issue(next, s);
      next += stride;
    }
  }
#endif
}

// Compute-bound filler standing in for an engine's MLP between two attention layers: FMAs in
// registers, no memory traffic.
__global__ void ComputeFiller(int iters, float* sink) {
  float a = threadIdx.x * 1e-3f, b = 1.0001f, c = 0.9999f;
  for (int i = 0; i < iters; ++i) {
    a = fmaf(a, b, c);
    b = fmaf(b, c, a);
  }
  if (a == 1234.5f) sink[threadIdx.x] = b;
}

struct Timer {
  cudaEvent_t a, b;
  Timer() {
    CHECK_CUDA(cudaEventCreate(&a));
    CHECK_CUDA(cudaEventCreate(&b));
  }
  ~Timer() {
    cudaEventDestroy(a);
    cudaEventDestroy(b);
  }
  // Median milliseconds of `reps` runs of f(i) (after 3 warm-ups), events recorded on `stream`.
  template <typename F>
  double MedianMs(int reps, F&& f, cudaStream_t stream = nullptr) {
    std::vector<float> t;
    for (int i = 0; i < reps + 3; ++i) {
      CHECK_CUDA(cudaEventRecord(a, stream));
      f(i);
      CHECK_CUDA(cudaEventRecord(b, stream));
      CHECK_CUDA(cudaEventSynchronize(b));
      float ms;
      CHECK_CUDA(cudaEventElapsedTime(&ms, a, b));
      if (i >= 3) t.push_back(ms);  // warm-up
    }
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
  }
};

// GPU milliseconds per call of enqueue(i, stream) as a CUDA graph replay sees it (no host launch
// cost): `per_graph` calls (i = 0 .. per_graph - 1) captured in one graph on `stream`, median
// over `reps` replays, divided by `per_graph`.
template <typename F>
double GraphMs(Timer& timer, cudaStream_t stream, int per_graph, int reps, F&& enqueue) {
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed));
  for (int i = 0; i < per_graph; ++i) enqueue(i, stream);
  CHECK_CUDA(cudaStreamEndCapture(stream, &graph));
  CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
  const double ms = timer.MedianMs(
      reps, [&](int) { CHECK_CUDA(cudaGraphLaunch(exec, stream)); }, stream);
  CHECK_CUDA(cudaGraphExecDestroy(exec));
  CHECK_CUDA(cudaGraphDestroy(graph));
  return ms / per_graph;
}

// One decode shape on the device (Llama-3-8B heads, bf16, NHD): KV pools rotated so that their
// total is > 2x L2 (at least two unless one alone is > 4x L2), a shuffled block table, random q,
// every sequence at `ctx` tokens (or at its own length in `ctxs`).
class DecodeSetup {
 public:
  static constexpr int kQHeads = 32, kKvHeads = 8, kDim = 128;
  // Block tables random (a permutation of the pool's blocks, as an engine's allocator leaves
  // them after a while) unless `sorted` (each sequence's blocks adjacent, in order).
  DecodeSetup(int batch, int ctx, size_t l2, uint32_t seed, int block_size = 16,
              bool sorted = false)
      : DecodeSetup(std::vector<int>(batch, ctx), l2, seed, block_size, sorted) {}
  // Sequences of the lengths in `ctxs`, each with the blocks its tokens need (a table row's
  // entries past them are 0, never read). max_context_len is the longest; sum_context_lens in
  // args() is left 0 (unknown): `sum_context_lens` below has it.
  DecodeSetup(const std::vector<int>& ctxs, size_t l2, uint32_t seed, int block_size = 16,
              bool sorted = false) {
    const int kBlock = block_size;
    const int batch = static_cast<int>(ctxs.size());
    const int max_ctx = *std::max_element(ctxs.begin(), ctxs.end());
    const int mb = std::max(1, (max_ctx + kBlock - 1) / kBlock);
    int nb = 0;
    for (int c : ctxs) {
      nb += (c + kBlock - 1) / kBlock;
      sum_context_lens += c;
    }
    nb = std::max(nb, 1);
    const size_t cache_elems = size_t{static_cast<size_t>(nb)} * kBlock * kKvHeads * kDim;
    kv_bytes = 2 * cache_elems * 2;
    read_bytes = static_cast<size_t>(sum_context_lens) * kKvHeads * kDim * 2 * 2;
    int pools = std::clamp(static_cast<int>(std::ceil(2.5 * l2 / kv_bytes)), 1, 64);
    if (pools == 1 && kv_bytes < 4 * l2) pools = 2;
    for (int p = 0; p < pools; ++p) {
      void *k, *v;
      CHECK_CUDA(cudaMalloc(&k, cache_elems * 2));
      CHECK_CUDA(cudaMalloc(&v, cache_elems * 2));
      FillRandom<<<2048, 256>>>(static_cast<uint16_t*>(k), cache_elems, 3 * p + 1, true);
      FillRandom<<<2048, 256>>>(static_cast<uint16_t*>(v), cache_elems, 3 * p + 2, true);
      k_.push_back(k);
      v_.push_back(v);
    }
    std::vector<int32_t> blocks(nb);
    std::iota(blocks.begin(), blocks.end(), 0);
    if (!sorted) std::shuffle(blocks.begin(), blocks.end(), std::mt19937(seed));
    std::vector<int32_t> tbl(static_cast<size_t>(batch) * mb, 0);
    for (int b = 0, next = 0; b < batch; ++b) {
      for (int j = 0; j < (ctxs[b] + kBlock - 1) / kBlock; ++j) {
        tbl[static_cast<size_t>(b) * mb + j] = blocks[next++];
      }
    }
    const size_t q_elems = size_t{static_cast<size_t>(batch)} * kQHeads * kDim;
    CHECK_CUDA(cudaMalloc(&q_, q_elems * 2));
    CHECK_CUDA(cudaMalloc(&out_, q_elems * 2));
    CHECK_CUDA(cudaMalloc(&table_, tbl.size() * 4));
    CHECK_CUDA(cudaMalloc(&ctx_lens_, batch * 4));
    FillRandom<<<64, 256>>>(static_cast<uint16_t*>(q_), q_elems, seed, true);
    CHECK_CUDA(cudaMemcpy(table_, tbl.data(), tbl.size() * 4, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(ctx_lens_, ctxs.data(), batch * 4, cudaMemcpyHostToDevice));
    args_.q = q_;
    args_.block_tables = table_;
    args_.context_lens = ctx_lens_;
    args_.out = out_;
    args_.batch = batch;
    args_.num_q_heads = kQHeads;
    args_.num_kv_heads = kKvHeads;
    args_.block_size = kBlock;
    args_.num_blocks = nb;
    args_.max_blocks_per_seq = mb;
    args_.max_context_len = max_ctx;
    args_.k_cache = k_[0];
    args_.v_cache = v_[0];
  }
  ~DecodeSetup() {
    for (size_t p = 0; p < k_.size(); ++p) {
      cudaFree(k_[p]);
      cudaFree(v_[p]);
    }
    for (void* p : {q_, out_, static_cast<void*>(table_), static_cast<void*>(ctx_lens_)}) {
      cudaFree(p);
    }
  }
  DecodeSetup(const DecodeSetup&) = delete;
  DecodeSetup& operator=(const DecodeSetup&) = delete;

  // The shape's arguments on pool 0, without workspace.
  const DecodeAttentionArgs& args() const { return args_; }
  // Median microseconds of `reps` launches of `a` (its plan's workspace allocated here), the KV
  // pools rotated launch by launch.
  double TimeUs(Timer& timer, DecodeAttentionArgs a, int reps) {
    void* ws = AttachWorkspace(&a);
    const double us = 1e3 * timer.MedianMs(reps, [&](int i) {
      a.k_cache = k_[i % k_.size()];
      a.v_cache = v_[i % v_.size()];
      CHECK_OK(PagedDecodeAttention(a, nullptr));
    });
    cudaFree(ws);
    return us;
  }

  // GPU microseconds per launch of `a` as an engine that replays CUDA graphs sees them (no host
  // launch or planning cost): `per_graph` launches (KV pools rotated launch by launch) captured in
  // one graph on `stream`, median over `reps` replays, divided by `per_graph`.
  double TimeGraphUs(Timer& timer, DecodeAttentionArgs a, int reps, cudaStream_t stream) {
    void* ws = AttachWorkspace(&a);
    const int per_graph = std::max<int>(static_cast<int>(k_.size()), 10);
    const double ms = GraphMs(timer, stream, per_graph, reps, [&](int i, cudaStream_t s) {
      a.k_cache = k_[i % k_.size()];
      a.v_cache = v_[i % v_.size()];
      CHECK_OK(PagedDecodeAttention(a, s));
    });
    cudaFree(ws);
    return 1e3 * ms;
  }

  // Two layers back to back on the default stream (layer A = one pool, layer B = the next), the
  // in-loop prefetch off. With `prefetch_next`, PrefetchL2Batch of all of layer B's pages is
  // enqueued on `side` as layer A starts (what an engine's SDK does for the next layer); the timing
  // joins `side` before it stops. Median microseconds over `reps`, pools rotated.
  double TimeTwoLayersUs(Timer& timer, DecodeAttentionArgs a, int reps, bool prefetch_next,
                         cudaStream_t side, cudaEvent_t start, cudaEvent_t side_done) {
    a.prefetch = PrefetchMode::kOff;
    void* ws = AttachWorkspace(&a);
    const size_t n = k_.size();
    const double us = 1e3 * timer.MedianMs(reps, [&](int i) {
      const size_t la = (2 * i) % n, lb = (2 * i + 1) % n;
      if (prefetch_next) PrefetchOnSide(lb, a, side, start, side_done);
      a.k_cache = k_[la];
      a.v_cache = v_[la];
      CHECK_OK(PagedDecodeAttention(a, nullptr));
      a.k_cache = k_[lb];
      a.v_cache = v_[lb];
      CHECK_OK(PagedDecodeAttention(a, nullptr));
      if (prefetch_next) CHECK_CUDA(cudaStreamWaitEvent(nullptr, side_done));
    });
    cudaFree(ws);
    return us;
  }

  // A compute-bound filler (`filler_iters`, standing in for the MLP between attention layers),
  // then one layer's attention (in-loop prefetch off); with `prefetch`, PrefetchL2Batch of that
  // layer's pages is enqueued on `side` as the filler starts. Median microseconds over `reps`.
  double TimeFillerThenLayerUs(Timer& timer, DecodeAttentionArgs a, int reps, bool prefetch,
                               int filler_iters, int filler_ctas, float* sink, cudaStream_t side,
                               cudaEvent_t start, cudaEvent_t side_done) {
    a.prefetch = PrefetchMode::kOff;
    void* ws = AttachWorkspace(&a);
    const double us = 1e3 * timer.MedianMs(reps, [&](int i) {
      const size_t l = i % k_.size();
      if (prefetch) PrefetchOnSide(l, a, side, start, side_done);
      ComputeFiller<<<filler_ctas, 256>>>(filler_iters, sink);
      a.k_cache = k_[l];
      a.v_cache = v_[l];
      CHECK_OK(PagedDecodeAttention(a, nullptr));
      if (prefetch) CHECK_CUDA(cudaStreamWaitEvent(nullptr, side_done));
    });
    cudaFree(ws);
    return us;
  }

  size_t kv_bytes = 0;    // one pool's K and V
  size_t read_bytes = 0;  // the K and V bytes one call reads (its sequences' tokens)
  int64_t sum_context_lens = 0;

  // Plans `a`, allocates its workspace and points `a` at it; the caller frees the result.
  static void* AttachWorkspace(DecodeAttentionArgs* a) {
    auto plan = PlanDecodeAttention(*a);
    CHECK_OK(plan.status());
    void* ws;
    CHECK_CUDA(cudaMalloc(&ws, std::max<size_t>(plan->workspace_bytes, 16)));
    a->workspace = ws;
    a->workspace_bytes = plan->workspace_bytes;
    return ws;
  }

 private:
  // Enqueues PrefetchL2Batch of pool `pool`'s pages on `side`, started when the default stream
  // reaches this point; `side_done` marks its end (the caller joins it).
  void PrefetchOnSide(size_t pool, const DecodeAttentionArgs& a, cudaStream_t side,
                      cudaEvent_t start, cudaEvent_t side_done) {
    CHECK_CUDA(cudaEventRecord(start, nullptr));
    CHECK_CUDA(cudaStreamWaitEvent(side, start));
    PagedKvLayer cache;
    cache.k = k_[pool];
    cache.v = v_[pool];
    cache.num_blocks = a.num_blocks;
    cache.block_size = a.block_size;
    cache.num_kv_heads = a.num_kv_heads;
    cache.head_dim = a.head_dim;
    CHECK_OK(PrefetchL2Batch(cache, table_, a.max_blocks_per_seq, ctx_lens_, a.batch, 0, side));
    CHECK_CUDA(cudaEventRecord(side_done, side));
  }

  std::vector<void*> k_, v_;
  void *q_ = nullptr, *out_ = nullptr;
  int32_t *table_ = nullptr, *ctx_lens_ = nullptr;
  DecodeAttentionArgs args_;
};

struct Json {
  std::string s = "[";
  void Add(const std::string& obj) { s += (s.size() > 1 ? ",\n" : "\n") + obj; }
  std::string Done() const { return s + "\n]\n"; }
};

std::string Fmt(const char* f, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, f);
  std::vsnprintf(buf, sizeof(buf), f, ap);
  va_end(ap);
  return buf;
}

}  // namespace kvdn::bench_kernels

#endif  // KVDN_BENCH_KERNELS_KERNELS_BENCH_UTIL_CUH_
