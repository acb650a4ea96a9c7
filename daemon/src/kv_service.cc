#include "src/kv_service.h"

#include <grpcpp/support/proto_buffer_reader.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>

#include "absl/strings/str_cat.h"
#include "kvdn/common/chunk_format.h"
#include "kvdn/proto/get_frames.h"
#include "kvdn/proto/grpc_status.h"
#include "src/data_plane.h"
#include "src/peer_router.h"

namespace kvdn::daemon {
namespace {

constexpr int kMaxLookupChain = 65536;

// When the caller stops waiting (its deadline, at most max_call_duration from now).
absl::Time CallDeadline(ServerState& state, const grpc::ServerContextBase* ctx) {
  const absl::Time cap = absl::Now() + absl::Milliseconds(state.config.max_call_duration_ms());
  return std::min(cap, absl::FromChrono(ctx->deadline()));
}

absl::StatusOr<ChunkKey> CheckedKey(ServerState& state, const v1::ChunkKey& key,
                                    absl::string_view field) {
  KVDN_ASSIGN_OR_RETURN(ChunkKey k, KeyFromProto(key, field));
  KVDN_RETURN_IF_ERROR(state.CheckNamespace(k.ns));
  return k;
}

// The chain of a Lookup or Probe request, validated.
absl::StatusOr<std::vector<ChunkKey>> ChainOf(ServerState& state, const v1::LookupRequest& req) {
  if (absl::Status st = ValidateNamespace(req.namespace_()); !st.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("namespace: ", st.message()));
  }
  KVDN_RETURN_IF_ERROR(state.CheckNamespace(req.namespace_()));
  if (req.prefix_hashes_size() > kMaxLookupChain) {
    return absl::InvalidArgumentError(absl::StrCat("prefix_hashes: ", req.prefix_hashes_size(),
                                                   " hashes, at most ", kMaxLookupChain));
  }
  std::vector<ChunkKey> chain(req.prefix_hashes_size());
  for (int i = 0; i < req.prefix_hashes_size(); ++i) {
    const std::string& h = req.prefix_hashes(i);
    if (h.size() != 16) {
      return absl::InvalidArgumentError(
          absl::StrCat("prefix_hashes[", i, "]: ", h.size(), " bytes, need 16"));
    }
    chain[i].ns = req.namespace_();
    chain[i].fingerprint = req.fingerprint();
    chain[i].prefix_hash = Hash128::FromCanonical(reinterpret_cast<const uint8_t*>(h.data()));
  }
  return chain;
}

// The longest stored prefix; `forward`: chunks past the local prefix may be on peers (KvService;
// PeerService answers for its local tiers only).
absl::Status DoLookup(ServerState& state, const grpc::ServerContextBase* ctx,
                      const v1::LookupRequest& req, v1::LookupResponse* resp, bool forward) {
  KVDN_ASSIGN_OR_RETURN(std::vector<ChunkKey> chain, ChainOf(state, req));
  const storage::LookupResult r = state.store->Lookup(chain);
  resp->set_matched_chunks(static_cast<uint32_t>(r.matched));
  for (storage::TierKind t : r.tiers) resp->add_tiers(TierToProto(t));
  if (forward && r.matched < chain.size() && state.HasPeers()) {
    std::vector<v1::Tier> tiers;
    const size_t remote = state.router->Probe(chain, r.matched, CallDeadline(state, ctx), &tiers);
    resp->set_matched_chunks(static_cast<uint32_t>(r.matched + remote));
    for (v1::Tier t : tiers) resp->add_tiers(t);
    if (remote > 0 && !state.config.peer_prefetch_disabled()) {
      // Each candidate may cost a peer deadline; R owners and one more.
      const absl::Duration budget = absl::Milliseconds(state.config.peer_timeout_ms()) *
                                    static_cast<int64_t>(state.config.replicas() + 2);
      state.router->Prefetch(absl::MakeConstSpan(chain).subspan(r.matched, remote),
                             absl::Now() + budget);
    }
  }
  return absl::OkStatus();
}

// Reads the frames of a Put stream into `buffer`. INVALID_ARGUMENT for a frame over the limit, a
// second header, more bytes than declared, or a stream that ends short; CANCELLED when the client
// went away.
absl::Status ReadFrames(ServerState& state, grpc::ServerContext* ctx,
                        grpc::ServerReader<v1::PutRequest>* reader, MutableByteSpan buffer) {
  v1::PutRequest msg;
  uint64_t got = 0;
  const uint64_t max_frame = state.config.max_frame_bytes();
  while (reader->Read(&msg)) {
    if (msg.frame_case() != v1::PutRequest::kData) {
      return absl::InvalidArgumentError(
          absl::StrCat("Put frame after the header at byte ", got, " is not a data frame"));
    }
    const std::string& data = msg.data();
    if (data.size() > max_frame) {
      return absl::InvalidArgumentError(absl::StrCat("Put data frame of ", data.size(),
                                                     " bytes exceeds max_frame_bytes ", max_frame));
    }
    if (got + data.size() > buffer.size()) {
      return absl::InvalidArgumentError(absl::StrCat("Put stream carries more than the ",
                                                     buffer.size(), " bytes its header declared"));
    }
    std::memcpy(buffer.data() + got, data.data(), data.size());
    got += data.size();
  }
  if (ctx->IsCancelled()) return absl::CancelledError("client cancelled the Put stream");
  if (got != buffer.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("Put stream ended after ", got, " of ", buffer.size(), " declared bytes"));
  }
  state.bytes_in->Inc(got);
  return absl::OkStatus();
}

