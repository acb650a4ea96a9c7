#include "kvdn/client/kv_connector.h"

#include <algorithm>
#include <cstring>
#include <future>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <utility>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "kvdn/common/chunk_format.h"
#include "kvdn/common/logging.h"
#include "kvdn/common/mutex.h"
#include "kvdn/common/thread_pool.h"

namespace kvdn::client {
namespace {

absl::Status CudaStatus(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(
      absl::StrCat(what, ": ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")"));
}

#define KVDN_CUDA_RETURN(call, what)                                          \
  do {                                                                        \
    if (absl::Status _st = CudaStatus((call), (what)); !_st.ok()) return _st; \
  } while (0)

// Makes `device` current for a scope and restores the caller's device after it.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&previous_) == cudaSuccess && previous_ != device) {
      (void)cudaSetDevice(device);
    } else {
      previous_ = -1;
    }
  }
  ~DeviceGuard() {
    if (previous_ >= 0) (void)cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

absl::Status CheckView(const ModelSpec& m, const PagedKvView& v, size_t num_tokens) {
  if (v.layers.size() != m.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("PagedKvView has ", v.layers.size(),
                                                   " layers; the model ", m.model_name, " has ",
                                                   m.num_layers));
  }
  for (size_t l = 0; l < v.layers.size(); ++l) {
    const kernels::PagedKvLayer& c = v.layers[l];
    const std::string at = absl::StrCat("PagedKvView.layers[", l, "]");
    const int layout = static_cast<int>(c.layout);
    if (layout > static_cast<int>(kernels::PagedKvLayout::kHnd)) {
      return absl::InvalidArgumentError(absl::StrCat(at, ".layout ", layout, " is not a layout"));
    }
    if (c.k == nullptr) return absl::InvalidArgumentError(absl::StrCat(at, ".k is null"));
    if (c.layout == kernels::PagedKvLayout::kNhdCombined && c.v != nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(at, ".v must be null for the combined layout (K and V share .k)"));
    }
    if (c.layout != kernels::PagedKvLayout::kNhdCombined && c.v == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(at, ".v is null"));
    }
    if (c.num_kv_heads < 0 || static_cast<uint32_t>(c.num_kv_heads) != m.num_kv_heads) {
      return absl::InvalidArgumentError(absl::StrCat(at, ".num_kv_heads is ", c.num_kv_heads,
                                                     "; the model has ", m.num_kv_heads));
    }
    if (c.head_dim < 0 || static_cast<uint32_t>(c.head_dim) != m.head_dim) {
      return absl::InvalidArgumentError(
          absl::StrCat(at, ".head_dim is ", c.head_dim, "; the model has ", m.head_dim));
    }
    if (c.dtype != m.dtype) {
      return absl::InvalidArgumentError(absl::StrCat(at, ".dtype is ", DtypeName(c.dtype),
                                                     "; the model's is ", DtypeName(m.dtype)));
    }
    if (c.block_size < 1 || c.num_blocks < 1) {
      return absl::InvalidArgumentError(absl::StrCat(at, " has block_size ", c.block_size,
                                                     " and num_blocks ", c.num_blocks,
                                                     "; both must be >= 1"));
    }
    if (c.block_size != v.layers[0].block_size || c.num_blocks != v.layers[0].num_blocks) {
      return absl::InvalidArgumentError(absl::StrCat(
          at, " has ", c.num_blocks, " blocks of ", c.block_size, " tokens, layers[0] ",
          v.layers[0].num_blocks, " of ", v.layers[0].block_size, "; one block table serves all"));
    }
  }
  if (num_tokens > static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
    return absl::InvalidArgumentError(absl::StrCat(num_tokens, " tokens; at most 2^31 - 1"));
  }
  if (num_tokens == 0) return absl::OkStatus();
  if (v.block_table == nullptr)
    return absl::InvalidArgumentError("PagedKvView.block_table is null");
  const int64_t covered = int64_t{std::max(v.block_table_len, 0)} * v.layers[0].block_size;
  if (covered < static_cast<int64_t>(num_tokens)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "PagedKvView.block_table has ", v.block_table_len, " blocks of ", v.layers[0].block_size,
        " tokens, covering ", covered, " positions; the request has ", num_tokens, " tokens"));
  }
  return absl::OkStatus();
}

// Most chunks one load leases in the GPU tier (one GetDescriptors call; kvdnd's limit).
constexpr size_t kMaxGpuChunks = 4096;

// A window: chunks [first, first + count) of the request, in one slot of the host staging (a
// window's worth of it), chunk j at j * chunk_bytes there; all have tokens_per_chunk tokens but
// possibly the request's tail chunk, which is last.
struct Window {
  size_t first = 0;
  size_t count = 0;
  int slot = 0;       // of the host staging
  size_t full = 0;    // chunks with tokens_per_chunk tokens
  uint32_t tail = 0;  // tokens of the tail chunk, 0 if the window has none
};

// A save's state, shared by the caller's PagedSave, the worker that gathers it and the storer
// thread that stores its windows.
struct SaveJob {
  std::vector<int32_t> tokens;
  PagedKvView view;
  int device = 0;
  cudaEvent_t written = nullptr;   // on the engine's stream, at StartSave
  cudaEvent_t gathered = nullptr;  // on the connector's stream, after the last gather
  mutable Mutex mu;
  CondVar cv;
  bool gather_enqueued ABSL_GUARDED_BY(mu) = false;
  absl::Status gather_status ABSL_GUARDED_BY(mu);
  // The worker has handed over every window (or failed first); `stores` of them are queued or
  // being stored. Done once both hold; `error` is the first failure.
  bool submitted ABSL_GUARDED_BY(mu) = false;
  size_t stores ABSL_GUARDED_BY(mu) = 0;
  absl::Status error ABSL_GUARDED_BY(mu);
  SaveResult total ABSL_GUARDED_BY(mu);
  bool done ABSL_GUARDED_BY(mu) = false;
  void MaybeDoneLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    if (submitted && stores == 0 && !done) {
      done = true;
      cv.SignalAll();
    }
  }
  ~SaveJob() {
    DeviceGuard guard(device);
    if (written != nullptr) (void)cudaEventDestroy(written);
    if (gathered != nullptr) (void)cudaEventDestroy(gathered);
  }
};

