#include "src/data_plane.h"

#include <unistd.h>

#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kvdn/common/chunk_format.h"
#include "kvdn/common/hash.h"
#include "kvdn/common/logging.h"
#include "kvdn/v1/data_plane.pb.h"
#include "src/peer_router.h"

namespace kvdn::daemon {
namespace {

using transfer::Incoming;

// Extra lease time past a transfer's deadline: the transport ends a transfer by its deadline plus
// its cancel grace, and the lease must outlive any read of the arena bytes.
constexpr absl::Duration kLeaseSlack = absl::Seconds(30);

// Encoded chunks up to this size are committed (hashed) on the progress thread.
constexpr uint64_t kInlineCommitBytes = (uint64_t{4} << 20) + kChunkHeaderBytes;
// Puts in parts by key: at most this many parts each, and this many Puts at once.
constexpr uint32_t kMaxPutParts = 64;
constexpr size_t kMaxAssemblies = 4096;

}  // namespace

absl::StatusOr<std::unique_ptr<DataPlane>> DataPlane::Start(ServerState* state) {
  const std::string& tls = state->config.data_plane_transports();
  if (tls == "off") return std::unique_ptr<DataPlane>();
  std::unique_ptr<DataPlane> dp(new DataPlane(state));
  DataPlane* raw = dp.get();
  storage::HostTier* host = state->store->host_tier();
  const uint32_t lanes = std::max(1u, state->config.data_plane_threads());
  // Creates one lane; registers the arena with it and routes its messages here.
  auto make_lane = [&](const std::string& name,
                       const std::string& transports) -> absl::StatusOr<Lane> {
    transfer::UcxTransportOptions o;
    o.name = name;
    o.transports = transports;
    Lane lane;
    KVDN_ASSIGN_OR_RETURN(lane.transport, transfer::UcxTransport::Create(o));
    KVDN_ASSIGN_OR_RETURN(lane.arena,
                          lane.transport->Register(host->arena_base(), host->capacity_bytes()));
    transfer::UcxTransport* t = lane.transport.get();
    t->SetHandler(v1::DATA_PLANE_GET,
                  [raw, t](std::unique_ptr<Incoming> in) { raw->OnGet(t, std::move(in)); });
    t->SetHandler(v1::DATA_PLANE_PUT,
                  [raw, t](std::unique_ptr<Incoming> in) { raw->OnPut(t, std::move(in)); });
    t->SetPeerFailureHandler(
        [raw, t](transfer::PeerId peer, const absl::Status&) { raw->OnPeerFailure(t, peer); });
    return lane;
  };
  for (uint32_t i = 0; i < lanes; ++i) {
    auto lane = make_lane(absl::StrCat("kvdnd-local-", i), "posix,cma");
    if (!lane.ok()) {
      spdlog::warn("data plane: no shared-memory transport ({}); same-host clients use the other",
                   lane.status().message());
      dp->local_.clear();
      break;
    }
    dp->local_.push_back(std::move(*lane));
  }
  // With TLS on the gRPC listener, payloads leave the host only inside it (UCX has no encryption),
  // unless the config allows them in clear.
  const bool clear_remote_ok =
      state->config.tls().cert_file().empty() || state->config.tls().allow_clear_data_plane();
  for (uint32_t i = 0; clear_remote_ok && i < lanes; ++i) {
    auto lane = make_lane(absl::StrCat("kvdnd-remote-", i), tls == "auto" ? "" : tls);
    if (!lane.ok()) {
      return absl::Status(lane.status().code(),
                          absl::StrCat("data_plane_transports: ", lane.status().message()));
    }
    dp->remote_.push_back(std::move(*lane));
  }
  spdlog::info("data plane: {}", absl::StrJoin(dp->Describe(), "; "));
  return dp;
}

DataPlane::~DataPlane() {
  // Transports end what is in flight (each done callback releases its lease or reservation);
  // each arena registration goes before its transport.
  for (std::vector<Lane>* lanes : {&local_, &remote_}) {
    for (Lane& lane : *lanes) {
      lane.arena.reset();
      lane.transport.reset();
    }
  }
}

std::vector<std::string> DataPlane::Describe() {
  ReapExitedClients();  // what stats show are live sessions
  SweepAssemblies();
  std::vector<std::string> out;
  for (size_t i = 0; i < local_.size(); ++i) {
    out.push_back(absl::StrCat("ucx-local[", i, "]: ", local_[i].transport->Describe()));
  }
  for (size_t i = 0; i < remote_.size(); ++i) {
    out.push_back(absl::StrCat("ucx-remote[", i, "]: ", remote_[i].transport->Describe()));
  }
  return out;
}

const DataPlane::Lane& DataPlane::LeastLoaded(const std::vector<Lane>& lanes) const {
  const Lane* best = &lanes[0];
  size_t best_sessions = SIZE_MAX;
  for (const Lane& lane : lanes) {
    size_t n = 0;
    for (const auto& [id, s] : sessions_) n += s.transport == lane.transport.get() ? 1 : 0;
    if (auto it = opening_.find(lane.transport.get()); it != opening_.end()) n += it->second;
    if (n < best_sessions) {
      best = &lane;
      best_sessions = n;
    }
  }
  return *best;
}

absl::StatusOr<v1::OpenDataPlaneResponse> DataPlane::Open(const v1::OpenDataPlaneRequest& req,
                                                          bool same_host, const Caller& caller) {
  const bool local = same_host && req.pid() > 0 && !local_.empty();
  if (req.peer_node().size() > 253) {
    return absl::InvalidArgumentError(
        absl::StrCat("peer_node: ", req.peer_node().size(), " characters, at most 253"));
  }
  if (!req.peer_node().empty() && caller.grants != nullptr && !caller.grants->peer) {
    state_.auth_denied->Inc();
    return absl::PermissionDeniedError(
        "peer_node: sessions of other kvdnd need a token with the kvdn:peer grant");
  }
  if (local) {
    KVDN_RETURN_IF_ERROR(CheckSamePidNamespace(
        req.pid_namespace(), absl::StrCat("client pid ", req.pid()),
        "shared memory finds its peer by pid and cannot reach it. Run the client and kvdnd in "
        "one pid namespace (Kubernetes: hostPID: true on both pods, deploy/README.md), or use "
        "the gRPC data plane"));
  }
  if (!local && remote_.empty()) {
    return absl::FailedPreconditionError(
        local_.empty()
            ? "this kvdnd has no UCX transport for this client; use gRPC"
            : "this kvdnd serves UCX only to clients on its host (shared memory): its gRPC "
              "listener has TLS and UCX would carry the payloads between hosts in clear "
              "(tls.allow_clear_data_plane); use gRPC");
  }
  ReapExitedClients();
  const Lane* lane;
  {
    MutexLock lock(&mu_);
    if (sessions_.size() >= state_.config.max_data_plane_sessions()) {
      return absl::ResourceExhaustedError(absl::StrCat(
          sessions_.size(), " data-plane sessions open (max_data_plane_sessions); close some"));
    }
    lane = &LeastLoaded(local ? local_ : remote_);
    ++opening_[lane->transport.get()];
  }
  transfer::UcxTransport* t = lane->transport.get();
  transfer::ConnectOptions co;
  co.peer_pid = local ? req.pid() : 0;
  auto peer = t->Connect(req.worker_address(), co);
  auto opened = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (--opening_[t] == 0) opening_.erase(t);
  };
  if (!peer.ok()) {
    MutexLock lock(&mu_);
    opened();
    return absl::Status(peer.status().code(),
                        absl::StrCat("worker_address: ", peer.status().message()));
  }
  Session s{t,
            lane->arena.get(),
            *peer,
            co.peer_pid,
            req.client_name(),
            !req.peer_node().empty(),
            caller.token_id()};
  v1::OpenDataPlaneResponse resp;
  {
    MutexLock lock(&mu_);
    opened();  // in the same critical section as the insert: LeastLoaded counts it once throughout
    // Checked again: other sessions may have opened while this one connected.
    if (sessions_.size() >= state_.config.max_data_plane_sessions()) {
      t->Disconnect(*peer);
      return absl::ResourceExhaustedError(absl::StrCat(
          sessions_.size(), " data-plane sessions open (max_data_plane_sessions); close some"));
    }
    const uint64_t id = next_session_++;
    sessions_[id] = s;
    resp.set_session_id(id);
  }
  resp.set_worker_address(t->address());
  resp.set_descriptor_address(AddressFor(local));
  resp.set_pid(local ? getpid() : 0);
  resp.set_transports(t->Describe());
  return resp;
}