// `replica`: the chunk comes from a peer (PeerService.Replicate) and is not replicated again.
absl::Status DoPut(ServerState& state, grpc::ServerContext* ctx,
                   grpc::ServerReader<v1::PutRequest>* reader, v1::PutResponse* resp,
                   bool replica) {
  v1::PutRequest first;
  if (!reader->Read(&first)) {
    if (ctx->IsCancelled()) return absl::CancelledError("client cancelled the Put stream");
    return absl::InvalidArgumentError("Put stream ended before its header");
  }
  if (first.frame_case() != v1::PutRequest::kHeader) {
    return absl::InvalidArgumentError("the first Put message must carry the header");
  }
  const v1::PutRequest::Header& h = first.header();
  if (h.size() < kChunkHeaderBytes || h.size() > kChunkHeaderBytes + kMaxChunkPayloadBytes) {
    return absl::InvalidArgumentError(absl::StrCat("header.size ", h.size(), " is outside [",
                                                   kChunkHeaderBytes, ", ",
                                                   kChunkHeaderBytes + kMaxChunkPayloadBytes, "]"));
  }
  storage::TieredStore& store = *state.store;
  uint64_t id = h.reservation_id();
  const bool own_reservation = id == 0;
  if (own_reservation) {
    KVDN_ASSIGN_OR_RETURN(ChunkKey key, CheckedKey(state, h.key(), "header.key"));
    auto r = store.Reserve(key, h.size());
    if (absl::IsAlreadyExists(r.status())) {
      resp->set_stored(false);  // content-addressed: the same bytes are stored already
      return absl::OkStatus();
    }
    KVDN_RETURN_IF_ERROR(r.status());
    id = r->id;
  }
  auto buffer = store.BeginWrite(id, h.size());
  if (!buffer.ok()) {
    if (own_reservation) (void)store.Abort(id);
    return buffer.status();
  }
  absl::Status st = ReadFrames(state, ctx, reader, *buffer);
  store.EndWrite(id);
  if (!own_reservation) {
    // The writer commits (or releases) its reservation itself.
    resp->set_stored(st.ok());
    return st;
  }
  ChunkKey key;
  if (st.ok())
    st = store.Commit(id, h.payload_checksum(), &key);  // frees the reservation on error
  else
    (void)store.Abort(id);
  resp->set_stored(st.ok());
  if (st.ok() && !replica) state.Written(key);
  return st;
}

