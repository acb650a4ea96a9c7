#include "src/peer_router.h"

#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kvdn/client/client.h"
#include "kvdn/client/data_plane_client.h"
#include "kvdn/common/chunk_format.h"
#include "kvdn/proto/grpc_status.h"
#include "kvdn/v1/peer_service.grpc.pb.h"
#include "src/data_plane.h"

namespace kvdn::daemon {

// Sessions (each a UCX worker, progress thread and connection) kept with each peer, used in turn.
// Several large transfers in flight on one UCX tcp connection went slower together than one at a
// time (bench/results/cluster-2026-11-23.md): one transfer per connection at a time is what
// ucx_perftest measures, so in-flight fetches and replicas spread over this many.
constexpr int kSessionsPerPeer = 4;

// How this kvdnd dials its peers: with TLS when its own listener has it (they share one CA and
// certificate name), presenting its certificate (for peers with tls.require_client_cert).
client::TlsOptions PeerTls(const v1::DaemonConfig& config) {
  client::TlsOptions t;
  if (config.tls().cert_file().empty()) return t;
  t.ca_file = config.tls().ca_file();
  t.cert_file = config.tls().cert_file();
  t.key_file = config.tls().key_file();
  t.server_name = config.tls().server_name();
  t.refresh_seconds = config.tls().refresh_seconds();
  return t;
}

// One other member: its gRPC stubs and, once opened, UCX data-plane sessions with it.
struct PeerRouter::Peer : std::enable_shared_from_this<PeerRouter::Peer> {
  // `token`: what this kvdnd presents to it (auth_tokens_file's kvdn:peer token; empty without);
  // `tls`: the config's TLS, as a client of the peer (verifies it against tls.ca_file, presents
  // this kvdnd's certificate).
  Peer(std::string n, std::string a, std::string t, const client::TlsOptions& tls)
      : node(std::move(n)),
        address(std::move(a)),
        token(std::move(t)),
        channel(client::MakeChannel(address, token, tls)),
        peer_stub(v1::PeerService::NewStub(channel)),
        kv_stub(v1::KvService::NewStub(channel)) {}

  bool Failing() const { return absl::ToUnixMicros(absl::Now()) < failing_until.load(); }

  const std::string node;
  const std::string address;  // host:port of its gRPC
  const std::string token;    // what its channel presents (the peer token when it was made)
  const std::shared_ptr<grpc::Channel> channel;
  const std::unique_ptr<v1::PeerService::Stub> peer_stub;
  const std::unique_ptr<v1::KvService::Stub> kv_stub;
  std::atomic<int64_t> failing_until{0};  // Unix micros