struct LoadState;

}  // namespace

struct KvConnector::Impl {
  // Run on the worker, one at a time (they share the staging).
  void RunLoad(LoadState& s);
  // On the worker: after `job->written` on the engine's stream, gathers the chunks past the
  // stored prefix window by window into free slots of the host staging and hands each window to
  // the storer thread. Sets job->gather_enqueued once the last gather is enqueued and
  // job->gathered recorded after it (or with the error that ended the save before), and
  // job->submitted when it has handed over its last window.
  void RunSave(const std::shared_ptr<SaveJob>& job);
  absl::Status GatherSave(const std::shared_ptr<SaveJob>& job);
  // On the storer: stores window w of the job once its gather has run, then frees its slot.
  void StoreWindow(const std::shared_ptr<SaveJob>& job, const Window& w);

  Client* client = nullptr;
  ConnectorOptions options;
  ModelSpec model;
  int device = 0;
  cudaStream_t stream = nullptr;
  uint8_t* device_staging = nullptr;
  MutableByteSpan host;         // page-locked; two halves
  bool host_from_pool = false;  // else cudaHostAlloc
  // The host staging holds `slots` windows (at least 2). A load takes two (one fetched while the
  // other goes up) until it ends; a save takes one per window until the storer has stored it.
  // Only the worker takes slots (waiting while none is free); the storer gives them back.
  size_t slots = 0;
  std::vector<cudaEvent_t> slot_done;  // per slot: its last copies (up or down) have run
  Mutex slots_mu;
  CondVar slots_cv;
  std::vector<int> free_slots ABSL_GUARDED_BY(slots_mu);
  int TakeSlot() {
    MutexLock lock(&slots_mu);
    while (free_slots.empty()) slots_cv.Wait(&slots_mu);
    const int slot = free_slots.back();
    free_slots.pop_back();
    return slot;
  }
  void GiveSlot(int slot) {
    MutexLock lock(&slots_mu);
    free_slots.push_back(slot);
    slots_cv.SignalAll();
  }
  uint64_t chunk_bytes = 0;       // payload of a full chunk
  uint64_t token_half_bytes = 0;  // K (or V) of one token in one layer
  size_t window = 0;              // chunks per window
  std::string device_uuid;        // cudaDeviceProp.uuid of `device`
  // kvdnd GPU tiers mapped here (CUDA IPC handle bytes -> base); used on the worker only.
  std::map<std::string, uint8_t*> ipc_bases;
  std::unique_ptr<ThreadPool> worker;
  std::unique_ptr<ThreadPool> lookups;  // a load's lookup, beside its GPU-tier leasing
  // Stores saved windows into kvdnd, in the order gathered, while the worker goes on with the
  // next load or save.
  std::unique_ptr<ThreadPool> storer;

  // kvdnd's host tier, mapped read-only and page-locked (ConnectorOptions.map_host_tier); empty
  // when it is not. Used on the worker only (after Create).
  HostTierMapping host_map;
  // Maps kvdnd's host tier (again, with `refresh`, after kvdnd restarted) and page-locks it; on
  // an error host_map stays empty.
  absl::Status MapHostTier(bool refresh) {
    if (host_map.bytes.data() != nullptr) {
      (void)cudaStreamSynchronize(stream);  // nothing reads the old mapping any more
      (void)cudaHostUnregister(const_cast<uint8_t*>(host_map.bytes.data()));
      host_map = HostTierMapping();
    }
    KVDN_ASSIGN_OR_RETURN(HostTierMapping m, client->MapHostTier(refresh));
    KVDN_CUDA_RETURN(cudaHostRegister(const_cast<uint8_t*>(m.bytes.data()), m.bytes.size(),
                                      cudaHostRegisterReadOnly),
                     "cudaHostRegister of kvdnd's host tier (read-only)");
    host_map = m;
    return absl::OkStatus();
  }

  kernels::ChunkSource* device_sources = nullptr;  // InjectChunkLayer's sources on the GPU
  size_t device_sources_cap = 0;

  // Copies `sources` to device_sources (grown as needed), in stream order.
  absl::Status UploadSources(const std::vector<kernels::ChunkSource>& sources) {
    if (sources.size() > device_sources_cap) {
      if (device_sources != nullptr) {
        KVDN_CUDA_RETURN(cudaStreamSynchronize(stream), "before growing the source list");
        (void)cudaFree(device_sources);
        device_sources = nullptr;
        device_sources_cap = 0;
      }
      void* p = nullptr;
      KVDN_CUDA_RETURN(cudaMalloc(&p, sources.size() * sizeof(kernels::ChunkSource)),
                       "cudaMalloc of the source list");
      device_sources = static_cast<kernels::ChunkSource*>(p);
      device_sources_cap = sources.size();
    }
    // From pageable memory: staged before the call returns, so `sources` may change after.
    KVDN_CUDA_RETURN(cudaMemcpyAsync(device_sources, sources.data(),
                                     sources.size() * sizeof(kernels::ChunkSource),
                                     cudaMemcpyHostToDevice, stream),
                     "uploading the source list");
    return absl::OkStatus();
  }