// Holds a chunk's lease while gRPC holds slices of its bytes: one reference for the reactor and
// one per frame slice (its destroy callback). The last reference releases the lease.
class LeasePin {
 public:
  LeasePin(ServerState& state, uint64_t lease_id) : state_(state), lease_id_(lease_id) {
    state_.leases_in_transport.fetch_add(1);
  }
  void Ref() { refs_.fetch_add(1, std::memory_order_relaxed); }
  static void Unref(void* pin) {
    auto* p = static_cast<LeasePin*>(pin);
    if (p->refs_.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
    // An expired lease was already reclaimed by the store; the reactor reported that (ABORTED).
    (void)p->state_.store->Release(p->lease_id_);
    p->state_.leases_in_transport.fetch_sub(1);
    delete p;
  }

 private:
  ServerState& state_;
  const uint64_t lease_id_;
  std::atomic<int> refs_{1};
};

// One Get (or Fetch) call: admission, the lease, then the chunk in frames of get_frame_bytes,
// each a GetResponse on the wire: a small header slice plus a slice that points into the leased
// arena bytes. The lease outlives the call by a grace period (the watchdog cancels the call at
// max_call_duration), so every byte gRPC sends is read while the lease holds the chunk; it is
// released when gRPC drops the last slice. Deletes itself in OnDone.
class GetReactor final : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
 public:
  GetReactor(ServerState& state, Method method, grpc::CallbackServerContext* ctx,
             const grpc::ByteBuffer* request)
      : state_(state),
        call_(state, method, ctx),
        forward_(method == Method::kGet),
        deadline_(CallDeadline(state, ctx)) {
    if (!call_.admitted().ok()) {
      Fail(call_.admitted());
      return;
    }
    v1::GetRequest req;
    grpc::ByteBuffer copy(*request);
    if (!grpc::SerializationTraits<v1::GetRequest>::Deserialize(&copy, &req).ok()) {
      Fail(absl::InvalidArgumentError("GetRequest does not parse"));
      return;
    }
    auto key = CheckedKey(state_, req.key(), "key");
    if (!key.ok()) {
      Fail(key.status());
      return;
    }
    key_ = *std::move(key);
    // Chunks in host memory are leased here, on gRPC's thread; the rest on a thread that may
    // block (a disk read, a copy off the GPU).
    if (!Acquire(/*may_block=*/false)) {
      state_.blocking_pool.Submit([this] { Acquire(/*may_block=*/true); });
    }
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      Fail(absl::CancelledError("client went away during Get"));
      return;
    }
    WriteNext();
  }

  void OnCancel() override { cancelled_.store(true); }

  void OnDone() override {
    absl::Status final = final_;
    if (cancelled_.load() && final.ok()) final = absl::CancelledError("Get cancelled");
    if (final.ok()) state_.bytes_out->Inc(bytes_.size());
    (void)call_.Finish(final);
    if (pin_ != nullptr) LeasePin::Unref(pin_);
    delete this;
  }

 private:
  // Leases the chunk and starts writing. False when it would block and may_block is false.
  bool Acquire(bool may_block) {
    storage::AcquireOptions opts;
    opts.ttl = absl::Milliseconds(state_.config.max_call_duration_ms()) + kLeaseGrace;
    opts.may_block = may_block;
    absl::StatusOr<storage::Lease> lease = state_.store->Acquire(key_, opts);
    if (!may_block && storage::IsWouldBlock(lease.status())) return false;
    if (absl::IsNotFound(lease.status()) && forward_ && state_.HasPeers()) {
      // A local miss: from the owners (into the host tier), on a thread that may block.
      if (!may_block) return false;
      absl::Status fetched = state_.router->Fetch(key_, deadline_);
      lease = fetched.ok() ? state_.store->Acquire(key_, opts) : fetched;
    }
    if (!lease.ok()) {
      Fail(lease.status());
      return true;
    }
    pin_ = new LeasePin(state_, lease->id);
    expires_ = lease->expires;
    tier_ = TierToProto(lease->tier);
    bytes_ = lease->host_bytes;
    WriteNext();
    return true;
  }

  // Writes the next frame; the last one together with the status.
  void WriteNext() {
    if (off_ >= bytes_.size()) {  // only after a write that was not the last (not reached)
      Fail(absl::InternalError("Get wrote past the chunk"));
      return;
    }
    if (absl::Now() >= expires_) {
      Fail(absl::AbortedError(absl::StrCat("lease on ", key_.ToString(),
                                           " expired mid-transfer; discard the bytes and retry")));
      return;
    }
    const size_t n = std::min<size_t>(state_.config.get_frame_bytes(), bytes_.size() - off_);
    uint8_t header[proto::kMaxGetFrameHeaderBytes];
    const size_t h = proto::EncodeGetFrameHeader(off_ == 0, bytes_.size(), tier_, n, header);
    pin_->Ref();
    grpc::Slice slices[2] = {
        grpc::Slice(header, h),
        grpc::Slice(const_cast<uint8_t*>(bytes_.data() + off_), n, &LeasePin::Unref, pin_)};
    frame_ = grpc::ByteBuffer(slices, 2);
    off_ += n;
    if (off_ == bytes_.size()) {
      StartWriteAndFinish(&frame_, grpc::WriteOptions(), grpc::Status::OK);
    } else {
      StartWrite(&frame_);
    }
  }

  void Fail(const absl::Status& status) {
    final_ = status;
    Finish(ToGrpcStatus(status));
  }

  static constexpr absl::Duration kLeaseGrace = absl::Seconds(10);

  ServerState& state_;
  CallScope call_;
  const bool forward_;  // KvService.Get: a local miss is asked of the peers
  const absl::Time deadline_;
  ChunkKey key_;
  LeasePin* pin_ = nullptr;
  absl::Time expires_;
  v1::Tier tier_ = v1::TIER_UNSPECIFIED;
  ByteSpan bytes_;
  size_t off_ = 0;
  grpc::ByteBuffer frame_;
  absl::Status final_;
  std::atomic<bool> cancelled_{false};
};

}  // namespace

