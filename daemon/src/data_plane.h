// Internal to daemon/: the UCX data plane (proto/kvdn/v1/data_plane.proto). Two kinds of
// transport: shared memory (posix + cma) for clients on this host, what UCX finds (tcp, RDMA) for
// the others; of each, `data_plane_threads` lanes (a UCX transport with its own worker and
// progress thread), with the host arena registered once with each lane. A session lives on one
// lane, the least loaded when it opens. Get replies send the chunk payload straight from the
// leased arena bytes; Put requests are pulled straight into the reserved arena bytes. Sessions are
// opened over gRPC (KvService.OpenDataPlane).
//
// Thread-safety: thread-safe. Requests are handled on the lanes' progress threads; what may block
// (disk reads, eviction that writes to disk, the checksum pass of large chunks) runs on the
// blocking pool.
#ifndef KVDN_DAEMON_SRC_DATA_PLANE_H_
#define KVDN_DAEMON_SRC_DATA_PLANE_H_

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "kvdn/common/chunk_format.h"
#include "kvdn/transfer/ucx_transport.h"
#include "kvdn/v1/data_plane.pb.h"
#include "kvdn/v1/kv_service.pb.h"
#include "src/server_state.h"

namespace kvdn::daemon {

class DataPlane {
 public:
  // Nullptr when config.data_plane_transports is "off". INVALID_ARGUMENT naming
  // data_plane_transports for unknown transports; UNAVAILABLE when UCX cannot start.
  static absl::StatusOr<std::unique_ptr<DataPlane>> Start(ServerState* state);
  // Stops both transports (transfers in flight end; their leases and reservations are released).
  ~DataPlane();

  // KvService.OpenDataPlane / CloseDataPlane. `same_host`: the call came over the unix socket.
  // `caller`: whose token opened it; the session's requests reach that token's namespaces only,
  // come only from the endpoint the session connected, and only that token closes it.
  absl::StatusOr<v1::OpenDataPlaneResponse> Open(const v1::OpenDataPlaneRequest& req,
                                                 bool same_host, const Caller& caller);
  absl::Status Close(uint64_t session_id, const Caller& caller);
  // The worker address a client of that kind connects to (what descriptors carry); empty when
  // no lane serves that kind (remote clients of a kvdnd with TLS, tls.allow_clear_data_plane off).
  std::string AddressFor(bool same_host) const {
    if (same_host && !local_.empty()) return local_[0].transport->address();
    return remote_.empty() ? std::string() : remote_[0].transport->address();
  }
  // Whether clients on other hosts (and peers) are served over UCX: not with TLS on the gRPC
  // listener unless tls.allow_clear_data_plane.
  bool ServesRemote() const { return !remote_.empty(); }
  // "ucx-local:..." and "ucx-remote:...", for GetStats.
  std::vector<std::string> Describe();

 private:
  // One UCX transport (worker + progress thread) and the arena's registration with it.
  struct Lane {
    std::unique_ptr<transfer::UcxTransport> transport;
    std::unique_ptr<transfer::MemoryRegion> arena;
  };
  struct Session {
    transfer::Transport* transport = nullptr;
    const transfer::MemoryRegion* arena = nullptr;
    transfer::PeerId peer = 0;
    int pid = 0;
    std::string name;
    // Opened by another kvdnd (peer_node): its Gets read local tiers only, its Puts are replicas.
    bool from_peer = false;
    std::string token_id;  // the token that opened it (Grants::id); empty without tokens
  };
  // With tokens, whether a request (that arrived on transport `t`) came over its session's own
  // connection: session ids are counters, and another client's request naming this session is
  // dropped (and counted). Peer ids are per transport, so both are compared.
  bool FromItsSession(const Session& s, const transfer::Transport* t,
                      const transfer::Incoming& in) const;
  explicit DataPlane(ServerState* state) : state_(*state) {}

