// kvdn::client::KvConnector — the engine side of kvdn (ARCHITECTURE.md "Engine side"): loads the
// cached KV of a request's prefix straight into the engine's paged KV cache on the GPU, layer by
// layer, and saves a request's KV from that cache. Built with CUDA only (target kvdn::connector).
//
//   auto client = kvdn::client::Client::Connect(opts);   // opts.receive_pool_bytes > 0
//   auto conn = kvdn::client::KvConnector::Create(client->get(), {});
//   kvdn::client::PagedKvView view = ...;                 // the engine's cache + block table
//   size_t hit = (*client)->Lookup(tokens).value();       // at scheduling time
//   auto load = (*conn)->StartLoad(tokens, view);         // before the forward pass
//   for (int l = 0; l < layers; ++l) {
//     (*load)->WaitLayer(l, stream);                      // the engine's stream waits on the GPU
//     attention(l, stream);
//   }
//   (*conn)->Save(tokens, view, stream);                  // after the forward pass
//   // or: auto save = (*conn)->StartSave(tokens, view, stream);   ... (*save)->Wait();
//
// How a load moves: chunks are fetched from kvdnd (UCX shared memory, or gRPC) into page-locked
// host staging, a window of chunks at a time; each chunk goes up to device staging in one copy
// as soon as it has arrived and been verified (while the rest of the window is still in flight),
// and once the window is there, one InjectChunkLayer kernel per layer scatters all of its chunks
// into the cache through the block table. The next window is fetched while the GPU works. Chunks
// that kvdnd holds in its GPU tier on the same GPU are not fetched at all: the connector maps the
// tier (CUDA IPC) and injects from it device to device. WaitLayer(l) blocks the host only until
// layer l's last copy is enqueued, then orders the engine's stream after it (cudaStreamWaitEvent):
// attention on layer 0 can start while later layers are still on their way. A save runs the other
// way (ExtractLayer of a window's layers into the device staging, then device-to-host copies)
// for the chunks past the stored prefix; with StartSave the engine goes on once the gather is
// enqueued, its stream waits only until the cache has been read, and the stores run behind it.
//
// Thread-safety: a connector may be shared by threads; its loads and saves' gathers run one at a
// time on its own stream, in the order they were started; a save's stores run on a thread of
// their own, so a load started meanwhile goes ahead beside them (given two free slots of the host
// staging, which the stores free as they end).
#ifndef KVDN_CLIENT_KV_CONNECTOR_H_
#define KVDN_CLIENT_KV_CONNECTOR_H_

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kvdn/client/client.h"
#include "kvdn/kernels/paged_kv.h"

