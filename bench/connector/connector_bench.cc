// connector_bench: KvConnector (the engine side) loading a request's KV from a real kvdnd into a
// paged KV cache on the GPU, beside what bounds it and a peer, all in the same run:
//   - ceiling 1: host-to-device copy bandwidth from page-locked memory (cudaMemcpyAsync, 256 MiB);
//   - ceiling 2: the fetch alone — Client::Load of the same chunks into page-locked host memory,
//     window by window as the connector fetches them (kvdnd -> client over UCX shared memory);
//   - the connector's GPU part alone (its method: one copy per chunk + one InjectChunkLayer per
//     layer and window) from page-locked memory already holding the chunks;
//   - peer: vLLM's swap-in method (one cudaMemcpyAsync per block, K and V, per layer) from
//     page-locked memory already holding the blocks — the GPU part only, no fetch.
// Llama-3-8B shapes (32 layers, 8 kv heads, head_dim 128, bf16, 256-token chunks of 32 MiB), vLLM
// NHD layout with 16-token blocks, shuffled block tables. Also Save (gather from the cache and
// store), and the time until layer 0 may be read (WaitLayer(0) and the engine stream after it);
// then what a save blocks: Save (the host until stored) against StartSave (the host until the
// gather is enqueued, the engine's stream until it has run), and a load of another prefix run
// while the started save's stores go on.
//   connector_bench [--kvdnd PATH] [--contexts 2048,8192,32768] [--rounds 3] [--lanes N]
//                   [--streams N] [--host-staging-mib 512] [--device-staging-mib 256]
//                   [--register-fetch 0|1] [--copy-kernel auto|vector] [--layout nhd|hnd]
//                   [--share-host-tier 1|0]   (1: kvdnd --share-host-tier, loads map it)
#include <cuda_runtime_api.h>
#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "kvdn/client/client.h"
#include "kvdn/client/kv_connector.h"
#include "kvdn/kernels/paged_kv.h"
#include "kvdn/v1/admin_service.grpc.pb.h"