  absl::StatusOr<Session> FindSession(uint64_t id) const;
  // Ends the sessions of same-host clients whose process is gone. Shared memory has no peer
  // failure detection, so a client killed without CloseDataPlane (an engine OOM-killed or
  // restarted) would otherwise keep its session, and enough of them would refuse every new one
  // (max_data_plane_sessions).
  void ReapExitedClients() ABSL_LOCKS_EXCLUDED(mu_);
  // The lane of `lanes` with the fewest sessions.
  const Lane& LeastLoaded(const std::vector<Lane>& lanes) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void OnPeerFailure(transfer::Transport* t, transfer::PeerId peer);
  // A request that arrived on transport `t`.
  void OnGet(transfer::Transport* t, std::unique_ptr<transfer::Incoming> in);
  void OnPut(transfer::Transport* t, std::unique_ptr<transfer::Incoming> in);
  // A part of a chunk's payload (DataPlaneGetRequest.payload_offset/_length).
  struct Part {
    uint64_t offset = 0;
    uint64_t length = 0;  // 0: to the end
  };
  // Serves a leased chunk's payload, or the part of it asked for (the lease is released after the
  // send when `owned`).
  void SendChunk(const Session& s, uint64_t request_id, absl::Time deadline,
                 const storage::Lease& lease, Part part, bool owned, absl::Time start);
  // Receives a Put's payload, or `part` of it, into a reservation of `chunk_bytes` (the encoded
  // chunk); commits it after when `commit`.
  void PutInto(const Session& s, uint64_t request_id, absl::Time deadline,
               std::shared_ptr<std::unique_ptr<transfer::Incoming>> in, std::string chunk_header,
               uint64_t reservation_id, Part part, uint64_t chunk_bytes, bool commit,
               uint64_t checksum, absl::Time start);
  // Commits a reservation whose bytes are all in (the store verifies its checksum), tells the
  // cluster of a new chunk unless `from_peer`, then calls `then`: inline when it is small and at
  // most `in_flight_here` transfers (the caller's own) are in flight, else on the blocking pool.
  void CommitReservation(uint64_t reservation_id, uint64_t chunk_bytes, uint64_t checksum,
                         bool from_peer, int64_t in_flight_here,
                         std::function<void(const absl::Status&)> then,
                         std::optional<uint64_t> payload_hash = std::nullopt);
  // A Put in parts by key (DataPlanePutRequest.parts / put_id): reserved at its first part,
  // committed after its last; every part is answered then, with the Put's result.
  struct Assembly;
  // One part of such a Put has arrived (its request checked against its header).
  void OnPutPart(const Session& s, uint64_t request_id, const v1::DataPlanePutRequest& req,
                 const ChunkKey& key, const ChunkHeader& header,
                 std::shared_ptr<std::unique_ptr<transfer::Incoming>> in, absl::Time deadline,
                 absl::Time start);
  void Reserved(const std::shared_ptr<Assembly>& a, uint64_t put_id,
                const absl::StatusOr<storage::Reservation>& r);
  // Receives one part into the assembly's reservation.
  void ReceivePart(const std::shared_ptr<Assembly>& a, uint64_t put_id, const Session& s,
                   const std::shared_ptr<std::unique_ptr<transfer::Incoming>>& in, uint64_t offset);
  void PartReceived(const std::shared_ptr<Assembly>& a, uint64_t put_id, const absl::Status& st);
  // Answers every part of `a` that arrived with `result`, and forgets `a` once all its parts
  // are answered.
  void EndAssembly(const std::shared_ptr<Assembly>& a, uint64_t put_id, const absl::Status& result,
                   bool stored) ABSL_LOCKS_EXCLUDED(parts_mu_);
  // Ends the assemblies past their deadline with no part moving (DEADLINE_EXCEEDED).
  void SweepAssemblies() ABSL_LOCKS_EXCLUDED(parts_mu_);
  void ReplyGet(const Session& s, uint64_t request_id, const absl::Status& st, absl::Time start);
  void ReplyPut(const Session& s, uint64_t request_id, const absl::Status& st, bool stored,
                absl::Time start);
  absl::Time DeadlineOf(int64_t unix_micros) const;

  ServerState& state_;
  // Constant after Start. local_ may be empty (no shared memory); remote_ is not.
  std::vector<Lane> local_;
  // This process's pid namespace (transfer::NamespaceId), 0 if unreadable.
  std::vector<Lane> remote_;

  mutable Mutex mu_;
  absl::flat_hash_map<uint64_t, Session> sessions_ ABSL_GUARDED_BY(mu_);
  // Sessions being opened (chosen a lane, connecting) per lane: counted by LeastLoaded, so opens
  // that run at once (a client opening its lanes together) spread over the lanes.
  absl::flat_hash_map<const transfer::UcxTransport*, int> opening_ ABSL_GUARDED_BY(mu_);
  uint64_t next_session_ ABSL_GUARDED_BY(mu_) = 1;

  Mutex parts_mu_;
  // By the token of the sessions its parts came over and put_id (the client's choice): a Put's
  // parts may arrive over several sessions of one client, and another token's parts never reach
  // it (without tokens: put_id alone).
  using AssemblyId = std::pair<std::string, uint64_t>;  // (token id, put_id)
  absl::flat_hash_map<AssemblyId, std::shared_ptr<Assembly>> assemblies_ ABSL_GUARDED_BY(parts_mu_);
  // Assemblies in flight per token: the limit (kMaxAssemblies) is each token's, so one tenant
  // holding many Puts in parts open does not refuse the others'.
  absl::flat_hash_map<std::string, size_t> assemblies_of_ ABSL_GUARDED_BY(parts_mu_);
  // Forgets assembly `id`. By value: callers pass the map's own key, which the erase destroys.
  void EraseAssemblyLocked(AssemblyId id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(parts_mu_);
};

}  // namespace kvdn::daemon

#endif  // KVDN_DAEMON_SRC_DATA_PLANE_H_