// ---- KvService ----

grpc::ServerUnaryReactor* KvServiceImpl::Lookup(grpc::CallbackServerContext* ctx,
                                                const v1::LookupRequest* req,
                                                v1::LookupResponse* resp) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  auto run = [this, ctx, req, resp, reactor] {
    CallScope call(state_, Method::kLookup, ctx);
    reactor->Finish(call.admitted().ok()
                        ? call.Finish(DoLookup(state_, ctx, *req, resp, /*forward=*/true))
                        : call.Finish(call.admitted()));
  };
  // The local index answers at once; asking the owners of a miss (a cluster) blocks.
  if (state_.HasPeers()) {
    state_.blocking_pool.Submit(std::move(run));
  } else {
    run();
  }
  return reactor;
}

grpc::Status KvServiceImpl::Put(grpc::ServerContext* ctx,
                                grpc::ServerReader<v1::PutRequest>* reader, v1::PutResponse* resp) {
  CallScope call(state_, Method::kPut, ctx);
  if (!call.admitted().ok()) return call.Finish(call.admitted());
  return call.Finish(DoPut(state_, ctx, reader, resp, /*replica=*/false));
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* KvServiceImpl::Get(grpc::CallbackServerContext* ctx,
                                                               const grpc::ByteBuffer* request) {
  return new GetReactor(state_, Method::kGet, ctx, request);
}

grpc::Status KvServiceImpl::Reserve(grpc::ServerContext* ctx, const v1::ReserveRequest* req,
                                    v1::ReserveResponse* resp) {
  CallScope call(state_, Method::kReserve, ctx);
  if (!call.admitted().ok()) return call.Finish(call.admitted());
  auto key = CheckedKey(state_, req->key(), "key");
  if (!key.ok()) return call.Finish(key.status());
  auto r = state_.store->Reserve(*key, req->size());
  if (!r.ok()) return call.Finish(r.status());
  v1::TransferDescriptor* d = resp->mutable_transfer();
  d->set_id(r->id);
  d->set_size(req->size());
  d->set_expires_unix_micros(absl::ToUnixMicros(r->expires));
  if (state_.data_plane != nullptr)
    d->set_worker_address(state_.data_plane->AddressFor(IsLocalPeer(ctx->peer())));
  if (storage::HostTier* host = state_.store->host_tier()) {
    d->set_remote_offset(static_cast<uint64_t>(
        r->buffer.data() - static_cast<uint8_t*>(host->Address(storage::MemoryBlock{}))));
  }
  return call.Finish(absl::OkStatus());
}

grpc::Status KvServiceImpl::Commit(grpc::ServerContext* ctx, const v1::CommitRequest* req,
                                   v1::CommitResponse*) {
  CallScope call(state_, Method::kCommit, ctx);
  if (!call.admitted().ok()) return call.Finish(call.admitted());
  if (req->reservation_id() == 0) {
    return call.Finish(absl::InvalidArgumentError("reservation_id: must be nonzero"));
  }
  ChunkKey key;
  absl::Status st = state_.store->Commit(req->reservation_id(), req->payload_checksum(), &key);
  if (st.ok()) state_.Written(key);
  return call.Finish(st);
}

namespace {

// Release's work: a lease, a reservation, or many leases (all in memory: it never blocks).
absl::Status DoRelease(ServerState& state, const v1::ReleaseRequest& req) {
  if (req.lease_ids_size() > 0) {
    constexpr int kMaxIds = 4096;
    if (req.target_case() != v1::ReleaseRequest::TARGET_NOT_SET) {
      return absl::InvalidArgumentError(
          "lease_ids: give either lease_ids or lease_id / reservation_id, not both");
    }
    if (req.lease_ids_size() > kMaxIds) {
      return absl::InvalidArgumentError(
          absl::StrCat("lease_ids: ", req.lease_ids_size(), " ids; at most ", kMaxIds));
    }
    for (int i = 0; i < req.lease_ids_size(); ++i) {
      if (req.lease_ids(i) == 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("lease_ids[", i, "] is 0; lease ids are nonzero"));
      }
    }
    absl::Status first;
    for (int i = 0; i < req.lease_ids_size(); ++i) {
      absl::Status st = state.store->Release(req.lease_ids(i));
      if (!st.ok() && first.ok()) {
        first = absl::Status(st.code(), absl::StrCat("lease_ids[", i, "]: ", st.message()));
      }
    }
    return first;
  }
  switch (req.target_case()) {
    case v1::ReleaseRequest::kLeaseId:
      return state.store->Release(req.lease_id());
    case v1::ReleaseRequest::kReservationId:
      return state.store->Abort(req.reservation_id());
    default:
      return absl::InvalidArgumentError("Release needs lease_id or reservation_id");
  }
}

}  // namespace

