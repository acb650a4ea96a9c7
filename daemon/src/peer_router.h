// Internal to daemon/: what makes one kvdnd part of a cluster (ARCHITECTURE.md "Cluster") once it
// has joined — reads that miss locally go to the chunk's owners, writes go to them afterwards.
//
// Placement: rendezvous hashing (placement.h) over the live members gives each key's owners, the
// `replicas` highest-ranked nodes. Reads ask those and one node more: right after a member joins,
// the chunks it comes to own are still on the node ranked just below it.
//
// Read-ahead: the chunks a Lookup finds on peers are fetched at once, in the background (the engine
// loads them next; a Lookup is the first it says of a request), so the client's Gets find them
// here or in flight; config peer_prefetch_disabled turns it off.
//
// Reads (Fetch, Probe): each candidate gets at most one peer_timeout_ms; a peer that fails
// (unreachable, timed out, its session broken) is then skipped for membership_ttl_ms — by then
// membership has dropped it if it is gone — so a dead or partitioned peer costs one deadline,
// not one per chunk. A fetched chunk is stored in the local host tier (edge caching), verified.
// Payloads travel over the peers' UCX data plane (a session per peer, its Gets land straight in
// the reserved arena bytes), or PeerService.Fetch where a peer serves no UCX.
//
// Writes (Replicate): a chunk written by a client here is queued for each of its owners that is
// not this node; two workers send them (UCX Put from the leased arena bytes, or
// PeerService.Replicate). The queue is bounded (replication_queue_limit): past it a write is not
// replicated — counted, never blocking the writer. Writes for a peer that is failing are dropped,
// counted. No backfill: a node that (re)joins receives only new writes, at the workers' pace, and
// fills from reads.
//
// Thread-safety: thread-safe. Fetch and Probe block: call them where blocking is allowed.
#ifndef KVDN_DAEMON_SRC_PEER_ROUTER_H_
#define KVDN_DAEMON_SRC_PEER_ROUTER_H_

#include <atomic>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/types/span.h"
#include "kvdn/common/chunk_key.h"
#include "kvdn/common/metrics.h"
#include "kvdn/common/mutex.h"
#include "kvdn/common/thread_pool.h"
#include "kvdn/daemon/membership.h"
#include "kvdn/daemon/placement.h"
#include "src/server_state.h"

namespace kvdn::client {
class DataPlaneClient;
}  // namespace kvdn::client

namespace kvdn::daemon {

class PeerRouter {
 public:
  explicit PeerRouter(ServerState* state);
  // Stop().
  ~PeerRouter();
  PeerRouter(const PeerRouter&) = delete;
  PeerRouter& operator=(const PeerRouter&) = delete;

  // A new membership view (this node included or not). Peers that left are forgotten.
  void SetMembers(const std::map<std::string, MemberRecord>& members);
  // auth_tokens_file was read again: peers whose channel presents another peer token than the
  // file's first kvdn:peer token now get a new channel (the old one closes with its last call),
  // so the peer token rotates without a restart.
  void OnTokensChanged();
  // Members other than this node are known.
  bool HasPeers() const;

  // Copies `key` from the first candidate peer that holds it into the local host tier. NOT_FOUND
  // when none does or none answered by `deadline` (a clean miss: the engine recomputes).
  absl::Status Fetch(const ChunkKey& key, absl::Time deadline);
  // Read-ahead: starts fetching `keys` (found on peers by a Lookup: the engine loads them next) in
  // the background, a bounded number at a time; Gets for them then wait for those fetches.
  void Prefetch(absl::Span<const ChunkKey> keys, absl::Time deadline);
  // How many of chain[from], chain[from + 1], ... in a row this node or the peers hold (the peers
  // asked in parallel, one call each, for what is not here). `tiers` gets where each of them is:
  // this node's fastest tier, or TIER_REMOTE.
  size_t Probe(absl::Span<const ChunkKey> chain, size_t from, absl::Time deadline,
               std::vector<v1::Tier>* tiers);
  // Queues a chunk a client wrote here for its owners.
  void Replicate(const ChunkKey& key);
  size_t queue_depth() const;