  absl::StatusOr<uint8_t*> OpenIpc(const std::string& handle) {
    if (auto it = ipc_bases.find(handle); it != ipc_bases.end()) return it->second;
    cudaIpcMemHandle_t h;
    if (handle.size() != sizeof(h)) {
      return absl::InternalError(absl::StrCat("kvdnd sent a ", handle.size(),
                                              "-byte CUDA IPC handle; expected ", sizeof(h)));
    }
    std::memcpy(&h, handle.data(), sizeof(h));
    void* p = nullptr;
    KVDN_CUDA_RETURN(cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess),
                     "cudaIpcOpenMemHandle of kvdnd's GPU tier");
    ipc_bases[handle] = static_cast<uint8_t*>(p);
    return static_cast<uint8_t*>(p);
  }

  ~Impl() {
    worker.reset();  // runs what was queued
    storer.reset();  // stores what the worker handed over
    DeviceGuard guard(device);
    if (stream != nullptr) (void)cudaStreamSynchronize(stream);
    for (auto& [handle, base] : ipc_bases) (void)cudaIpcCloseMemHandle(base);
    if (host_map.bytes.data() != nullptr) {
      (void)cudaHostUnregister(const_cast<uint8_t*>(host_map.bytes.data()));
    }
    if (device_sources != nullptr) (void)cudaFree(device_sources);
    for (cudaEvent_t e : slot_done) {
      if (e != nullptr) (void)cudaEventDestroy(e);
    }
    if (device_staging != nullptr) (void)cudaFree(device_staging);
    if (host.data() != nullptr) {
      if (host_from_pool) {
        (void)cudaHostUnregister(host.data());
        client->FreeBuffer(host);
      } else {
        (void)cudaFreeHost(host.data());
      }
    }
    if (stream != nullptr) (void)cudaStreamDestroy(stream);
  }

  uint8_t* Slot(int slot, size_t j) const {
    return host.data() + static_cast<size_t>(slot) * window * chunk_bytes + j * chunk_bytes;
  }
  uint32_t TokensInChunk(size_t chunk, size_t num_tokens) const {
    const size_t start = chunk * model.tokens_per_chunk;
    return static_cast<uint32_t>(std::min<size_t>(model.tokens_per_chunk, num_tokens - start));
  }
  Window MakeWindow(size_t first, size_t count, int slot, size_t num_tokens) const {
    Window w{first, count, slot, count, 0};
    const uint32_t last = TokensInChunk(first + count - 1, num_tokens);
    if (last < model.tokens_per_chunk) {
      w.full = count - 1;
      w.tail = last;
    }
    return w;
  }
  size_t WindowTokens(const Window& w) const { return w.full * model.tokens_per_chunk + w.tail; }

  // Where a save's window keeps layer l in the device staging: ExtractLayer's output for the
  // window's tokens (K of every token, then V), the layers one after another. The staging holds
  // a window of whole chunks, so it holds every layer of the window's tokens.
  uint8_t* SaveLayer(const Window& w, uint32_t l) const {
    return device_staging + uint64_t{l} * 2 * WindowTokens(w) * token_half_bytes;
  }

  // Layer l of a save's window in the device staging (SaveLayer) -> the window's host slots.
  // Enqueued on `stream`.
  absl::Status CopyLayerToHost(const Window& w, uint32_t l) {
    const uint64_t tpc = model.tokens_per_chunk;
    const uint64_t wt = WindowTokens(w);
    const uint64_t half_bytes = tpc * token_half_bytes;  // K (or V) of one full chunk layer
    for (int kv = 0; kv < 2; ++kv) {
      const uint8_t* dev = SaveLayer(w, l) + kv * wt * token_half_bytes;
      if (w.full > 0) {
        uint8_t* h = Slot(w.slot, 0) + l * 2 * half_bytes + kv * half_bytes;
        KVDN_CUDA_RETURN(cudaMemcpy2DAsync(h, chunk_bytes, dev, half_bytes, half_bytes, w.full,
                                           cudaMemcpyDeviceToHost, stream),
                         "cudaMemcpy2DAsync of a layer's chunks");
      }
      if (w.tail > 0) {
        const uint64_t tail_half = uint64_t{w.tail} * token_half_bytes;
        uint8_t* h = Slot(w.slot, w.full) + l * 2 * tail_half + kv * tail_half;
        KVDN_CUDA_RETURN(cudaMemcpyAsync(h, dev + w.full * half_bytes, tail_half,
                                         cudaMemcpyDeviceToHost, stream),
                         "cudaMemcpyAsync of a layer's tail chunk");
      }
    }
    return absl::OkStatus();
  }

  kernels::TokenRange Range(const PagedKvView& v, const Window& w) const {
    return kernels::TokenRange{v.block_table, v.block_table_len,
                               static_cast<int32_t>(w.first * model.tokens_per_chunk),
                               static_cast<int32_t>(WindowTokens(w))};
  }
};

namespace {

struct LoadState {
  explicit LoadState(int dev) : device(dev) {}
  ~LoadState() {
    DeviceGuard guard(device);
    for (cudaEvent_t e : layer_events) (void)cudaEventDestroy(e);
  }
  const int device;
  std::vector<int32_t> tokens;
  PagedKvView view;
  uint64_t l2_prefetch_bytes = 0;
  std::vector<cudaEvent_t> layer_events;  // recorded after each layer's last copies

  Mutex mu;
  CondVar cv;
  int layers_ready ABSL_GUARDED_BY(mu) = 0;      // layers whose last copies are enqueued
  size_t tokens_loaded ABSL_GUARDED_BY(mu) = 0;  // final once layers_ready > 0
  bool done ABSL_GUARDED_BY(mu) = false;
  absl::Status status ABSL_GUARDED_BY(mu);
  LoadResult result ABSL_GUARDED_BY(mu);
  LoadStats timings ABSL_GUARDED_BY(mu);
};

class PagedLoadImpl final : public PagedLoad {
 public:
  explicit PagedLoadImpl(std::shared_ptr<LoadState> s) : s_(std::move(s)) {}
  ~PagedLoadImpl() override {
    MutexLock lock(&s_->mu);
    while (!s_->done) s_->cv.Wait(&s_->mu);
  }

  absl::Status WaitLayer(int layer, cudaStream_t stream) override {
    if (layer < 0 || static_cast<size_t>(layer) >= s_->layer_events.size()) {
      return absl::InvalidArgumentError(absl::StrCat("WaitLayer(", layer, "): the model has ",
                                                     s_->layer_events.size(), " layers"));
    }
    size_t tokens;
    {
      MutexLock lock(&s_->mu);
      while (s_->layers_ready <= layer && !s_->done) s_->cv.Wait(&s_->mu);
      if (!s_->status.ok()) return s_->status;
      tokens = s_->tokens_loaded;
    }
    DeviceGuard guard(s_->device);
    KVDN_CUDA_RETURN(cudaStreamWaitEvent(stream, s_->layer_events[layer], 0),
                     "cudaStreamWaitEvent on a loaded layer");
    if (s_->l2_prefetch_bytes > 0 && tokens > 0) {
      const kernels::TokenRange all{s_->view.block_table, s_->view.block_table_len, 0,
                                    static_cast<int32_t>(tokens)};
      return kernels::PrefetchL2(s_->view.layers[layer], all, s_->l2_prefetch_bytes, stream);
    }
    return absl::OkStatus();
  }

