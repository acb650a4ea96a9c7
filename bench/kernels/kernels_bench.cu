// kernels_bench: kvdn's GPU kernels beside the ceilings measured in the same run (GPU machine).
//   - ceilings: a device-to-device copy and a read-only streaming kernel over buffers >= 4x L2;
//   - InjectLayer / ExtractLayer moving >= 64 MiB, GB/s counting bytes read + written, beside
//     the device-to-device copy;
//   - PagedDecodeAttention (Llama-3-8B shapes: 32 q / 8 kv heads, head_dim 128, bf16, vLLM NHD,
//     block 16, random block tables) for batch x context, cold L2 (KV pools rotated, > 2x L2 in
//     all), prefetch off / on / auto: time, GB/s of KV read, % of the streaming kernel.
// Correctness is checked on random data before timing (against the fp64 reference).
//
//   kernels_bench [--json FILE] [--quick]
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
#include "reference.h"

namespace {

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

__global__ void StreamRead(const uint4* p, size_t n, uint4* sink) {
  uint4 acc = make_uint4(0, 0, 0, 0);
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p + i));
    acc.x ^= v.x;
    acc.y ^= v.y;
    acc.z ^= v.z;
    acc.w ^= v.w;
  }
  if ((acc.x ^ acc.y ^ acc.z ^ acc.w) == 0x12345678u) sink[threadIdx.x] = acc;
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
  template <typename F>
  double MedianMs(int reps, F&& f) {
    std::vector<float> t;
    for (int i = 0; i < reps + 3; ++i) {
      CHECK_CUDA(cudaEventRecord(a));
      f(i);
      CHECK_CUDA(cudaEventRecord(b));
      CHECK_CUDA(cudaEventSynchronize(b));
      float ms;
      CHECK_CUDA(cudaEventElapsedTime(&ms, a, b));
      if (i >= 3) t.push_back(ms);  // warm-up
    }
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
  }
};

// One decode shape on the device (Llama-3-8B heads, bf16, NHD): KV pools rotated so that their
// total is > 2x L2 (at least two unless one alone is > 4x L2), a shuffled block table, random q,
// every sequence at `ctx` tokens.
class DecodeSetup {
 public:
  static constexpr int kQHeads = 32, kKvHeads = 8, kDim = 128, kBlock = 16;
  DecodeSetup(int batch, int ctx, size_t l2, uint32_t seed) {
    const int mb = ctx / kBlock, nb = batch * mb;
    const size_t cache_elems = size_t{static_cast<size_t>(nb)} * kBlock * kKvHeads * kDim;
    kv_bytes = 2 * cache_elems * 2;
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
    std::vector<int32_t> tbl(nb);
    std::iota(tbl.begin(), tbl.end(), 0);
    std::shuffle(tbl.begin(), tbl.end(), std::mt19937(seed));
    const std::vector<int32_t> ctxs(batch, ctx);
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
    args_.max_context_len = ctx;
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
    auto plan = PlanDecodeAttention(a);
    CHECK_OK(plan.status());
    void* ws;
    CHECK_CUDA(cudaMalloc(&ws, std::max<size_t>(plan->workspace_bytes, 16)));
    a.workspace = ws;
    a.workspace_bytes = plan->workspace_bytes;
    const double us = 1e3 * timer.MedianMs(reps, [&](int i) {
      a.k_cache = k_[i % k_.size()];
      a.v_cache = v_[i % v_.size()];
      CHECK_OK(PagedDecodeAttention(a, nullptr));
    });
    cudaFree(ws);
    return us;
  }

