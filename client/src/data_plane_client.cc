#include "kvdn/client/data_plane_client.h"

#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kvdn/common/chunk_format.h"
#include "kvdn/proto/grpc_status.h"
#include "kvdn/v1/data_plane.pb.h"

namespace kvdn::client {

void KeyToProto(const ChunkKey& key, v1::ChunkKey* out) {
  out->set_namespace_(key.ns);
  out->set_fingerprint(key.fingerprint);
  const std::array<uint8_t, 16> c = key.prefix_hash.Canonical();
  out->set_prefix_hash(c.data(), c.size());
}

// One request waiting for its reply (and, for a Put, for its send to end: the payload is the
// caller's memory until then).
struct DataPlaneClient::Pending {
  Mutex mu;
  CondVar cv;
  bool replied ABSL_GUARDED_BY(mu) = false;    // reply handled (and its payload received)
  bool sent ABSL_GUARDED_BY(mu) = false;       // the request's send ended
  bool receiving ABSL_GUARDED_BY(mu) = false;  // a payload is being received into the buffer
  absl::Status status ABSL_GUARDED_BY(mu);
  uint64_t payload_bytes = 0;  // Get: the whole payload's
  uint64_t part_offset = 0;    // Get: where the received part starts in it
  uint64_t part_bytes = 0;     // Get: the part's size
  bool stored = false;
  std::optional<Place> place;    // Get: where the payload goes
  std::optional<Landed> landed;  // Get: told when the payload has landed

  void Complete(absl::Status st) {
    MutexLock lock(&mu);
    if (replied) return;
    replied = true;
    receiving = false;
    if (status.ok()) status = std::move(st);
    cv.SignalAll();
  }
  void SendEnded(const absl::Status& st) {
    MutexLock lock(&mu);
    sent = true;
    if (!st.ok() && !replied) {
      replied = true;
      status = st;
    }
    cv.SignalAll();
  }
};

absl::StatusOr<std::unique_ptr<DataPlaneClient>> DataPlaneClient::Open(
    v1::KvService::Stub* stub, bool same_host, const std::string& transports,
    absl::Duration deadline, const std::string& peer_node, const std::string& authorization) {
  std::unique_ptr<DataPlaneClient> dp(new DataPlaneClient());
  dp->stub_ = stub;
  dp->authorization_ = authorization;
  transfer::UcxTransportOptions o;
  o.name = peer_node.empty() ? "kvdn-client" : "kvdnd-peer";
  o.transports = !transports.empty() ? transports : same_host ? "posix,cma" : "";
  KVDN_ASSIGN_OR_RETURN(dp->transport_, transfer::UcxTransport::Create(o));
  DataPlaneClient* raw = dp.get();
  dp->transport_->SetHandler(
      v1::DATA_PLANE_GET_REPLY,
      [raw](std::unique_ptr<transfer::Incoming> in) { raw->OnGetReply(std::move(in)); });
  dp->transport_->SetHandler(
      v1::DATA_PLANE_PUT_REPLY,
      [raw](std::unique_ptr<transfer::Incoming> in) { raw->OnPutReply(std::move(in)); });
  dp->transport_->SetPeerFailureHandler(
      [raw](transfer::PeerId, const absl::Status&) { raw->healthy_.store(false); });

  v1::OpenDataPlaneRequest req;
  req.set_worker_address(dp->transport_->address());
  req.set_pid(same_host ? getpid() : 0);
  if (same_host) req.set_pid_namespace(transfer::NamespaceId("self", "pid"));
  req.set_client_name(peer_node.empty() ? absl::StrCat("pid ", getpid())
                                        : absl::StrCat("kvdnd ", peer_node));
  req.set_peer_node(peer_node);
  v1::OpenDataPlaneResponse resp;
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + deadline));
  if (!authorization.empty()) ctx.AddMetadata("authorization", authorization);
  grpc::Status gs = stub->OpenDataPlane(&ctx, req, &resp);
  if (!gs.ok()) return FromGrpcStatus(gs);
  transfer::ConnectOptions co;
  co.peer_pid = resp.pid();
  KVDN_ASSIGN_OR_RETURN(dp->daemon_, dp->transport_->Connect(resp.worker_address(), co));
  dp->session_ = resp.session_id();
  dp->daemon_address_ = resp.worker_address();
  // A daemon from before lanes has one worker, whose address its descriptors carry.
  dp->descriptor_address_ =
      resp.descriptor_address().empty() ? resp.worker_address() : resp.descriptor_address();
  dp->transports_ = resp.transports();
  return dp;
}