namespace kvdn::client {

// The engine's paged KV cache for one request, described without copying it.
struct PagedKvView {
  // One entry per model layer, in order. Every layer has the model's kv heads, head_dim and
  // dtype, and all share one block size and block count (one block table serves them all).
  std::vector<kernels::PagedKvLayer> layers;
  // The request's block table: device int32, block ids for sequence positions
  // [0, block_table_len * block_size). It must cover the request's tokens.
  const int32_t* block_table = nullptr;
  int32_t block_table_len = 0;
};

struct ConnectorOptions {
  // Page-locked host memory for chunks between kvdnd and the GPU, taken from the client's
  // registered pool (ClientOptions.receive_pool_bytes) when it has one, so fetches land by UCX
  // zero-copy; else allocated by the connector (cudaHostAlloc). Half holds the window being
  // fetched, half the one being copied to the GPU; a half must hold one chunk at least.
  // Larger windows keep more chunks in flight (ClientOptions.parallel_streams of them at once).
  // A save fills every window the staging holds before it waits for a store: a StartSave of up
  // to host_staging_bytes returns without waiting for kvdnd (page-locked host memory is what
  // lets an engine go on during its saves; device_staging_bytes need not grow with it).
  uint64_t host_staging_bytes = uint64_t{512} << 20;
  // Device memory a window of chunks passes through on its way into the cache (a window is as
  // many whole chunks as fit both this and half the host staging). A save extracts a whole
  // window out of the cache into it before copying it down, so the engine's stream waits for a
  // save of up to a window (8 Llama-3-8B chunks, 2048 tokens, by default) only for that
  // extraction, at the GPU's memory speed, and for a longer one also for the copies to host
  // memory of all its windows but the last. A larger staging holds the engine less on long
  // prompts; a load's first layer waits for a whole window of chunks to arrive.
  uint64_t device_staging_bytes = uint64_t{256} << 20;
  // Bytes of each layer's pages to prefetch into L2 when WaitLayer releases it (0: none). Off by
  // default: on the H200 with kvdn's own decode attention the prefetch measured 0.73-0.90x
  // (bench/results/kernels-2026-11-30.md); for engines whose attention kernel leaves HBM latency
  // exposed.
  uint64_t l2_prefetch_bytes = 0;
  // Read chunks that kvdnd holds in its GPU tier on this connector's GPU in place, through CUDA
  // IPC (one InjectChunkLayer per layer, device to device), instead of through host memory. A
  // load leases them in one GetDescriptors call (accept_gpu, gpu_only; kvdnd also promotes host
  // chunks into the GPU tier while it has room) from the first chunk on, and fetches the rest as
  // above. The daemon checked each chunk's checksum when it was stored; the device copy is not
  // hashed again. A kvdnd run with --no-gpu-tier-ipc ignores the request (loads go through host
  // memory).
  bool use_gpu_tier = true;
  // Inject chunks that kvdnd holds in its host tier into the cache straight out of kvdnd's
  // memory, mapped read-only into this process (Client::MapHostTier: kvdnd run with
  // share_host_tier; the client on its unix socket with a token that reaches every namespace),
  // instead of fetching them into the host staging first: the inject kernel reads them over PCIe,
  // layer by layer, and WaitLayer(l) is released as soon as layer l is in place (when they are the
  // whole load). A load leases them in one GetDescriptors call, past the GPU tier's run, and
  // fetches the rest as above. As with the GPU tier, the daemon checked each chunk's checksum when
  // it was stored and the connector does not hash it again. The mapping is page-locked for the GPU
  // (cudaHostRegister, read-only) at Create, which takes a while for a large tier; where any step
  // of it fails, loads fetch as before.
  bool map_host_tier = true;
};

// Where a load's chunks came from and its host time went (seconds, on the connector's thread),
// for engines' logs.
struct LoadStats {
  size_t gpu_tier_chunks = 0;   // read in place from kvdnd's GPU tier (CUDA IPC)
  size_t host_tier_chunks = 0;  // injected straight out of kvdnd's host tier (mapped)
  double descriptors = 0;       // leasing chunks in the GPU tier and the mapped host tier
  double lookup = 0;            // waiting for the prefix lookup (beyond the leasing, beside it)
  double fetch = 0;             // fetching chunks from kvdnd into host staging
  double stall = 0;             // waiting for a staging half's copies to the GPU to end
  double enqueue = 0;           // enqueuing copies and kernels
};

// One load in flight. Destroying it waits for the load to finish enqueuing (never for the GPU).
class PagedLoad {
 public:
  virtual ~PagedLoad() = default;
  // Blocks the host until layer `layer`'s copies are enqueued, then makes `stream` wait for them
  // on the GPU. The load's error, if it failed (then the layer's cache is not to be used: it may
  // hold some of the chunks). INVALID_ARGUMENT for a layer out of range.
  virtual absl::Status WaitLayer(int layer, cudaStream_t stream) = 0;
  // Blocks until every layer is enqueued and copied (the connector's stream synchronized): the
  // tokens now in the cache, a prefix of the request's (a chunk evicted since the lookup ends it
  // there, and the engine computes the rest), or the error. DATA_LOSS: a chunk failed its
  // checksum; nothing of the load is to be used.
  virtual absl::StatusOr<LoadResult> Wait() = 0;
  // After Wait: where the chunks came from and the host time went.
  virtual LoadStats stats() const = 0;
};

// One save in flight (KvConnector::StartSave). By the time StartSave returns, every chunk of it
// is being gathered out of the cache on the GPU, in the order of the engine's stream (which waits
// for the gather before its next work): the engine may reuse or free the blocks at once. What is
// left runs in the background: the copies to host memory and the stores into kvdnd. Destroying
// it waits for the save to end.
class PagedSave {
 public:
  virtual ~PagedSave() = default;
  // Whether the save has ended (stored, or failed); does not block.
  virtual bool Done() const = 0;
  // Blocks until the save ends: what was stored, or the error (then some chunks may be stored:
  // each one whole and verified, so a later load finds a shorter prefix, never wrong KV).
  virtual absl::StatusOr<SaveResult> Wait() = 0;
};

class KvConnector {
 public:
  // Staging memory and a stream on the current CUDA device. `client` must outlive the connector
  // and have a ModelSpec. INVALID_ARGUMENT for zero staging sizes; RESOURCE_EXHAUSTED when the
  // client's pool has no room for host_staging_bytes; INTERNAL with CUDA's message otherwise.
  static absl::StatusOr<std::unique_ptr<KvConnector>> Create(Client* client,
                                                             const ConnectorOptions& options);
  ~KvConnector();
  KvConnector(const KvConnector&) = delete;
  KvConnector& operator=(const KvConnector&) = delete;

  // Checks the view against the client's model and the tokens (INVALID_ARGUMENT naming what is
  // wrong: layer count, a layer's shape or pointers, block size, a block table too short for the
  // tokens) and starts loading the longest stored prefix of `tokens` into it; returns at once.
  absl::StatusOr<std::unique_ptr<PagedLoad>> StartLoad(absl::Span<const int32_t> tokens,
                                                       const PagedKvView& view);
  // StartLoad, then Wait, then `stream` ordered after the whole load.
  absl::StatusOr<LoadResult> Load(absl::Span<const int32_t> tokens, const PagedKvView& view,
                                  cudaStream_t stream);
  // Stores the KV of `tokens` from the view once the work enqueued on `stream` so far is done
  // (the forward pass that wrote it): chunks past the stored prefix are gathered from the cache
  // and saved (a tail chunk too). Blocks until they are stored. Checks the view as StartLoad.
  absl::StatusOr<SaveResult> Save(absl::Span<const int32_t> tokens, const PagedKvView& view,
                                  cudaStream_t stream);
  // The same without waiting for the stores: returns once every chunk's gather out of the cache
  // is enqueued (after the work on `stream` so far) and `stream` is made to wait for it on the
  // GPU, so work the engine enqueues next, including on blocks it frees or reuses, comes after
  // the gather. The host staging holds the gathered windows until they are stored; for a save
  // larger than it (ConnectorOptions.host_staging_bytes), StartSave blocks the host until the
  // excess is stored and the last windows gathered. Errors found before the gather (the
  // view, a block table entry outside the cache, kvdnd unreachable for the prefix lookup) are
  // returned here; later ones by the handle's Wait. A load started meanwhile runs beside the
  // stores.
  absl::StatusOr<std::unique_ptr<PagedSave>> StartSave(absl::Span<const int32_t> tokens,
                                                       const PagedKvView& view,
                                                       cudaStream_t stream);

  // Chunks per window: how many move between kvdnd and the GPU per round.
  size_t window_chunks() const;

 private:
  struct Impl;
  explicit KvConnector(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvdn::client

#endif  // KVDN_CLIENT_KV_CONNECTOR_H_