  Mutex mu;  // held while a session opens: one attempt at a time
  std::array<std::shared_ptr<client::DataPlaneClient>, kSessionsPerPeer> sessions
      ABSL_GUARDED_BY(mu);
  std::atomic<uint32_t> next_session{0};
  absl::Time grpc_only_until ABSL_GUARDED_BY(mu) = absl::InfinitePast();
};

namespace {

constexpr int kWorkers = 2;
// A replication the owner answers ABORTED (it is writing the key itself) is sent again after
// 50, 100, ... 6400 ms (12.75 s in all: a slow client's 32 MiB write, with room to spare), then
// counted failed.
constexpr int kMaxReplicationRetries = 8;
constexpr absl::Duration kReplicationRetryBase = absl::Milliseconds(50);
// After a peer refused or failed to open a UCX session: gRPC for this long, then try again.
constexpr absl::Duration kSessionRetry = absl::Seconds(5);

void SetKey(const ChunkKey& key, v1::ChunkKey* out) { client::KeyToProto(key, out); }

grpc::ClientContext* WithDeadline(grpc::ClientContext* ctx, absl::Time deadline) {
  ctx->set_deadline(absl::ToChronoTime(deadline));
  return ctx;
}

// Errors that say the peer itself is unreachable or broken (not that it lacks the chunk).
bool IsPeerFailure(const absl::Status& st) {
  switch (st.code()) {
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kDeadlineExceeded:
    case absl::StatusCode::kCancelled:
    case absl::StatusCode::kUnknown:
    case absl::StatusCode::kInternal:
      return true;
    default:
      return false;
  }
}

// The local store refused a fetched chunk because the key is stored here (ALREADY_EXISTS) or
// another write of it is in progress here (ABORTED).
bool HeldHere(const absl::Status& st) { return absl::IsAlreadyExists(st) || absl::IsAborted(st); }

}  // namespace

PeerRouter::PeerRouter(ServerState* state)
    : state_(*state),
      self_(state->config.node_name()),
      replicas_(std::max<uint32_t>(1, state->config.replicas())),
      peer_timeout_(absl::Milliseconds(state->config.peer_timeout_ms())),
      suspect_for_(absl::Milliseconds(state->config.membership_ttl_ms())),
      fetch_hit_(state->metrics->AddCounter(
          "kvdn_peer_fetch_total", "Local misses asked of peers, by result.", {{"result", "hit"}})),
      fetch_miss_(state->metrics->AddCounter("kvdn_peer_fetch_total",
                                             "Local misses asked of peers, by result.",
                                             {{"result", "miss"}})),
      fetch_error_(state->metrics->AddCounter("kvdn_peer_fetch_total",
                                              "Local misses asked of peers, by result.",
                                              {{"result", "error"}})),
      fetch_bytes_(state->metrics->AddCounter(
          "kvdn_peer_fetch_bytes_total", "Chunk bytes fetched from peers into the host tier.")),
      repl_sent_(state->metrics->AddCounter("kvdn_replication_total",
                                            "Writes queued for an owner, by outcome.",
                                            {{"result", "sent"}})),
      repl_present_(state->metrics->AddCounter("kvdn_replication_total",
                                               "Writes queued for an owner, by outcome.",
                                               {{"result", "present"}})),
      repl_failed_(state->metrics->AddCounter("kvdn_replication_total",
                                              "Writes queued for an owner, by outcome.",
                                              {{"result", "failed"}})),
      repl_dropped_(state->metrics->AddCounter("kvdn_replication_total",
                                               "Writes queued for an owner, by outcome.",
                                               {{"result", "dropped"}})),
      repl_retries_(state->metrics->AddCounter(
          "kvdn_replication_retries_total",
          "Replications sent again because the owner was writing the key itself (ABORTED).")),
      prefetched_(state->metrics->AddCounter(
          "kvdn_peer_prefetch_total",
          "Chunks a Lookup found on peers and fetched here before the client asked for them.")),
      prefetch_skipped_(state->metrics->AddCounter(
          "kvdn_peer_prefetch_skipped_total",
          "Chunks a Lookup found on peers but left for Get (the read-ahead queue was full).")),
      peer_failures_(state->metrics->AddCounter(
          "kvdn_peer_failures_total",
          "Calls to a peer that found it unreachable or broken (it is then skipped for a TTL).")),
      view_(std::make_shared<View>()) {
  state->metrics->AddCollector([this](MetricsWriter& w) {
    w.Gauge("kvdn_replication_queue_depth", "Writes waiting to be replicated to their owners.", {},
            static_cast<double>(queue_depth()));
  });
  for (int i = 0; i < kWorkers; ++i) workers_.emplace_back([this] { Work(); });
}

PeerRouter::~PeerRouter() { Stop(); }

void PeerRouter::Stop() {
  {
    MutexLock lock(&mu_);
    if (stop_) return;
    stop_ = true;
    repl_dropped_->Inc(queue_.size());
    queue_.clear();
  }
  cv_.SignalAll();
  for (std::thread& t : workers_) t.join();
  MutexLock lock(&mu_);
  view_ = std::make_shared<View>();  // sessions close as their last user lets go
}

std::string PeerRouter::PeerToken() const {
  const std::shared_ptr<const TokenTable> tokens = state_.Tokens();
  return tokens != nullptr ? tokens->peer_token() : std::string();
}

void PeerRouter::SetMembers(const std::map<std::string, MemberRecord>& members) {
  MutexLock update(&update_mu_);
  auto v = std::make_shared<View>();
  std::shared_ptr<const View> old = view();
  const std::string token = PeerToken();
  for (const auto& [node, record] : members) {
    v->members.push_back(node);
    if (node == self_) continue;
    auto it = old->peers.find(node);
    if (it != old->peers.end() && it->second->address == record.grpc_address &&
        it->second->token == token) {
      v->peers[node] = it->second;  // keep its channel and session
    } else {
      v->peers[node] =
          std::make_shared<Peer>(node, record.grpc_address, token, PeerTls(state_.config));
    }
  }
  if (std::find(v->members.begin(), v->members.end(), self_) == v->members.end()) {
    v->members.push_back(self_);  // this node serves whether or not etcd lists it now
  }
  v->placement = std::make_unique<Placement>(v->members);
  MutexLock lock(&mu_);
  view_ = std::move(v);
}

void PeerRouter::OnTokensChanged() {
  MutexLock update(&update_mu_);
  std::shared_ptr<const View> old = view();
  const std::string token = PeerToken();
  auto v = std::make_shared<View>();
  v->members = old->members;
  size_t renewed = 0;
  for (const auto& [node, peer] : old->peers) {
    if (peer->token == token) {
      v->peers[node] = peer;
    } else {  // a new channel presenting the new token; the old one closes with its last user
      v->peers[node] = std::make_shared<Peer>(node, peer->address, token, PeerTls(state_.config));
      ++renewed;
    }
  }
  if (renewed == 0) return;
  v->placement = std::make_unique<Placement>(v->members);
  spdlog::info("cluster: the peer token changed; new channels to {} peer(s)", renewed);
  MutexLock lock(&mu_);
  view_ = std::move(v);
}

std::shared_ptr<const PeerRouter::View> PeerRouter::view() const {
  MutexLock lock(&mu_);
  return view_;
}

bool PeerRouter::HasPeers() const { return !view()->peers.empty(); }

size_t PeerRouter::queue_depth() const {
  MutexLock lock(&mu_);
  return queue_.size();
}

std::vector<std::shared_ptr<PeerRouter::Peer>> PeerRouter::Candidates(const View& v,
                                                                      const ChunkKey& key) const {
  std::vector<std::shared_ptr<Peer>> out;
  if (v.placement == nullptr) return out;
  for (const std::string& node : v.placement->Owners(key, replicas_ + 1)) {
    auto it = v.peers.find(node);
    if (it != v.peers.end() && !it->second->Failing()) out.push_back(it->second);
  }
  return out;
}

bool PeerRouter::MaybeSuspect(Peer& peer, const absl::Status& st) {
  if (!IsPeerFailure(st)) return false;
  peer_failures_->Inc();
  const bool was = peer.Failing();
  peer.failing_until.store(absl::ToUnixMicros(absl::Now() + suspect_for_));
  if (!was) {
    spdlog::warn("cluster: peer {} ({}) failed: {}; skipping it for {}", peer.node, peer.address,
                 st.ToString(), absl::FormatDuration(suspect_for_));
  }
  std::array<std::shared_ptr<client::DataPlaneClient>, kSessionsPerPeer> sessions;
  {
    MutexLock lock(&peer.mu);
    sessions.swap(peer.sessions);  // reopened once it answers again
  }
  // Closing them tells the peer (calls that may wait out their deadline): not on this thread. The
  // sessions call through the peer's stub: it stays alive until they are closed.
  state_.blocking_pool.Submit([s = std::move(sessions), keep = peer.shared_from_this()]() mutable {
    for (auto& session : s) session.reset();
  });
  return true;
}

std::shared_ptr<client::DataPlaneClient> PeerRouter::SessionWith(Peer& peer, absl::Time deadline) {
  storage::HostTier* host = state_.store->host_tier();
  if (state_.data_plane == nullptr || host == nullptr) return nullptr;
  // With TLS, payloads go to peers over gRPC inside it (UCX would carry them in clear).
  if (!state_.data_plane->ServesRemote()) return nullptr;
  const uint32_t i = peer.next_session.fetch_add(1) % kSessionsPerPeer;
  MutexLock lock(&peer.mu);
  std::shared_ptr<client::DataPlaneClient>& session = peer.sessions[i];
  if (session != nullptr && !session->healthy()) session.reset();
  if (session == nullptr && absl::Now() >= peer.grpc_only_until) {
    const std::string& tls = state_.config.data_plane_transports();
    auto opened =
        client::DataPlaneClient::Open(peer.kv_stub.get(), /*same_host=*/false,
                                      tls == "auto" ? "" : tls, deadline - absl::Now(), self_);
    absl::Status st = opened.status();
    // The arena registered with the session: fetched payloads land in it, replicas leave from it.
    if (st.ok()) st = (*opened)->RegisterPool(host->arena_base(), host->capacity_bytes());
    if (st.ok()) {
      session = std::move(*opened);
    } else {
      peer.grpc_only_until = absl::Now() + kSessionRetry;
      spdlog::info("cluster: no UCX session with {} ({}); gRPC for {}", peer.node, st.ToString(),
                   absl::FormatDuration(kSessionRetry));
    }
  }
  return session;
}

// ---- reads ----

struct PeerRouter::Inflight {
  Mutex mu;
  CondVar cv;
  bool done ABSL_GUARDED_BY(mu) = false;
  absl::Status status ABSL_GUARDED_BY(mu);
};

absl::Status PeerRouter::Fetch(const ChunkKey& key, absl::Time deadline) {
  // One fetch per key at a time: a Get that comes while a read-ahead (or another Get) fetches the
  // chunk waits for that one instead of racing it for the reservation.
  std::shared_ptr<Inflight> f;
  bool mine = false;
  {
    MutexLock lock(&mu_);
    auto [it, inserted] = inflight_.try_emplace(key);
    if (inserted) it->second = std::make_shared<Inflight>();
    f = it->second;
    mine = inserted;
  }
  if (!mine) {
    MutexLock lock(&f->mu);
    while (!f->done && absl::Now() < deadline)
      f->cv.WaitWithTimeout(&f->mu, deadline - absl::Now());
    if (f->done) return f->status;
    return absl::NotFoundError(absl::StrCat(
        "chunk ", key.ToString(), " was still being fetched from a peer at the deadline"));
  }
  const absl::Status st = FetchNow(key, deadline);
  {
    MutexLock lock(&mu_);
    inflight_.erase(key);
  }
  MutexLock lock(&f->mu);
  f->done = true;
  f->status = st;
  f->cv.SignalAll();
  return st;
}

void PeerRouter::Prefetch(absl::Span<const ChunkKey> keys, absl::Time deadline) {
  for (const ChunkKey& key : keys) {
    if (prefetch_queued_.load() >= kMaxPrefetchQueued) {
      prefetch_skipped_->Inc();
      continue;
    }
    prefetch_queued_.fetch_add(1);
    prefetch_pool_.Submit([this, key, deadline] {
      prefetch_queued_.fetch_sub(1);
      if (state_.store->Where(key)) return;  // here already (a Get fetched it first)
      if (Fetch(key, deadline).ok()) prefetched_->Inc();
    });
  }
}

absl::Status PeerRouter::FetchNow(const ChunkKey& key, absl::Time deadline) {
  if (state_.store->Where(key)) return absl::OkStatus();  // fetched by the one before
  std::shared_ptr<const View> v = view();
  for (const std::shared_ptr<Peer>& peer : Candidates(*v, key)) {
    const absl::Time now = absl::Now();
    if (now >= deadline) break;
    bool held_here = false;
    const absl::Status st =
        FetchFrom(*peer, key, std::min(deadline, now + peer_timeout_), &held_here);
    if (st.ok()) {
      fetch_hit_->Inc();
      return absl::OkStatus();
    }
    if (held_here) {
      if (absl::IsAlreadyExists(st)) return absl::OkStatus();  // arrived meanwhile
      // A Put on this node is writing it: not readable until that commits (and it may fail).
      return absl::NotFoundError(
          absl::StrCat("chunk ", key.ToString(), " is being written on this node, not stored yet"));
    }
    if (absl::IsNotFound(st)) continue;
    if (!MaybeSuspect(*peer, st)) {
      fetch_error_->Inc();
      spdlog::warn("cluster: fetching {} from {}: {}", key.ToString(), peer->node, st.ToString());
    }
  }
  fetch_miss_->Inc();
  return absl::NotFoundError(
      absl::StrCat("chunk ", key.ToString(), " is stored neither here nor on its owners"));
}

absl::Status PeerRouter::FetchFrom(Peer& peer, const ChunkKey& key, absl::Time deadline,
                                   bool* held_here) {
  std::shared_ptr<client::DataPlaneClient> session = SessionWith(peer, deadline);
  if (session == nullptr) return FetchGrpc(peer, key, deadline, held_here);

  // The payload lands in bytes reserved in the host tier; where that would block (room must be
  // made by writing to disk), in a buffer stored after the transfer.
  storage::TieredStore& store = *state_.store;
  uint64_t reservation = 0;
  uint64_t checksum = 0;
  std::string bounce;
  auto place = [&](ByteSpan header, uint64_t payload_bytes) -> absl::StatusOr<MutableByteSpan> {
    KVDN_ASSIGN_OR_RETURN(ChunkHeader h, DecodeChunkHeader(header));
    if (h.payload_bytes != payload_bytes) {
      return absl::DataLossError(absl::StrCat(
          "peer sent ", payload_bytes, " payload bytes for a header that says ", h.payload_bytes));
    }
    checksum = h.payload_checksum;
    const uint64_t size = kChunkHeaderBytes + payload_bytes;
    auto r = store.Reserve(key, size, {.may_block = false});
    MutableByteSpan buffer;
    if (r.ok()) {
      KVDN_ASSIGN_OR_RETURN(buffer, store.BeginWrite(r->id, size));
      reservation = r->id;
    } else if (storage::IsWouldBlock(r.status())) {
      bounce.resize(size);
      buffer = MutableByteSpan(reinterpret_cast<uint8_t*>(bounce.data()), size);
    } else {
      *held_here = HeldHere(r.status());
      return r.status();
    }
    std::memcpy(buffer.data(), header.data(), kChunkHeaderBytes);
    return buffer.subspan(kChunkHeaderBytes);
  };
  absl::StatusOr<uint64_t> got = session->Get(key, 0, place, deadline);
  if (reservation != 0) store.EndWrite(reservation);
  if (!got.ok()) {
    if (reservation != 0) (void)store.Abort(reservation);
    return got.status();
  }
  absl::Status st = reservation != 0 ? store.Commit(reservation, checksum)
                                     : store.Put(key, AsBytes(bounce));  // both verify the payload
  if (st.ok()) fetch_bytes_->Inc(kChunkHeaderBytes + *got);
  if (reservation == 0) *held_here = HeldHere(st);
  return st;
}

absl::Status PeerRouter::FetchGrpc(Peer& peer, const ChunkKey& key, absl::Time deadline,
                                   bool* held_here) {
  v1::GetRequest req;
  SetKey(key, req.mutable_key());
  grpc::ClientContext ctx;
  auto reader = peer.peer_stub->Fetch(WithDeadline(&ctx, deadline), req);
  v1::GetResponse msg;
  std::string chunk;
  uint64_t size = 0;
  bool first = true;
  while (reader->Read(&msg)) {
    if (first) {
      size = msg.size();
      if (size > kChunkHeaderBytes + kMaxChunkPayloadBytes) {
        ctx.TryCancel();
        return absl::DataLossError(absl::StrCat("peer announced a chunk of ", size, " bytes"));
      }
      chunk.reserve(size);
      first = false;
    }
    chunk.append(msg.data());
  }
  grpc::Status gs = reader->Finish();
  if (!gs.ok()) return FromGrpcStatus(gs);
  if (chunk.size() != size) {
    return absl::DataLossError(absl::StrCat("peer sent ", chunk.size(), " of ", size, " bytes"));
  }
  absl::Status st = state_.store->Put(key, AsBytes(chunk));
  if (st.ok()) fetch_bytes_->Inc(chunk.size());
  *held_here = HeldHere(st);
  return st;
}

// One PeerService.Probe per peer, all in flight at once; returns when each has ended (by
// `deadline`). A peer whose call failed as unreachable is marked failing.
struct PeerRouter::ProbeCall {
  std::shared_ptr<Peer> peer;
  v1::LookupRequest req;
  v1::ProbeResponse resp;
  grpc::ClientContext ctx;
  grpc::Status status;
};

void PeerRouter::ProbeAll(std::vector<std::unique_ptr<ProbeCall>>& calls, absl::Time deadline) {
  Mutex mu;
  CondVar cv;
  size_t pending = calls.size();
  for (std::unique_ptr<ProbeCall>& c : calls) {
    ProbeCall* raw = c.get();
    c->peer->peer_stub->async()->Probe(WithDeadline(&c->ctx, deadline), &c->req, &c->resp,
                                       [raw, &mu, &cv, &pending](grpc::Status s) {
                                         raw->status = std::move(s);
                                         MutexLock lock(&mu);
                                         if (--pending == 0) cv.SignalAll();
                                       });
  }
  {
    MutexLock lock(&mu);
    while (pending > 0) cv.Wait(&mu);  // each call ends by its deadline
  }
  for (std::unique_ptr<ProbeCall>& c : calls) {
    if (!c->status.ok()) MaybeSuspect(*c->peer, FromGrpcStatus(c->status));
  }
}

size_t PeerRouter::Probe(absl::Span<const ChunkKey> chain, size_t from, absl::Time deadline,
                         std::vector<v1::Tier>* tiers) {
  std::shared_ptr<const View> v = view();
  tiers->clear();
  if (from >= chain.size() || v->peers.empty()) return 0;
  // One request per peer, for the chunks it may hold; index[k][j]: the chain position of the
  // j-th hash asked of calls[k].
  std::vector<std::unique_ptr<ProbeCall>> calls;
  std::vector<std::vector<size_t>> index;
  absl::flat_hash_map<std::string, size_t> call_of;
  std::vector<bool> present(chain.size(), false);
  std::vector<v1::Tier> where(chain.size(), v1::TIER_REMOTE);
  for (size_t i = from; i < chain.size(); ++i) {
    // Past the local prefix this node may still hold some (those it owns, or fetched before).
    if (std::optional<storage::TierKind> here = state_.store->Where(chain[i])) {
      present[i] = true;
      where[i] = TierToProto(*here);
      continue;
    }
    for (std::shared_ptr<Peer>& p : Candidates(*v, chain[i])) {
      auto [it, inserted] = call_of.try_emplace(p->node, calls.size());
      if (inserted) {
        calls.push_back(std::make_unique<ProbeCall>());
        calls.back()->peer = p;
        calls.back()->req.set_namespace_(chain[i].ns);
        calls.back()->req.set_fingerprint(chain[i].fingerprint);
        index.emplace_back();
      }
      index[it->second].push_back(i);
      const std::array<uint8_t, 16> h = chain[i].prefix_hash.Canonical();
      calls[it->second]->req.add_prefix_hashes(h.data(), h.size());
    }
  }
  ProbeAll(calls, std::min(deadline, absl::Now() + peer_timeout_));
  for (size_t k = 0; k < calls.size(); ++k) {
    if (!calls[k]->status.ok()) continue;
    const v1::ProbeResponse& r = calls[k]->resp;
    for (size_t j = 0; j < index[k].size() && j < static_cast<size_t>(r.present_size()); ++j) {
      if (r.present(static_cast<int>(j))) present[index[k][j]] = true;
    }
  }
  size_t n = 0;
  while (from + n < chain.size() && present[from + n]) ++n;
  tiers->assign(where.begin() + from, where.begin() + from + n);
  return n;
}

std::map<std::string, uint64_t> PeerRouter::PeerChunks(absl::Time deadline) {
  std::shared_ptr<const View> v = view();
  std::vector<std::unique_ptr<ProbeCall>> calls;  // no chunks named: the count
  for (const auto& [node, peer] : v->peers) {
    if (peer->Failing()) continue;  // it would only time out again: no count
    calls.push_back(std::make_unique<ProbeCall>());
    calls.back()->peer = peer;
  }
  ProbeAll(calls, deadline);
  std::map<std::string, uint64_t> out;
  for (const std::unique_ptr<ProbeCall>& c : calls) {
    if (c->status.ok()) out[c->peer->node] = c->resp.chunks();
  }
  return out;
}

// ---- writes ----

void PeerRouter::Replicate(const ChunkKey& key) {
  std::shared_ptr<const View> v = view();
  if (v->peers.empty() || v->placement == nullptr) return;
  const size_t limit = state_.config.replication_queue_limit();
  size_t queued = 0;
  {
    MutexLock lock(&mu_);
    if (stop_) return;
    for (const std::string& node : v->placement->Owners(key, replicas_)) {
      auto it = v->peers.find(node);
      if (it == v->peers.end()) continue;  // this node is an owner: stored already
      if (it->second->Failing() || queue_.size() >= limit) {
        repl_dropped_->Inc();
        continue;
      }
      queue_.push_back(Job{key, it->second});
      ++queued;
    }
  }
  if (queued > 0) cv_.SignalAll();
}

void PeerRouter::Work() {
  for (;;) {
    Job job;
    {
      MutexLock lock(&mu_);
      for (;;) {
        if (stop_) return;
        // The first job that is due, in order (jobs sent again wait out their backoff).
        const absl::Time now = absl::Now();
        absl::Time next = absl::InfiniteFuture();
        auto it = queue_.begin();
        for (; it != queue_.end() && it->due > now; ++it) next = std::min(next, it->due);
        if (it != queue_.end()) {
          job = std::move(*it);
          queue_.erase(it);
          break;
        }
        if (queue_.empty()) {
          cv_.Wait(&mu_);
        } else {
          cv_.WaitWithTimeout(&mu_, next - now);
        }
      }
    }
    if (job.peer->Failing()) {
      repl_dropped_->Inc();
      continue;
    }
    const absl::Status st = Send(*job.peer, job.key, absl::Now() + peer_timeout_);
    if (st.ok()) continue;
    if (absl::IsNotFound(st)) continue;  // deleted or evicted here before its turn: nothing to send
    if (absl::IsAborted(st) && job.retries < kMaxReplicationRetries) {
      // The owner is writing the key itself (a client's Put, another node's replication): that
      // write may still fail, so send again once it has had time to end, not count it present.
      job.due = absl::Now() + kReplicationRetryBase * (1 << job.retries);
      ++job.retries;
      repl_retries_->Inc();
      {
        MutexLock lock(&mu_);
        if (stop_) {
          repl_dropped_->Inc();
          return;
        }
        queue_.push_back(std::move(job));
      }
      cv_.Signal();
      continue;
    }
    repl_failed_->Inc();
    if (!MaybeSuspect(*job.peer, st)) {
      spdlog::warn("cluster: replicating {} to {}: {}", job.key.ToString(), job.peer->node,
                   st.ToString());
    }
  }
}

absl::Status PeerRouter::Send(Peer& peer, const ChunkKey& key, absl::Time deadline) {
  storage::AcquireOptions opts;
  opts.ttl = deadline - absl::Now() + absl::Seconds(10);
  KVDN_ASSIGN_OR_RETURN(storage::Lease lease, state_.store->Acquire(key, opts));
  const ByteSpan chunk = lease.host_bytes;
  absl::StatusOr<bool> stored = absl::FailedPreconditionError("not sent");
  std::shared_ptr<client::DataPlaneClient> session = SessionWith(peer, deadline);
  if (chunk.size() < kChunkHeaderBytes) {
    (void)state_.store->Release(lease.id);
    return absl::FailedPreconditionError("leased chunk is not in host memory");
  }
  if (session != nullptr) {
    stored = session->Put(key, 0, chunk.first(kChunkHeaderBytes), chunk.subspan(kChunkHeaderBytes),
                          deadline);
  } else {
    grpc::ClientContext ctx;
    v1::PutResponse resp;
    auto writer = peer.peer_stub->Replicate(WithDeadline(&ctx, deadline), &resp);
    v1::PutRequest msg;
    v1::PutRequest::Header* h = msg.mutable_header();
    SetKey(key, h->mutable_key());
    h->set_size(chunk.size());
    auto header = DecodeChunkHeader(chunk);
    h->set_payload_checksum(header.ok() ? header->payload_checksum : 0);
    bool ok = writer->Write(msg);
    const size_t frame = state_.config.max_frame_bytes();
    for (size_t off = 0; ok && off < chunk.size(); off += frame) {
      msg.Clear();
      const size_t n = std::min(frame, chunk.size() - off);
      msg.set_data(chunk.data() + off, n);
      ok = writer->Write(msg);
    }
    writer->WritesDone();
    grpc::Status gs = writer->Finish();
    stored = gs.ok() ? absl::StatusOr<bool>(resp.stored()) : FromGrpcStatus(gs);
  }
  (void)state_.store->Release(lease.id);
  if (!stored.ok()) return stored.status();
  (*stored ? repl_sent_ : repl_present_)->Inc();
  return absl::OkStatus();
}

}  // namespace kvdn::daemon