DataPlaneClient::~DataPlaneClient() {
  if (session_ != 0) {
    v1::CloseDataPlaneRequest req;
    req.set_session_id(session_);
    v1::CloseDataPlaneResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(2)));
    if (!authorization_.empty()) ctx.AddMetadata("authorization", authorization_);
    (void)stub_->CloseDataPlane(&ctx, req, &resp);
  }
  pool_.reset();
  transport_.reset();  // ends what is in flight
}

std::shared_ptr<DataPlaneClient::Pending> DataPlaneClient::Take(uint64_t request_id) {
  MutexLock lock(&mu_);
  auto it = pending_.find(request_id);
  if (it == pending_.end()) return nullptr;
  std::shared_ptr<Pending> p = std::move(it->second);
  pending_.erase(it);
  return p;
}

absl::Status DataPlaneClient::Wait(uint64_t request_id, const std::shared_ptr<Pending>& p,
                                   absl::Time deadline) {
  MutexLock lock(&p->mu);
  while (!(p->replied && p->sent)) {
    if (!p->replied && !p->receiving && absl::Now() >= deadline) {
      // No reply by the deadline: forget the request (a late reply is discarded); the send's own
      // end is still awaited, since its payload may be the caller's memory.
      p->mu.Unlock();
      const bool taken = Take(request_id) != nullptr;
      p->mu.Lock();
      if (taken && !p->replied) {
        p->replied = true;
        p->status = absl::DeadlineExceededError("no data-plane reply from kvdnd by the deadline");
      }
      continue;
    }
    const absl::Duration left = deadline - absl::Now();
    p->cv.WaitWithTimeout(&p->mu, p->replied || p->receiving || left <= absl::ZeroDuration()
                                      ? absl::Milliseconds(50)
                                      : left);
  }
  return p->status;
}

void DataPlaneClient::OnGetReply(std::unique_ptr<transfer::Incoming> in) {
  v1::DataPlaneGetReply reply;
  if (!reply.ParseFromString(in->header())) return;  // not ours: dropped
  std::shared_ptr<Pending> p = Take(reply.request_id());
  if (p == nullptr) return;  // timed out already: its payload is discarded
  if (reply.code() != 0) {
    return p->Complete(absl::Status(static_cast<absl::StatusCode>(reply.code()), reply.message()));
  }
  const std::string& h = reply.chunk_header();
  // A daemon from before parts sends the whole payload and no size.
  const uint64_t total = reply.payload_size() != 0 ? reply.payload_size() : in->payload_bytes();
  const uint64_t at = reply.payload_offset();
  auto dst = (*p->place)(ByteSpan(reinterpret_cast<const uint8_t*>(h.data()), h.size()), total);
  if (!dst.ok()) return p->Complete(dst.status());
  if (at > dst->size() || in->payload_bytes() > dst->size() - at) {
    return p->Complete(absl::InternalError(
        absl::StrCat("kvdnd sent payload bytes [", at, ", ", at + in->payload_bytes(), ") of a ",
                     total, "-byte payload into a ", dst->size(), "-byte buffer")));
  }
  p->payload_bytes = total;
  p->part_offset = at;
  p->part_bytes = in->payload_bytes();
  if (in->payload_bytes() == 0) return p->Complete(absl::OkStatus());  // a part past the end
  {
    MutexLock lock(&p->mu);
    p->receiving = true;
  }
  const MutableByteSpan part = dst->subspan(at, in->payload_bytes());
  const transfer::MemoryRegion* region =
      pool_ && pool_->Contains(part.data(), part.size()) ? pool_.get() : nullptr;
  transport_->Receive(std::move(in), part, region, absl::Now() + absl::Seconds(60),
                      [p, part](absl::Status st) {
                        if (st.ok() && p->landed.has_value()) (*p->landed)(p->part_offset, part);
                        p->Complete(std::move(st));
                      });
}

void DataPlaneClient::OnPutReply(std::unique_ptr<transfer::Incoming> in) {
  v1::DataPlanePutReply reply;
  if (!reply.ParseFromString(in->header())) return;
  std::shared_ptr<Pending> p = Take(reply.request_id());
  if (p == nullptr) return;
  p->stored = reply.stored();
  p->Complete(absl::Status(static_cast<absl::StatusCode>(reply.code()), reply.message()));
}

absl::StatusOr<uint64_t> DataPlaneClient::Get(const ChunkKey& key, uint64_t lease_id, Place place,
                                              absl::Time deadline, std::optional<Landed> landed) {
  return FinishGet(StartGet(key, lease_id, Part{}, place, deadline, landed), deadline);
}