absl::Status DataPlane::Close(uint64_t session_id, const Caller& caller) {
  Session s;
  {
    MutexLock lock(&mu_);
    auto it = sessions_.find(session_id);
    if (it == sessions_.end()) {
      return absl::NotFoundError(absl::StrCat("no data-plane session ", session_id));
    }
    if (caller.token_id() != it->second.token_id) {
      state_.auth_denied->Inc();
      return absl::PermissionDeniedError(
          absl::StrCat("data-plane session ", session_id, " was opened with another token"));
    }
    s = it->second;
    sessions_.erase(it);
  }
  s.transport->Disconnect(s.peer);
  return absl::OkStatus();
}

bool DataPlane::FromItsSession(const Session& s, const transfer::Transport* t,
                               const transfer::Incoming& in) const {
  if (!state_.auth_enabled() || (t == s.transport && in.peer() == s.peer)) return true;
  state_.auth_denied->Inc();
  // Debug, not warn: a client sending these could otherwise flood the log (the metric counts them).
  spdlog::debug(
      "data plane: a request naming session {} ({}) came over another connection; dropped", s.name,
      s.pid);
  return false;
}

void DataPlane::ReapExitedClients() {
  std::vector<Session> gone;
  {
    MutexLock lock(&mu_);
    for (auto it = sessions_.begin(); it != sessions_.end();) {
      auto here = it++;
      if (here->second.pid > 0 && !transfer::ProcessAlive(here->second.pid)) {
        gone.push_back(here->second);
        sessions_.erase(here);
      }
    }
  }
  for (const Session& s : gone) {
    spdlog::info("data plane: session of {} (pid {}) closed: the process exited without closing it",
                 s.name.empty() ? "a client" : s.name, s.pid);
    s.transport->Disconnect(s.peer);
  }
}

