// Validation, planning and dispatch for PagedDecodeAttention (STYLE.md 12, layer 2).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "kvdn/kernels/decode_attention.h"
#include "src/cuda_status.h"
#include "src/decode_attention.cuh"
#include "src/decode_attention_tc.cuh"

namespace kvdn::kernels {
namespace {

using detail::kHeadDim;

// Smallest split worth a CTA (tokens): below it the CTA's fixed costs (q load, merge, combine)
// outweigh its reads.
constexpr int kMinSplitTokens = 256;
// Tensor-core kernel: splits at least this long keep two CTAs per SM (see PlanDecodeAttention).
constexpr int64_t kTcLongSplitTokens = 8192;

// Lanes per token for groups <= 4 when the caller leaves it to us.
constexpr int kDefaultLanes = 8;

// Prefetch policy (kAuto), from the lent H100 (bench/results/kernels-2026-11-23.md). With 16
// lanes per token (four CTAs per SM) the in-loop prefetch gained 10-14% where each CTA walks a
// long run of blocks with few CTAs per SM, was within +-5% with split-KV's short runs, and lost
// up to 17% with many CTAs over large KV: on only with few CTAs per SM and long runs per warp.
constexpr double kPrefetchMaxCtasPerSm = 2.0;
constexpr int64_t kPrefetchMinBlocksPerWarp = 16;

// Runtime -> compile-time dispatch: dtype x group x lanes per token x prefetch.
template <typename F>
cudaError_t Dispatch(Dtype dtype, int group, int lanes, bool prefetch, F&& f) {
  auto with = [&]<typename T, int G, int L>() -> cudaError_t {
    return prefetch ? f.template operator()<T, G, L, true>()
                    : f.template operator()<T, G, L, false>();
  };
  auto by_group = [&]<typename T>() -> cudaError_t {
    switch (group) {
      case 1:
        return lanes == 8 ? with.template operator()<T, 1, 8>()
                          : with.template operator()<T, 1, 16>();
      case 2:
        return lanes == 8 ? with.template operator()<T, 2, 8>()
                          : with.template operator()<T, 2, 16>();
      case 4:
        return lanes == 8 ? with.template operator()<T, 4, 8>()
                          : with.template operator()<T, 4, 16>();
      case 8:
        return with.template operator()<T, 8, 16>();
    }
    return cudaErrorInvalidValue;
  };
  return dtype == Dtype::kBFloat16 ? by_group.template operator()<__nv_bfloat16>()
                                   : by_group.template operator()<__half>();
}

// Runtime -> compile-time dispatch of the tensor-core kernel: dtype x group x aligned x prefetch
// x stages (2, 3, 4).
template <typename F>
cudaError_t DispatchTc(Dtype dtype, int group, bool aligned, bool prefetch, int stages, F&& f) {
  auto by_stages = [&]<typename T, int G, bool A, bool P>() -> cudaError_t {
    switch (stages) {
      case 2:
        return f.template operator()<T, G, A, P, 2>();
      case 4:
        return f.template operator()<T, G, A, P, 4>();
      default:
        return f.template operator()<T, G, A, P, 3>();
    }
  };
  auto with = [&]<typename T, int G>() -> cudaError_t {
    if (!aligned) return by_stages.template operator()<T, G, false, false>();
    return prefetch ? by_stages.template operator()<T, G, true, true>()
                    : by_stages.template operator()<T, G, true, false>();
  };
  auto by_group = [&]<typename T>() -> cudaError_t {
    switch (group) {
      case 1:
        return with.template operator()<T, 1>();
      case 2:
        return with.template operator()<T, 2>();
      case 4:
        return with.template operator()<T, 4>();
      case 8:
        return with.template operator()<T, 8>();
    }
    return cudaErrorInvalidValue;
  };
  return dtype == Dtype::kBFloat16 ? by_group.template operator()<__nv_bfloat16>()
                                   : by_group.template operator()<__half>();
}

// Lanes per token: 16 for groups of 8 (registers, shared memory), else `requested` or 8.
int LanesFor(int group, int requested) {
  if (group >= 8) return 16;
  return requested == 16 ? 16 : kDefaultLanes;
}

// Multiprocessors and resident CTAs per multiprocessor of one kernel variant on the current
// device. NOTE: both are cached per (device, variant): the occupancy query costs microseconds of
// host time, and an engine plans every layer of every decode step.
struct Occupancy {
  int sms = 0;
  int ctas_per_sm = 0;
};

constexpr int kCachedDevices = 16;
// dtype x group (1, 2, 4, 8) x kernel (CUDA core with 8 or 16 lanes per token, tensor core
// with 2, 3 or 4 stages)
constexpr int kVariants = 2 * 4 * 5;
std::atomic<int> g_sms[kCachedDevices];
std::atomic<int> g_ctas_per_sm[kCachedDevices][kVariants];

int VariantIndex(Dtype dtype, int group, DecodeKernel kernel, int lanes, int stages) {
  const int g = group == 1 ? 0 : group == 2 ? 1 : group == 4 ? 2 : 3;
  const int k = kernel == DecodeKernel::kTensorCore ? stages : lanes == 8 ? 0 : 1;
  return (dtype == Dtype::kBFloat16 ? 0 : 20) + g * 5 + k;
}

// `kernel` is kTensorCore (with `stages`) or kCudaCore (with `lanes`).
absl::StatusOr<Occupancy> CurrentOccupancy(Dtype dtype, int group, DecodeKernel kernel, int lanes,
                                           int stages) {
  int dev = 0;
  if (cudaError_t e = cudaGetDevice(&dev); e != cudaSuccess) return CudaStatus(e, "cudaGetDevice");
  const bool cached = dev >= 0 && dev < kCachedDevices;
  const int v = VariantIndex(dtype, group, kernel, lanes, stages);
  Occupancy o;
  if (cached) {
    o.sms = g_sms[dev].load(std::memory_order_relaxed);
    o.ctas_per_sm = g_ctas_per_sm[dev][v].load(std::memory_order_relaxed);
    if (o.sms > 0 && o.ctas_per_sm > 0) return o;
  }
  if (cudaError_t e = cudaDeviceGetAttribute(&o.sms, cudaDevAttrMultiProcessorCount, dev);
      e != cudaSuccess) {
    return CudaStatus(e, "cudaDeviceGetAttribute");
  }
  cudaError_t e =
      kernel == DecodeKernel::kTensorCore
          ? DispatchTc(dtype, group, true, false, stages,
                       [&]<typename T, int G, bool A, bool P, int S>() {
                         return detail::DecodeTcOccupancy<T, G, S>(&o.ctas_per_sm);
                       })
          : Dispatch(dtype, group, lanes, false, [&]<typename T, int G, int L, bool P>() {
              return detail::DecodeOccupancy<T, G, L, P>(&o.ctas_per_sm);
            });
  if (e != cudaSuccess) return CudaStatus(e, "occupancy query");
  o.ctas_per_sm = std::max(o.ctas_per_sm, 1);
  if (cached) {
    g_sms[dev].store(o.sms, std::memory_order_relaxed);
    g_ctas_per_sm[dev][v].store(o.ctas_per_sm, std::memory_order_relaxed);
  }
  return o;
}

absl::Status Validate(const DecodeAttentionArgs& a) {
  auto bad = [](auto... parts) { return absl::InvalidArgumentError(absl::StrCat(parts...)); };
  if (!a.q || !a.k_cache || !a.block_tables || !a.context_lens || !a.out) {
    return bad("q, k_cache, block_tables, context_lens and out must be non-null");
  }
  if (a.layout != PagedKvLayout::kNhd && a.layout != PagedKvLayout::kNhdCombined &&
      a.layout != PagedKvLayout::kHnd) {
    return bad("layout ", static_cast<int>(a.layout), " is not a PagedKvLayout");
  }
  if ((a.layout == PagedKvLayout::kNhdCombined) != (a.v_cache == nullptr)) {
    return bad(a.v_cache == nullptr ? "v_cache must be non-null for layout "
                                    : "v_cache must be null for layout ",
               LayoutName(a.layout));
  }
  if (a.kernel == DecodeKernel::kCudaCore && a.layout != PagedKvLayout::kNhd) {
    return bad("the cuda-core kernel reads layout NHD only, not ", LayoutName(a.layout));
  }
  if (a.batch < 1) return bad("batch ", a.batch, " < 1");
  if (a.num_kv_heads < 1 || a.num_q_heads < 1 || a.num_q_heads % a.num_kv_heads != 0) {
    return bad("num_q_heads ", a.num_q_heads, " must be a positive multiple of num_kv_heads ",
               a.num_kv_heads);
  }
  const int group = a.num_q_heads / a.num_kv_heads;
  if (group != 1 && group != 2 && group != 4 && group != 8) {
    return bad("q heads per kv head is ", group, "; supported: 1, 2, 4, 8");
  }
  if (a.head_dim != kHeadDim) return bad("head_dim ", a.head_dim, " unsupported (128 only)");
  if (a.dtype != Dtype::kBFloat16 && a.dtype != Dtype::kFloat16) {
    return bad("dtype must be bf16 or fp16");
  }
  if (a.block_size < 1 || a.num_blocks < 1 || a.max_blocks_per_seq < 1) {
    return bad("block_size, num_blocks and max_blocks_per_seq must be >= 1");
  }
  if (a.max_context_len < 0 ||
      int64_t{a.max_context_len} > int64_t{a.max_blocks_per_seq} * a.block_size) {
    return bad("max_context_len ", a.max_context_len,
               " outside [0, max_blocks_per_seq x block_size = ",
               int64_t{a.max_blocks_per_seq} * a.block_size, "]");
  }
  if (a.lanes_per_token != 0 && a.lanes_per_token != 8 && a.lanes_per_token != 16) {
    return bad("lanes_per_token ", a.lanes_per_token, " must be 0, 8 or 16");
  }
  if (a.tc_stages != 0 && (a.tc_stages < 2 || a.tc_stages > 4)) {
    return bad("tc_stages ", a.tc_stages, " must be 0, 2, 3 or 4");
  }
  if (a.prefetch_distance < 0 || a.prefetch_distance > 64) {
    return bad("prefetch_distance ", a.prefetch_distance, " outside [0, 64]");
  }
  if (a.sum_context_lens < 0 ||
      a.sum_context_lens > int64_t{a.batch} * std::max(a.max_context_len, 0)) {
    return bad("sum_context_lens ", a.sum_context_lens, " outside [0, batch x max_context_len = ",
               int64_t{a.batch} * std::max(a.max_context_len, 0), "]");
  }
  if (a.num_splits < 0 || a.num_splits > 65535) {
    return bad("num_splits ", a.num_splits, " outside [0, 65535]");
  }
  if (!std::isfinite(a.scale) || a.scale < 0) return bad("scale must be finite and >= 0");
  for (const void* ptr : {a.q, a.k_cache, a.v_cache, static_cast<const void*>(a.out)}) {
    if (ptr == nullptr) continue;  // v_cache of the combined layout
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) {
      return bad("q, k_cache, v_cache and out must be 16-byte aligned");
    }
  }
  return absl::OkStatus();
}

}  // namespace

