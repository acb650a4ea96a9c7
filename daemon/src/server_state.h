// Internal to daemon/: what every service of one kvdnd shares — config, store, metrics, and the
// tracking of calls in flight (for drain, the max call duration and per-method metrics).
#ifndef KVDN_DAEMON_SRC_SERVER_STATE_H_
#define KVDN_DAEMON_SRC_SERVER_STATE_H_

#include <grpcpp/server_context.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <string>
#include <thread>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/match.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "kvdn/common/chunk_key.h"
#include "kvdn/common/metrics.h"
#include "kvdn/common/mutex.h"
#include "kvdn/common/thread_pool.h"
#include "kvdn/daemon/membership.h"
#include "kvdn/storage/tiered_store.h"
#include "kvdn/v1/common.pb.h"
#include "kvdn/v1/config.pb.h"
#include "src/auth.h"

namespace kvdn::daemon {

// Every RPC method kvdnd serves, for metrics and for drain (data-plane methods are refused while
// draining; admin ones are not).
enum class Method : int {
  kLookup,
  kPut,
  kGet,
  kReserve,
  kCommit,
  kRelease,
  kGetDescriptor,
  kGetDescriptors,
  kDelete,
  kOpenDataPlane,
  kCloseDataPlane,
  kMapHostTier,
  kUcxGet,  // data-plane requests (UCX active messages, not gRPC calls)
  kUcxPut,
  kPeerLookup,
  kPeerFetch,
  kPeerReplicate,
  kPeerProbe,
  kAdminStats,
  kAdminList,
  kAdminInspect,
  kAdminEvict,
  kAdminConfig,
  kAdminMembers,
  kAdminDrain,
  kCount,
};
inline constexpr int kNumMethods = static_cast<int>(Method::kCount);
const char* MethodService(Method m);
const char* MethodName(Method m);
bool IsAdminMethod(Method m);

// FAILED_PRECONDITION "pid_namespace: <who> is in another pid namespace (<caller>) than kvdnd
// (<kvdnd's>); <why>" when a same-host caller's pid namespace (the inode of its
// /proc/self/ns/pid; 0 unknown) is not kvdnd's: what finds a peer by pid (UCX's shared memory,
// /proc/<pid>/fd) cannot reach across. OK when either is unknown.
absl::Status CheckSamePidNamespace(uint64_t caller, absl::string_view who, absl::string_view why);

// Calls in flight: refuses data-plane calls while draining, cancels calls that run past the
// configured max duration (a watchdog thread), and lets drain wait for the rest. Thread-safe.
class CallTracker {
 public:
  explicit CallTracker(absl::Duration max_call_duration);
  ~CallTracker();
  // UNAVAILABLE while draining (unless admin). Otherwise registers the call; returns its id.
  absl::StatusOr<uint64_t> Begin(grpc::ServerContextBase* ctx, bool admin);
  void End(uint64_t id);
  // From now on Begin refuses data-plane calls. Returns the calls in flight.
  size_t StartDrain();
  bool draining() const { return draining_.load(); }
  // Waits until no data-plane call is in flight; false on timeout.
  bool WaitIdle(absl::Duration timeout);
  // Cancels every call in flight (TryCancel), e.g. after the drain timeout.
  void CancelAll();
  size_t in_flight() const;

 private:
  struct Call {
    grpc::ServerContextBase* ctx;
    absl::Time deadline;
    bool admin;
  };
  void Watchdog();

  const absl::Duration max_call_duration_;
  std::atomic<bool> draining_{false};
  mutable Mutex mu_;
  CondVar cv_;
  absl::flat_hash_map<uint64_t, Call> calls_ ABSL_GUARDED_BY(mu_);
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread watchdog_;
};

class DataPlane;
class PeerRouter;

// True for a call that came in over kvdnd's unix socket (a client on this node): gRPC names such a
// peer "unix:..." and a connection kvdnd's UnixListener accepted and handed over "fd:N".
inline bool IsLocalPeer(absl::string_view peer) {
  return absl::StartsWith(peer, "unix:") || absl::StartsWith(peer, "fd:");
}

struct ServerState {
  ServerState(const v1::DaemonConfig& config, storage::TieredStore* store,
              MetricsRegistry* metrics);

  // PERMISSION_DENIED when the config restricts namespaces and `ns` is not one of them, or when
  // the caller's token does not grant it.
  absl::Status CheckNamespace(const Caller& caller, absl::string_view ns) const;
  // The caller of a call (its token's grants), checked for `method`: UNAUTHENTICATED without a
  // known token, PERMISSION_DENIED when the token lacks kvdn:admin (AdminService) or kvdn:peer
  // (PeerService). Everything allowed when the daemon has no tokens.
  absl::StatusOr<Caller> Authenticate(Method method, const grpc::ServerContextBase& ctx) const;
  // With tokens, PERMISSION_DENIED (naming `field`) when reservation (or lease) `id` is for a
  // namespace the caller may not use: ids are counters, not secrets. An unknown id passes: the
  // operation on it says what it is (unknown, expired).
  absl::Status CheckIdNamespace(const Caller& caller, uint64_t id, bool reservation,
                                absl::string_view field) const;
  // Counts a refused token or namespace (kvdn_auth_failures_total).
  void CountAuthFailure(const absl::Status& st) const;
  // Tenant tokens (auth_tokens_file). The table is swapped whole by ReloadTokens; calls and
  // sessions keep the one they were checked against alive (Caller::table).
  bool auth_enabled() const { return !config.auth_tokens_file().empty(); }
  std::shared_ptr<const TokenTable> Tokens() const;
  void SetTokens(std::shared_ptr<const TokenTable> table);
  // Reads auth_tokens_file again; a file that does not parse leaves the current table in place
  // (logged, kvdn_auth_reloads_total{result="failed"}).
  absl::Status ReloadTokens();
  // The caller a data-plane session's token (its Grants::id) stands for now, after any reload:
  // UNAUTHENTICATED when the token is no longer in the file. Without tokens: everything allowed.
  absl::StatusOr<Caller> CallerFor(const std::string& token_id) const;
  // The addresses actually bound (a configured port 0 becomes the port picked).
  void SetEndpoints(std::string grpc, std::string http);
  std::pair<std::string, std::string> Endpoints() const;
  // Requests and latency of one finished call.
  void RecordCall(Method m, absl::StatusCode code, absl::Duration elapsed);

