// The kvdn client SDK: what an inference engine links to find, save and load KV chunks through the
// local kvdnd.
//
//   kvdn::client::ClientOptions opts;           // unix socket of the local daemon by default
//   opts.ns = "tenant-a";
//   opts.model = {"llama-3-8b", 32, 8, 128, kvdn::Dtype::kBFloat16, 256};
//   auto client = kvdn::client::Client::Connect(opts);
//   size_t cached = (*client)->Lookup(tokens).value();     // tokens whose KV is stored
//   (*client)->Load(tokens, buffers);                      // that KV into the caller's buffers
//
// Chunks. `tokens` is cut into chunks of model.tokens_per_chunk tokens (the last one may be
// shorter); chunk i's payload is its KV laid out layer-major [layer][K|V][token][kv_head][dim]
// (chunk_format.h), ModelSpec-sized: 2 * layers * tokens_in_chunk * kv_heads * head_dim * dtype
// bytes. Keys come from the prefix hash chain in common/, so two processes with the same tokens
// and model find each other's chunks; namespaces (tenants) never share.
//
// Integrity: every chunk loaded is checked against its header's XXH3-64 checksum before Load
// returns it; a mismatch is DATA_LOSS and the buffer must not be used.
//
// Errors: statuses from the daemon pass through (kvdn.v1 documents them); calls are retried only on
// UNAVAILABLE, with backoff, within the call's deadline. Thread-safe: one Client may be shared by
// many threads; the async calls run on the client's own threads.
#ifndef KVDN_CLIENT_CLIENT_H_
#define KVDN_CLIENT_CLIENT_H_

#include <cstdint>
#include <functional>
#include <future>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "absl/types/span.h"
#include "kvdn/common/bytes.h"
#include "kvdn/common/chunk_key.h"
#include "kvdn/common/status.h"

namespace grpc {
class Channel;
class ChannelCredentials;
}  // namespace grpc