DataPlaneClient::Ticket DataPlaneClient::StartGet(const ChunkKey& key, uint64_t lease_id, Part part,
                                                  Place place, absl::Time deadline,
                                                  std::optional<Landed> landed) {
  const uint64_t rid = next_request_.fetch_add(1);
  auto p = std::make_shared<Pending>();
  p->place.emplace(place);
  if (landed.has_value()) p->landed.emplace(*landed);
  v1::DataPlaneGetRequest req;
  req.set_session_id(session_);
  req.set_request_id(rid);
  req.set_deadline_unix_micros(absl::ToUnixMicros(deadline));
  if (lease_id != 0) {
    req.set_lease_id(lease_id);
  } else {
    KeyToProto(key, req.mutable_key());
  }
  req.set_payload_offset(part.offset);
  req.set_payload_length(part.length);
  {
    MutexLock lock(&mu_);
    pending_[rid] = p;
  }
  transport_->Send(daemon_, v1::DATA_PLANE_GET, req.SerializeAsString(), {}, nullptr, deadline,
                   [p](absl::Status st) { p->SendEnded(st); });
  return Ticket{rid, std::move(p)};
}

absl::StatusOr<uint64_t> DataPlaneClient::FinishGet(const Ticket& ticket, absl::Time deadline,
                                                    uint64_t* part_bytes) {
  KVDN_RETURN_IF_ERROR(Wait(ticket.request_id, ticket.pending, deadline));
  if (part_bytes != nullptr) *part_bytes = ticket.pending->part_bytes;
  return ticket.pending->payload_bytes;
}

namespace {

// The `place` of a Get in parts: the caller's runs once, for the first reply; the others must
// name the same chunk (header and size) and get the same buffer. Runs on the lanes' threads.
class PlaceOnce {
 public:
  PlaceOnce(const ChunkKey& key, uint64_t lease_id, DataPlaneClient::Place place)
      : key_(key), lease_id_(lease_id), place_(place) {}

  absl::StatusOr<MutableByteSpan> operator()(ByteSpan header, uint64_t payload_bytes) {
    MutexLock lock(&mu_);
    if (!dst_.has_value()) {
      header_.assign(header.begin(), header.end());
      payload_bytes_ = payload_bytes;
      dst_.emplace(place_(header, payload_bytes));
      return *dst_;
    }
    if (payload_bytes != payload_bytes_ ||
        !std::equal(header.begin(), header.end(), header_.begin(), header_.end())) {
      return absl::AbortedError(absl::StrCat(
          lease_id_ != 0 ? absl::StrCat("lease ", lease_id_) : key_.ToString(),
          ": the parts of one Get came from two versions of the chunk (it was replaced "
          "meanwhile); discard the buffer and retry"));
    }
    return *dst_;
  }

