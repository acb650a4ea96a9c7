#include "kvdn/client/data_plane_client.h"

#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include <cstring>

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
  uint64_t payload_bytes = 0;
  bool stored = false;
  std::optional<Place> place;  // Get: where the payload goes

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
    absl::Duration deadline, const std::string& peer_node) {
  std::unique_ptr<DataPlaneClient> dp(new DataPlaneClient());
  dp->stub_ = stub;
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
  grpc::Status gs = stub->OpenDataPlane(&ctx, req, &resp);
  if (!gs.ok()) return FromGrpcStatus(gs);
  transfer::ConnectOptions co;
  co.peer_pid = resp.pid();
  KVDN_ASSIGN_OR_RETURN(dp->daemon_, dp->transport_->Connect(resp.worker_address(), co));
  dp->session_ = resp.session_id();
  dp->daemon_address_ = resp.worker_address();
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
  auto dst = (*p->place)(ByteSpan(reinterpret_cast<const uint8_t*>(h.data()), h.size()),
                         in->payload_bytes());
  if (!dst.ok()) return p->Complete(dst.status());
  p->payload_bytes = in->payload_bytes();
  {
    MutexLock lock(&p->mu);
    p->receiving = true;
  }
  const transfer::MemoryRegion* region =
      pool_ && pool_->Contains(dst->data(), dst->size()) ? pool_.get() : nullptr;
  transport_->Receive(std::move(in), *dst, region, absl::Now() + absl::Seconds(60),
                      [p](absl::Status st) { p->Complete(std::move(st)); });
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
                                              absl::Time deadline) {
  const uint64_t rid = next_request_.fetch_add(1);
  auto p = std::make_shared<Pending>();
  p->place.emplace(place);
  v1::DataPlaneGetRequest req;
  req.set_session_id(session_);
  req.set_request_id(rid);
  req.set_deadline_unix_micros(absl::ToUnixMicros(deadline));
  if (lease_id != 0) {
    req.set_lease_id(lease_id);
  } else {
    KeyToProto(key, req.mutable_key());
  }
  {
    MutexLock lock(&mu_);
    pending_[rid] = p;
  }
  transport_->Send(daemon_, v1::DATA_PLANE_GET, req.SerializeAsString(), {}, nullptr, deadline,
                   [p](absl::Status st) { p->SendEnded(st); });
  KVDN_RETURN_IF_ERROR(Wait(rid, p, deadline));
  return p->payload_bytes;
}

absl::StatusOr<bool> DataPlaneClient::Put(const ChunkKey& key, uint64_t reservation_id,
                                          ByteSpan chunk_header, ByteSpan payload,
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
  {
    MutexLock lock(&mu_);
    pending_[rid] = p;
  }
  const transfer::MemoryRegion* region =
      pool_ && pool_->Contains(payload.data(), payload.size()) ? pool_.get() : nullptr;
  transport_->Send(daemon_, v1::DATA_PLANE_PUT, req.SerializeAsString(), payload, region, deadline,
                   [p](absl::Status st) { p->SendEnded(st); });
  KVDN_RETURN_IF_ERROR(Wait(rid, p, deadline));
  return p->stored;
}

}  // namespace kvdn::client
