// Paged decode attention with in-loop L2 prefetch: one query token per sequence, reading K/V
// from an engine's paged cache (vLLM NHD, NHD-combined or FlashInfer/SGLang HND), GQA or MHA,
// head_dim 128, bf16 or fp16.
//
// The method of arXiv 2504.06319: while a warp computes on its current KV block it issues
// cp.async.bulk.prefetch.L2 for the block it reads next, hiding HBM latency. Measured on the
// lent H100 (kernels/README.md), the prefetch pays where few warps are resident per SM and
// costs where many are, so PrefetchMode::kAuto turns it on by the kernel variant and CTAs per SM;
// split-KV gives small batches enough CTAs to fill the GPU.
#ifndef KVDN_KERNELS_DECODE_ATTENTION_H_
#define KVDN_KERNELS_DECODE_ATTENTION_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvdn/common/chunk_key.h"
#include "kvdn/kernels/paged_kv.h"

namespace kvdn::kernels {

enum class PrefetchMode : uint8_t { kOff = 0, kOn = 1, kAuto = 2 };
const char* PrefetchModeName(PrefetchMode mode);

// Which kernel computes the attention. kTensorCore: QK^T and PV on mma.sync with the GQA group
// as the MMA rows, K/V staged through shared memory by cp.async (the default). kCudaCore: the
// first kernel, FMAs on CUDA cores with K/V in registers, kept as a measured baseline.
enum class DecodeKernel : uint8_t { kAuto = 0, kTensorCore = 1, kCudaCore = 2 };
const char* DecodeKernelName(DecodeKernel kernel);

struct DecodeAttentionArgs {
  const void* q = nullptr;  // [batch][num_q_heads][head_dim]
  // The engine's paged cache in `layout` (paged_kv.h): kNhd [num_blocks][block_size]
  // [num_kv_heads][head_dim] K and V tensors; kHnd [num_blocks][num_kv_heads][block_size]
  // [head_dim]; kNhdCombined one tensor [num_blocks][2][block_size][num_kv_heads][head_dim] in
  // k_cache, v_cache null. The CUDA-core kernel reads kNhd only.
  const void* k_cache = nullptr;
  const void* v_cache = nullptr;
  PagedKvLayout layout = PagedKvLayout::kNhd;
  const int32_t* block_tables = nullptr;  // [batch][max_blocks_per_seq], device
  const int32_t* context_lens = nullptr;  // [batch], device; each in [0, max_context_len]
  void* out = nullptr;                    // [batch][num_q_heads][head_dim]
  int32_t batch = 0;
  int32_t num_q_heads = 0;  // a multiple of num_kv_heads; q heads per kv head in {1, 2, 4, 8}
  int32_t num_kv_heads = 0;
  int32_t head_dim = 128;   // 128 only
  int32_t block_size = 16;  // any >= 1
  int32_t num_blocks = 0;
  int32_t max_blocks_per_seq = 0;
  int32_t max_context_len = 0;  // host-side bound on context_lens (plans the splits)
  // The sum of context_lens, host-side, if the caller knows it (engines do: vLLM's and
  // FlashInfer's metadata keep the lengths on the host too); 0 = unknown. The plan then splits
  // by the work there is, not by batch x max_context_len: in a batch of mostly short sequences
  // with a few long ones, the long ones get more splits (else their CTAs read alone long after
  // the others end), and the tensor-core kernel packs each sequence's splits one after another,
  // launching none for nothing (DecodePlan::packed_splits); a batch whose sum exceeds 3/4 of
  // batch x max_context_len is planned as without it. Any value in [0, batch x
  // max_context_len] gives correct results; only the true sum gives the planned split sizes.
  int64_t sum_context_lens = 0;
  Dtype dtype = Dtype::kBFloat16;  // kBFloat16 or kFloat16
  float scale = 0;                 // softmax scale; 0 means 1/sqrt(head_dim)
  PrefetchMode prefetch = PrefetchMode::kAuto;
  DecodeKernel kernel = DecodeKernel::kAuto;
  int32_t num_splits = 0;  // KV splits per sequence (of the longest, packed); 0 = chosen
  // CUDA-core kernel only: lanes of a warp that share one K/V row, 8 or 16 (0 = the measured
  // default; groups of 8 always use 16). A tuning knob for benchmarks; results agree either way.
  int32_t lanes_per_token = 0;
  // With prefetch: how many of its blocks ahead each warp prefetches (0 = 1, the block it reads
  // next). A tuning knob for benchmarks.
  int32_t prefetch_distance = 0;
  // Tensor-core kernel only: shared-memory stages per warp, 2, 3 or 4 (0 = 3, the measured
  // default; each stage holds one 16-token tile of K and V, 8 KiB). A tuning knob for benchmarks.
  int32_t tc_stages = 0;
  void* workspace = nullptr;  // PlanDecodeAttention(args)->workspace_bytes (none with one split)
  size_t workspace_bytes = 0;
};

// What PagedDecodeAttention does with `args` on the current device.
struct DecodePlan {
  int32_t num_splits = 1;    // splits of the longest sequence (every sequence's, unless packed)
  int32_t split_tokens = 0;  // KV tokens per split (a multiple of block_size)
  // Packed splits (tensor-core kernel, sum_context_lens given and below 3/4 of batch x
  // max_context_len): each sequence is cut into ceil(len / split_tokens) splits (at least one),
  // numbered one after another; work_items per kv head are launched (an upper bound:
  // ceil(sum_context_lens / split_tokens) + batch) and the workspace has a row per item and q
  // head. Otherwise every sequence has num_splits splits.
  bool packed_splits = false;
  int64_t work_items = 0;
  bool prefetch = false;
  DecodeKernel kernel = DecodeKernel::kTensorCore;  // never kAuto
  int32_t tc_stages = 0;         // tensor-core kernel: shared-memory stages per warp
  int32_t lanes_per_token = 16;  // CUDA-core kernel variant (8 for groups <= 4 by default)
  int64_t ctas = 0;              // CTAs of the main kernel
  double ctas_per_sm = 0;        // ctas / multiprocessors
  size_t workspace_bytes = 0;    // needed for this plan
};

// Validates `args` and plans the launch. INVALID_ARGUMENT naming the bad field.
absl::StatusOr<DecodePlan> PlanDecodeAttention(const DecodeAttentionArgs& args);

// Enqueues the attention on `stream`: out = softmax(q K^T * scale) V per (sequence, q head),
// over the first context_lens[b] tokens. Sequences with context 0 get zeros. INVALID_ARGUMENT
// for bad arguments or a workspace smaller than the plan needs; INTERNAL for a failed launch.
// `plan` (optional) receives the plan used.
absl::Status PagedDecodeAttention(const DecodeAttentionArgs& args, cudaStream_t stream,
                                  DecodePlan* plan = nullptr);

}  // namespace kvdn::kernels

#endif  // KVDN_KERNELS_DECODE_ATTENTION_H_