absl::StatusOr<DataPlane::Session> DataPlane::FindSession(uint64_t id) const {
  MutexLock lock(&mu_);
  auto it = sessions_.find(id);
  if (it == sessions_.end()) return absl::NotFoundError(absl::StrCat("no session ", id));
  return it->second;
}

void DataPlane::OnPeerFailure(transfer::Transport* t, transfer::PeerId peer) {
  MutexLock lock(&mu_);
  for (auto it = sessions_.begin(); it != sessions_.end();) {
    auto here = it++;
    if (here->second.transport == t && here->second.peer == peer) sessions_.erase(here);
  }
}

absl::Time DataPlane::DeadlineOf(int64_t unix_micros) const {
  const absl::Time cap = absl::Now() + absl::Milliseconds(state_.config.max_call_duration_ms());
  if (unix_micros <= 0) return cap;
  return std::min(cap, absl::FromUnixMicros(unix_micros));
}

void DataPlane::ReplyGet(const Session& s, uint64_t request_id, const absl::Status& st,
                         absl::Time start) {
  v1::DataPlaneGetReply reply;
  reply.set_request_id(request_id);
  reply.set_code(static_cast<int32_t>(st.code()));
  reply.set_message(std::string(st.message()));
  state_.RecordCall(Method::kUcxGet, st.code(), absl::Now() - start);
  s.transport->Send(s.peer, v1::DATA_PLANE_GET_REPLY, reply.SerializeAsString(), {}, nullptr,
                    absl::Now() + absl::Seconds(10), [](absl::Status) {});
}

void DataPlane::ReplyPut(const Session& s, uint64_t request_id, const absl::Status& st, bool stored,
                         absl::Time start) {
  v1::DataPlanePutReply reply;
  reply.set_request_id(request_id);
  reply.set_code(static_cast<int32_t>(st.code()));
  reply.set_message(std::string(st.message()));
  reply.set_stored(stored);
  state_.RecordCall(Method::kUcxPut, st.code(), absl::Now() - start);
  s.transport->Send(s.peer, v1::DATA_PLANE_PUT_REPLY, reply.SerializeAsString(), {}, nullptr,
                    absl::Now() + absl::Seconds(10), [](absl::Status) {});
}

void DataPlane::OnGet(transfer::Transport* t, std::unique_ptr<Incoming> in) {
  const absl::Time start = absl::Now();
  v1::DataPlaneGetRequest req;
  if (!req.ParseFromString(in->header())) {
    state_.bad_requests->Inc();
    spdlog::debug("data plane: unparsable Get request dropped");
    return;
  }
  auto session = FindSession(req.session_id());
  if (!session.ok()) {
    state_.bad_requests->Inc();
    spdlog::debug("data plane: Get for unknown session {} dropped", req.session_id());
    return;
  }
  const Session s = *session;
  if (!FromItsSession(s, t, *in)) return;
  const absl::Time deadline = DeadlineOf(req.deadline_unix_micros());
  const uint64_t rid = req.request_id();
  const Part part{req.payload_offset(), req.payload_length()};
  if (state_.calls.draining()) {
    return ReplyGet(s, rid, absl::UnavailableError("kvdnd is draining; use another node or retry"),
                    start);
  }
  // The session's token as the tokens file has it now (it may have been reloaded).
  const absl::StatusOr<Caller> caller = state_.CallerFor(s.token_id);
  if (!caller.ok()) return ReplyGet(s, rid, caller.status(), start);
  if (req.target_case() == v1::DataPlaneGetRequest::kLeaseId) {
    if (absl::Status st =
            state_.CheckIdNamespace(*caller, req.lease_id(), /*reservation=*/false, "lease_id");
        !st.ok()) {
      return ReplyGet(s, rid, st, start);
    }
    auto lease = state_.store->HoldLease(req.lease_id(), deadline + kLeaseSlack);
    if (!lease.ok()) {
      return ReplyGet(
          s, rid,
          absl::Status(lease.status().code(), absl::StrCat("lease_id: ", lease.status().message())),
          start);
    }
    return SendChunk(s, rid, deadline, *lease, part, /*owned=*/false, start);
  }
  if (req.target_case() != v1::DataPlaneGetRequest::kKey) {
    return ReplyGet(s, rid, absl::InvalidArgumentError("Get request names neither key nor lease"),
                    start);
  }
  auto key = KeyFromProto(req.key(), "key");
  absl::Status st = key.status();
  if (st.ok()) st = state_.CheckNamespace(*caller, key->ns);
  if (!st.ok()) return ReplyGet(s, rid, st, start);
  storage::AcquireOptions opts;
  opts.ttl = deadline - absl::Now() + kLeaseSlack;
  opts.may_block = false;
  auto lease = state_.store->Acquire(*key, opts);
  const bool fetch = absl::IsNotFound(lease.status()) && !s.from_peer && state_.HasPeers();
  if (storage::IsWouldBlock(lease.status()) || fetch) {
    // On disk (or moving), or on the owners: read it on a thread that may block.
    state_.blocking_pool.Submit(
        [this, s, rid, deadline, k = *key, opts, part, start, fetch]() mutable {
          opts.may_block = true;
          absl::StatusOr<storage::Lease> l = absl::NotFoundError("");
          if (fetch) {
            const absl::Status fetched = state_.router->Fetch(k, deadline);
            l = fetched.ok() ? state_.store->Acquire(k, opts) : fetched;
          } else {
            l = state_.store->Acquire(k, opts);
          }
          if (!l.ok()) return ReplyGet(s, rid, l.status(), start);
          SendChunk(s, rid, deadline, *l, part, /*owned=*/true, start);
        });
    return;
  }
  if (!lease.ok()) return ReplyGet(s, rid, lease.status(), start);
  SendChunk(s, rid, deadline, *lease, part, /*owned=*/true, start);
}