namespace kvdn::client {

// TLS to a kvdnd whose TCP listener has it (its config `tls`, daemon/README.md "TLS"). Unix
// socket targets never use TLS (kvdnd serves its socket plain: it does not leave the node). Files
// are PEM, reread every refresh_seconds (rotated certificates apply to new connections).
struct TlsOptions {
  // The CA bundle that signs kvdnd's certificate. Empty: no TLS (the other fields must be too).
  std::string ca_file;
  // This client's certificate chain and key, for a kvdnd with tls.require_client_cert.
  std::string cert_file;
  std::string key_file;
  // The name kvdnd's certificate carries, when it is not the target's host (e.g. dialing a node's
  // IP address while the certificate names "kvdnd.kvdn.svc"). Empty: the target's host.
  std::string server_name;
  uint32_t refresh_seconds = 60;
};

// INVALID_ARGUMENT naming the field (`prefix` + field) for options that cannot work: a
// certificate without its key or without a CA, a server_name without a CA; NOT_FOUND for a file
// that cannot be read.
absl::Status ValidateTlsOptions(const TlsOptions& tls, const std::string& prefix);

struct ClientOptions {
  // gRPC target: "unix:/path/to/kvdnd.sock" or "host:port". Empty: the KVDN_TARGET environment
  // variable when set (a pod spec names its node's socket there), else the local daemon's
  // default unix socket (common/defaults.h).
  std::string target;
  // The tenant and the model whose KV this client moves.
  std::string ns = "default";
  // Bearer token for a kvdnd that authenticates tenants (its config auth_tokens_file), sent with
  // every call; it must grant `ns`. Empty: $KVDN_TOKEN when set, else the contents of the file
  // $KVDN_TOKEN_FILE names (a Kubernetes Secret mounted as a file), else none.
  std::string token;
  ModelSpec model;
  // TLS over a TCP target (ignored for unix sockets).
  TlsOptions tls;
  // Deadline of each call (Lookup, one chunk's Put or Get, ...), retries included.
  absl::Duration deadline = absl::Seconds(10);
  // Attempts for a call that fails with UNAVAILABLE (the first included).
  int max_attempts = 4;
  absl::Duration initial_backoff = absl::Milliseconds(20);
  // Chunks moved concurrently by one Save or Load. 0: max(4, data_plane_lanes) — 8 on a host of
  // 16 cores or more, where 8 in flight moved 1.6-1.8x what 4 did (32 MiB chunks, shared memory).
  int parallel_streams = 0;
  // Bytes per streamed frame (the daemon accepts at most 1 MiB by default).
  size_t frame_bytes = size_t{1} << 20;
  // Threads that run the *Async calls.
  int async_threads = 2;
  // At Connect, raise glibc malloc's thresholds process-wide (kvdn::TuneMalloc,
  // common/malloc_tuning.h: M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD 64 MiB) unless
  // GLIBC_TUNABLES sets a glibc.malloc tunable. With glibc's defaults each gRPC read buffer freed
  // at the end of a Get went back to the kernel and was faulted in again by the next: 4 clients
  // getting 1 MiB values over tcp on the 2-core VM moved 1.2-1.3 GB/s, 2.6-2.8 with it
  // (bench/results/e2e-2026-12-02.md). Cost: each malloc arena may keep up to 64 MiB of freed
  // memory. false: leave malloc as the process set it.
  bool tune_malloc = true;
  // How chunk payloads travel. kAuto: over the daemon's UCX data plane when it offers one (shared
  // memory to a daemon on this host, else tcp/RDMA), else as gRPC frames. kGrpc: gRPC only.
  // kUcx: UCX only (UNAVAILABLE without it). Results are identical bit for bit either way.
  enum class DataPlane { kAuto, kGrpc, kUcx };
  DataPlane data_plane = DataPlane::kAuto;
  // UCX sessions (each a worker with its own progress thread in this process) the payloads of
  // one client are spread over, in turn. The receiver of a shared-memory transfer does its copy
  // on that thread, so one lane caps what a client moves at one core's copy speed (4 GB/s for
  // 32 MiB chunks on the H200 host; 8 lanes: 17 GB/s, bench/results/connector-2026-11-30.md).
  // 0: one per two cores of this host, at most 8 (1 on a 2-core host). At most 64.
  int data_plane_lanes = 0;
  // A UCX Get or Put of a payload at least twice this size is cut into parts of at least this
  // size, moved at once over as many lanes as the chunks moving at the same time leave free (a
  // Get, a PutEncoded, or a Load or Save of one chunk: up to all of them), so that one chunk's
  // copy runs on several cores on both sides; kvdnd assembles a Put's parts, each part's XXH3
  // blocks summed by the thread that received it. One client on the 16-core H200 host, 8 lanes, 4
  // MiB chunks over shared memory: Get whole 4.9 GB/s, in 1 MiB parts (4) 10.1-12.5, in 512 KiB
  // parts (8) 17.6-31; Put whole 2.5, in 1 MiB parts 5.4-8.0, in 512 KiB parts 8.3-12.4
  // (bench/results/transfer-2026-12-01-parts.md, transfer-2026-12-01-blocks-hash.md). A Put of
  // one chunk to a daemon on another host (a target that is not a unix socket) is cut into at
  // least 4 parts even where fewer lanes are free, parts sharing a lane: its parts' transfers and
  // kvdnd's receiving of each overlap (4 clients' 4 MiB Puts over tcp on the 2-core VM, one lane:
  // 4.0-4.4 GB/s whole, 5.0-5.8 in parts; transfer-2026-12-02-tcp-seg.md). 0: whole
  // chunks only. At least 4096.
  uint64_t part_bytes = uint64_t{512} << 10;
  // UCX transports (UCX_TLS names, e.g. "tcp"). Empty: shared memory ("posix,cma") to a daemon on
  // a unix socket, UCX's own choice otherwise.
  std::string ucx_transports;
  // Bytes of registered memory (huge pages where the kernel gives them, faulted in at Connect) the
  // client keeps for payloads (AllocateBuffer): Gets into it and Saves/Puts from it take UCX's
  // registered path. 0: none.
  uint64_t receive_pool_bytes = 0;
};

// Where a chunk lies for a zero-copy read (KvService.GetDescriptor): valid until Release or
// `expires`, on the daemon whose UCX worker is `worker_address`.
struct TransferDescriptor {
  uint64_t lease_id = 0;
  uint64_t size = 0;  // encoded chunk bytes
  std::string worker_address;
  absl::Time expires;
  // Set when the chunk is leased in the daemon's GPU tier (AcquireDescriptor with accept_gpu):
  // the pool's CUDA IPC handle (64 bytes), the encoded chunk's offset in it, the GPU's UUID.
  struct Gpu {
    std::string ipc_handle;
    uint64_t offset = 0;
    std::string device_uuid;
  };
  std::optional<Gpu> gpu;
  // Set when the chunk lies in the daemon's host tier and kvdnd shares it (share_host_tier): the
  // arena's id (Client::MapHostTier's) and the encoded chunk's offset in it; else 0.
  uint64_t host_arena = 0;
  uint64_t host_offset = 0;
};

// The daemon's host tier, mapped read-only into this process (Client::MapHostTier).
struct HostTierMapping {
  ByteSpan bytes;
  uint64_t arena_id = 0;  // TransferDescriptor.host_arena of the chunks that lie in it
};

struct SaveResult {
  size_t chunks_stored = 0;   // sent and committed now
  size_t chunks_present = 0;  // already stored (by anyone): skipped
  uint64_t bytes_sent = 0;
};

struct LoadResult {
  size_t tokens = 0;  // tokens whose KV is now in the caller's buffers (from the first chunk on)
  size_t chunks = 0;
  uint64_t bytes = 0;  // payload bytes loaded
};

class Client {
 public:
  // Checks the options (INVALID_ARGUMENT naming the field) and creates the channel; connecting is
  // lazy, so an absent daemon shows as UNAVAILABLE on the first call.
  static absl::StatusOr<std::unique_ptr<Client>> Connect(const ClientOptions& options);
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // The options, automatic values (0) replaced by what was chosen.
  const ClientOptions& options() const;
  // Payload bytes of a chunk of `tokens_in_chunk` tokens for this client's model.
  uint64_t PayloadBytes(uint32_t tokens_in_chunk) const;
  // Payload bytes of each chunk covering `num_tokens` tokens (the last may be shorter).
  std::vector<uint64_t> ChunkPayloadSizes(size_t num_tokens) const;