const char* DecodeKernelName(DecodeKernel kernel) {
  switch (kernel) {
    case DecodeKernel::kAuto:
      return "auto";
    case DecodeKernel::kTensorCore:
      return "tensor-core";
    case DecodeKernel::kCudaCore:
      return "cuda-core";
  }
  return "?";
}

const char* PrefetchModeName(PrefetchMode mode) {
  switch (mode) {
    case PrefetchMode::kOff:
      return "off";
    case PrefetchMode::kOn:
      return "on";
    case PrefetchMode::kAuto:
      return "auto";
  }
  return "?";
}

absl::StatusOr<DecodePlan> PlanDecodeAttention(const DecodeAttentionArgs& a) {
  if (absl::Status st = Validate(a); !st.ok()) return st;
  const int group = a.num_q_heads / a.num_kv_heads;
  const int lanes = LanesFor(group, a.lanes_per_token);
  const DecodeKernel kernel =
      a.kernel == DecodeKernel::kCudaCore ? DecodeKernel::kCudaCore : DecodeKernel::kTensorCore;
  const int stages = a.tc_stages == 0 ? detail::kTcDefaultStages : a.tc_stages;
  absl::StatusOr<Occupancy> dev = CurrentOccupancy(a.dtype, group, kernel, lanes, stages);
  if (!dev.ok()) return dev.status();
  const int per_sm = dev->ctas_per_sm;
  const int ctx = std::max(a.max_context_len, 1);
  // The work in CTAs of a whole context each (batch x kv heads when every sequence is as long as
  // the longest). With the sum of the lengths, a batch of mostly short sequences counts for less,
  // so its longest sequences get more splits; the tensor-core kernel then packs the splits
  // (below). The cuda-core kernel, kept as a baseline, splits uniformly whatever the lengths.
  // A batch whose lengths add up to more than 3/4 of batch x the longest is planned as uniform
  // (its CTAs' work differs by less than the rounding of the split count).
  const bool skewed = kernel == DecodeKernel::kTensorCore && a.sum_context_lens > 0 &&
                      a.sum_context_lens * 4 < int64_t{a.batch} * ctx * 3;
  const double base =
      (skewed ? static_cast<double>(a.sum_context_lens) / ctx : a.batch) * a.num_kv_heads;
  DecodePlan plan;
  int64_t splits = a.num_splits;
  if (splits == 0) {
    // As many CTAs as one wave holds (never a second, partial wave: 1.2 waves measured slower
    // than 1), without splits shorter than kMinSplitTokens. The tensor-core kernel's wave is one
    // CTA per SM although two fit, unless that leaves splits of kTcLongSplitTokens or more: its
    // 4 warps keep 64 KiB in flight per SM, which reads HBM about as fast as more does, and half
    // the splits is less to combine and longer runs per CTA (batch 1 x 32K 38.2 -> 37.0 us,
    // 8 x 1K 14.0 -> 13.1); with splits that long the combine is negligible and a second CTA
    // per SM read 1% faster (8 x 32K 249.0 -> 246.5). H200, kernels-2026-12-01-transposed.md.
    // A skewed batch fills every CTA slot and rounds up (no CTA gets more than its share of
    // the work: the longest sequence's splits are what the call waits for), where a uniform one
    // rounds down. H200, bench/results/kernels-2026-12-02-skewed.md: rounding down left a batch
    // of 128 log-uniform lengths (256..32K) at one split, 9% slower than two.
    const int64_t full = int64_t{dev->sms} * std::max(per_sm, 1);
    int64_t wave = full;
    if (kernel == DecodeKernel::kTensorCore && !skewed) {
      const int64_t half_splits = std::max<int64_t>(static_cast<int64_t>(dev->sms / base), 1);
      if ((ctx + half_splits - 1) / half_splits < kTcLongSplitTokens) wave = dev->sms;
    }
    splits = static_cast<int64_t>(skewed ? std::ceil(wave / base) : wave / base);
    splits = std::min<int64_t>(splits, (ctx + kMinSplitTokens - 1) / kMinSplitTokens);
    splits = std::max<int64_t>(splits, 1);
  }
  int64_t split_tokens = (ctx + splits - 1) / splits;
  split_tokens = (split_tokens + a.block_size - 1) / a.block_size * a.block_size;
  splits = (ctx + split_tokens - 1) / split_tokens;  // no split left empty by the rounding
  plan.num_splits = static_cast<int32_t>(splits);
  plan.kernel = kernel;
  plan.tc_stages = kernel == DecodeKernel::kTensorCore ? stages : 0;
  plan.lanes_per_token = lanes;
  plan.split_tokens = static_cast<int32_t>(split_tokens);
  plan.ctas = int64_t{a.batch} * a.num_kv_heads * splits;
  if (skewed && splits > 1) {
    // Packed: each sequence's own splits, one after another (see DecodeParams::work_items).
    const int64_t items = (a.sum_context_lens + split_tokens - 1) / split_tokens + a.batch;
    if (items <= INT32_MAX) {
      plan.packed_splits = true;
      plan.work_items = items;
      plan.ctas = items * a.num_kv_heads;
    }
  }
  plan.ctas_per_sm = static_cast<double>(plan.ctas) / dev->sms;
  switch (a.prefetch) {
    case PrefetchMode::kOff:
      plan.prefetch = false;
      break;
    case PrefetchMode::kOn:
      plan.prefetch = true;
      break;
    case PrefetchMode::kAuto:
      // Tensor-core kernel: its cp.async ring already keeps two tiles per warp in flight, and the
      // in-loop L2 prefetch on top measured 0.69-0.93x (H200, bench/results/kernels-2026-11-30.md).
      if (kernel == DecodeKernel::kTensorCore) {
        plan.prefetch = false;
        break;
      }
      // 8 lanes per token (two CTAs per SM): the prefetch measured +5-15% from batch 8 up and
      // neutral (+-4%) at batch 1. 16 lanes: only with few CTAs and long runs (see above).
      plan.prefetch =
          lanes == 8 || (plan.ctas_per_sm <= kPrefetchMaxCtasPerSm &&
                         split_tokens / (int64_t{a.block_size} * detail::kDecodeWarps) >=
                             kPrefetchMinBlocksPerWarp);
      break;
  }
  // The tensor-core kernel prefetches whole blocks only where tiles align with blocks.
  if (kernel == DecodeKernel::kTensorCore && a.block_size % detail::kTcTile != 0) {
    plan.prefetch = false;
  }
  const int64_t rows = plan.packed_splits ? plan.work_items : splits == 1 ? 0 : a.batch * splits;
  plan.workspace_bytes = static_cast<size_t>(rows) * a.num_q_heads * (kHeadDim + 1) * sizeof(float);
  return plan;
}