namespace kvdn {
namespace {

using Clock = std::chrono::steady_clock;
double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

#define CHECK_CUDA(call)                                                                         \
  do {                                                                                           \
    cudaError_t e_ = (call);                                                                     \
    if (e_ != cudaSuccess) {                                                                     \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (0)

template <typename T>
T Must(absl::StatusOr<T> s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, s.status().ToString().c_str());
    std::exit(1);
  }
  return *std::move(s);
}

constexpr uint32_t kLayers = 32, kHeads = 8, kDim = 128, kTpc = 256, kBlock = 16;
constexpr uint64_t kTokenHalf = uint64_t{kHeads} * kDim * 2;  // K (or V) of a token in a layer
// The cache layout (--layout): vLLM NHD by default.
kernels::PagedKvLayout g_layout = kernels::PagedKvLayout::kNhd;

// kvdnd in a temporary directory (host tier only), SIGTERM on destruction.
class Daemon {
 public:
  Daemon(const std::string& path, uint64_t host_bytes, uint64_t gpu_bytes, bool share_host) {
    char tmpl[] = "/tmp/kvdn-connector-bench.XXXXXX";
    dir_ = mkdtemp(tmpl);
    pid_ = fork();
    if (pid_ == 0) {
      const int fd = open((dir_ + "/kvdnd.log").c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      dup2(fd, 1);
      dup2(fd, 2);
      const std::string host = std::to_string(host_bytes), gpu = std::to_string(gpu_bytes);
      const std::string sock = dir_ + "/kvdnd.sock", data = dir_ + "/data",
                        ready = dir_ + "/ready.json";
      std::vector<const char*> argv = {path.c_str(),
                                       "--data-dir",
                                       data.c_str(),
                                       "--unix-socket",
                                       sock.c_str(),
                                       "--grpc-address",
                                       "127.0.0.1:0",
                                       "--http-address",
                                       "none",
                                       "--host-tier-bytes",
                                       host.c_str(),
                                       "--no-disk-tier",
                                       "--ready-file",
                                       ready.c_str(),
                                       "--log-level",
                                       "warn",
                                       "--gpu-tier-bytes",
                                       gpu.c_str()};
      if (share_host) argv.push_back("--share-host-tier");
      argv.push_back(nullptr);
      execv(path.c_str(), const_cast<char* const*>(argv.data()));
      _exit(127);
    }
    for (int i = 0; i < 600 && !std::filesystem::exists(dir_ + "/ready.json"); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    if (!std::filesystem::exists(dir_ + "/ready.json")) {
      std::fprintf(stderr, "kvdnd did not start (%s/kvdnd.log)\n", dir_.c_str());
      std::exit(1);
    }
    // Wait for the arena prefault (a background thread in kvdnd) to end.
    const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
    for (int i = 0; i < 1200; ++i) {
      uint64_t size = 0, resident = 0;
      std::ifstream statm("/proc/" + std::to_string(pid_) + "/statm");
      if (!(statm >> size >> resident) || resident * page >= host_bytes * 95 / 100) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }
  ~Daemon() {
    kill(pid_, SIGTERM);
    waitpid(pid_, nullptr, 0);
    std::filesystem::remove_all(dir_);
  }
  std::string target() const { return "unix:" + dir_ + "/kvdnd.sock"; }

 private:
  std::string dir_;
  pid_t pid_ = -1;
};

// kvdnd's tier counters (AdminService.GetStats): what moved between tiers, to tell a slow round's
// cause (a lease that promoted a chunk into the GPU tier, or waited for one being moved).
struct TierCounters {
  uint64_t gpu_promotions = 0, gpu_demotions = 0, gpu_evictions = 0, gpu_misses = 0;
  uint64_t host_evictions = 0;
};
TierCounters ReadTierCounters(const std::string& target) {
  TierCounters t;
  auto stub =
      v1::AdminService::NewStub(grpc::CreateChannel(target, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  v1::GetStatsResponse r;
  if (grpc::Status st = stub->GetStats(&ctx, v1::GetStatsRequest(), &r); !st.ok()) {
    std::fprintf(stderr, "GetStats: %s\n", st.error_message().c_str());
    return t;
  }
  for (const v1::TierStats& ts : r.tiers()) {
    if (ts.tier() == v1::TIER_GPU) {
      t.gpu_promotions = ts.promotions();
      t.gpu_demotions = ts.demotions();
      t.gpu_evictions = ts.evictions();
      t.gpu_misses = ts.misses();
    } else if (ts.tier() == v1::TIER_HOST) {
      t.host_evictions = ts.evictions();
    }
  }
  return t;
}

// A paged cache [blocks, 16, 8, 128] bf16 per layer for K and V, and a shuffled block table.
struct Cache {
  Cache(size_t tokens, uint32_t seed, const uint8_t* random_host, size_t random_bytes) {
    blocks = static_cast<int32_t>((tokens + kBlock - 1) / kBlock);
    tensor_bytes = static_cast<uint64_t>(blocks) * kBlock * kTokenHalf;
    for (uint32_t i = 0; i < 2 * kLayers; ++i) {
      void* p = nullptr;
      CHECK_CUDA(cudaMalloc(&p, tensor_bytes));
      // Random bytes, each tensor from another offset of the random buffer.
      const uint8_t* src = random_host + (i * 4096) % 65536;
      for (uint64_t off = 0; random_host != nullptr && off < tensor_bytes; off += random_bytes) {
        const uint64_t n = std::min<uint64_t>(random_bytes, tensor_bytes - off);
        CHECK_CUDA(cudaMemcpy(static_cast<uint8_t*>(p) + off, src, n, cudaMemcpyHostToDevice));
      }
      if (random_host == nullptr) CHECK_CUDA(cudaMemset(p, 0, tensor_bytes));
      tensors.push_back(p);
    }
    table.resize(blocks);
    std::iota(table.begin(), table.end(), 0);
    std::shuffle(table.begin(), table.end(), std::mt19937(seed));
    CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&d_table), table.size() * 4));
    CHECK_CUDA(cudaMemcpy(d_table, table.data(), table.size() * 4, cudaMemcpyHostToDevice));
  }
  ~Cache() {
    for (void* p : tensors) (void)cudaFree(p);
    (void)cudaFree(d_table);
  }
  client::PagedKvView View() const {
    client::PagedKvView v;
    for (uint32_t l = 0; l < kLayers; ++l) {
      kernels::PagedKvLayer c;
      c.k = tensors[2 * l];
      c.v = tensors[2 * l + 1];
      c.layout = g_layout;
      c.num_blocks = blocks;
      c.block_size = kBlock;
      c.num_kv_heads = kHeads;
      c.head_dim = kDim;
      c.dtype = Dtype::kBFloat16;
      v.layers.push_back(c);
    }
    v.block_table = d_table;
    v.block_table_len = blocks;
    return v;
  }
  // Token p's K (kv 0) or V of layer l, read back.
  std::vector<uint8_t> Token(uint32_t l, int kv, size_t p) const {
    std::vector<uint8_t> out(kTokenHalf);
    const uint64_t off =
        (static_cast<uint64_t>(table[p / kBlock]) * kBlock + p % kBlock) * kTokenHalf;
    CHECK_CUDA(cudaMemcpy(out.data(), static_cast<uint8_t*>(tensors[2 * l + kv]) + off, kTokenHalf,
                          cudaMemcpyDeviceToHost));
    return out;
  }
  int32_t blocks = 0;
  uint64_t tensor_bytes = 0;
  std::vector<void*> tensors;
  std::vector<int32_t> table;
  int32_t* d_table = nullptr;
};

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int Main(int argc, char** argv) {
  std::string kvdnd = std::getenv("KVDN_KVDND") ? std::getenv("KVDN_KVDND") : KVDN_KVDND_PATH;
  std::vector<size_t> contexts = {2048, 8192, 32768};
  int rounds = 3;
  int lanes = 0;               // the client's default
  uint64_t staging_mib = 512;  // the connector's defaults
  uint64_t device_staging_mib = 256;
  bool register_fetch = false;
  uint64_t gpu_tier_mib = 0;
  int streams = 0;         // the client's automatic value
  bool share_host = true;  // kvdnd --share-host-tier: the connector maps its host tier
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--kvdnd") {
      kvdnd = argv[i + 1];
    } else if (a == "--contexts") {
      contexts.clear();
      for (absl::string_view c : absl::StrSplit(argv[i + 1], ',')) {
        contexts.push_back(std::strtoull(std::string(c).c_str(), nullptr, 10));
      }
    } else if (a == "--host-staging-mib") {
      staging_mib = std::strtoull(argv[i + 1], nullptr, 10);
    } else if (a == "--device-staging-mib") {
      device_staging_mib = std::strtoull(argv[i + 1], nullptr, 10);
    } else if (a == "--gpu-tier-mib") {
      gpu_tier_mib = std::strtoull(argv[i + 1], nullptr, 10);
    } else if (a == "--share-host-tier") {
      share_host = std::atoi(argv[i + 1]) != 0;
    } else if (a == "--register-fetch") {
      register_fetch = std::atoi(argv[i + 1]) != 0;
    } else if (a == "--streams") {
      streams = std::atoi(argv[i + 1]);
    } else if (a == "--lanes") {
      lanes = std::atoi(argv[i + 1]);
    } else if (a == "--rounds") {
      rounds = std::max(1, std::atoi(argv[i + 1]));
    } else if (a == "--layout") {  // nhd (vLLM) or hnd (FlashInfer / SGLang pages)
      const std::string l = argv[i + 1];
      if (l != "nhd" && l != "hnd") {
        std::fprintf(stderr, "--layout: nhd or hnd, not %s\n", l.c_str());
        return 2;
      }
      g_layout = l == "hnd" ? kernels::PagedKvLayout::kHnd : kernels::PagedKvLayout::kNhd;
    } else if (a == "--copy-kernel") {  // auto (bulk copies on sm_90+) or vector
      const std::string k = argv[i + 1];
      if (k != "auto" && k != "vector") {
        std::fprintf(stderr, "--copy-kernel: auto or vector, not %s\n", k.c_str());
        return 2;
      }
      kernels::SetCopyKernel(k == "vector" ? kernels::CopyKernel::kVector
                                           : kernels::CopyKernel::kAuto);
    } else {
      std::fprintf(stderr, "unknown flag %s\n", a.c_str());
      return 2;
    }
  }
  cudaDeviceProp prop{};
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  const uint64_t max_bytes =
      *std::max_element(contexts.begin(), contexts.end()) * 2 * kLayers * kTokenHalf;
  std::printf(
      "GPU: %s; host CPUs: %u; model: 32 layers x 8 kv heads x 128, bf16, 256-token chunks "
      "(32 MiB); cache: %s, 16-token blocks, shuffled\n",
      prop.name, std::thread::hardware_concurrency(), kernels::LayoutName(g_layout));
  // Room for the largest context three times over: the save table keeps a blocking save's
  // prefix (loaded beside the next save) while that save stores another.
  Daemon daemon(kvdnd, 3 * max_bytes + (uint64_t{2} << 30), gpu_tier_mib << 20, share_host);
  if (gpu_tier_mib > 0) {
    std::printf(
        "kvdnd GPU tier: %llu MiB on this GPU; each context is loaded once untimed (which "
        "promotes its chunks into the tier), then timed; no 'fetch alone' (a host reader "
        "would move the chunks back to host memory)\n",
        static_cast<unsigned long long>(gpu_tier_mib));
  }