  // Two layers back to back on the default stream (layer A = one pool, layer B = the next), the
  // in-loop prefetch off. With `prefetch_next`, PrefetchL2Batch of all of layer B's pages is
  // enqueued on `side` as layer A starts (what an engine's SDK does for the next layer); the timing
  // joins `side` before it stops. Median microseconds over `reps`, pools rotated.
  double TimeTwoLayersUs(Timer& timer, DecodeAttentionArgs a, int reps, bool prefetch_next,
                         cudaStream_t side, cudaEvent_t start, cudaEvent_t side_done) {
    a.prefetch = PrefetchMode::kOff;
    auto plan = PlanDecodeAttention(a);
    CHECK_OK(plan.status());
    void* ws;
    CHECK_CUDA(cudaMalloc(&ws, std::max<size_t>(plan->workspace_bytes, 16)));
    a.workspace = ws;
    a.workspace_bytes = plan->workspace_bytes;
    const size_t n = k_.size();
    const double us = 1e3 * timer.MedianMs(reps, [&](int i) {
      const size_t la = (2 * i) % n, lb = (2 * i + 1) % n;
      if (prefetch_next) {
        CHECK_CUDA(cudaEventRecord(start, nullptr));
        CHECK_CUDA(cudaStreamWaitEvent(side, start));
        PagedKvLayer cache;
        cache.k = k_[lb];
        cache.v = v_[lb];
        cache.num_blocks = a.num_blocks;
        cache.block_size = a.block_size;
        cache.num_kv_heads = a.num_kv_heads;
        cache.head_dim = a.head_dim;
        CHECK_OK(PrefetchL2Batch(cache, table_, a.max_blocks_per_seq, ctx_lens_, a.batch, 0, side));
        CHECK_CUDA(cudaEventRecord(side_done, side));
      }
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

  size_t kv_bytes = 0;

 private:
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

}  // namespace

int main(int argc, char** argv) {
  std::string json_path;
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--json") && i + 1 < argc) json_path = argv[++i];
    if (!std::strcmp(argv[i], "--quick")) quick = true;
  }
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  const size_t l2 = prop.l2CacheSize;
  std::printf("# kernels_bench on %s (%d SMs, L2 %zu MiB)\n", prop.name, prop.multiProcessorCount,
              l2 >> 20);
  Json json;
  Timer timer;

  // ---- Ceilings ----
  const size_t big = std::max<size_t>(size_t{1} << 30, 8 * l2);
  void *a, *b;
  CHECK_CUDA(cudaMalloc(&a, big));
  CHECK_CUDA(cudaMalloc(&b, big));
  FillRandom<<<1024, 256>>>(static_cast<uint16_t*>(a), big / 2, 1, true);
  uint4* sink;
  CHECK_CUDA(cudaMalloc(&sink, 4096));
  const double copy_ms = timer.MedianMs(
      20, [&](int) { CHECK_CUDA(cudaMemcpyAsync(b, a, big, cudaMemcpyDeviceToDevice)); });
  const double d2d = 2.0 * big / (copy_ms * 1e-3) / 1e9;
  const double stream_ms = timer.MedianMs(20, [&](int) {
    StreamRead<<<prop.multiProcessorCount * 8, 512>>>(static_cast<const uint4*>(a), big / 16, sink);
  });
  const double streaming = big / (stream_ms * 1e-3) / 1e9;
  std::printf(
      "\nceilings: device-to-device copy %.0f GB/s (read + write), streaming read %.0f "
      "GB/s (%zu MiB buffers)\n",
      d2d, streaming, big >> 20);
  json.Add(Fmt("{\"kind\":\"ceiling\",\"d2d_gbps\":%.1f,\"stream_gbps\":%.1f,\"gpu\":\"%s\"}", d2d,
               streaming, prop.name));
  CHECK_CUDA(cudaFree(b));

  // ---- Inject / extract ----
  std::printf(
      "\n| op | layout | block | tokens | MiB moved | ms | GB/s (r+w) | %% of d2d copy |\n"
      "|---|---|---|---|---|---|---|---|\n");
  {
    const int heads = 8, dim = 128, tokens = 32768;
    for (PagedKvLayout layout :
         {PagedKvLayout::kNhd, PagedKvLayout::kNhdCombined, PagedKvLayout::kHnd}) {
      for (int bs : {16, 1}) {
        PagedKvLayer c;
        c.layout = layout;
        c.block_size = bs;
        c.num_kv_heads = heads;
        c.head_dim = dim;
        c.dtype = Dtype::kBFloat16;
        const int nblk = tokens / bs;
        c.num_blocks = nblk;
        const size_t tensor = size_t{static_cast<size_t>(nblk)} * bs * heads * dim * 2;
        const size_t layer = ChunkLayerBytes(c, tokens);
        // Three chunk buffers and caches rotated: > 2x L2 of distinct bytes per op.
        const int sets = 3;
        std::vector<void*> chunk(sets), k(sets), v(sets);
        for (int s = 0; s < sets; ++s) {
          CHECK_CUDA(cudaMalloc(&chunk[s], layer));
          CHECK_CUDA(
              cudaMalloc(&k[s], layout == PagedKvLayout::kNhdCombined ? 2 * tensor : tensor));
          v[s] = nullptr;
          if (layout != PagedKvLayout::kNhdCombined) CHECK_CUDA(cudaMalloc(&v[s], tensor));
          FillRandom<<<1024, 256>>>(static_cast<uint16_t*>(chunk[s]), layer / 2, s + 7, true);
        }
        std::vector<int32_t> table(nblk);
        std::iota(table.begin(), table.end(), 0);
        std::shuffle(table.begin(), table.end(), std::mt19937(1));
        int32_t* dtable;
        CHECK_CUDA(cudaMalloc(&dtable, nblk * 4));
        CHECK_CUDA(cudaMemcpy(dtable, table.data(), nblk * 4, cudaMemcpyHostToDevice));
        for (int inject = 1; inject >= 0; --inject) {
          const double ms = timer.MedianMs(20, [&](int i) {
            PagedKvLayer ci = c;
            ci.k = k[i % sets];
            ci.v = v[i % sets];
            TokenRange r{dtable, nblk, 0, tokens};
            if (inject) {
              CHECK_OK(InjectLayer(chunk[i % sets], ci, r, nullptr));
            } else {
              CHECK_OK(ExtractLayer(ci, r, chunk[i % sets], nullptr));
            }
          });
          const double gbps = 2.0 * layer / (ms * 1e-3) / 1e9;
          std::printf("| %s | %s | %d | %d | %.0f | %.3f | %.0f | %.0f%% |\n",
                      inject ? "inject" : "extract", LayoutName(layout), bs, tokens,
                      layer / 1048576.0, ms, gbps, 100 * gbps / d2d);
          json.Add(
              Fmt("{\"kind\":\"copy\",\"op\":\"%s\",\"layout\":\"%s\",\"block\":%d,"
                  "\"bytes\":%zu,\"ms\":%.4f,\"gbps\":%.1f,\"pct_d2d\":%.1f}",
                  inject ? "inject" : "extract", LayoutName(layout), bs, layer, ms, gbps,
                  100 * gbps / d2d));
        }
        for (int s = 0; s < sets; ++s) {
          cudaFree(chunk[s]);
          cudaFree(k[s]);
          if (v[s]) cudaFree(v[s]);
        }
        cudaFree(dtable);
      }
    }
  }

  // ---- Decode attention ----
  const int QH = 32, KVH = 8, D = 128, BS = 16;
  std::vector<int> batches = {1, 8, 32, 64, 128};
  std::vector<int> contexts = {1024, 4096, 16384, 32768};
  if (quick) {
    batches = {1, 8, 64};
    contexts = {1024, 32768};
  }
  // Correctness first: one small shape per mode, fp64 reference.
  {
    const int B = 3, ctx = 1500, mb = (ctx + BS - 1) / BS, nb = B * mb;
    std::vector<uint16_t> q(B * QH * D), k(size_t{static_cast<size_t>(nb)} * BS * KVH * D),
        v(k.size());
    std::mt19937 rng(9);
    std::normal_distribution<float> nd;
    for (auto* vec : {&q, &k, &v}) {
      for (auto& x : *vec) x = reference::FloatToBf16(nd(rng));
    }
    std::vector<int32_t> tbl(nb);
    std::iota(tbl.begin(), tbl.end(), 0);
    std::shuffle(tbl.begin(), tbl.end(), rng);
    std::vector<int32_t> ctxs = {ctx, 700, 1};
    void *dq, *dk, *dv, *dout, *ws;
    int32_t *dt, *dc;
    CHECK_CUDA(cudaMalloc(&dq, q.size() * 2));
    CHECK_CUDA(cudaMalloc(&dk, k.size() * 2));
    CHECK_CUDA(cudaMalloc(&dv, v.size() * 2));
    CHECK_CUDA(cudaMalloc(&dout, q.size() * 2));
    CHECK_CUDA(cudaMalloc(&dt, tbl.size() * 4));
    CHECK_CUDA(cudaMalloc(&dc, 12));
    CHECK_CUDA(cudaMalloc(&ws, 64 << 20));
    CHECK_CUDA(cudaMemcpy(dq, q.data(), q.size() * 2, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(dk, k.data(), k.size() * 2, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(dv, v.data(), v.size() * 2, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(dt, tbl.data(), tbl.size() * 4, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(dc, ctxs.data(), 12, cudaMemcpyHostToDevice));
    const auto ref =
        reference::DecodeAttention(q.data(), k.data(), v.data(), tbl.data(), ctxs.data(), B, QH,
                                   KVH, D, BS, mb, true, 1 / std::sqrt(128.0));
    for (PrefetchMode pf : {PrefetchMode::kOff, PrefetchMode::kOn, PrefetchMode::kAuto}) {
      DecodeAttentionArgs args;
      args.q = dq;
      args.k_cache = dk;
      args.v_cache = dv;
      args.block_tables = dt;
      args.context_lens = dc;
      args.out = dout;
      args.batch = B;
      args.num_q_heads = QH;
      args.num_kv_heads = KVH;
      args.block_size = BS;
      args.num_blocks = nb;
      args.max_blocks_per_seq = mb;
      args.max_context_len = ctx;
      args.prefetch = pf;
      args.workspace = ws;
      args.workspace_bytes = 64 << 20;
      CHECK_CUDA(cudaMemset(dout, 0xFF, q.size() * 2));
      CHECK_OK(PagedDecodeAttention(args, nullptr));
      std::vector<uint16_t> out(q.size());
      CHECK_CUDA(cudaMemcpy(out.data(), dout, out.size() * 2, cudaMemcpyDeviceToHost));
      double num = 0, den = 0;
      for (size_t i = 0; i < out.size(); ++i) {
        const double o = reference::Bf16ToFloat(out[i]);
        num += (o - ref[i]) * (o - ref[i]);
        den += ref[i] * ref[i];
      }
      const double rel = std::sqrt(num / den);
      std::printf("check: decode prefetch=%s relative error %.2e %s\n", PrefetchModeName(pf), rel,
                  rel < 1e-2 ? "ok" : "FAILED");
      if (!(rel < 1e-2)) return 1;
    }
    for (void* p : {dq, dk, dv, dout, ws}) cudaFree(p);
    cudaFree(dt);
    cudaFree(dc);
  }

  std::printf(
      "\n| batch | context | KV MiB | splits | CTAs/SM | off us | on us | auto us (pf) | "
      "auto GB/s | auto %% of streaming | on/off | auto/off | lanes | 16-lane auto us |\n"
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (int B : batches) {
    for (int ctx : contexts) {
      DecodeSetup setup(B, ctx, l2, static_cast<uint32_t>(B * 131 + ctx));
      DecodeAttentionArgs args = setup.args();
      auto plan = PlanDecodeAttention(args);
      CHECK_OK(plan.status());
      double us[3];
      for (PrefetchMode pf : {PrefetchMode::kOff, PrefetchMode::kOn, PrefetchMode::kAuto}) {
        args.prefetch = pf;
        us[static_cast<int>(pf)] = setup.TimeUs(timer, args, 30);
      }
      // The other lane layout (16 lanes per token), auto prefetch, for comparison.
      args.prefetch = PrefetchMode::kAuto;
      args.lanes_per_token = 16;
      const double us16 = setup.TimeUs(timer, args, 30);
      const size_t kv_bytes = setup.kv_bytes;
      const double gbps = kv_bytes / (us[2] * 1e-6) / 1e9;
      std::printf(
          "| %d | %d | %.0f | %d | %.2f | %.1f | %.1f | %.1f (%s) | %.0f | %.0f%% | %.2f | "
          "%.2f | %d | %.1f |\n",
          B, ctx, kv_bytes / 1048576.0, plan->num_splits, plan->ctas_per_sm, us[0], us[1], us[2],
          plan->prefetch ? "on" : "off", gbps, 100 * gbps / streaming, us[0] / us[1], us[0] / us[2],
          plan->lanes_per_token, us16);
      std::fflush(stdout);
      json.Add(
          Fmt("{\"kind\":\"decode\",\"batch\":%d,\"context\":%d,\"kv_bytes\":%zu,"
              "\"splits\":%d,\"ctas_per_sm\":%.3f,\"off_us\":%.2f,\"on_us\":%.2f,"
              "\"auto_us\":%.2f,\"auto_prefetch\":%s,\"auto_gbps\":%.1f,"
              "\"pct_stream\":%.1f,\"lanes16_auto_us\":%.2f}",
              B, ctx, kv_bytes, plan->num_splits, plan->ctas_per_sm, us[0], us[1], us[2],
              plan->prefetch ? "true" : "false", gbps, 100 * gbps / streaming, us16));
    }
  }
  // The paper's regime: no split-KV (one CTA per sequence x kv head), prefetch off / on / auto.
  std::printf(
      "\n| batch | context | splits | CTAs/SM | off us | on us | auto us (pf) | on/off | auto/off "
      "|\n|---|---|---|---|---|---|---|---|---|\n");
  for (int B : {1, 8, 32}) {
    for (int ctx : {4096, 32768}) {
      DecodeSetup setup(B, ctx, l2, 7);
      DecodeAttentionArgs args = setup.args();
      args.num_splits = 1;
      auto plan = PlanDecodeAttention(args);
      CHECK_OK(plan.status());
      double us[3];
      for (PrefetchMode pf : {PrefetchMode::kOff, PrefetchMode::kOn, PrefetchMode::kAuto}) {
        args.prefetch = pf;
        us[static_cast<int>(pf)] = setup.TimeUs(timer, args, 20);
      }
      std::printf("| %d | %d | 1 | %.2f | %.1f | %.1f | %.1f (%s) | %.2f | %.2f |\n", B, ctx,
                  plan->ctas_per_sm, us[0], us[1], us[2], plan->prefetch ? "on" : "off",
                  us[0] / us[1], us[0] / us[2]);
      json.Add(
          Fmt("{\"kind\":\"nosplit\",\"batch\":%d,\"context\":%d,\"off_us\":%.2f,"
              "\"on_us\":%.2f,\"auto_us\":%.2f}",
              B, ctx, us[0], us[1], us[2]));
    }
  }
  // Prefetch distance (blocks ahead per warp) at small batch, default plan.
  std::printf(
      "\n| batch | context | splits | off us | on d=1 us | on d=2 us | on d=4 us | on d=8 us | "
      "best on/off |\n|---|---|---|---|---|---|---|---|---|\n");
  for (int B : {1, 8}) {
    for (int ctx : {4096, 32768}) {
      DecodeSetup setup(B, ctx, l2, 11);
      DecodeAttentionArgs args = setup.args();
      auto plan = PlanDecodeAttention(args);
      CHECK_OK(plan.status());
      args.prefetch = PrefetchMode::kOff;
      const double off = setup.TimeUs(timer, args, 30);
      args.prefetch = PrefetchMode::kOn;
      double on[4], best = 1e30;
      const int dist[4] = {1, 2, 4, 8};
      for (int i = 0; i < 4; ++i) {
        args.prefetch_distance = dist[i];
        on[i] = setup.TimeUs(timer, args, 30);
        best = std::min(best, on[i]);
      }
      std::printf("| %d | %d | %d | %.1f | %.1f | %.1f | %.1f | %.1f | %.2f |\n", B, ctx,
                  plan->num_splits, off, on[0], on[1], on[2], on[3], off / best);
      json.Add(
          Fmt("{\"kind\":\"distance\",\"batch\":%d,\"context\":%d,\"off_us\":%.2f,"
              "\"d1_us\":%.2f,\"d2_us\":%.2f,\"d4_us\":%.2f,\"d8_us\":%.2f}",
              B, ctx, off, on[0], on[1], on[2], on[3]));
    }
  }
  // PrefetchL2 (the API for engines that keep their own attention kernel): the next layer's
  // pages prefetched on a side stream while this layer's attention runs.
  std::printf(
      "\n| batch | context | layer KV MiB | two layers us | with PrefetchL2 of layer 2 us | "
      "speedup |\n|---|---|---|---|---|---|\n");
  {
    cudaStream_t side;
    cudaEvent_t start, side_done;
    CHECK_CUDA(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking));
    CHECK_CUDA(cudaEventCreateWithFlags(&start, cudaEventDisableTiming));
    CHECK_CUDA(cudaEventCreateWithFlags(&side_done, cudaEventDisableTiming));
    for (auto [B, ctx] : {std::pair{1, 2048}, std::pair{1, 4096}, std::pair{8, 512},
                          std::pair{8, 1024}, std::pair{32, 512}}) {
      DecodeSetup setup(B, ctx, l2, 13);
      const double base =
          setup.TimeTwoLayersUs(timer, setup.args(), 30, false, side, start, side_done);
      const double pf =
          setup.TimeTwoLayersUs(timer, setup.args(), 30, true, side, start, side_done);
      std::printf("| %d | %d | %.0f | %.1f | %.1f | %.2f |\n", B, ctx, setup.kv_bytes / 1048576.0,
                  base, pf, base / pf);
      json.Add(
          Fmt("{\"kind\":\"prefetch_api\",\"batch\":%d,\"context\":%d,"
              "\"base_us\":%.2f,\"prefetch_us\":%.2f}",
              B, ctx, base, pf));
    }
    cudaStreamDestroy(side);
    cudaEventDestroy(start);
    cudaEventDestroy(side_done);
  }
  if (!json_path.empty()) {
    FILE* f = std::fopen(json_path.c_str(), "w");
    if (f) {
      std::fputs(json.Done().c_str(), f);
      std::fclose(f);
    }
  }
  return 0;
}