  LoadStats stats() const override {
    MutexLock lock(&s_->mu);
    return s_->timings;
  }

  absl::StatusOr<LoadResult> Wait() override {
    {
      MutexLock lock(&s_->mu);
      while (!s_->done) s_->cv.Wait(&s_->mu);
      if (!s_->status.ok()) return s_->status;
    }
    DeviceGuard guard(s_->device);
    // Every layer's event is recorded after the ones before it: the last one covers the load.
    if (!s_->layer_events.empty()) {
      KVDN_CUDA_RETURN(cudaEventSynchronize(s_->layer_events.back()), "the load's copies");
    }
    MutexLock lock(&s_->mu);
    return s_->result;
  }

 private:
  std::shared_ptr<LoadState> s_;
};

}  // namespace

// Fetches windows of chunks and enqueues their layers.
void KvConnector::Impl::RunLoad(LoadState& s) {
  Impl& c = *this;
  DeviceGuard guard(c.device);
  const size_t layers = s.layer_events.size();
  // Ends the load: every layer event not yet final is recorded here, after all that was enqueued.
  LoadStats timings;
  auto since = [](absl::Time t0) { return absl::ToDoubleSeconds(absl::Now() - t0); };
  std::vector<TransferDescriptor> leases;  // chunks read in place from the GPU tier
  auto finish = [&](absl::Status st, const LoadResult& r, int from_layer) {
    for (size_t l = static_cast<size_t>(from_layer); l < layers; ++l) {
      cudaError_t e = cudaEventRecord(s.layer_events[l], c.stream);
      if (st.ok() && e != cudaSuccess) st = CudaStatus(e, "cudaEventRecord");
    }
    {
      MutexLock lock(&s.mu);
      s.status = std::move(st);
      s.result = r;
      s.tokens_loaded = r.tokens;
      s.timings = timings;
      s.layers_ready = static_cast<int>(layers);
      s.done = true;
      s.cv.SignalAll();
    }
    // The GPU tier's leases end once the GPU has read the chunks (`s` is not touched here: the
    // load's owner may be gone).
    if (!leases.empty()) {
      (void)cudaStreamSynchronize(c.stream);
      (void)c.client->ReleaseDescriptors(leases);  // one round trip, not one per chunk
    }
  };
  LoadResult total;
  int recorded = 0;  // layers whose final event is recorded
  // Every layer of `sources` (whole chunk payloads in device memory), one launch per layer; with
  // `last`, each layer's event is recorded after it and the layer released to WaitLayer.
  auto inject_layers = [&](const std::vector<kernels::ChunkSource>& sources, bool last,
                           kernels::CopyKernel kernel =
                               kernels::CopyKernel::kAuto) -> absl::Status {
    KVDN_RETURN_IF_ERROR(c.UploadSources(sources));
    for (uint32_t l = 0; l < layers; ++l) {
      KVDN_RETURN_IF_ERROR(kernels::InjectChunkLayer(
          sources, c.device_sources, static_cast<int32_t>(l), s.view.layers[l], s.view.block_table,
          s.view.block_table_len, c.stream, kernel));
      if (!last) continue;
      KVDN_RETURN_IF_ERROR(
          CudaStatus(cudaEventRecord(s.layer_events[l], c.stream), "cudaEventRecord"));
      recorded = static_cast<int>(l) + 1;
      MutexLock lock(&s.mu);
      s.layers_ready = recorded;
      s.cv.SignalAll();
    }
    return absl::OkStatus();
  };
  const size_t tpc = c.model.tokens_per_chunk;
  // With the GPU tier, the lookup runs beside the leasing there: two round trips to kvdnd at once
  // rather than one after the other (the leases end where the GPU tier's run of the prefix does,
  // so they need no lookup first).
  std::promise<absl::StatusOr<size_t>> lookup_result;
  std::future<absl::StatusOr<size_t>> lookup;
  // Whatever way RunLoad returns, the lookup (which reads s.tokens) has ended.
  absl::Cleanup lookup_ended = [&lookup] {
    if (lookup.valid()) lookup.wait();
  };
  if (c.options.use_gpu_tier && !s.tokens.empty()) {
    lookup = lookup_result.get_future();
    c.lookups->Submit([&] { lookup_result.set_value(c.client->Lookup(s.tokens)); });
  }
  // Chunks [0, first_host) lie in kvdnd's GPU tier on this GPU: leased and read in place.
  size_t first_host = 0;
  std::vector<kernels::ChunkSource> gpu_src;  // their payloads, mapped
  if (lookup.valid()) {
    const absl::Time t0 = absl::Now();
    absl::StatusOr<std::vector<ChunkKey>> keys =
        ChunkKeysForTokens(c.client->options().ns, c.model, s.tokens, /*include_tail=*/true);
    if (!keys.ok()) return finish(keys.status(), total, recorded);
    keys->resize(std::min(keys->size(), kMaxGpuChunks));
    absl::StatusOr<std::vector<TransferDescriptor>> ds = c.client->AcquireDescriptors(
        *keys, absl::ZeroDuration(), /*accept_gpu=*/true, /*gpu_only=*/true);
    if (!ds.ok()) return finish(ds.status(), total, recorded);
    bool run_ended = false;  // a chunk not readable here ends the GPU-tier run
    for (TransferDescriptor& d : *ds) {
      const uint32_t t = c.TokensInChunk(first_host, s.tokens.size());
      absl::StatusOr<uint8_t*> base = absl::NotFoundError("not on this GPU");
      if (!run_ended && d.gpu && d.gpu->device_uuid == c.device_uuid &&
          d.size == kChunkHeaderBytes + c.client->PayloadBytes(t)) {
        base = c.OpenIpc(d.gpu->ipc_handle);
      }
      run_ended = !base.ok();
      if (base.ok()) {
        gpu_src.push_back(kernels::ChunkSource{*base + d.gpu->offset + kChunkHeaderBytes,
                                               static_cast<int32_t>(first_host * tpc),
                                               static_cast<int32_t>(t)});
        ++first_host;
        leases.push_back(std::move(d));
      } else {  // another GPU's tier (or a mapping that failed): through host memory from here
        (void)c.client->ReleaseDescriptor(d);
      }
    }
    timings.descriptors = since(t0);
    timings.gpu_tier_chunks = first_host;
  }
  const absl::Time lookup_t0 = absl::Now();
  absl::StatusOr<size_t> matched = lookup.valid() ? lookup.get() : c.client->Lookup(s.tokens);
  timings.lookup = since(lookup_t0);
  if (!matched.ok()) return finish(matched.status(), total, recorded);
  // A run leased in the GPU tier is stored even where the lookup, answered a moment apart, ended
  // sooner (the chunks saved meanwhile).
  const size_t chunks = std::max((*matched + tpc - 1) / tpc, first_host);
  if (first_host > 0) {
    const absl::Time t0 = absl::Now();
    const bool last = first_host == chunks;
    LoadResult part;
    for (const kernels::ChunkSource& g : gpu_src) {
      part.tokens += static_cast<size_t>(g.num_tokens);
      part.bytes += c.client->PayloadBytes(static_cast<uint32_t>(g.num_tokens));
    }
    part.chunks = first_host;
    if (last) {
      MutexLock lock(&s.mu);
      s.tokens_loaded = part.tokens;
    }
    if (absl::Status st = inject_layers(gpu_src, last); !st.ok()) {
      return finish(st, total, recorded);
    }
    total = part;
    timings.enqueue += since(t0);
  }
  // Chunks [first_host, first_mapped) lie in kvdnd's host tier, mapped here: leased in one call
  // and injected straight out of it, layer by layer (below).
  size_t first_mapped = first_host;
  std::vector<const uint8_t*> mapped_from;  // their payloads in the mapping
  if (c.host_map.bytes.data() != nullptr && first_host < chunks) {
    const absl::Time t0 = absl::Now();
    absl::StatusOr<std::vector<ChunkKey>> keys =
        ChunkKeysForTokens(c.client->options().ns, c.model, s.tokens, /*include_tail=*/true);
    if (!keys.ok()) return finish(keys.status(), total, recorded);
    const size_t n = std::min(chunks, keys->size()) - first_host;
    absl::StatusOr<std::vector<TransferDescriptor>> ds = c.client->AcquireDescriptors(
        absl::MakeConstSpan(*keys).subspan(first_host, std::min(n, kMaxGpuChunks)),
        absl::ZeroDuration());
    if (!ds.ok()) {
      // Leasing failed (e.g. UNAVAILABLE past the retries: a chunk moving off kvdnd's GPU tier
      // for another reader): the fetch path reads these chunks, or says what is wrong.
      spdlog::debug("KvConnector: leasing host chunks failed ({}); fetching them",
                    ds.status().ToString());
      ds = std::vector<TransferDescriptor>();
    }
    // kvdnd restarted since the mapping was made: map its new arena (once per load).
    if (!ds->empty() && (*ds)[0].host_arena != 0 && (*ds)[0].host_arena != c.host_map.arena_id) {
      if (absl::Status st = c.MapHostTier(/*refresh=*/true); !st.ok()) {
        spdlog::warn(
            "KvConnector: kvdnd's host tier changed and cannot be mapped again ({}); "
            "its chunks are fetched",
            st.ToString());
      }
    }
    size_t i = 0;
    for (; i < ds->size(); ++i) {
      const TransferDescriptor& d = (*ds)[i];
      const uint64_t size = kChunkHeaderBytes + c.client->PayloadBytes(c.TokensInChunk(
                                                    first_host + i, s.tokens.size()));
      const ByteSpan map = c.host_map.bytes;
      // Not in the mapped arena (a chunk kvdnd holds only on disk or its GPU, or a mapping
      // that failed): the run ends here, the rest is fetched.
      if (map.data() == nullptr || d.host_arena != c.host_map.arena_id || d.size != size ||
          size > map.size() || d.host_offset > map.size() - size) {
        break;
      }
      mapped_from.push_back(map.data() + d.host_offset + kChunkHeaderBytes);
      leases.push_back(d);
    }
    if (i < ds->size()) {
      (void)c.client->ReleaseDescriptors(absl::MakeConstSpan(*ds).subspan(i));
    }
    timings.descriptors += since(t0);
    timings.host_tier_chunks = mapped_from.size();
    first_mapped = first_host + mapped_from.size();
  }
  // The mapped run is injected straight out of kvdnd's page-locked memory, one InjectChunkLayer
  // per layer over every chunk of the run (the vector kernel, reading host memory over PCIe;
  // paged_kv.h says why not the bulk-copy one): no copy into the device staging first. When the
  // run ends the load, each layer is released to WaitLayer as soon as it is injected: the
  // engine's attention on layer 0 starts after 1/num_layers of it. (Copying each chunk's layer
  // into the device staging first, 4096 copies of 1 MiB for 32K Llama-3-8B tokens, released
  // layer 0 as early but moved 44 GB/s; whole chunks, 128 copies, 51 GB/s with every layer
  // released at the end.)
  if (first_mapped > first_host) {
    const absl::Time t0 = absl::Now();
    const bool last = first_mapped == chunks;
    std::vector<kernels::ChunkSource> sources;
    LoadResult part;
    for (size_t i = 0; i < mapped_from.size(); ++i) {
      const uint32_t t = c.TokensInChunk(first_host + i, s.tokens.size());
      sources.push_back(kernels::ChunkSource{
          mapped_from[i], static_cast<int32_t>((first_host + i) * tpc), static_cast<int32_t>(t)});
      part.tokens += t;
      part.bytes += c.client->PayloadBytes(t);
    }
    part.chunks = sources.size();
    if (last) {
      MutexLock lock(&s.mu);
      s.tokens_loaded = total.tokens + part.tokens;
    }
    if (absl::Status st = inject_layers(sources, last, kernels::CopyKernel::kVector); !st.ok()) {
      return finish(st, total, recorded);
    }
    total.chunks += part.chunks;
    total.tokens += part.tokens;
    total.bytes += part.bytes;
    timings.enqueue += since(t0);
  }
  // Two slots of the host staging, given back however the load ends. Taken here, past the
  // GPU-tier and mapped runs: a load served wholly from them does not wait for a save's stores.
  int load_slots[2] = {-1, -1};
  absl::Cleanup give_slots = [&] {
    for (int slot : load_slots) {
      if (slot >= 0) c.GiveSlot(slot);
    }
  };
  if (first_mapped < chunks) {
    const absl::Time t0 = absl::Now();
    load_slots[0] = c.TakeSlot();
    load_slots[1] = c.TakeSlot();
    timings.stall += since(t0);
  }
  int next_half = 0;
  for (size_t first = first_mapped; first < chunks;) {
    const size_t want = std::min(c.window, chunks - first);
    const int half = load_slots[next_half];
    next_half ^= 1;
    // The half's copies of two windows ago are done before it is refilled.
    absl::Time t0 = absl::Now();
    if (absl::Status st = CudaStatus(cudaEventSynchronize(c.slot_done[half]), "host staging");
        !st.ok()) {
      return finish(st, total, recorded);
    }
    timings.stall += since(t0);
    std::vector<MutableByteSpan> buffers;
    std::vector<kernels::ChunkSource> sources;
    for (size_t j = 0; j < want; ++j) {
      const uint32_t t = c.TokensInChunk(first + j, s.tokens.size());
      buffers.emplace_back(c.Slot(half, j), c.client->PayloadBytes(t));
      sources.push_back(kernels::ChunkSource{c.device_staging + j * c.chunk_bytes,
                                             static_cast<int32_t>((first + j) * tpc),
                                             static_cast<int32_t>(t)});
    }
    // Each chunk goes up as soon as it is here (on the client's threads): only the window's last
    // arrival is copied after the fetch. The window before is injected first (stream order), so
    // the device staging is free by the time these copies run.
    Mutex copy_mu;
    absl::Status copy_error;
    auto up = [&](size_t j) {
      DeviceGuard on_device(c.device);
      const cudaError_t e = cudaMemcpyAsync(c.device_staging + j * c.chunk_bytes, buffers[j].data(),
                                            buffers[j].size(), cudaMemcpyHostToDevice, c.stream);
      if (e != cudaSuccess) {
        MutexLock lock(&copy_mu);
        if (copy_error.ok()) copy_error = CudaStatus(e, "cudaMemcpyAsync of a chunk");
      }
    };
    t0 = absl::Now();
    absl::StatusOr<LoadResult> got = c.client->Load(s.tokens, buffers, first, up);
    timings.fetch += since(t0);
    if (!got.ok()) return finish(got.status(), total, recorded);
    {
      MutexLock lock(&copy_mu);
      if (!copy_error.ok()) return finish(copy_error, total, recorded);
    }
    t0 = absl::Now();
    if (got->chunks == 0) break;
    sources.resize(got->chunks);
    const bool last = got->chunks < want || first + got->chunks == chunks;
    if (last) {
      MutexLock lock(&s.mu);
      s.tokens_loaded = total.tokens + got->tokens;
    }
    absl::Status st = inject_layers(sources, last);
    if (st.ok()) st = CudaStatus(cudaEventRecord(c.slot_done[half], c.stream), "host staging");
    if (!st.ok()) return finish(st, total, recorded);
    timings.enqueue += since(t0);
    total.chunks += got->chunks;
    total.tokens += got->tokens;
    total.bytes += got->bytes;
    first += got->chunks;
    if (last) break;
  }
  finish(absl::OkStatus(), total, recorded);
}