grpc::ServerUnaryReactor* KvServiceImpl::Release(grpc::CallbackServerContext* ctx,
                                                 const v1::ReleaseRequest* req,
                                                 v1::ReleaseResponse*) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  CallScope call(state_, Method::kRelease, ctx);
  reactor->Finish(call.admitted().ok() ? call.Finish(DoRelease(state_, *req))
                                       : call.Finish(call.admitted()));
  return reactor;
}

namespace {

// The checks GetDescriptor and GetDescriptors share.
absl::Status CheckLeaseRequest(const ServerState& state, uint32_t lease_ms, bool accept_gpu,
                               bool same_host) {
  if (lease_ms > state.config.max_lease_ttl_ms()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "lease_ms ", lease_ms, " exceeds max_lease_ttl_ms ", state.config.max_lease_ttl_ms()));
  }
  if (accept_gpu && !same_host) {
    return absl::FailedPreconditionError(
        "accept_gpu: CUDA IPC reaches engines on this node only, through the unix socket");
  }
  return absl::OkStatus();
}

// Leases `key` and describes it into `resp`. With gpu_only, a chunk that did not land in the GPU
// tier is released at once and NOT_FOUND returned (the caller ends its run there).
// may_block false: UNAVAILABLE kWouldBlock where the chunk needs a disk read, a copy off or onto
// the GPU, or a move in flight.
absl::Status LeaseAndDescribe(ServerState& state, const ChunkKey& key, uint32_t lease_ms,
                              bool accept_gpu, bool gpu_only, bool same_host,
                              v1::GetDescriptorResponse* resp, bool may_block = true) {
  storage::GpuTier* gpu = state.store->gpu_tier();
  storage::AcquireOptions opts;
  opts.may_block = may_block;
  if (lease_ms != 0) opts.ttl = absl::Milliseconds(lease_ms);
  opts.accept_gpu = accept_gpu && gpu != nullptr && !state.config.gpu_tier_ipc_disabled();
  KVDN_ASSIGN_OR_RETURN(storage::Lease lease, state.store->Acquire(key, opts));
  if (gpu_only && lease.tier != storage::TierKind::kGpu) {
    (void)state.store->Release(lease.id);
    return absl::NotFoundError(absl::StrCat("chunk ", key.ToString(), " is not in the GPU tier"));
  }
  if (lease.tier == storage::TierKind::kGpu) {
    absl::StatusOr<std::string> handle = state.GpuIpcHandle();
    if (!handle.ok()) {
      (void)state.store->Release(lease.id);
      return handle.status();
    }
    v1::GpuLocation* g = resp->mutable_gpu();
    g->set_ipc_handle(*handle);
    g->set_device_uuid(gpu->DeviceUuid());
    g->set_offset(
        static_cast<uint64_t>(static_cast<const uint8_t*>(lease.device_ptr) -
                              static_cast<const uint8_t*>(gpu->Address(storage::MemoryBlock{}))));
  }
  v1::TransferDescriptor* d = resp->mutable_transfer();
  d->set_id(lease.id);
  d->set_size(lease.size);
  d->set_expires_unix_micros(absl::ToUnixMicros(lease.expires));
  if (state.data_plane != nullptr) d->set_worker_address(state.data_plane->AddressFor(same_host));
  if (storage::HostTier* host = state.store->host_tier(); host && lease.host_bytes.data()) {
    d->set_remote_offset(
        static_cast<uint64_t>(lease.host_bytes.data() -
                              static_cast<const uint8_t*>(host->Address(storage::MemoryBlock{}))));
  }
  resp->set_tier(TierToProto(lease.tier));
  return absl::OkStatus();
}

}  // namespace