 private:
  const ChunkKey& key_;
  const uint64_t lease_id_;
  DataPlaneClient::Place place_;
  Mutex mu_;
  std::vector<uint8_t> header_ ABSL_GUARDED_BY(mu_);
  uint64_t payload_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  std::optional<absl::StatusOr<MutableByteSpan>> dst_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

absl::StatusOr<uint64_t> DataPlaneClient::GetInParts(absl::Span<DataPlaneClient* const> sessions,
                                                     const ChunkKey& key, uint64_t lease_id,
                                                     uint64_t payload_hint, Place place,
                                                     absl::Time deadline,
                                                     std::optional<Landed> landed) {
  if (sessions.empty()) return absl::InternalError("GetInParts over no session");
  if (sessions.size() == 1) return sessions[0]->Get(key, lease_id, place, deadline, landed);
  constexpr uint64_t kPage = 4096;
  const uint64_t n = sessions.size();
  const uint64_t step = ((payload_hint + n - 1) / n + kPage - 1) / kPage * kPage;
  PlaceOnce once(key, lease_id, place);
  auto place_once = [&once](ByteSpan header, uint64_t payload_bytes) {
    return once(header, payload_bytes);
  };
  std::vector<Ticket> tickets;
  tickets.reserve(n);
  for (uint64_t i = 0; i < n; ++i) {
    // The last part reads to the end, whatever the chunk's size.
    const Part part{i * step, i + 1 == n ? 0 : step};
    tickets.push_back(sessions[i]->StartGet(key, lease_id, part, place_once, deadline, landed));
  }
  absl::Status first_error;
  uint64_t size = 0;
  std::vector<std::pair<uint64_t, uint64_t>> got;  // [offset, end) of each part received
  for (uint64_t i = 0; i < n; ++i) {
    uint64_t bytes = 0;
    absl::StatusOr<uint64_t> r = sessions[i]->FinishGet(tickets[i], deadline, &bytes);
    if (!r.ok()) {
      if (first_error.ok()) first_error = r.status();
      continue;
    }
    size = *r;
    got.emplace_back(tickets[i].pending->part_offset, tickets[i].pending->part_offset + bytes);
  }
  KVDN_RETURN_IF_ERROR(first_error);
  // Every byte of the payload arrived (a daemon that ignores parts sends the whole payload each
  // time, which also covers it).
  std::sort(got.begin(), got.end());
  uint64_t covered = 0;
  for (const auto& [from, to] : got) {
    if (from > covered) break;
    covered = std::max(covered, to);
  }
  if (covered != size) {
    return absl::InternalError(absl::StrCat("a Get in ", n, " parts received bytes [0, ", covered,
                                            ") of a ", size, "-byte payload"));
  }
  return size;
}

absl::StatusOr<bool> DataPlaneClient::Put(const ChunkKey& key, uint64_t reservation_id,
                                          ByteSpan chunk_header, ByteSpan payload,
                                          absl::Time deadline) {
  return FinishPut(StartPut(key, reservation_id, chunk_header, payload, std::nullopt, deadline),
                   deadline);
}

DataPlaneClient::Ticket DataPlaneClient::StartPut(const ChunkKey& key, uint64_t reservation_id,
                                                  ByteSpan chunk_header, ByteSpan payload,
                                                  std::optional<PutPart> part,
                                                  absl::Time deadline) {
  const uint64_t rid = next_request_.fetch_add(1);
  auto p = std::make_shared<Pending>();
  v1::DataPlanePutRequest req;
  req.set_session_id(session_);
  req.set_request_id(rid);
  req.set_deadline_unix_micros(absl::ToUnixMicros(deadline));
  if (reservation_id != 0) {
    req.set_reservation_id(reservation_id);
  } else {
    KeyToProto(key, req.mutable_key());
  }
  req.set_chunk_header(chunk_header.data(), chunk_header.size());
  if (part.has_value()) {
    req.set_part(true);
    req.set_payload_offset(part->offset);
    req.set_parts(part->parts);
    req.set_put_id(part->put_id);
  }
  {
    MutexLock lock(&mu_);
    pending_[rid] = p;
  }
  const transfer::MemoryRegion* region =
      pool_ && pool_->Contains(payload.data(), payload.size()) ? pool_.get() : nullptr;
  transport_->Send(daemon_, v1::DATA_PLANE_PUT, req.SerializeAsString(), payload, region, deadline,
                   [p](absl::Status st) { p->SendEnded(st); });
  return Ticket{rid, std::move(p)};
}

absl::StatusOr<bool> DataPlaneClient::FinishPut(const Ticket& ticket, absl::Time deadline) {
  KVDN_RETURN_IF_ERROR(Wait(ticket.request_id, ticket.pending, deadline));
  return ticket.pending->stored;
}

absl::StatusOr<bool> DataPlaneClient::PutInParts(absl::Span<DataPlaneClient* const> sessions,
                                                 const ChunkKey& key, ByteSpan chunk_header,
                                                 ByteSpan payload, absl::Time deadline) {
  if (sessions.empty()) return absl::InternalError("PutInParts over no session");
  constexpr uint64_t kPage = 4096;
  const uint64_t want = sessions.size();
  const uint64_t step = ((payload.size() + want - 1) / want + kPage - 1) / kPage * kPage;
  const uint64_t n = (payload.size() + step - 1) / step;  // parts that carry bytes
  if (n < 2) return sessions[0]->Put(key, 0, chunk_header, payload, deadline);
  // Unique among this process's Puts in flight, and unlikely to meet another client's.
  static std::atomic<uint64_t> next_put{absl::ToUnixNanos(absl::Now()) ^
                                        (uint64_t(getpid()) << 40)};
  const uint64_t put_id = (next_put.fetch_add(1) * 0x9E3779B97F4A7C15ull) | 1;
  std::vector<Ticket> tickets;
  for (uint64_t i = 0; i < n; ++i) {
    const ByteSpan part = payload.subspan(i * step, std::min(step, payload.size() - i * step));
    tickets.push_back(sessions[i]->StartPut(
        key, 0, chunk_header, part, PutPart{i * step, static_cast<uint32_t>(n), put_id}, deadline));
  }
  absl::Status st;
  bool stored = false;
  for (uint64_t i = 0; i < n; ++i) {
    const absl::StatusOr<bool> r = sessions[i]->FinishPut(tickets[i], deadline);
    if (st.ok()) st = r.status();
    if (r.ok()) stored = stored || *r;
  }
  KVDN_RETURN_IF_ERROR(st);
  return stored;
}

}  // namespace kvdn::client