  const v1::DaemonConfig config;
  storage::TieredStore* const store;
  MetricsRegistry* const metrics;
  const absl::Time started;
  const absl::flat_hash_set<std::string> namespaces;
  CallTracker calls;
  Counter* const bytes_in;
  Counter* const bytes_out;
  Counter* const bad_requests;
  Counter* const auth_unauthenticated;  // kvdn_auth_failures_total{reason="unauthenticated"}
  Counter* const auth_denied;           // kvdn_auth_failures_total{reason="permission_denied"}
  Counter* const auth_reloaded;         // kvdn_auth_reloads_total{result="ok"}
  Counter* const auth_reload_failed;    // kvdn_auth_reloads_total{result="failed"}
  // Leases that gRPC still holds slices of (Get frames point into the arena until sent). The
  // store must outlive them: shutdown waits for this to reach zero.
  std::atomic<int64_t> leases_in_transport{0};
  // Runs what may block (disk reads, moves off the GPU, fetches from peers) for callback
  // handlers, which must not. 8: a fetch waits on the network most of its time.
  ThreadPool blocking_pool{8};
  // The GPU tier pool's CUDA IPC handle, made on first use and the same bytes after (engines
  // open it once per daemon). FAILED_PRECONDITION without a GPU tier.
  absl::StatusOr<std::string> GpuIpcHandle();
  // The UCX data plane; null when off. Set before the services start, constant after.
  DataPlane* data_plane = nullptr;
  // Data-plane transfers whose lease or reservation is held by a transport (shutdown waits).
  std::atomic<int64_t> data_plane_in_flight{0};
  // GpuIpcHandle's cache.
  Mutex gpu_ipc_mu;
  std::string gpu_ipc_handle ABSL_GUARDED_BY(gpu_ipc_mu);

  // Cluster membership (config.etcd_endpoints); `membership` is null while single node or not yet
  // joined. `degraded`: etcd configured but unreachable (or not joined yet).
  struct Cluster {
    mutable Mutex mu;
    std::unique_ptr<Membership> membership ABSL_GUARDED_BY(mu);
    bool configured = false;  // constant after Start
    bool Degraded() const {
      MutexLock lock(&mu);
      return configured && (membership == nullptr || membership->degraded());
    }
  };
  Cluster cluster;
  // Routes local misses to peers and replicates writes (peer_router.h); null without a cluster.
  // Set before the services start, constant after.
  PeerRouter* router = nullptr;
  // True when a local miss should be asked of the peers (a cluster with other members).
  bool HasPeers() const;
  // A client (not a peer) stored `key` here: queue it for its owners.
  void Written(const ChunkKey& key);

 private:
  mutable Mutex tokens_mu_;
  std::shared_ptr<const TokenTable> tokens_ ABSL_GUARDED_BY(tokens_mu_);
  mutable Mutex endpoints_mu_;
  std::string grpc_endpoint_ ABSL_GUARDED_BY(endpoints_mu_);
  std::string http_endpoint_ ABSL_GUARDED_BY(endpoints_mu_);
  std::array<Histogram*, kNumMethods> latency_{};
  // requests_total{service,method,code}: created on first use of each pair.
  std::array<std::array<std::atomic<Counter*>, 17>, kNumMethods> requests_{};
};

// One RPC from admission to its metrics. Usage:
//   CallScope call(state, Method::kGet, ctx);
//   if (!call.admitted().ok()) return call.Finish(call.admitted());
//   ...
//   return call.Finish(status);
class CallScope {
 public:
  CallScope(ServerState& state, Method method, grpc::ServerContextBase* ctx);
  ~CallScope();
  const absl::Status& admitted() const { return admitted_; }
  // Who called (valid once admitted).
  const Caller& caller() const { return caller_; }
  // ServerState::CheckNamespace for this call's caller.
  absl::Status CheckNamespace(absl::string_view ns) const {
    return state_.CheckNamespace(caller_, ns);
  }
  grpc::Status Finish(const absl::Status& status);

 private:
  ServerState& state_;
  const Method method_;
  const absl::Time start_;
  absl::Status admitted_;
  Caller caller_;
  uint64_t id_ = 0;
  bool finished_ = false;
};

// Proto <-> kvdn conversions with precise INVALID_ARGUMENT messages naming `field`.
absl::StatusOr<ChunkKey> KeyFromProto(const v1::ChunkKey& key, absl::string_view field);
void KeyToProto(const ChunkKey& key, v1::ChunkKey* out);
v1::Tier TierToProto(storage::TierKind t);

}  // namespace kvdn::daemon

#endif  // KVDN_DAEMON_SRC_SERVER_STATE_H_