void DataPlane::SendChunk(const Session& s, uint64_t request_id, absl::Time deadline,
                          const storage::Lease& lease, Part part, bool owned, absl::Time start) {
  if (lease.tier != storage::TierKind::kHost || lease.size < kChunkHeaderBytes) {
    if (owned) (void)state_.store->Release(lease.id);
    return ReplyGet(s, request_id,
                    absl::FailedPreconditionError(
                        "the lease is on GPU memory, which this data plane does not serve"),
                    start);
  }
  v1::DataPlaneGetReply reply;
  reply.set_request_id(request_id);
  reply.set_tier(TierToProto(lease.tier));
  reply.set_chunk_header(lease.host_bytes.data(), kChunkHeaderBytes);
  ByteSpan payload = lease.host_bytes.subspan(kChunkHeaderBytes);
  reply.set_payload_size(payload.size());
  // The part asked for, cut at the payload's end (pread's rule).
  const uint64_t from = std::min<uint64_t>(part.offset, payload.size());
  const uint64_t left = payload.size() - from;
  payload = payload.subspan(from, part.length == 0 ? left : std::min(part.length, left));
  reply.set_payload_offset(from);
  // The header rides with every part; only the first part counts it among the bytes sent.
  const uint64_t counted = payload.size() + (from == 0 ? kChunkHeaderBytes : 0);
  state_.data_plane_in_flight.fetch_add(1);
  s.transport->Send(s.peer, v1::DATA_PLANE_GET_REPLY, reply.SerializeAsString(), payload, s.arena,
                    deadline, [this, id = lease.id, owned, counted, start](absl::Status st) {
                      if (owned) (void)state_.store->Release(id);
                      if (st.ok()) state_.bytes_out->Inc(static_cast<double>(counted));
                      state_.RecordCall(Method::kUcxGet, st.code(), absl::Now() - start);
                      if (!st.ok())
                        spdlog::debug("data plane: Get transfer failed: {}", st.ToString());
                      state_.data_plane_in_flight.fetch_sub(1);
                    });
}