void KvConnector::Impl::RunSave(const std::shared_ptr<SaveJob>& job) {
  absl::Status st = GatherSave(job);
  MutexLock lock(&job->mu);
  if (!job->gather_enqueued) {  // nothing was gathered, or the save failed before the last gather
    job->gather_enqueued = true;
    job->gather_status = st;
  }
  if (!st.ok() && job->error.ok()) job->error = st;
  job->submitted = true;
  job->cv.SignalAll();
  job->MaybeDoneLocked();
}

absl::Status KvConnector::Impl::GatherSave(const std::shared_ptr<SaveJob>& job) {
  Impl& c = *this;
  DeviceGuard guard(c.device);
  const std::vector<int32_t>& tokens = job->tokens;
  const PagedKvView& view = job->view;
  KVDN_CUDA_RETURN(cudaStreamWaitEvent(c.stream, job->written, 0),
                   "waiting for the engine's stream");
  const size_t tpc = c.model.tokens_per_chunk;
  const size_t chunks = (tokens.size() + tpc - 1) / tpc;
  KVDN_ASSIGN_OR_RETURN(size_t matched, c.client->Lookup(tokens));
  const size_t present = matched == tokens.size() ? chunks : matched / tpc;
  {
    MutexLock lock(&job->mu);
    job->total.chunks_present = present;
  }
  if (present == chunks) return absl::OkStatus();
  // Every block the saved tokens live in must be one of the cache's: a bad entry would store
  // whatever the staging held as this prefix's KV, for every engine that loads it.
  {
    const size_t from_block = present * tpc / static_cast<size_t>(view.layers[0].block_size);
    const size_t to_block = (tokens.size() + view.layers[0].block_size - 1) /
                            static_cast<size_t>(view.layers[0].block_size);
    std::vector<int32_t> table(to_block - from_block);
    KVDN_CUDA_RETURN(
        cudaMemcpyAsync(table.data(), view.block_table + from_block, table.size() * sizeof(int32_t),
                        cudaMemcpyDeviceToHost, c.stream),
        "reading the block table");
    KVDN_CUDA_RETURN(cudaStreamSynchronize(c.stream), "reading the block table");
    for (size_t i = 0; i < table.size(); ++i) {
      if (table[i] < 0 || table[i] >= view.layers[0].num_blocks) {
        return absl::InvalidArgumentError(absl::StrCat(
            "PagedKvView.block_table[", from_block + i, "] is ", table[i], ", not one of the ",
            view.layers[0].num_blocks, " blocks of the cache; nothing saved"));
      }
    }
  }
  // Each window goes into a free slot (waiting for the storer to free one when there is none),
  // then to the storer: the GPU gathers the next window while the storer stores this one. A
  // window's layers are all extracted into the device staging before any is copied down, so the
  // cache is read at the GPU's memory speed and the engine's stream, waiting for the last
  // window's extraction, does not wait for that window's copy to host memory (only for the
  // copies of the windows before it, whose staging the later ones reuse).
  for (size_t first = present; first < chunks;) {
    const int slot = c.TakeSlot();
    const Window w = c.MakeWindow(first, std::min(c.window, chunks - first), slot, tokens.size());
    absl::Status st;
    for (uint32_t l = 0; l < c.model.num_layers && st.ok(); ++l) {
      st = kernels::ExtractLayer(view.layers[l], c.Range(view, w), c.SaveLayer(w, l), c.stream);
    }
    const bool last = first + w.count == chunks;
    if (st.ok() && last) {  // the last read of the cache: the engine may go on after it
      st = CudaStatus(cudaEventRecord(job->gathered, c.stream), "recording the gather's end");
      if (st.ok()) {
        MutexLock lock(&job->mu);
        job->gather_enqueued = true;
        job->cv.SignalAll();
      }
    }
    for (uint32_t l = 0; l < c.model.num_layers && st.ok(); ++l) st = c.CopyLayerToHost(w, l);
    if (st.ok()) st = CudaStatus(cudaEventRecord(c.slot_done[slot], c.stream), "host staging");
    if (!st.ok()) {
      // The slot's copies may still run: it goes back after them, in stream order.
      (void)cudaStreamSynchronize(c.stream);
      c.GiveSlot(slot);
      return st;
    }
    {
      MutexLock lock(&job->mu);
      ++job->stores;
    }
    c.storer->Submit([this, job, w] { StoreWindow(job, w); });
    first += w.count;
  }
  return absl::OkStatus();
}