grpc::Status KvServiceImpl::GetDescriptor(grpc::ServerContext* ctx,
                                          const v1::GetDescriptorRequest* req,
                                          v1::GetDescriptorResponse* resp) {
  CallScope call(state_, Method::kGetDescriptor, ctx);
  if (!call.admitted().ok()) return call.Finish(call.admitted());
  auto key = CheckedKey(state_, req->key(), "key");
  if (!key.ok()) return call.Finish(key.status());
  const bool same_host = IsLocalPeer(ctx->peer());
  if (absl::Status st = CheckLeaseRequest(state_, req->lease_ms(), req->accept_gpu(), same_host);
      !st.ok()) {
    return call.Finish(st);
  }
  return call.Finish(LeaseAndDescribe(state_, *key, req->lease_ms(), req->accept_gpu(),
                                      /*gpu_only=*/false, same_host, resp));
}

namespace {

// GetDescriptors' work, the leases of the run; with may_block false, kWouldBlock (nothing kept
// leased) where a chunk of the run needs a blocking step.
absl::Status LeaseRun(ServerState& state, const grpc::ServerContextBase* ctx,
                      const v1::GetDescriptorsRequest& req, v1::GetDescriptorsResponse* resp,
                      bool may_block) {
  constexpr int kMaxKeys = 4096;
  if (req.keys_size() > kMaxKeys) {
    return absl::InvalidArgumentError(
        absl::StrCat(req.keys_size(), " keys; at most ", kMaxKeys, " per call"));
  }
  if (req.gpu_only() && !req.accept_gpu()) {
    return absl::InvalidArgumentError("gpu_only needs accept_gpu");
  }
  const bool same_host = IsLocalPeer(ctx->peer());
  KVDN_RETURN_IF_ERROR(CheckLeaseRequest(state, req.lease_ms(), req.accept_gpu(), same_host));
  std::vector<ChunkKey> keys;
  keys.reserve(req.keys_size());
  for (int i = 0; i < req.keys_size(); ++i) {
    KVDN_ASSIGN_OR_RETURN(ChunkKey key,
                          CheckedKey(state, req.keys(i), absl::StrCat("keys[", i, "]")));
    keys.push_back(std::move(key));
  }
  for (const ChunkKey& key : keys) {
    v1::GetDescriptorResponse one;
    absl::Status st = LeaseAndDescribe(state, key, req.lease_ms(), req.accept_gpu(), req.gpu_only(),
                                       same_host, &one, may_block);
    if (absl::IsNotFound(st)) break;  // the run ends here
    if (!st.ok()) {
      for (const auto& d : resp->descriptors()) (void)state.store->Release(d.transfer().id());
      resp->clear_descriptors();
      return st;
    }
    *resp->add_descriptors() = std::move(one);
  }
  return absl::OkStatus();
}

}  // namespace