  client::ClientOptions co;
  co.target = daemon.target();
  co.ns = "bench";
  co.model = ModelSpec{"llama-3-8b", kLayers, kHeads, kDim, Dtype::kBFloat16, kTpc};
  co.receive_pool_bytes = (staging_mib << 20) + (uint64_t{512} << 20);
  co.data_plane_lanes = lanes;
  co.parallel_streams = streams;
  auto c = Must(client::Client::Connect(co), "Connect");
  client::ConnectorOptions conn_opts;
  conn_opts.host_staging_bytes = staging_mib << 20;
  conn_opts.device_staging_bytes = device_staging_mib << 20;
  const auto create_t0 = Clock::now();
  auto conn = Must(client::KvConnector::Create(c.get(), conn_opts), "KvConnector::Create");
  // With kvdnd sharing its host tier, Create maps it and page-locks it for the GPU.
  std::printf("KvConnector::Create: %.1f ms (kvdnd's host tier: %llu MiB, %s)\n",
              Seconds(create_t0, Clock::now()) * 1e3,
              static_cast<unsigned long long>((3 * max_bytes + (uint64_t{2} << 30)) >> 20),
              share_host ? "shared: mapped and page-locked here" : "not shared");
  std::printf(
      "data plane: %s; connector staging: host %llu MiB, device %llu MiB, window %zu chunks; "
      "parallel_streams %d; fetch alone into %s memory\n",
      c->DataPlaneInUse().c_str(), static_cast<unsigned long long>(staging_mib),
      static_cast<unsigned long long>(device_staging_mib), conn->window_chunks(),
      c->options().parallel_streams,
      register_fetch ? "page-locked (cudaHostRegister)" : "pageable");