  // Chunks each peer holds, by node, for those that answered by `deadline` (failing peers are not
  // asked).
  std::map<std::string, uint64_t> PeerChunks(absl::Time deadline);

  // Ends the replication workers (queued writes are dropped) and the peer sessions.
  void Stop();

  struct Peer;

 private:
  struct View {
    std::vector<std::string> members;  // placement's input, this node included
    std::unique_ptr<Placement> placement;
    absl::flat_hash_map<std::string, std::shared_ptr<Peer>> peers;  // not this node
  };
  struct Inflight;
  struct Job {
    ChunkKey key;
    std::shared_ptr<Peer> peer;
    int retries = 0;                        // times the owner answered ABORTED
    absl::Time due = absl::InfinitePast();  // not sent before this
  };

  std::shared_ptr<const View> view() const;
  // The token this kvdnd presents to peers now (the tokens file's first kvdn:peer; empty without).
  std::string PeerToken() const;
  // Peers that may hold `key`, best first, skipping failing ones.
  std::vector<std::shared_ptr<Peer>> Candidates(const View& v, const ChunkKey& key) const;
  // The UCX session with `peer`, opened if need be; nullptr: use gRPC (this node or the peer
  // serves no UCX, or opening failed within the last few seconds).
  std::shared_ptr<client::DataPlaneClient> SessionWith(Peer& peer, absl::Time deadline);
  // Fetch without the in-flight bookkeeping.
  absl::Status FetchNow(const ChunkKey& key, absl::Time deadline);
  // One peer's copy into the store. `held_here` is set when this node's store refused it because
  // the key is stored here or being written here (by a Put or another fetch): no peer can help.
  absl::Status FetchFrom(Peer& peer, const ChunkKey& key, absl::Time deadline, bool* held_here);
  absl::Status FetchGrpc(Peer& peer, const ChunkKey& key, absl::Time deadline, bool* held_here);
  absl::Status Send(Peer& peer, const ChunkKey& key, absl::Time deadline);
  struct ProbeCall;
  void ProbeAll(std::vector<std::unique_ptr<ProbeCall>>& calls, absl::Time deadline);
  // Marks a peer failing after an error that says it is unreachable; true if it was such an error.
  bool MaybeSuspect(Peer& peer, const absl::Status& st);
  void Work();

  ServerState& state_;
  const std::string self_;
  const size_t replicas_;
  const absl::Duration peer_timeout_;
  const absl::Duration suspect_for_;

  Counter* const fetch_hit_;
  Counter* const fetch_miss_;
  Counter* const fetch_error_;
  Counter* const fetch_bytes_;
  Counter* const repl_sent_;
  Counter* const repl_present_;
  Counter* const repl_failed_;
  Counter* const repl_dropped_;
  Counter* const repl_retries_;
  Counter* const prefetched_;
  Counter* const prefetch_skipped_;
  Counter* const peer_failures_;

  // Held through SetMembers and OnTokensChanged (each builds the next view from the last), taken
  // before mu_.
  Mutex update_mu_;
  mutable Mutex mu_;
  std::shared_ptr<const View> view_ ABSL_GUARDED_BY(mu_);
  std::deque<Job> queue_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<ChunkKey, std::shared_ptr<Inflight>> inflight_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  CondVar cv_;
  std::vector<std::thread> workers_;

  // Read-ahead fetches waiting or running, at most kMaxPrefetchQueued.
  static constexpr int kMaxPrefetchQueued = 256;
  std::atomic<int> prefetch_queued_{0};
  ThreadPool prefetch_pool_{4};  // last: its threads end before the rest goes
};

}  // namespace kvdn::daemon

#endif  // KVDN_DAEMON_SRC_PEER_ROUTER_H_