grpc::ServerUnaryReactor* KvServiceImpl::GetDescriptors(grpc::CallbackServerContext* ctx,
                                                        const v1::GetDescriptorsRequest* req,
                                                        v1::GetDescriptorsResponse* resp) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  auto call = std::make_shared<CallScope>(state_, Method::kGetDescriptors, ctx);
  if (!call->admitted().ok()) {
    reactor->Finish(call->Finish(call->admitted()));
    return reactor;
  }
  // Chunks in memory are leased here, on gRPC's thread; a run with a chunk that needs a disk
  // read, a copy off or onto the GPU, or a move in flight is leased from its start again on a
  // thread that may block.
  absl::Status st = LeaseRun(state_, ctx, *req, resp, /*may_block=*/false);
  if (storage::IsWouldBlock(st)) {
    state_.blocking_pool.Submit([this, ctx, req, resp, reactor, call] {
      reactor->Finish(call->Finish(LeaseRun(state_, ctx, *req, resp, /*may_block=*/true)));
    });
  } else {
    reactor->Finish(call->Finish(st));
  }
  return reactor;
}

grpc::Status KvServiceImpl::Delete(grpc::ServerContext* ctx, const v1::DeleteRequest* req,
                                   v1::DeleteResponse*) {
  CallScope call(state_, Method::kDelete, ctx);
  if (!call.admitted().ok()) return call.Finish(call.admitted());
  auto key = CheckedKey(state_, req->key(), "key");
  if (!key.ok()) return call.Finish(key.status());
  return call.Finish(state_.store->Delete(*key));
}

grpc::Status KvServiceImpl::OpenDataPlane(grpc::ServerContext* ctx,
                                          const v1::OpenDataPlaneRequest* req,
                                          v1::OpenDataPlaneResponse* resp) {
  CallScope call(state_, Method::kOpenDataPlane, ctx);
  if (!call.admitted().ok()) return call.Finish(call.admitted());
  if (state_.data_plane == nullptr) {
    return call.Finish(absl::UnavailableError(
        "this kvdnd serves no UCX data plane (data_plane_transports is off); use gRPC"));
  }
  const bool same_host = IsLocalPeer(ctx->peer());
  auto r = state_.data_plane->Open(*req, same_host);
  if (!r.ok()) return call.Finish(r.status());
  *resp = std::move(*r);
  return call.Finish(absl::OkStatus());
}

grpc::Status KvServiceImpl::CloseDataPlane(grpc::ServerContext* ctx,
                                           const v1::CloseDataPlaneRequest* req,
                                           v1::CloseDataPlaneResponse*) {
  CallScope call(state_, Method::kCloseDataPlane, ctx);
  if (!call.admitted().ok()) return call.Finish(call.admitted());
  if (state_.data_plane == nullptr) {
    return call.Finish(absl::NotFoundError("this kvdnd serves no UCX data plane"));
  }
  return call.Finish(state_.data_plane->Close(req->session_id()));
}

// ---- PeerService ----

grpc::Status PeerServiceImpl::Lookup(grpc::ServerContext* ctx, const v1::LookupRequest* req,
                                     v1::LookupResponse* resp) {
  CallScope call(state_, Method::kPeerLookup, ctx);
  if (!call.admitted().ok()) return call.Finish(call.admitted());
  return call.Finish(DoLookup(state_, ctx, *req, resp, /*forward=*/false));
}

grpc::Status PeerServiceImpl::Probe(grpc::ServerContext* ctx, const v1::LookupRequest* req,
                                    v1::ProbeResponse* resp) {
  CallScope call(state_, Method::kPeerProbe, ctx);
  if (!call.admitted().ok()) return call.Finish(call.admitted());
  if (req->prefix_hashes_size() == 0) {  // a member list's question: how much is stored here
    resp->set_chunks(state_.store->ChunkCount());
    return call.Finish(absl::OkStatus());
  }
  auto chain = ChainOf(state_, *req);
  if (!chain.ok()) return call.Finish(chain.status());
  for (const ChunkKey& key : *chain) resp->add_present(state_.store->Where(key).has_value());
  return call.Finish(absl::OkStatus());
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* PeerServiceImpl::Fetch(
    grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* request) {
  return new GetReactor(state_, Method::kPeerFetch, ctx, request);
}

grpc::Status PeerServiceImpl::Replicate(grpc::ServerContext* ctx,
                                        grpc::ServerReader<v1::PutRequest>* reader,
                                        v1::PutResponse* resp) {
  CallScope call(state_, Method::kPeerReplicate, ctx);
  if (!call.admitted().ok()) return call.Finish(call.admitted());
  return call.Finish(DoPut(state_, ctx, reader, resp, /*replica=*/true));
}

}  // namespace kvdn::daemon