absl::Status PagedDecodeAttention(const DecodeAttentionArgs& a, cudaStream_t stream,
                                  DecodePlan* plan_out) {
  absl::StatusOr<DecodePlan> plan = PlanDecodeAttention(a);
  if (!plan.ok()) return plan.status();
  if (plan_out != nullptr) *plan_out = *plan;
  if (plan->workspace_bytes > a.workspace_bytes || (plan->workspace_bytes > 0 && !a.workspace)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "workspace of ", a.workspace_bytes, " bytes; this plan needs ", plan->workspace_bytes));
  }
  if (plan->workspace_bytes > 0 && reinterpret_cast<uintptr_t>(a.workspace) % 16 != 0) {
    return absl::InvalidArgumentError("workspace must be 16-byte aligned");
  }
  detail::DecodeParams p{};
  p.q = a.q;
  p.k = a.k_cache;
  p.v = a.v_cache;
  p.block_tables = a.block_tables;
  p.context_lens = a.context_lens;
  p.out = a.out;
  p.ws_o = static_cast<float*>(a.workspace);
  p.ws_lse = p.ws_o == nullptr
                 ? nullptr
                 : p.ws_o + plan->workspace_bytes / ((kHeadDim + 1) * sizeof(float)) * kHeadDim;
  p.batch = a.batch;
  p.q_heads = a.num_q_heads;
  p.kv_heads = a.num_kv_heads;
  p.block_size = a.block_size;
  p.num_blocks = a.num_blocks;
  p.max_blocks_per_seq = a.max_blocks_per_seq;
  p.max_context_len = a.max_context_len;
  p.num_splits = plan->num_splits;
  p.split_tokens = plan->split_tokens;
  p.work_items = static_cast<int32_t>(plan->work_items);
  p.prefetch_distance = a.prefetch_distance == 0 ? 1 : a.prefetch_distance;
  p.layout = static_cast<int32_t>(a.layout);
  const float scale = a.scale == 0 ? 1.0f / std::sqrt(static_cast<float>(a.head_dim)) : a.scale;
  p.scale_log2 = scale * 1.4426950408889634f;
  const int group = a.num_q_heads / a.num_kv_heads;
  cudaError_t e =
      plan->kernel == DecodeKernel::kTensorCore
          ? DispatchTc(a.dtype, group, a.block_size % detail::kTcTile == 0, plan->prefetch,
                       plan->tc_stages,
                       [&]<typename T, int G, bool A, bool P, int S>() {
                         return detail::LaunchDecodeTc<T, G, A, P, S>(p, a.batch, stream);
                       })
          : Dispatch(a.dtype, group, plan->lanes_per_token, plan->prefetch,
                     [&]<typename T, int G, int L, bool P>() {
                       return detail::LaunchDecode<T, G, L, P>(p, a.batch, stream);
                     });
  return CudaStatus(e, "PagedDecodeAttention launch");
}

}  // namespace kvdn::kernels