  // Ceiling 1: page-locked host -> device. The buffer also holds a window of chunks for the GPU
  // part alone.
  const uint64_t h2d_bytes =
      std::max<uint64_t>(uint64_t{256} << 20, conn->window_chunks() * c->PayloadBytes(kTpc));
  void* pinned = nullptr;
  void* dev = nullptr;
  CHECK_CUDA(cudaHostAlloc(&pinned, h2d_bytes, cudaHostAllocDefault));
  CHECK_CUDA(cudaMalloc(&dev, h2d_bytes));
  std::mt19937_64 rng(42);
  for (uint64_t i = 0; i < h2d_bytes / 8; ++i) static_cast<uint64_t*>(pinned)[i] = rng();
  cudaStream_t stream, engine;
  CHECK_CUDA(cudaStreamCreate(&stream));
  CHECK_CUDA(cudaStreamCreate(&engine));
  cudaEvent_t e0, e1;
  CHECK_CUDA(cudaEventCreate(&e0));
  CHECK_CUDA(cudaEventCreate(&e1));
  auto h2d = [&](bool down = false) {
    std::vector<double> gbs;
    for (int r = 0; r < 5; ++r) {
      CHECK_CUDA(cudaEventRecord(e0, stream));
      if (down) {
        CHECK_CUDA(cudaMemcpyAsync(pinned, dev, h2d_bytes, cudaMemcpyDeviceToHost, stream));
      } else {
        CHECK_CUDA(cudaMemcpyAsync(dev, pinned, h2d_bytes, cudaMemcpyHostToDevice, stream));
      }
      CHECK_CUDA(cudaEventRecord(e1, stream));
      CHECK_CUDA(cudaEventSynchronize(e1));
      float ms = 0;
      CHECK_CUDA(cudaEventElapsedTime(&ms, e0, e1));
      gbs.push_back(h2d_bytes / (ms * 1e6));
    }
    return Median(gbs);
  };