  // Tokens, from the start of `tokens`, whose KV is stored.
  absl::StatusOr<size_t> Lookup(absl::Span<const int32_t> tokens);
  // Stores the KV of payloads.size() chunks of `tokens` from chunk `first_chunk` on (chunks
  // already stored are skipped). INVALID_ARGUMENT: more payloads than chunks from first_chunk,
  // or a payload of the wrong size.
  absl::StatusOr<SaveResult> Save(absl::Span<const int32_t> tokens,
                                  absl::Span<const ByteSpan> payloads, size_t first_chunk = 0);
  // Loads the longest stored run of chunks of `tokens` from chunk `first_chunk` on (with
  // first_chunk 0: the longest stored prefix), at most buffers.size() chunks, chunk
  // first_chunk + j into buffers[j] (sized as ChunkPayloadSizes says, else INVALID_ARGUMENT;
  // a first_chunk past the chunks too). The run is stored only if every chunk before it is
  // (the prefix hash chain). A chunk evicted between lookup and load ends the run there.
  // DATA_LOSS: a chunk failed verification.
  // `on_chunk(j)`, when given, is called as soon as buffers[j] holds its verified chunk, from
  // whichever of the client's threads loaded it (concurrently with other calls of it), before
  // Load returns: a caller can start on a chunk while the others are still in flight.
  absl::StatusOr<LoadResult> Load(absl::Span<const int32_t> tokens,
                                  absl::Span<const MutableByteSpan> buffers, size_t first_chunk = 0,
                                  const std::function<void(size_t)>& on_chunk = nullptr);

  // The same, on the client's threads. The spans must stay valid until the future is ready.
  std::future<absl::StatusOr<size_t>> LookupAsync(std::vector<int32_t> tokens);
  std::future<absl::StatusOr<SaveResult>> SaveAsync(std::vector<int32_t> tokens,
                                                    std::vector<ByteSpan> payloads);
  std::future<absl::StatusOr<LoadResult>> LoadAsync(std::vector<int32_t> tokens,
                                                    std::vector<MutableByteSpan> buffers);

  // Whole encoded chunks (header + payload) by key, for tools and tests. PutEncoded returns true
  // if stored now, false if it was already stored. GetEncoded returns the chunk size;
  // OUT_OF_RANGE when dst is too small.
  absl::StatusOr<bool> PutEncoded(const ChunkKey& key, ByteSpan encoded);
  absl::StatusOr<uint64_t> GetEncoded(const ChunkKey& key, MutableByteSpan dst);
  absl::Status Delete(const ChunkKey& key);