void DataPlane::OnPut(transfer::Transport* t, std::unique_ptr<Incoming> in) {
  const absl::Time start = absl::Now();
  SweepAssemblies();
  v1::DataPlanePutRequest req;
  if (!req.ParseFromString(in->header())) {
    state_.bad_requests->Inc();
    return;
  }
  auto session = FindSession(req.session_id());
  if (!session.ok()) {
    state_.bad_requests->Inc();
    return;
  }
  const Session s = *session;
  if (!FromItsSession(s, t, *in)) return;
  const uint64_t rid = req.request_id();
  if (state_.calls.draining()) {
    return ReplyPut(s, rid, absl::UnavailableError("kvdnd is draining; use another node or retry"),
                    false, start);
  }
  const absl::StatusOr<Caller> caller = state_.CallerFor(s.token_id);
  if (!caller.ok()) return ReplyPut(s, rid, caller.status(), false, start);
  auto header = DecodeChunkHeader(AsBytes(req.chunk_header()));
  if (!header.ok()) {
    return ReplyPut(s, rid,
                    absl::Status(header.status().code(),
                                 absl::StrCat("chunk_header: ", header.status().message())),
                    false, start);
  }
  if (req.part()) {
    if (req.target_case() == v1::DataPlanePutRequest::kKey &&
        (req.parts() < 2 || req.parts() > kMaxPutParts)) {
      return ReplyPut(s, rid,
                      absl::InvalidArgumentError(
                          absl::StrCat("parts: a Put in parts by key has 2 to ", kMaxPutParts,
                                       " parts; this one says ", req.parts())),
                      false, start);
    }
    if (req.target_case() == v1::DataPlanePutRequest::kKey && req.put_id() == 0) {
      return ReplyPut(s, rid,
                      absl::InvalidArgumentError("put_id: a Put in parts by key needs a put_id"),
                      false, start);
    }
    if (in->payload_bytes() == 0) {
      return ReplyPut(s, rid, absl::InvalidArgumentError("part: the message carries no bytes"),
                      false, start);
    }
    if (req.payload_offset() > header->payload_bytes ||
        in->payload_bytes() > header->payload_bytes - req.payload_offset()) {
      return ReplyPut(s, rid,
                      absl::InvalidArgumentError(absl::StrCat(
                          "payload_offset: the part [", req.payload_offset(), ", ",
                          req.payload_offset() + in->payload_bytes(), ") lies past the ",
                          header->payload_bytes, " payload bytes the chunk header says")),
                      false, start);
    }
  } else if (header->payload_bytes != in->payload_bytes()) {
    return ReplyPut(s, rid,
                    absl::InvalidArgumentError(
                        absl::StrCat("the chunk header says ", header->payload_bytes,
                                     " payload bytes; the message carries ", in->payload_bytes())),
                    false, start);
  }
  auto holder = std::make_shared<std::unique_ptr<Incoming>>(std::move(in));
  const absl::Time deadline = DeadlineOf(req.deadline_unix_micros());
  const uint64_t size = kChunkHeaderBytes + header->payload_bytes;
  if (req.target_case() == v1::DataPlanePutRequest::kReservationId) {
    if (absl::Status st = state_.CheckIdNamespace(*caller, req.reservation_id(),
                                                  /*reservation=*/true, "reservation_id");
        !st.ok()) {
      return ReplyPut(s, rid, st, false, start);
    }
    return PutInto(s, rid, deadline, holder, req.chunk_header(), req.reservation_id(),
                   Part{req.payload_offset(), holder->get()->payload_bytes()}, size,
                   /*commit=*/false, header->payload_checksum, start);
  }
  if (req.target_case() != v1::DataPlanePutRequest::kKey) {
    return ReplyPut(s, rid, absl::InvalidArgumentError("Put names neither key nor reservation"),
                    false, start);
  }
  auto key = KeyFromProto(req.key(), "key");
  absl::Status st = key.status();
  if (st.ok()) st = state_.CheckNamespace(*caller, key->ns);
  if (!st.ok()) return ReplyPut(s, rid, st, false, start);
  if (req.part()) return OnPutPart(s, rid, req, *key, *header, holder, deadline, start);
  // Room in the host tier, here when that needs no disk I/O (the usual case: the store demotes in
  // the background), else on a thread that may block. A thread hop costs about as much as moving
  // a 1 MiB payload over shared memory.
  auto reserved = [this, s, rid, deadline, holder, k = *key, ch = req.chunk_header(),
                   sum = header->payload_checksum, size,
                   start](const absl::StatusOr<storage::Reservation>& r) {
    if (absl::IsAlreadyExists(r.status())) {
      holder->reset();  // content-addressed: the same bytes are stored
      return ReplyPut(s, rid, absl::OkStatus(), false, start);
    }
    if (!r.ok()) return ReplyPut(s, rid, r.status(), false, start);
    PutInto(s, rid, deadline, holder, ch, r->id, Part{0, holder->get()->payload_bytes()}, size,
            /*commit=*/true, sum, start);
  };
  auto r = state_.store->Reserve(*key, size, {.may_block = false});
  if (!storage::IsWouldBlock(r.status())) return reserved(r);
  state_.blocking_pool.Submit([this, k = *key, size, reserved = std::move(reserved)] {
    reserved(state_.store->Reserve(k, size));
  });
}

void DataPlane::PutInto(const Session& s, uint64_t request_id, absl::Time deadline,
                        std::shared_ptr<std::unique_ptr<Incoming>> in, std::string chunk_header,
                        uint64_t reservation_id, Part part, uint64_t chunk_bytes, bool commit,
                        uint64_t checksum, absl::Time start) {
  auto buffer = state_.store->BeginWrite(reservation_id, chunk_bytes);
  if (!buffer.ok()) {
    if (commit) (void)state_.store->Abort(reservation_id);
    return ReplyPut(s, request_id,
                    absl::Status(buffer.status().code(),
                                 absl::StrCat("reservation_id: ", buffer.status().message())),
                    false, start);
  }
  // The header once: parts of one chunk arrive at once, each with it.
  if (part.offset == 0) std::memcpy(buffer->data(), chunk_header.data(), kChunkHeaderBytes);
  const uint64_t size = part.length + (part.offset == 0 ? kChunkHeaderBytes : 0);
  state_.data_plane_in_flight.fetch_add(1);
  s.transport->Receive(
      std::move(*in), buffer->subspan(kChunkHeaderBytes + part.offset, part.length), s.arena,
      deadline,
      [this, s, request_id, reservation_id, commit, checksum, size, start](absl::Status st) {
        state_.store->EndWrite(reservation_id);
        if (!st.ok() || !commit) {
          if (!st.ok() && commit) (void)state_.store->Abort(reservation_id);
          if (st.ok()) state_.bytes_in->Inc(static_cast<double>(size));
          ReplyPut(s, request_id, st, st.ok(), start);
          state_.data_plane_in_flight.fetch_sub(1);
          return;
        }
        // This transfer still counts as in flight until it is committed.
        CommitReservation(reservation_id, size, checksum, s.from_peer, /*in_flight_here=*/1,
                          [this, s, request_id, size, start](const absl::Status& c) {
                            if (c.ok()) state_.bytes_in->Inc(static_cast<double>(size));
                            ReplyPut(s, request_id, c, c.ok(), start);
                            state_.data_plane_in_flight.fetch_sub(1);
                          });
      });
}