  std::printf(
      "\n| context | GiB | H2D ceiling GB/s | fetch alone GB/s | kvdn Load GB/s | Load / "
      "min(ceilings) | layer 0 ready ms | Load ms | GPU part alone GB/s | peer: vLLM "
      "swap-in GB/s | GPU part / peer | Save GB/s |\n|---|---|---|---|---|---|---|---|---|"
      "---|---|---|\n");
  for (size_t ctx : contexts) {
    std::vector<int32_t> tokens(ctx);
    std::mt19937 trng(static_cast<uint32_t>(ctx));
    for (auto& t : tokens) t = static_cast<int32_t>(trng() % 128000);
    const uint64_t bytes = uint64_t{ctx} * 2 * kLayers * kTokenHalf;
    Cache a(ctx, 1, static_cast<const uint8_t*>(pinned), h2d_bytes - 65536);
    Cache b(ctx, 2, nullptr, 0);

    const auto s0 = Clock::now();
    client::SaveResult saved = Must(conn->Save(tokens, a.View(), stream), "Save");
    const double save_s = Seconds(s0, Clock::now());
    if (saved.chunks_stored * kTpc < ctx) {
      std::fprintf(stderr, "saved %zu chunks of %zu tokens\n", saved.chunks_stored, ctx);
      return 1;
    }
    std::vector<double> fetch, load, first, gpu, peer, ceil;
    client::LoadStats slowest_stats;  // of the slowest round's load
    if (gpu_tier_mib > 0) {
      const auto t0 = Clock::now();
      auto l = Must(conn->StartLoad(tokens, b.View()), "StartLoad");
      client::LoadResult got = Must(l->Wait(), "Wait");
      std::printf("  %zu tokens: first load %.1f ms, %zu of %zu chunks from the GPU tier\n", ctx,
                  Seconds(t0, Clock::now()) * 1e3, l->stats().gpu_tier_chunks, got.chunks);
    }
    const TierCounters before = ReadTierCounters(daemon.target());
    for (int r = 0; r < rounds; ++r) {
      ceil.push_back(h2d());
      // The fetch alone, window by window into page-locked pool memory, as the connector does.
      if (gpu_tier_mib > 0) {
        fetch.push_back(0);
      } else {
        const size_t window = conn->window_chunks();
        const uint64_t chunk = c->PayloadBytes(kTpc);
        auto buf = c->AllocateBuffer(window * chunk);
        if (register_fetch) CHECK_CUDA(cudaHostRegister(buf.data(), buf.size(), 0));
        std::vector<MutableByteSpan> spans;
        for (size_t j = 0; j < window; ++j) spans.emplace_back(buf.data() + j * chunk, chunk);
        const auto t0 = Clock::now();
        for (size_t first_chunk = 0; first_chunk * kTpc < ctx; first_chunk += window) {
          const size_t n = std::min(window, (ctx - first_chunk * kTpc + kTpc - 1) / kTpc);
          auto got =
              Must(c->Load(tokens, absl::MakeSpan(spans).subspan(0, n), first_chunk), "Load");
          if (got.chunks != n) {
            std::fprintf(stderr, "fetch: %zu of %zu chunks\n", got.chunks, n);
            return 1;
          }
        }
        fetch.push_back(bytes / Seconds(t0, Clock::now()) / 1e9);
        if (register_fetch) CHECK_CUDA(cudaHostUnregister(buf.data()));
        c->FreeBuffer(buf);
      }
      // The connector.
      {
        const auto t0 = Clock::now();
        auto l = Must(conn->StartLoad(tokens, b.View()), "StartLoad");
        if (auto st = l->WaitLayer(0, engine); !st.ok()) {
          std::fprintf(stderr, "WaitLayer: %s\n", st.ToString().c_str());
          return 1;
        }
        CHECK_CUDA(cudaStreamSynchronize(engine));
        const auto t1 = Clock::now();
        client::LoadResult got = Must(l->Wait(), "Wait");
        const auto t2 = Clock::now();
        if (got.tokens != ctx) {
          std::fprintf(stderr, "loaded %zu of %zu tokens\n", got.tokens, ctx);
          return 1;
        }
        const client::LoadStats lt = l->stats();
        if (r == rounds - 1) {
          std::printf(
              "  %zu tokens, last round: %zu chunks from the GPU tier, %zu out of the mapped host "
              "tier; load %.1f ms = descriptors %.1f + lookup %.1f + fetch %.1f + stall %.1f + "
              "enqueue %.1f ms (host, connector thread)\n",
              ctx, lt.gpu_tier_chunks, lt.host_tier_chunks, Seconds(t0, t2) * 1e3,
              lt.descriptors * 1e3, lt.lookup * 1e3, lt.fetch * 1e3, lt.stall * 1e3,
              lt.enqueue * 1e3);
        }
        if (load.empty() || Seconds(t0, t2) > *std::max_element(load.begin(), load.end())) {
          slowest_stats = lt;
        }
        first.push_back(Seconds(t0, t1) * 1e3);
        load.push_back(Seconds(t0, t2));
      }
      // The connector's GPU part alone: each chunk up in one copy, then one InjectChunkLayer per
      // layer and window, from page-locked memory holding a window of chunks (reused for every
      // window).
      {
        const uint64_t chunk = c->PayloadBytes(kTpc);
        const size_t window = conn->window_chunks();
        void* staging = nullptr;
        void* dev_sources = nullptr;
        CHECK_CUDA(cudaMalloc(&staging, window * chunk));
        CHECK_CUDA(cudaMalloc(&dev_sources, window * sizeof(kernels::ChunkSource)));
        const client::PagedKvView v = b.View();
        CHECK_CUDA(cudaEventRecord(e0, stream));
        for (size_t f = 0; f * kTpc < ctx; f += window) {
          const size_t n = std::min(window, (ctx - f * kTpc) / kTpc);
          std::vector<kernels::ChunkSource> sources;
          for (size_t j = 0; j < n; ++j) {
            CHECK_CUDA(cudaMemcpyAsync(static_cast<uint8_t*>(staging) + j * chunk,
                                       static_cast<const uint8_t*>(pinned) + j * chunk, chunk,
                                       cudaMemcpyHostToDevice, stream));
            sources.push_back({static_cast<uint8_t*>(staging) + j * chunk,
                               static_cast<int32_t>((f + j) * kTpc), static_cast<int32_t>(kTpc)});
          }
          CHECK_CUDA(cudaMemcpyAsync(dev_sources, sources.data(),
                                     sources.size() * sizeof(kernels::ChunkSource),
                                     cudaMemcpyHostToDevice, stream));
          for (uint32_t l = 0; l < kLayers; ++l) {
            if (!kernels::InjectChunkLayer(sources, static_cast<kernels::ChunkSource*>(dev_sources),
                                           static_cast<int32_t>(l), v.layers[l], v.block_table,
                                           v.block_table_len, stream)
                     .ok()) {
              return 1;
            }
          }
        }
        CHECK_CUDA(cudaEventRecord(e1, stream));
        CHECK_CUDA(cudaEventSynchronize(e1));
        float ms = 0;
        CHECK_CUDA(cudaEventElapsedTime(&ms, e0, e1));
        gpu.push_back(bytes / (ms * 1e6));
        CHECK_CUDA(cudaFree(staging));
        CHECK_CUDA(cudaFree(dev_sources));
      }
      // Peer: vLLM's swap-in (one cudaMemcpyAsync per block, K and V, per layer).
      {
        const uint64_t block_bytes = kBlock * kTokenHalf;
        const client::PagedKvView v = b.View();
        const uint64_t src_span = h2d_bytes - block_bytes;
        CHECK_CUDA(cudaEventRecord(e0, stream));
        for (uint32_t l = 0; l < kLayers; ++l) {
          for (int kv = 0; kv < 2; ++kv) {
            uint8_t* dst = static_cast<uint8_t*>(kv == 0 ? v.layers[l].k : v.layers[l].v);
            for (int32_t blk = 0; blk < b.blocks; ++blk) {
              const uint64_t src_off = (static_cast<uint64_t>(blk) * block_bytes) % src_span;
              CHECK_CUDA(cudaMemcpyAsync(dst + static_cast<uint64_t>(b.table[blk]) * block_bytes,
                                         static_cast<const uint8_t*>(pinned) + src_off, block_bytes,
                                         cudaMemcpyHostToDevice, stream));
            }
          }
        }
        CHECK_CUDA(cudaEventRecord(e1, stream));
        CHECK_CUDA(cudaEventSynchronize(e1));
        float ms = 0;
        CHECK_CUDA(cudaEventElapsedTime(&ms, e0, e1));
        peer.push_back(bytes / (ms * 1e6));
      }
    }
    // Correctness of the connector's load (once, after the timed rounds): load again, compare
    // sampled tokens of every layer with the source cache.
    {
      client::LoadResult got = Must(conn->Load(tokens, b.View(), engine), "Load");
      CHECK_CUDA(cudaStreamSynchronize(engine));
      size_t bad = 0;
      for (uint32_t l = 0; l < kLayers; ++l) {
        for (size_t p : {size_t{0}, ctx / 3, ctx / 2 + 7, ctx - 1}) {
          for (int kv = 0; kv < 2; ++kv) bad += a.Token(l, kv, p) != b.Token(l, kv, p);
        }
      }
      std::printf("%s", bad == 0 && got.tokens == ctx ? "" : "CHECK FAILED: loaded KV differs\n");
      if (bad != 0) return 1;
    }
    // Back to back: an engine starting the loads of a batch's requests one after another (the
    // connector runs them in order; each one's host work may overlap the GPU work before it).
    {
      constexpr int kLoads = 16;
      const auto t0 = Clock::now();
      std::vector<std::unique_ptr<client::PagedLoad>> ls;
      for (int i = 0; i < kLoads; ++i) {
        ls.push_back(Must(conn->StartLoad(tokens, b.View()), "StartLoad"));
      }
      for (auto& l : ls) Must(l->Wait(), "Wait");
      std::printf("  %zu tokens, %d loads started back to back: %.2f ms a load\n", ctx, kLoads,
                  Seconds(t0, Clock::now()) * 1e3 / kLoads);
    }
    if (gpu_tier_mib > 0) {
      const TierCounters after = ReadTierCounters(daemon.target());
      std::printf(
          "  %zu tokens, kvdnd over the timed loads: GPU tier promotions %llu, demotions %llu, "
          "evictions %llu, misses %llu; host tier evictions %llu\n",
          ctx, static_cast<unsigned long long>(after.gpu_promotions - before.gpu_promotions),
          static_cast<unsigned long long>(after.gpu_demotions - before.gpu_demotions),
          static_cast<unsigned long long>(after.gpu_evictions - before.gpu_evictions),
          static_cast<unsigned long long>(after.gpu_misses - before.gpu_misses),
          static_cast<unsigned long long>(after.host_evictions - before.host_evictions));
    }
    // The spread of the rounds (the table gives medians): a slow round is a slow request.
    std::printf(
        "  %zu tokens over %d rounds: load ms min %.2f, median %.2f, max %.2f; layer 0 ready ms "
        "median %.2f, max %.2f; the slowest: descriptors %.1f + lookup %.1f + fetch %.1f + stall "
        "%.1f + enqueue %.1f ms\n",
        ctx, rounds, *std::min_element(load.begin(), load.end()) * 1e3, Median(load) * 1e3,
        *std::max_element(load.begin(), load.end()) * 1e3, Median(first),
        *std::max_element(first.begin(), first.end()), slowest_stats.descriptors * 1e3,
        slowest_stats.lookup * 1e3, slowest_stats.fetch * 1e3, slowest_stats.stall * 1e3,
        slowest_stats.enqueue * 1e3);
    const double h2d_ceiling = Median(ceil), fetch_gbs = Median(fetch);
    const double load_gbs = bytes / Median(load) / 1e9;
    std::printf(
        "| %zu | %.2f | %.1f | %.1f | %.1f | %.2f | %.1f | %.1f | %.1f | %.1f | %.2f | %.1f |\n",
        ctx, bytes / double(1 << 30), h2d_ceiling, fetch_gbs, load_gbs,
        // Chunks copied out of kvdnd's mapped host tier are not fetched: the H2D copy bounds them.
        load_gbs / std::min(h2d_ceiling, fetch_gbs > 0 && slowest_stats.host_tier_chunks == 0
                                             ? fetch_gbs
                                             : h2d_ceiling),
        Median(first), Median(load) * 1e3, Median(gpu), Median(peer), Median(gpu) / Median(peer),
        bytes / save_s / 1e9);
    std::fflush(stdout);
  }
  // What a save costs the engine: Save blocks its host thread until every chunk is stored;
  // StartSave returns once the gather is enqueued, and the engine's stream waits on the GPU only
  // for the gather. New tokens each time (every chunk is stored), the same cache. The bound the
  // stream waited for before saves extracted whole windows: the save's bytes copied down.
  // (The copy overwrites the pinned buffer with what `dev` holds: the H2D ceiling's copy of it.)
  const double d2h_gbs = h2d(/*down=*/true);
  std::printf("\nD2H ceiling (page-locked, %llu MiB): %.1f GB/s\n",
              static_cast<unsigned long long>(h2d_bytes >> 20), d2h_gbs);
  std::printf(
      "\n| context | GiB | Save ms (engine blocked) | StartSave returns ms | engine stream free ms "
      "| its bytes copied down at the D2H ceiling ms | stored ms (StartSave to Wait) | blocked: "
      "Save / StartSave+stream | a load meanwhile ms |\n|---|---|---|---|---|---|---|---|---|\n");
  for (size_t ctx : contexts) {
    const uint64_t bytes = uint64_t{ctx} * 2 * kLayers * kTokenHalf;
    Cache a(ctx, 3, static_cast<const uint8_t*>(pinned), h2d_bytes - 65536);
    Cache b(ctx, 4, nullptr, 0);
    cudaEvent_t free_event;
    CHECK_CUDA(cudaEventCreateWithFlags(&free_event, cudaEventDisableTiming));
    std::vector<double> sync_ms, ret_ms, free_ms, stored_ms, load_ms;
    for (int r = 0; r < rounds; ++r) {
      std::vector<int32_t> saved_before;  // by the blocking Save of this round
      for (int mode = 0; mode < 2; ++mode) {
        std::vector<int32_t> tokens(ctx);
        std::mt19937 trng(static_cast<uint32_t>(ctx * 1000 + r * 2 + mode));
        for (auto& t : tokens) t = static_cast<int32_t>(trng() % 128000);
        CHECK_CUDA(cudaStreamSynchronize(stream));
        const auto t0 = Clock::now();
        if (mode == 0) {
          Must(conn->Save(tokens, a.View(), stream), "Save");
          sync_ms.push_back(Seconds(t0, Clock::now()) * 1e3);
          saved_before = tokens;
          continue;
        }
        auto save = Must(conn->StartSave(tokens, a.View(), stream), "StartSave");
        ret_ms.push_back(Seconds(t0, Clock::now()) * 1e3);
        CHECK_CUDA(cudaEventRecord(free_event, stream));
        CHECK_CUDA(cudaEventSynchronize(free_event));
        free_ms.push_back(Seconds(t0, Clock::now()) * 1e3);
        // The engine's next request loads a stored prefix while this save's stores run.
        const auto l0 = Clock::now();
        client::LoadResult got = Must(conn->Load(saved_before, b.View(), stream), "Load");
        CHECK_CUDA(cudaStreamSynchronize(stream));
        load_ms.push_back(Seconds(l0, Clock::now()) * 1e3);
        if (got.tokens != ctx) {
          std::fprintf(stderr, "a load beside a save got %zu of %zu tokens\n", got.tokens, ctx);
          return 1;
        }
        client::SaveResult saved = Must(save->Wait(), "PagedSave::Wait");
        stored_ms.push_back(Seconds(t0, Clock::now()) * 1e3);
        if (saved.chunks_stored * kTpc < ctx) {
          std::fprintf(stderr, "started save stored %zu chunks of %zu tokens\n",
                       saved.chunks_stored, ctx);
          return 1;
        }
      }
    }
    (void)cudaEventDestroy(free_event);
    std::printf("| %zu | %.2f | %.1f | %.2f | %.2f | %.2f | %.1f | %.1f | %.1f |\n", ctx,
                bytes / double(1 << 30), Median(sync_ms), Median(ret_ms), Median(free_ms),
                bytes / d2h_gbs / 1e6, Median(stored_ms), Median(sync_ms) / Median(free_ms),
                Median(load_ms));
    std::fflush(stdout);
  }
  std::printf(
      "\ncheck: every load's sampled tokens (4 positions x K/V x 32 layers) match the "
      "source cache\n");
  return 0;
}

}  // namespace
}  // namespace kvdn

int main(int argc, char** argv) { return kvdn::Main(argc, argv); }