void KvConnector::Impl::StoreWindow(const std::shared_ptr<SaveJob>& job, const Window& w) {
  DeviceGuard guard(device);
  bool failed;
  {
    MutexLock lock(&job->mu);
    failed = !job->error.ok();
  }
  absl::StatusOr<SaveResult> r = absl::AbortedError("an earlier window of the save failed");
  absl::Status st = CudaStatus(cudaEventSynchronize(slot_done[w.slot]), "gathering a window");
  if (st.ok() && !failed) {
    std::vector<ByteSpan> payloads;
    for (size_t j = 0; j < w.count; ++j) {
      payloads.emplace_back(Slot(w.slot, j),
                            client->PayloadBytes(TokensInChunk(w.first + j, job->tokens.size())));
    }
    r = client->Save(job->tokens, payloads, w.first);
  } else if (!st.ok()) {
    r = st;
  }
  GiveSlot(w.slot);
  MutexLock lock(&job->mu);
  if (r.ok()) {
    job->total.chunks_stored += r->chunks_stored;
    job->total.chunks_present += r->chunks_present;
    job->total.bytes_sent += r->bytes_sent;
  } else if (job->error.ok() && !failed) {
    job->error = r.status();
  }
  --job->stores;
  job->MaybeDoneLocked();
}

KvConnector::KvConnector(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
KvConnector::~KvConnector() = default;

size_t KvConnector::window_chunks() const { return impl_->window; }

absl::StatusOr<std::unique_ptr<KvConnector>> KvConnector::Create(Client* client,
                                                                 const ConnectorOptions& options) {
  if (client == nullptr) return absl::InvalidArgumentError("KvConnector::Create: client is null");
  auto impl = std::make_unique<Impl>();
  impl->client = client;
  impl->options = options;
  impl->model = client->options().model;
  KVDN_RETURN_IF_ERROR(impl->model.Validate());
  const ModelSpec& m = impl->model;
  impl->token_half_bytes = uint64_t{m.num_kv_heads} * m.head_dim * DtypeSize(m.dtype);
  impl->chunk_bytes = client->PayloadBytes(m.tokens_per_chunk);
  const uint64_t host_half = (options.host_staging_bytes / 2) & ~uint64_t{4095};
  impl->window = static_cast<size_t>(
      std::min(host_half / impl->chunk_bytes, options.device_staging_bytes / impl->chunk_bytes));
  if (impl->window == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("ConnectorOptions: host_staging_bytes ", options.host_staging_bytes,
                     " must hold two chunks of ", impl->chunk_bytes,
                     " bytes and device_staging_bytes ", options.device_staging_bytes, " one"));
  }
  KVDN_CUDA_RETURN(cudaGetDevice(&impl->device), "cudaGetDevice");
  cudaDeviceProp prop{};
  KVDN_CUDA_RETURN(cudaGetDeviceProperties(&prop, impl->device), "cudaGetDeviceProperties");
  impl->device_uuid.assign(reinterpret_cast<const char*>(&prop.uuid), sizeof(prop.uuid));
  KVDN_CUDA_RETURN(cudaStreamCreateWithFlags(&impl->stream, cudaStreamNonBlocking),
                   "cudaStreamCreate");
  const uint64_t window_bytes = impl->window * impl->chunk_bytes;
  impl->slots = static_cast<size_t>((options.host_staging_bytes & ~uint64_t{4095}) / window_bytes);
  impl->slot_done.assign(impl->slots, nullptr);
  for (cudaEvent_t& e : impl->slot_done) {
    KVDN_CUDA_RETURN(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate");
  }
  void* staging = nullptr;
  KVDN_CUDA_RETURN(cudaMalloc(&staging, impl->window * impl->chunk_bytes),
                   "cudaMalloc of the device staging");
  impl->device_staging = static_cast<uint8_t*>(staging);
  const uint64_t host_bytes = impl->slots * window_bytes;
  if (!client->PoolRegion().empty()) {
    MutableByteSpan span = client->AllocateBuffer(host_bytes);
    if (span.empty()) {
      return absl::ResourceExhaustedError(
          absl::StrCat("ConnectorOptions.host_staging_bytes: the client's receive pool (",
                       client->PoolRegion().size(), " bytes) has no room for ", host_bytes));
    }
    impl->host = span;
    impl->host_from_pool = true;
    cudaError_t e = cudaHostRegister(span.data(), span.size(), cudaHostRegisterDefault);
    if (e != cudaSuccess) {
      impl->host_from_pool = false;
      client->FreeBuffer(span);
      impl->host = MutableByteSpan();
      return CudaStatus(e, "cudaHostRegister of the host staging");
    }
  } else {
    void* p = nullptr;
    KVDN_CUDA_RETURN(cudaHostAlloc(&p, host_bytes, cudaHostAllocDefault),
                     "cudaHostAlloc of the host staging");
    impl->host = MutableByteSpan(static_cast<uint8_t*>(p), host_bytes);
  }
  {
    MutexLock lock(&impl->slots_mu);
    for (size_t i = impl->slots; i-- > 0;) impl->free_slots.push_back(static_cast<int>(i));
  }
  if (options.map_host_tier) {
    if (absl::Status st = impl->MapHostTier(/*refresh=*/false); st.ok()) {
      spdlog::info(
          "KvConnector: kvdnd's host tier mapped ({} MiB); its chunks go to the GPU "
          "straight out of it",
          impl->host_map.bytes.size() >> 20);
    } else {
      spdlog::info("KvConnector: chunks in kvdnd's host tier are fetched ({})", st.ToString());
    }
  }
  impl->worker = std::make_unique<ThreadPool>(1);
  impl->lookups = std::make_unique<ThreadPool>(1);
  impl->storer = std::make_unique<ThreadPool>(1);
  return std::unique_ptr<KvConnector>(new KvConnector(std::move(impl)));
}

absl::StatusOr<std::unique_ptr<PagedLoad>> KvConnector::StartLoad(absl::Span<const int32_t> tokens,
                                                                  const PagedKvView& view) {
  KVDN_RETURN_IF_ERROR(CheckView(impl_->model, view, tokens.size()));
  auto s = std::make_shared<LoadState>(impl_->device);
  s->tokens.assign(tokens.begin(), tokens.end());
  s->view = view;
  s->l2_prefetch_bytes = impl_->options.l2_prefetch_bytes;
  {
    DeviceGuard guard(impl_->device);
    s->layer_events.resize(view.layers.size(), nullptr);
    for (cudaEvent_t& e : s->layer_events) {
      KVDN_CUDA_RETURN(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate");
    }
  }
  impl_->worker->Submit([impl = impl_.get(), s] { impl->RunLoad(*s); });
  return std::unique_ptr<PagedLoad>(new PagedLoadImpl(std::move(s)));
}

absl::StatusOr<LoadResult> KvConnector::Load(absl::Span<const int32_t> tokens,
                                             const PagedKvView& view, cudaStream_t stream) {
  KVDN_ASSIGN_OR_RETURN(std::unique_ptr<PagedLoad> load, StartLoad(tokens, view));
  KVDN_ASSIGN_OR_RETURN(LoadResult r, load->Wait());
  if (!view.layers.empty())
    KVDN_RETURN_IF_ERROR(load->WaitLayer(static_cast<int>(view.layers.size()) - 1, stream));
  return r;
}

namespace {

class PagedSaveImpl final : public PagedSave {
 public:
  explicit PagedSaveImpl(std::shared_ptr<SaveJob> job) : job_(std::move(job)) {}
  ~PagedSaveImpl() override { (void)Wait(); }
  bool Done() const override {
    MutexLock lock(&job_->mu);
    return job_->done;
  }
  absl::StatusOr<SaveResult> Wait() override {
    MutexLock lock(&job_->mu);
    while (!job_->done) job_->cv.Wait(&job_->mu);
    if (!job_->error.ok()) return job_->error;
    return job_->total;
  }

 private:
  std::shared_ptr<SaveJob> job_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<PagedSave>> KvConnector::StartSave(absl::Span<const int32_t> tokens,
                                                                  const PagedKvView& view,
                                                                  cudaStream_t stream) {
  KVDN_RETURN_IF_ERROR(CheckView(impl_->model, view, tokens.size()));
  auto job = std::make_shared<SaveJob>();
  job->device = impl_->device;
  if (tokens.empty()) {
    MutexLock lock(&job->mu);
    job->done = true;
    return std::make_unique<PagedSaveImpl>(std::move(job));
  }
  job->tokens.assign(tokens.begin(), tokens.end());
  job->view = view;
  DeviceGuard guard(impl_->device);
  KVDN_CUDA_RETURN(cudaEventCreateWithFlags(&job->written, cudaEventDisableTiming),
                   "cudaEventCreate");
  KVDN_CUDA_RETURN(cudaEventCreateWithFlags(&job->gathered, cudaEventDisableTiming),
                   "cudaEventCreate");
  KVDN_CUDA_RETURN(cudaEventRecord(job->written, stream), "cudaEventRecord on the engine's stream");
  Impl* impl = impl_.get();
  impl->worker->Submit([impl, job] { impl->RunSave(job); });
  absl::Status gather_status;
  {
    MutexLock lock(&job->mu);
    while (!job->gather_enqueued) job->cv.Wait(&job->mu);
    gather_status = job->gather_status;
  }
  if (!gather_status.ok()) return gather_status;
  // The engine's next work waits for the gather on the GPU (a no-op when nothing was gathered:
  // the event was never recorded).
  if (cudaError_t e = cudaStreamWaitEvent(stream, job->gathered, 0); e != cudaSuccess) {
    (void)cudaEventSynchronize(job->gathered);  // then at least the host waits for it
    return CudaStatus(e, "ordering the engine's stream after the save's gather");
  }
  return std::make_unique<PagedSaveImpl>(std::move(job));
}

absl::StatusOr<SaveResult> KvConnector::Save(absl::Span<const int32_t> tokens,
                                             const PagedKvView& view, cudaStream_t stream) {
  KVDN_ASSIGN_OR_RETURN(std::unique_ptr<PagedSave> save, StartSave(tokens, view, stream));
  return save->Wait();
}

}  // namespace kvdn::client