void DataPlane::CommitReservation(uint64_t reservation_id, uint64_t chunk_bytes, uint64_t checksum,
                                  bool from_peer, int64_t in_flight_here,
                                  std::function<void(const absl::Status&)> then,
                                  std::optional<uint64_t> payload_hash) {
  // Commit hashes the payload: here when it is at most kInlineCommitBytes and no other transfer
  // is in flight (verifying 4 MiB costs about 0.1 ms, storage-2026-11-22.md; less than a thread
  // hop), else on the blocking pool, so the progress thread goes on moving the others while it is
  // hashed in parallel. A payload hashed already (a Put in parts) is committed here: what is left
  // is the index update.
  auto commit = [this, reservation_id, checksum, from_peer, payload_hash, then = std::move(then)] {
    ChunkKey key;
    const absl::Status c =
        payload_hash.has_value()
            ? state_.store->CommitHashed(reservation_id, checksum, *payload_hash, &key)
            : state_.store->Commit(reservation_id, checksum, &key);
    if (c.ok() && !from_peer) state_.Written(key);
    then(c);
  };
  if (payload_hash.has_value() ||
      (chunk_bytes <= kInlineCommitBytes && state_.data_plane_in_flight.load() <= in_flight_here)) {
    return commit();
  }
  state_.blocking_pool.Submit(std::move(commit));
}

struct DataPlane::Assembly {
  std::string owner;  // the token of its sessions (AssemblyId)
  ChunkKey key;
  std::string chunk_header;
  uint64_t checksum = 0;
  uint64_t chunk_bytes = 0;
  uint32_t parts = 0;
  absl::Time deadline;
  absl::Time start;
  // Guarded by parts_mu_ (the assembly is reached only through assemblies_ or its callbacks).
  uint64_t part_bytes = 0;   // the sizes of the parts that arrived, added up
  bool reserving = false;    // the reservation is being made
  uint64_t reservation = 0;  // once made
  bool ended = false;        // answered (reservation refused, failure, or committed)
  absl::Status result;
  bool stored = false;
  int receiving = 0;      // parts being received
  uint32_t received = 0;  // parts received (or failed)
  absl::Status failure;   // the first part that failed
  struct Queued {
    Session s;
    std::shared_ptr<std::unique_ptr<Incoming>> in;
    uint64_t offset;
  };
  std::vector<Queued> queued;                         // arrived before the reservation
  std::vector<std::pair<Session, uint64_t>> waiting;  // parts to answer: session, request id
  uint32_t answered = 0;
  // The payload's XXH3 is computed in parts (Xxh3_64Blocks): each part's 1 KiB blocks are
  // summed by the thread that received it, right after its copy, while those bytes are in its
  // cache; the last part's thread folds the sums in order (~4 ns a block) instead of one thread
  // reading the whole payload again (a single-threaded pass over up to 64 MiB, mostly from DRAM).
  // overlap: a part covered bytes another had (AddRange refused it).
  std::unique_ptr<Xxh3_64Blocks> hash;
  bool overlap = false;
};

