// kernels_bench: kvdn's GPU kernels beside the ceilings measured in the same run (GPU machine).
//   - ceilings: a device-to-device copy and a read-only streaming kernel over buffers >= 4x L2;
//   - InjectLayer / ExtractLayer moving >= 64 MiB, GB/s counting bytes read + written, beside
//     the device-to-device copy;
//   - PagedDecodeAttention (Llama-3-8B shapes: 32 q / 8 kv heads, head_dim 128, bf16, vLLM NHD,
//     block 16, random block tables) for batch x context, cold L2 (KV pools rotated, > 2x L2 in
//     all), prefetch off / on / auto: GPU time per launch from CUDA graph replays (and one
//     eager call, host planning included), GB/s of KV read, % of the streaming kernel.
// Correctness is checked on random data before timing (against the fp64 reference).
//
//   kernels_bench [--json FILE] [--quick] [--sections a,b,...] [--profile-decode BATCH,CONTEXT]
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

#include "absl/strings/str_split.h"
#include "kernels_bench_util.cuh"
#include "kvdn/kernels/decode_attention.h"
#include "kvdn/kernels/paged_kv.h"
#include "reference.h"

using namespace kvdn::bench_kernels;  // NOLINT: one program

int main(int argc, char** argv) {
  std::string json_path;
  bool quick = false;
  // --profile-decode B,CTX: three decode calls (auto) of that shape and nothing else, to run
  // under a profiler (ncu) beside another kernel of the same shape.
  int profile_batch = 0, profile_ctx = 0;
  // --sections a,b,...: only these of the tables after the ceilings (ceiling_sweep, copy, decode,
  // stages, layout, table, skewed, splits, nosplit, distance, prefetch_api); all by default.
  std::string sections;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--json") && i + 1 < argc) json_path = argv[++i];
    if (!std::strcmp(argv[i], "--quick")) quick = true;
    if (!std::strcmp(argv[i], "--sections") && i + 1 < argc)
      sections = "," + std::string(argv[++i]) + ",";
    if (!std::strcmp(argv[i], "--profile-decode") && i + 1 < argc) {
      if (std::sscanf(argv[++i], "%d,%d", &profile_batch, &profile_ctx) != 2 ||
          profile_batch <= 0 || profile_ctx <= 0) {
        std::fprintf(stderr, "--profile-decode takes BATCH,CONTEXT, both positive\n");
        return 2;
      }
    }
  }
  {  // an unknown section name is refused, not silently skipped
    static const char* kSections[] = {"ceiling_sweep", "copy",     "decode",      "stages",
                                      "layout",        "table",    "skewed",      "splits",
                                      "nosplit",       "distance", "prefetch_api"};
    for (absl::string_view name : absl::StrSplit(sections, ',', absl::SkipEmpty())) {
      if (std::none_of(std::begin(kSections), std::end(kSections),
                       [&](const char* k) { return name == k; })) {
        std::fprintf(stderr, "--sections: unknown section \"%.*s\"\n",
                     static_cast<int>(name.size()), name.data());
        return 2;
      }
    }
  }
  auto Want = [&](const char* name) {
    return sections.empty() || sections.find("," + std::string(name) + ",") != std::string::npos;
  };
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  const size_t l2 = prop.l2CacheSize;
  std::printf("# kernels_bench on %s (%d SMs, L2 %zu MiB)\n", prop.name, prop.multiProcessorCount,
              l2 >> 20);
  Json json;
  Timer timer;
  if (profile_batch > 0) {
    DecodeSetup setup(profile_batch, profile_ctx, l2, 1);
    DecodeAttentionArgs args = setup.args();
    void* ws = DecodeSetup::AttachWorkspace(&args);  // split shapes need one
    for (int i = 0; i < 3; ++i) CHECK_OK(PagedDecodeAttention(args, nullptr));
    CHECK_CUDA(cudaDeviceSynchronize());
    CHECK_CUDA(cudaFree(ws));
    std::printf("profiled: decode batch %d context %d, 3 calls\n", profile_batch, profile_ctx);
    return 0;
  }

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
  // The same read by bulk asynchronous copies (TMA, 1-D) of several sizes, CTAs per SM as many
  // as fit: does issuing loads through the copy engine read HBM faster than 16-byte loads?
  {
    const size_t smem = size_t{kBulkStages} * kBulkStageBytes;
    CHECK_CUDA(cudaFuncSetAttribute(StreamReadBulk, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)));
    int per_sm = 0;
    CHECK_CUDA(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, StreamReadBulk, 32, smem));
    std::printf("streaming read by bulk copies (%d stages per CTA, %d CTAs per SM):", kBulkStages,
                per_sm);
    for (const bool interleaved : {true, false}) {
      std::printf("\n  %s:", interleaved ? "interleaved" : "a contiguous range per CTA");
      for (const uint32_t op : {4096u, 8192u, 16384u}) {
        const double ms = timer.MedianMs(20, [&](int) {
          StreamReadBulk<<<prop.multiProcessorCount * per_sm, 32, smem>>>(
              static_cast<const uint8_t*>(a), big / op, op, interleaved);
        });
        CHECK_CUDA(cudaGetLastError());
        const double gbps = big / (ms * 1e-3) / 1e9;
        std::printf(" %u B ops %.0f GB/s;", op, gbps);
        json.Add(
            Fmt("{\"kind\":\"bulk_stream\",\"interleaved\":%s,\"op_bytes\":%u,"
                "\"gbps\":%.1f,\"ctas_per_sm\":%d}",
                interleaved ? "true" : "false", op, gbps, per_sm));
      }
    }
    std::printf("\n");
  }
  // The contiguous-range bulk read again with fewer bytes in flight: CTAs per SM (1-3) x copies in
  // flight per CTA x copy size. Does the DRAM read faster with less queued (fewer streams, fewer
  // open rows) than with as much in flight as fits?
  if (Want("ceiling_sweep")) {
    const size_t smem = size_t{kBulkStages} * kBulkStageBytes;
    std::printf(
        "\n| bulk copy, contiguous per CTA: CTAs per SM | copies in flight per CTA | copy KiB | "
        "KiB "
        "in flight per SM | GB/s |\n|---|---|---|---|---|\n");
    for (int per_sm = 1; per_sm <= 3; ++per_sm) {
      for (int stages : {1, 2, 4}) {
        for (uint32_t op : {8192u, 16384u}) {
          const double ms = timer.MedianMs(20, [&](int) {
            StreamReadBulk<<<prop.multiProcessorCount * per_sm, 32, smem>>>(
                static_cast<const uint8_t*>(a), big / op, op, false, stages);
          });
          CHECK_CUDA(cudaGetLastError());
          const double gbps = big / (ms * 1e-3) / 1e9;
          std::printf("| %d | %d | %u | %u | %.0f |\n", per_sm, stages, op >> 10,
                      per_sm * stages * (op >> 10), gbps);
          json.Add(
              Fmt("{\"kind\":\"bulk_sweep\",\"ctas_per_sm\":%d,\"stages\":%d,\"op_bytes\":%u,"
                  "\"gbps\":%.1f}",
                  per_sm, stages, op, gbps));
        }
      }
    }
  }
  json.Add(Fmt("{\"kind\":\"ceiling\",\"d2d_gbps\":%.1f,\"stream_gbps\":%.1f,\"gpu\":\"%s\"}", d2d,
               streaming, prop.name));
  CHECK_CUDA(cudaFree(b));

  // Kernel times are GPU time per launch from CUDA graph replays (what an engine that captures
  // its decode step sees; BENCHMARKING.md); "eager" is one call timed alone, host planning and
  // launch included.
  cudaStream_t gs;
  CHECK_CUDA(cudaStreamCreateWithFlags(&gs, cudaStreamNonBlocking));

  if (Want("copy")) {
    // ---- Inject / extract ----
    std::printf(
        "\nkernel: what kAuto ran (PlannedCopyPath: 'bulk rows', TMA bulk copies of token rows "
        "where a token's heads are contiguous; 'tensor map', TMA tensor copies transposing HND "
        "pages), or 'vector' (kVector: 16-byte loads and stores)\n");
    std::printf(
        "\n| op | kernel | layout | block | tokens | MiB moved | ms | GB/s (r+w) | %% of d2d copy "
        "| "
        "same-size "
        "d2d GB/s | %% of same-size d2d | "
        "eager ms |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    {
      const int heads = 8, dim = 128, tokens = 32768;
      for (PagedKvLayout layout :
           {PagedKvLayout::kNhd, PagedKvLayout::kNhdCombined, PagedKvLayout::kHnd}) {
        for (int bs : {16, 1, 64}) {
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
          for (int run = 0; run < 4; ++run) {
            const int inject = run < 2 ? 1 : 0;
            const CopyKernel kern = run % 2 == 0 ? CopyKernel::kAuto : CopyKernel::kVector;
            SetCopyKernel(kern);
            PagedKvLayer c0 = c;
            c0.k = k[0];
            c0.v = v[0];
            const char* kern_name = CopyPathName(PlannedCopyPath(c0));
            auto copy = [&](int i, cudaStream_t stream) {
              PagedKvLayer ci = c;
              ci.k = k[i % sets];
              ci.v = v[i % sets];
              TokenRange r{dtable, nblk, 0, tokens};
              if (inject) {
                CHECK_OK(InjectLayer(chunk[i % sets], ci, r, stream));
              } else {
                CHECK_OK(ExtractLayer(ci, r, chunk[i % sets], stream));
              }
            };
            const double ms = GraphMs(timer, gs, 4 * sets, 20, copy);
            // The ceiling at this size: a device-to-device copy of the same bytes, same buffers.
            const double same_ms = GraphMs(timer, gs, 4 * sets, 20, [&](int i, cudaStream_t st) {
              char* src = static_cast<char*>(chunk[i % sets]);
              if (v[i % sets] == nullptr) {  // combined: one tensor of `layer` bytes
                CHECK_CUDA(cudaMemcpyAsync(k[i % sets], src, layer, cudaMemcpyDeviceToDevice, st));
              } else {  // K and V tensors of half the layer each
                CHECK_CUDA(
                    cudaMemcpyAsync(k[i % sets], src, layer / 2, cudaMemcpyDeviceToDevice, st));
                CHECK_CUDA(cudaMemcpyAsync(v[i % sets], src + layer / 2, layer / 2,
                                           cudaMemcpyDeviceToDevice, st));
              }
            });
            const double same_gbps = 2.0 * layer / (same_ms * 1e-3) / 1e9;
            const double eager_ms = timer.MedianMs(20, [&](int i) { copy(i, nullptr); });
            const double gbps = 2.0 * layer / (ms * 1e-3) / 1e9;
            std::printf(
                "| %s | %s | %s | %d | %d | %.0f | %.3f | %.0f | %.0f%% | %.0f | %.0f%% | %.3f |\n",
                inject ? "inject" : "extract", kern_name, LayoutName(layout), bs, tokens,
                layer / 1048576.0, ms, gbps, 100 * gbps / d2d, same_gbps, 100 * gbps / same_gbps,
                eager_ms);
            json.Add(
                Fmt("{\"kind\":\"copy\",\"op\":\"%s\",\"kernel\":\"%s\",\"layout\":\"%s\","
                    "\"block\":%d,"
                    "\"bytes\":%zu,\"ms\":%.4f,\"gbps\":%.1f,\"pct_d2d\":%.1f,"
                    "\"same_size_d2d_gbps\":%.1f,\"eager_ms\":%.4f}",
                    inject ? "inject" : "extract", kern_name, LayoutName(layout), bs, layer, ms,
                    gbps, 100 * gbps / d2d, same_gbps, eager_ms));
          }
          SetCopyKernel(CopyKernel::kAuto);
          for (int s = 0; s < sets; ++s) {
            cudaFree(chunk[s]);
            cudaFree(k[s]);
            if (v[s]) cudaFree(v[s]);
          }
          cudaFree(dtable);
        }
      }
    }
  }  // section copy

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
    for (int c = 0; c < 6; ++c) {
      const PrefetchMode pf = static_cast<PrefetchMode>(c % 3);
      const DecodeKernel kernel = c < 3 ? DecodeKernel::kTensorCore : DecodeKernel::kCudaCore;
      DecodeAttentionArgs args;
      args.kernel = kernel;
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
      std::printf("check: decode %s prefetch=%s relative error %.2e %s\n", DecodeKernelName(kernel),
                  PrefetchModeName(pf), rel, rel < 1e-2 ? "ok" : "FAILED");
      if (!(rel < 1e-2)) return 1;
    }
    for (void* p : {dq, dk, dv, dout, ws}) cudaFree(p);
    cudaFree(dt);
    cudaFree(dc);
  }

  if (Want("decode")) {
    std::printf(
        "\n| batch | context | KV MiB | splits | CTAs/SM | off us | on us | auto us (pf) | "
        "auto GB/s | auto %% of streaming | on/off | auto/off | auto eager us | cuda-core auto us "
        "| tensor/cuda core |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (int B : batches) {
      for (int ctx : contexts) {
        DecodeSetup setup(B, ctx, l2, static_cast<uint32_t>(B * 131 + ctx));
        DecodeAttentionArgs args = setup.args();
        auto plan = PlanDecodeAttention(args);
        CHECK_OK(plan.status());
        double us[3];
        for (PrefetchMode pf : {PrefetchMode::kOff, PrefetchMode::kOn, PrefetchMode::kAuto}) {
          args.prefetch = pf;
          us[static_cast<int>(pf)] = setup.TimeGraphUs(timer, args, 20, gs);
        }
        const double eager = setup.TimeUs(timer, args, 30);
        DecodeAttentionArgs cc = args;  // the CUDA-core kernel, its own auto plan
        cc.kernel = DecodeKernel::kCudaCore;
        const double cc_us = setup.TimeGraphUs(timer, cc, 20, gs);
        const size_t kv_bytes = setup.kv_bytes;
        const double gbps = kv_bytes / (us[2] * 1e-6) / 1e9;
        std::printf(
            "| %d | %d | %.0f | %d | %.2f | %.1f | %.1f | %.1f (%s) | %.0f | %.0f%% | %.2f | "
            "%.2f | %.1f | %.1f | %.2f |\n",
            B, ctx, kv_bytes / 1048576.0, plan->num_splits, plan->ctas_per_sm, us[0], us[1], us[2],
            plan->prefetch ? "on" : "off", gbps, 100 * gbps / streaming, us[0] / us[1],
            us[0] / us[2], eager, cc_us, cc_us / us[2]);
        std::fflush(stdout);
        json.Add(
            Fmt("{\"kind\":\"decode\",\"batch\":%d,\"context\":%d,\"kv_bytes\":%zu,"
                "\"splits\":%d,\"ctas_per_sm\":%.3f,\"off_us\":%.2f,\"on_us\":%.2f,"
                "\"auto_us\":%.2f,\"auto_prefetch\":%s,\"auto_gbps\":%.1f,"
                "\"pct_stream\":%.1f,\"auto_eager_us\":%.2f,\"cuda_core_auto_us\":%.2f}",
                B, ctx, kv_bytes, plan->num_splits, plan->ctas_per_sm, us[0], us[1], us[2],
                plan->prefetch ? "true" : "false", gbps, 100 * gbps / streaming, eager, cc_us));
      }
    }
  }  // section decode
  if (Want("stages")) {
    // Tensor-core kernel: shared-memory stages per warp (2: 64 KiB per CTA, three CTAs per SM;
    // 3: 96 KiB, two; 4: 128 KiB, one), each with its own plan.
    std::printf(
        "\n| batch | context | 2 stages us | 3 stages us | 4 stages us | CTAs/SM (2/3/4) |\n"
        "|---|---|---|---|---|---|\n");
    for (auto [B, ctx] :
         {std::pair{1, 4096}, std::pair{1, 32768}, std::pair{8, 4096}, std::pair{8, 32768},
          std::pair{32, 32768}, std::pair{64, 1024}, std::pair{128, 4096}}) {
      DecodeSetup setup(B, ctx, l2, 23);
      double us[3];
      double per_sm[3];
      for (int st = 2; st <= 4; ++st) {
        DecodeAttentionArgs args = setup.args();
        args.tc_stages = st;
        auto plan = PlanDecodeAttention(args);
        CHECK_OK(plan.status());
        per_sm[st - 2] = plan->ctas_per_sm;
        us[st - 2] = setup.TimeGraphUs(timer, args, 20, gs);
      }
      std::printf("| %d | %d | %.1f | %.1f | %.1f | %.2f / %.2f / %.2f |\n", B, ctx, us[0], us[1],
                  us[2], per_sm[0], per_sm[1], per_sm[2]);
      json.Add(
          Fmt("{\"kind\":\"stages\",\"batch\":%d,\"context\":%d,\"s2_us\":%.2f,"
              "\"s3_us\":%.2f,\"s4_us\":%.2f}",
              B, ctx, us[0], us[1], us[2]));
    }
  }  // section stages

  if (Want("layout")) {
    // Cache layouts, tensor-core kernel: vLLM NHD (a head's rows kv_heads x 256 bytes apart) and
    // FlashInfer/SGLang HND (a head's rows of a block adjacent); the same buffers read either way.
    std::printf(
        "\n| batch | context | NHD us | HND us | NHD/HND |\n"
        "|---|---|---|---|---|\n");
    for (auto [B, ctx] :
         {std::pair{1, 32768}, std::pair{8, 4096}, std::pair{8, 32768}, std::pair{32, 16384},
          std::pair{64, 32768}, std::pair{128, 1024}, std::pair{128, 4096}}) {
      DecodeSetup setup(B, ctx, l2, 31);
      DecodeAttentionArgs args = setup.args();
      const double nhd = setup.TimeGraphUs(timer, args, 20, gs);
      args.layout = PagedKvLayout::kHnd;
      const double hnd = setup.TimeGraphUs(timer, args, 20, gs);
      std::printf("| %d | %d | %.1f | %.1f | %.2f |\n", B, ctx, nhd, hnd, nhd / hnd);
      std::fflush(stdout);
      json.Add(
          Fmt("{\"kind\":\"layout\",\"batch\":%d,\"context\":%d,\"nhd_us\":%.2f,"
              "\"hnd_us\":%.2f}",
              B, ctx, nhd, hnd));
    }
  }  // section layout

  if (Want("table")) {
    // Where the KV blocks lie, tensor-core kernel, prefetch off: random block tables (the rest of
    // this benchmark) against each sequence's blocks adjacent and in order (what the contiguous KV
    // of torch SDPA reads), at block sizes 16 and 64. A gap between the two is the cost of paging
    // itself (DRAM pages and address translation), not of the kernel's arithmetic.
    std::printf(
        "\n| batch | context | block | random table us | sorted table us | random/sorted |\n"
        "|---|---|---|---|---|---|\n");
    for (auto [B, ctx] : {std::pair{1, 32768}, std::pair{8, 32768}, std::pair{32, 16384},
                          std::pair{64, 32768}, std::pair{128, 4096}}) {
      for (int bs : {16, 64}) {
        double us[2];
        for (int sorted = 0; sorted < 2; ++sorted) {
          DecodeSetup setup(B, ctx, l2, 37, bs, sorted == 1);
          DecodeAttentionArgs args = setup.args();
          args.prefetch = PrefetchMode::kOff;
          us[sorted] = setup.TimeGraphUs(timer, args, 20, gs);
        }
        std::printf("| %d | %d | %d | %.1f | %.1f | %.3f |\n", B, ctx, bs, us[0], us[1],
                    us[0] / us[1]);
        std::fflush(stdout);
        json.Add(
            Fmt("{\"kind\":\"table_order\",\"batch\":%d,\"context\":%d,\"block\":%d,"
                "\"random_us\":%.2f,\"sorted_us\":%.2f}",
                B, ctx, bs, us[0], us[1]));
      }
    }
  }  // section table

  if (Want("skewed")) {
    // Batches of mostly short sequences with a few long ones (what a serving engine's decode
    // batch looks like), tensor-core kernel: planned without the sum of the lengths (splits by
    // batch x the longest: the long sequences' CTAs read alone at the end) and with it (packed
    // splits), and with it at half and twice the planned splits. % of streaming: the bytes the
    // call reads (its tokens' K and V) at the streaming read measured above. A uniform batch
    // last: the sum must change nothing there.
    struct Skewed {
      const char* name;
      std::vector<int> ctxs;
    };
    std::vector<Skewed> shapes;
    auto mix = [](int n_long, int long_ctx, int n_short, int short_ctx) {
      std::vector<int> v(n_short, short_ctx);
      v.insert(v.begin() + n_short / 2, n_long, long_ctx);  // the long ones mid-batch
      return v;
    };
    shapes.push_back({"8: 1 x 32K + 7 x 2K", mix(1, 32768, 7, 2048)});
    shapes.push_back({"32: 1 x 32K + 31 x 1K", mix(1, 32768, 31, 1024)});
    shapes.push_back({"64: 4 x 16K + 60 x 512", mix(4, 16384, 60, 512)});
    shapes.push_back({"256: 2 x 64K + 254 x 1K", mix(2, 65536, 254, 1024)});
    {
      std::mt19937 rng(17);  // log-uniform in [256, 32K]
      std::uniform_real_distribution<double> u(std::log(256.0), std::log(32768.0));
      std::vector<int> v(128);
      for (int& x : v) x = static_cast<int>(std::exp(u(rng)));
      shapes.push_back({"128: log-uniform 256..32K", v});
    }
    shapes.push_back({"32: uniform 4K", std::vector<int>(32, 4096)});
    std::printf(
        "\n| batch: lengths | KV MiB read | no sum: splits | no sum us | sum: splits (items) | "
        "sum us | no sum / sum | sum %% of streaming | sum, half the splits us | sum, twice the "
        "splits us |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for (const Skewed& shape : shapes) {
      DecodeSetup setup(shape.ctxs, l2, 41);
      DecodeAttentionArgs args = setup.args();
      args.prefetch = PrefetchMode::kOff;
      auto plain = PlanDecodeAttention(args);
      CHECK_OK(plain.status());
      const double plain_us = setup.TimeGraphUs(timer, args, 20, gs);
      args.sum_context_lens = setup.sum_context_lens;
      auto plan = PlanDecodeAttention(args);
      CHECK_OK(plan.status());
      const double sum_us = setup.TimeGraphUs(timer, args, 20, gs);
      double var_us[2];
      for (int v = 0; v < 2; ++v) {
        args.num_splits = v == 0 ? std::max(1, plan->num_splits / 2) : plan->num_splits * 2;
        var_us[v] = setup.TimeGraphUs(timer, args, 20, gs);
      }
      const double read_mib = setup.read_bytes / 1048576.0;
      const double pct = 100.0 * (setup.read_bytes / (sum_us * 1e-6) / 1e9) / streaming;
      std::printf("| %s | %.0f | %d | %.1f | %d (%lld) | %.1f | %.2f | %.0f%% | %.1f | %.1f |\n",
                  shape.name, read_mib, plain->num_splits, plain_us, plan->num_splits,
                  static_cast<long long>(plan->work_items), sum_us, plain_us / sum_us, pct,
                  var_us[0], var_us[1]);
      std::fflush(stdout);
      json.Add(
          Fmt("{\"kind\":\"skewed\",\"shape\":\"%s\",\"read_mib\":%.1f,\"plain_splits\":%d,"
              "\"plain_us\":%.2f,\"sum_splits\":%d,\"work_items\":%lld,\"sum_us\":%.2f,"
              "\"half_us\":%.2f,\"twice_us\":%.2f}",
              shape.name, read_mib, plain->num_splits, plain_us, plan->num_splits,
              static_cast<long long>(plan->work_items), sum_us, var_us[0], var_us[1]));
    }
  }  // section skewed

  if (Want("splits")) {
    // Splits per sequence around the plan's (as many as one wave of CTAs holds): fewer (longer
    // work per CTA, less to combine, a part of a wave idle) and more (finer work, more combine
    // work), tensor-core kernel.
    std::printf(
        "\n| batch | context | plan splits | x1/4 us | x1/2 us | x1 us | x2 us | x4 us | x8 us |\n"
        "|---|---|---|---|---|---|---|---|---|\n");
    for (auto [B, ctx] :
         {std::pair{1, 16384}, std::pair{1, 32768}, std::pair{8, 4096}, std::pair{8, 32768},
          std::pair{32, 16384}, std::pair{32, 32768}, std::pair{64, 16384}, std::pair{64, 32768},
          std::pair{128, 4096}, std::pair{128, 32768}}) {
      DecodeSetup setup(B, ctx, l2, 29);
      DecodeAttentionArgs args = setup.args();
      auto plan = PlanDecodeAttention(args);
      CHECK_OK(plan.status());
      double us[6];
      for (int f = -2; f < 4; ++f) {
        args.num_splits = f < 0 ? std::max(1, plan->num_splits >> -f) : plan->num_splits << f;
        us[f + 2] = setup.TimeGraphUs(timer, args, 20, gs);
      }
      std::printf("| %d | %d | %d | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f |\n", B, ctx,
                  plan->num_splits, us[0], us[1], us[2], us[3], us[4], us[5]);
      std::fflush(stdout);
      json.Add(
          Fmt("{\"kind\":\"splits\",\"batch\":%d,\"context\":%d,\"plan_splits\":%d,"
              "\"x0.25_us\":%.2f,\"x0.5_us\":%.2f,\"x1_us\":%.2f,\"x2_us\":%.2f,"
              "\"x4_us\":%.2f,\"x8_us\":%.2f}",
              B, ctx, plan->num_splits, us[0], us[1], us[2], us[3], us[4], us[5]));
    }
  }  // section splits

  if (Want("nosplit")) {
    // The paper's regime: no split-KV (one CTA per sequence x kv head), prefetch off / on / auto.
    std::printf(
        "\n| batch | context | splits | CTAs/SM | off us | on us | auto us (pf) | on/off | "
        "auto/off "
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
          us[static_cast<int>(pf)] = setup.TimeGraphUs(timer, args, 20, gs);
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
  }  // section nosplit
  if (Want("distance")) {
    // Prefetch distance (blocks ahead per warp) at small batch: the CUDA-core kernel's knob.
    std::printf(
        "\n| batch | context | splits | off us | on d=1 us | on d=2 us | on d=4 us | on d=8 us | "
        "best on/off |\n|---|---|---|---|---|---|---|---|---|\n");
    for (int B : {1, 8}) {
      for (int ctx : {4096, 32768}) {
        DecodeSetup setup(B, ctx, l2, 11);
        DecodeAttentionArgs args = setup.args();
        args.kernel = DecodeKernel::kCudaCore;
        auto plan = PlanDecodeAttention(args);
        CHECK_OK(plan.status());
        args.prefetch = PrefetchMode::kOff;
        const double off = setup.TimeGraphUs(timer, args, 20, gs);
        args.prefetch = PrefetchMode::kOn;
        double on[4], best = 1e30;
        const int dist[4] = {1, 2, 4, 8};
        for (int i = 0; i < 4; ++i) {
          args.prefetch_distance = dist[i];
          on[i] = setup.TimeGraphUs(timer, args, 20, gs);
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
  }  // section distance
  if (Want("prefetch_api")) {
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
      // The engine's case: a compute-bound MLP (here a filler as long as the attention) between
      // layers leaves DRAM idle, which the prefetch can use.
      std::printf(
          "\n| batch | context | layer KV MiB | filler us | filler + layer us | with "
          "PrefetchL2Batch "
          "us | speedup |\n|---|---|---|---|---|---|---|\n");
      float* sink;
      CHECK_CUDA(cudaMalloc(&sink, 4096));
      const int filler_ctas = prop.multiProcessorCount * 4;
      for (auto [B, ctx] : {std::pair{1, 2048}, std::pair{1, 4096}, std::pair{8, 512},
                            std::pair{8, 1024}, std::pair{32, 512}}) {
        DecodeSetup setup(B, ctx, l2, 17);
        DecodeAttentionArgs off = setup.args();
        off.prefetch = PrefetchMode::kOff;
        const double layer_us = setup.TimeUs(timer, off, 20);
        const double probe_us = 1e3 * timer.MedianMs(10, [&](int) {
          ComputeFiller<<<filler_ctas, 256>>>(10000, sink);
        });
        const int iters = std::max(1, static_cast<int>(10000 * layer_us / probe_us));
        const double filler_us = 1e3 * timer.MedianMs(10, [&](int) {
          ComputeFiller<<<filler_ctas, 256>>>(iters, sink);
        });
        const double base = setup.TimeFillerThenLayerUs(timer, setup.args(), 30, false, iters,
                                                        filler_ctas, sink, side, start, side_done);
        const double pf = setup.TimeFillerThenLayerUs(timer, setup.args(), 30, true, iters,
                                                      filler_ctas, sink, side, start, side_done);
        std::printf("| %d | %d | %.0f | %.1f | %.1f | %.1f | %.2f |\n", B, ctx,
                    setup.kv_bytes / 1048576.0, filler_us, base, pf, base / pf);
        json.Add(
            Fmt("{\"kind\":\"prefetch_api_mlp\",\"batch\":%d,\"context\":%d,"
                "\"filler_us\":%.2f,\"base_us\":%.2f,\"prefetch_us\":%.2f}",
                B, ctx, filler_us, base, pf));
      }
      cudaFree(sink);
      cudaStreamDestroy(side);
      cudaEventDestroy(start);
      cudaEventDestroy(side_done);
    }
  }  // section prefetch_api
  CHECK_CUDA(cudaStreamDestroy(gs));
  if (!json_path.empty()) {
    FILE* f = std::fopen(json_path.c_str(), "w");
    if (f) {
      std::fputs(json.Done().c_str(), f);
      std::fclose(f);
    }
  }
  return 0;
}