  // The zero-copy read path: lease a chunk (lease: how long, 0 for the daemon's default), read it
  // over UCX into dst (OUT_OF_RANGE when too small; FAILED_PRECONDITION for a descriptor of another
  // daemon or without UCX; NOT_FOUND for an unknown lease; ABORTED when it expired), release it.
  // With accept_gpu (an engine on this node, reading device memory through CUDA IPC), a chunk in
  // the daemon's GPU tier is leased there (TransferDescriptor.gpu).
  absl::StatusOr<TransferDescriptor> AcquireDescriptor(const ChunkKey& key, absl::Duration lease,
                                                       bool accept_gpu = false);
  // Leases many chunks in one call, from the first key to the first that is not stored (or, with
  // gpu_only, that the daemon's GPU tier does not hold): the descriptors of that run, in order.
  // At most 4096 keys. On an error no lease is kept.
  absl::StatusOr<std::vector<TransferDescriptor>> AcquireDescriptors(
      absl::Span<const ChunkKey> keys, absl::Duration lease, bool accept_gpu = false,
      bool gpu_only = false);
  absl::StatusOr<uint64_t> ReadDescriptor(const TransferDescriptor& d, MutableByteSpan dst);
  absl::Status ReleaseDescriptor(const TransferDescriptor& d);
  // Releases many leases in one call (AcquireDescriptors'); at most 4096. Every one is released;
  // the first failure's status (NOT_FOUND, ABORTED: expired) is returned, naming the lease.
  absl::Status ReleaseDescriptors(absl::Span<const TransferDescriptor> ds);

  // Maps the daemon's host tier read-only into this process (KvService.MapHostTier; kvdnd run
  // with share_host_tier, this client on its unix socket, in its pid namespace, with
  // a token that reaches every namespace), so that an engine copies chunks it leases
  // (AcquireDescriptors; TransferDescriptor.host_arena / host_offset) to its GPU straight out of
  // the daemon's memory. The first call maps, later ones return the same mapping; with `refresh`,
  // the daemon is asked again and, when its arena changed (kvdnd restarted), the new one is mapped
  // and the old one unmapped (its users must be done with it). The mapping lives as long as the
  // client. FAILED_PRECONDITION, PERMISSION_DENIED as MapHostTier says; INTERNAL naming what failed
  // to open or map.
  absl::StatusOr<HostTierMapping> MapHostTier(bool refresh = false);

  // What payloads travel over now: "grpc", or "ucx: <transports>".
  std::string DataPlaneInUse();
  // A buffer from the registered pool (receive_pool_bytes): loads into it and saves from it need
  // no memory registration. Empty span when the pool has no room (or there is no pool). Return it
  // with FreeBuffer.
  MutableByteSpan AllocateBuffer(size_t size);
  void FreeBuffer(MutableByteSpan buffer);
  // The whole registered pool that AllocateBuffer hands out (empty without one), e.g. for an
  // engine connector to page-lock it for the GPU's copy engines (cudaHostRegister).
  MutableByteSpan PoolRegion() const;

  // The channel, for tools that call other services (kvdnctl). It does not add the token: calls
  // on it carry `authorization: Bearer <options().token>` only if the caller adds it (or use
  // MakeChannel(target, token)).
  std::shared_ptr<grpc::Channel> channel() const;

 private:
  struct Impl;
  explicit Client(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The target an empty one stands for: $KVDN_TARGET when set and not empty, else
// "unix:<the local daemon's default socket>". A non-empty target is returned as is.
std::string ResolveTarget(const std::string& target);

// The token an empty one stands for: $KVDN_TOKEN when set and not empty, else the contents of the
// file $KVDN_TOKEN_FILE names (surrounding white space trimmed), else none. A non-empty token is
// returned as is. NOT_FOUND when $KVDN_TOKEN_FILE names a file that cannot be read;
// INVALID_ARGUMENT when the token is empty there or holds white space or control characters.
absl::StatusOr<std::string> ResolveToken(const std::string& token);

// The gRPC channel the client uses for `target` (unix socket or host:port; ResolveTarget), with
// kvdn's message size limits; with a `token`, every call on it carries
// `authorization: Bearer <token>`; over TLS when `tls.ca_file` is set and the target is not a
// unix socket. REQUIRES: ValidateTlsOptions(tls).ok().
std::shared_ptr<grpc::Channel> MakeChannel(const std::string& target, const std::string& token = "",
                                           const TlsOptions& tls = {});

// gRPC channel credentials verifying the server against tls.ca_file and presenting
// tls.cert_file/key_file when set, the files watched (reread every refresh_seconds); the caller
// sets tls.server_name as the channel's target name override. REQUIRES: tls.ca_file set and
// ValidateTlsOptions(tls).ok(). Also what kvdnd dials etcd with (daemon/src/etcd_client.cc).
std::shared_ptr<grpc::ChannelCredentials> MakeTlsCredentials(const TlsOptions& tls);

}  // namespace kvdn::client

#endif  // KVDN_CLIENT_CLIENT_H_