void DataPlane::OnPutPart(const Session& s, uint64_t rid, const v1::DataPlanePutRequest& req,
                          const ChunkKey& key, const ChunkHeader& header,
                          std::shared_ptr<std::unique_ptr<Incoming>> in, absl::Time deadline,
                          absl::Time start) {
  const uint64_t put_id = req.put_id();
  const uint64_t n = (*in)->payload_bytes();
  std::shared_ptr<Assembly> a;
  bool reserve = false, receive = false, end_now = false;
  uint64_t abort = 0;  // the reservation of a Put this part fails
  absl::Status refuse;
  {
    MutexLock lock(&parts_mu_);
    auto it = assemblies_.find(AssemblyId{s.token_id, put_id});
    if (it == assemblies_.end()) {
      if (size_t& open = assemblies_of_[s.token_id]; open >= kMaxAssemblies) {
        refuse = absl::ResourceExhaustedError(absl::StrCat(
            open, " Puts in parts are in flight", s.token_id.empty() ? "" : " with this token",
            "; send whole chunks or retry"));
      } else {
        a = std::make_shared<Assembly>();
        a->owner = s.token_id;
        a->key = key;
        a->chunk_header = req.chunk_header();
        a->checksum = header.payload_checksum;
        a->chunk_bytes = kChunkHeaderBytes + header.payload_bytes;
        a->parts = req.parts();
        a->deadline = deadline;
        a->start = start;
        assemblies_.emplace(AssemblyId{a->owner, put_id}, a);
        ++open;
      }
    } else {
      a = it->second;
      if (a->key != key || a->chunk_header != req.chunk_header() || a->parts != req.parts()) {
        refuse = absl::InvalidArgumentError(
            absl::StrCat("put_id ", put_id,
                         ": this part names another chunk, header or part count than the "
                         "Put's first part"));
      }
    }
    if (a != nullptr) {
      const uint64_t payload = a->chunk_bytes - kChunkHeaderBytes;
      if (!refuse.ok()) {
        // Named above.
      } else if (a->waiting.size() + 1 > a->parts || a->part_bytes + n > payload) {
        refuse = absl::InvalidArgumentError(
            absl::StrCat("parts: put_id ", put_id, " has more parts or bytes than its ", a->parts,
                         " parts of ", payload, " payload bytes"));
      } else if (a->waiting.size() + 1 == a->parts && a->part_bytes + n != payload) {
        refuse = absl::InvalidArgumentError(
            absl::StrCat("parts: the ", a->parts, " parts of put_id ", put_id, " carry ",
                         a->part_bytes + n, " bytes of a ", payload, "-byte payload"));
      }
      if (!refuse.ok()) {
        // This part is answered now; the Put fails, at once when nothing of it is moving.
        if (a->failure.ok()) a->failure = refuse;
        end_now = !a->ended && a->receiving == 0 && !a->reserving;
        abort = end_now ? a->reservation : 0;
      } else {
        a->waiting.emplace_back(s, rid);
        a->part_bytes += n;
        if (a->ended) {
          end_now = true;  // answered with the Put's result
        } else if (a->reservation == 0) {
          a->queued.push_back({s, std::move(in), req.payload_offset()});
          reserve = !a->reserving;
          a->reserving = true;
        } else {
          receive = true;
        }
      }
    }
  }
  if (!refuse.ok()) ReplyPut(s, rid, refuse, false, start);
  if (a == nullptr) return;
  if (end_now) {
    if (abort != 0) (void)state_.store->Abort(abort);
    return EndAssembly(a, put_id, refuse.ok() ? a->result : refuse, a->stored);
  }
  if (receive) return ReceivePart(a, put_id, s, in, req.payload_offset());
  if (!reserve) return;
  auto r = state_.store->Reserve(a->key, a->chunk_bytes, {.may_block = false});
  if (!storage::IsWouldBlock(r.status())) return Reserved(a, put_id, r);
  state_.blocking_pool.Submit(
      [this, a, put_id] { Reserved(a, put_id, state_.store->Reserve(a->key, a->chunk_bytes)); });
}

void DataPlane::Reserved(const std::shared_ptr<Assembly>& a, uint64_t put_id,
                         const absl::StatusOr<storage::Reservation>& r) {
  std::vector<Assembly::Queued> queued;
  absl::Status failure;
  {
    MutexLock lock(&parts_mu_);
    a->reserving = false;
    failure = a->failure;
    if (r.ok() && failure.ok()) {
      // Made with the reservation, which bounds it (its sums are 1/14 of the payload's size).
      a->hash = std::make_unique<Xxh3_64Blocks>(a->chunk_bytes - kChunkHeaderBytes);
      a->reservation = r->id;
      queued = std::move(a->queued);
    }
    a->queued.clear();  // otherwise dropped: their bytes are not taken
  }
  if (r.ok() && !failure.ok()) (void)state_.store->Abort(r->id);
  // Content-addressed: the same bytes are stored already (being written: ABORTED, below).
  if (absl::IsAlreadyExists(r.status())) return EndAssembly(a, put_id, absl::OkStatus(), false);
  if (!r.ok()) return EndAssembly(a, put_id, r.status(), false);
  if (!failure.ok()) return EndAssembly(a, put_id, failure, false);
  for (Assembly::Queued& q : queued) ReceivePart(a, put_id, q.s, q.in, q.offset);
}

void DataPlane::ReceivePart(const std::shared_ptr<Assembly>& a, uint64_t put_id, const Session& s,
                            const std::shared_ptr<std::unique_ptr<Incoming>>& in, uint64_t offset) {
  auto buffer = state_.store->BeginWrite(a->reservation, a->chunk_bytes);
  if (!buffer.ok()) {
    {
      MutexLock lock(&parts_mu_);
      ++a->receiving;  // PartReceived counts it down
    }
    return PartReceived(a, put_id,
                        absl::Status(buffer.status().code(),
                                     absl::StrCat("reservation: ", buffer.status().message())));
  }
  // The header once, with the first part (every part carries it).
  if (offset == 0) std::memcpy(buffer->data(), a->chunk_header.data(), kChunkHeaderBytes);
  const uint64_t n = (*in)->payload_bytes();
  {
    MutexLock lock(&parts_mu_);
    ++a->receiving;
  }
  state_.data_plane_in_flight.fetch_add(1);
  const uint8_t* payload = buffer->data() + kChunkHeaderBytes;
  s.transport->Receive(
      std::move(*in), buffer->subspan(kChunkHeaderBytes + offset, n), s.arena, a->deadline,
      [this, a, put_id, n, offset, payload](absl::Status st) {
        // Summed while this part's write holds the reservation (its bytes cannot go meanwhile);
        // an overlapping part is not (PartReceived fails the Put).
        if (st.ok() && !a->hash->AddRange(offset, ByteSpan(payload + offset, n))) {
          MutexLock lock(&parts_mu_);
          a->overlap = true;
        }
        state_.store->EndWrite(a->reservation);
        state_.data_plane_in_flight.fetch_sub(1);
        if (st.ok()) {
          state_.bytes_in->Inc(static_cast<double>(n + (offset == 0 ? kChunkHeaderBytes : 0)));
        }
        PartReceived(a, put_id, st);
      });
}

void DataPlane::PartReceived(const std::shared_ptr<Assembly>& a, uint64_t put_id,
                             const absl::Status& st) {
  absl::Status failure;
  {
    MutexLock lock(&parts_mu_);
    --a->receiving;
    ++a->received;
    if (!st.ok() && a->failure.ok()) a->failure = st;
    // The last part's end decides; after a failure, the end of the last one moving.
    if (a->received < a->parts && (a->failure.ok() || a->receiving > 0)) return;
    if (a->ended) return;
    if (a->failure.ok() && a->overlap) {
      // The parts' sizes add up (checked as they came), so they leave a gap too.
      a->failure = absl::InvalidArgumentError(
          absl::StrCat("payload_offset: the ", a->parts, " parts of put_id ", put_id,
                       " overlap, so some payload bytes were never sent"));
    }
    failure = a->failure;
  }
  uint64_t hash = 0;
  if (failure.ok()) {
    // Folded while a write holds the reservation (its bytes cannot go meanwhile).
    auto w = state_.store->BeginWrite(a->reservation, a->chunk_bytes);
    if (w.ok()) {
      hash = a->hash->Finish(ByteSpan(w->subspan(kChunkHeaderBytes)));
      state_.store->EndWrite(a->reservation);
    } else {
      failure =
          absl::Status(w.status().code(), absl::StrCat("reservation: ", w.status().message()));
    }
  }
  if (!failure.ok()) {
    (void)state_.store->Abort(a->reservation);
    return EndAssembly(a, put_id, failure, false);
  }
  // Every part has arrived, so waiting[0] is there; the parts' receives no longer count as in
  // flight.
  CommitReservation(
      a->reservation, a->chunk_bytes, a->checksum, a->waiting[0].first.from_peer,
      /*in_flight_here=*/0,
      [this, a, put_id](const absl::Status& c) { EndAssembly(a, put_id, c, c.ok()); }, hash);
}

void DataPlane::EndAssembly(const std::shared_ptr<Assembly>& a, uint64_t put_id,
                            const absl::Status& result, bool stored) {
  std::vector<std::pair<Session, uint64_t>> answer;
  {
    MutexLock lock(&parts_mu_);
    if (!a->ended) {
      a->ended = true;
      a->result = result;
      a->stored = stored;
    }
    answer.assign(a->waiting.begin() + a->answered, a->waiting.end());
    a->answered = static_cast<uint32_t>(a->waiting.size());
    if (a->answered >= a->parts) {
      auto it = assemblies_.find(AssemblyId{a->owner, put_id});
      if (it != assemblies_.end() && it->second == a) EraseAssemblyLocked(it->first);
    }
  }
  // Each part's call is recorded as one UcxPut; "stored" only on the Put's first part's answer.
  for (const auto& [s, rid] : answer) ReplyPut(s, rid, a->result, a->stored, a->start);
}

void DataPlane::EraseAssemblyLocked(AssemblyId id) {
  if (assemblies_.erase(id) == 0) return;
  auto it = assemblies_of_.find(id.first);
  if (it != assemblies_of_.end() && --it->second == 0) assemblies_of_.erase(it);
}

void DataPlane::SweepAssemblies() {
  const absl::Time now = absl::Now();
  struct Late {
    uint64_t put_id;
    std::shared_ptr<Assembly> a;
    uint64_t abort;  // the reservation to drop, 0 when none (or the Put has ended)
    size_t came;     // parts that arrived
  };
  std::vector<Late> late;
  {
    MutexLock lock(&parts_mu_);
    if (assemblies_.empty()) return;
    for (auto& [id, a] : assemblies_) {
      if (now > a->deadline && a->receiving == 0 && !a->reserving) {
        late.push_back({id.second, a, a->ended ? 0 : a->reservation, a->waiting.size()});
      }
    }
    for (const Late& l : late) {
      EraseAssemblyLocked(AssemblyId{l.a->owner, l.put_id});  // parts that come later start anew
    }
  }
  for (const Late& l : late) {
    if (l.abort != 0) (void)state_.store->Abort(l.abort);
    EndAssembly(l.a, l.put_id,
                absl::DeadlineExceededError(
                    absl::StrCat("put_id ", l.put_id, ": only ", l.came, " of the Put's ",
                                 l.a->parts, " parts came by its deadline; nothing is stored")),
                false);
  }
}

}  // namespace kvdn::daemon
