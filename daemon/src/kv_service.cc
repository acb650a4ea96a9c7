#include "src/kv_service.h"

#include <grpcpp/support/proto_buffer_reader.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "kvdn/common/chunk_format.h"
#include "kvdn/common/hash.h"
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

// The key of a request, valid and in a namespace the caller may use.
absl::StatusOr<ChunkKey> CheckedKey(const CallScope& call, const v1::ChunkKey& key,
                                    absl::string_view field) {
  KVDN_ASSIGN_OR_RETURN(ChunkKey k, KeyFromProto(key, field));
  KVDN_RETURN_IF_ERROR(call.CheckNamespace(k.ns));
  return k;
}

// The chain of a Lookup or Probe request, validated.
absl::StatusOr<std::vector<ChunkKey>> ChainOf(const CallScope& call, const v1::LookupRequest& req) {
  if (absl::Status st = ValidateNamespace(req.namespace_()); !st.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("namespace: ", st.message()));
  }
  KVDN_RETURN_IF_ERROR(call.CheckNamespace(req.namespace_()));
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
absl::Status DoLookup(ServerState& state, const CallScope& call, const grpc::ServerContextBase* ctx,
                      const v1::LookupRequest& req, v1::LookupResponse* resp, bool forward) {
  KVDN_ASSIGN_OR_RETURN(std::vector<ChunkKey> chain, ChainOf(call, req));
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

// One Put (or Replicate) stream, read through gRPC's callback API as raw frames: each data
// frame's bytes are copied from gRPC's receive slices straight into the reservation (no protobuf
// string in between) and the payload is hashed as it lands, while those bytes are still in cache,
// so the commit does not read the chunk again. Reserve runs on gRPC's thread unless it must evict
// to disk (then on the blocking pool). INVALID_ARGUMENT for a malformed frame, a frame over the
// limit, a second header, more bytes than declared, or a stream that ends short; CANCELLED when
// the client went away. On any error an own reservation is dropped. Deletes itself in OnDone.
class PutReactor final : public grpc::ServerReadReactor<grpc::ByteBuffer> {
 public:
  // `replica`: the chunk comes from a peer (PeerService.Replicate) and is not replicated again.
  PutReactor(ServerState& state, Method method, grpc::CallbackServerContext* ctx,
             grpc::ByteBuffer* response, bool replica)
      : state_(state),
        call_(state, method, ctx),
        ctx_(ctx),
        response_(response),
        replica_(replica) {
    if (!call_.admitted().ok()) {
      Fail(call_.admitted());
      return;
    }
    StartRead(&frame_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {  // the stream ended (or broke)
      if (cancelled_.load() || ctx_->IsCancelled()) {
        Fail(absl::CancelledError("client cancelled the Put stream"));
      } else if (!have_header_) {
        Fail(absl::InvalidArgumentError("Put stream ended before its header"));
      } else {
        Complete();
      }
      return;
    }
    if (have_header_) {
      absl::Status st = OnData();
      if (st.ok()) {
        StartRead(&frame_);
      } else {
        Fail(st);
      }
      return;
    }
    absl::StatusOr<Next> next = OnHeader();
    if (!next.ok()) {
      Fail(next.status());
    } else if (*next == Next::kRead) {
      StartRead(&frame_);
    }
  }

  void OnCancel() override { cancelled_.store(true); }

  void OnDone() override {
    if (writing_) state_.store->EndWrite(id_);
    if (own_reservation_ && id_ != 0 && !committed_) (void)state_.store->Abort(id_);
    (void)call_.Finish(final_);
    delete this;
  }

 private:
  // What follows a step: read the next frame, or nothing (answered, or handed to the pool).
  enum class Next { kRead, kNone };

  absl::StatusOr<Next> OnHeader() {
    std::string header_bytes;
    uint64_t data_len = 0;
    KVDN_ASSIGN_OR_RETURN(
        proto::PutFrameKind kind,
        proto::ParsePutFrame(frame_, &header_bytes, &data_len, [](const uint8_t*, size_t) {}));
    if (kind != proto::PutFrameKind::kHeader) {
      return absl::InvalidArgumentError("the first Put message must carry the header");
    }
    if (!header_.ParseFromString(header_bytes)) {
      return absl::InvalidArgumentError("header: does not parse as PutRequest.Header");
    }
    const v1::PutRequest::Header& h = header_;
    if (h.size() < kChunkHeaderBytes || h.size() > kChunkHeaderBytes + kMaxChunkPayloadBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("header.size ", h.size(), " is outside [", kChunkHeaderBytes, ", ",
                       kChunkHeaderBytes + kMaxChunkPayloadBytes, "]"));
    }
    have_header_ = true;
    id_ = h.reservation_id();
    own_reservation_ = id_ == 0;
    if (!own_reservation_) {
      KVDN_RETURN_IF_ERROR(state_.CheckIdNamespace(call_.caller(), id_, /*reservation=*/true,
                                                   "header.reservation_id"));
      KVDN_RETURN_IF_ERROR(BeginWrite());
      return Next::kRead;
    }
    KVDN_ASSIGN_OR_RETURN(key_, CheckedKey(call_, h.key(), "header.key"));
    absl::StatusOr<Next> next = Reserve(/*may_block=*/false);
    if (!next.ok() && storage::IsWouldBlock(next.status())) {
      // Room that needs a chunk written to disk first is made on a thread that may block.
      state_.blocking_pool.Submit([this] {
        absl::StatusOr<Next> r = Reserve(/*may_block=*/true);
        if (!r.ok()) {
          Fail(r.status());
        } else if (*r == Next::kRead) {
          StartRead(&frame_);
        }
      });
      return Next::kNone;
    }
    return next;
  }

  // Reserves room for the chunk and opens it for writing (kWouldBlock, nothing done, when that
  // needs disk I/O and may_block is false). A chunk stored already is answered at once.
  absl::StatusOr<Next> Reserve(bool may_block) {
    storage::ReserveOptions opts;
    opts.may_block = may_block;
    auto r = state_.store->Reserve(key_, header_.size(), opts);
    if (absl::IsAlreadyExists(r.status())) {
      // Content-addressed: the same bytes are stored already; the rest of the stream is unread.
      // (Another Put still writing them: ABORTED, from the store, as it may yet fail.)
      Respond(/*stored=*/false);
      return Next::kNone;
    }
    KVDN_RETURN_IF_ERROR(r.status());
    id_ = r->id;
    KVDN_RETURN_IF_ERROR(BeginWrite());
    return Next::kRead;
  }

  absl::Status BeginWrite() {
    KVDN_ASSIGN_OR_RETURN(buffer_, state_.store->BeginWrite(id_, header_.size()));
    writing_ = true;
    return absl::OkStatus();
  }

  absl::Status OnData() {
    const uint64_t max_frame = state_.config.max_frame_bytes();
    absl::Status bad;
    uint64_t data_len = 0;
    std::string header_bytes;
    KVDN_ASSIGN_OR_RETURN(
        proto::PutFrameKind kind,
        proto::ParsePutFrame(frame_, &header_bytes, &data_len, [&](const uint8_t* d, size_t n) {
          if (!bad.ok()) return;
          if (data_len > max_frame) {
            bad = absl::InvalidArgumentError(absl::StrCat(
                "Put data frame of ", data_len, " bytes exceeds max_frame_bytes ", max_frame));
            return;
          }
          if (got_ + n > buffer_.size()) {
            bad = absl::InvalidArgumentError(absl::StrCat(
                "Put stream carries more than the ", buffer_.size(), " bytes its header declared"));
            return;
          }
          std::memcpy(buffer_.data() + got_, d, n);
          // The payload (past the chunk header) is hashed while it is in cache.
          if (own_reservation_ && got_ + n > kChunkHeaderBytes) {
            const uint64_t from = std::max<uint64_t>(got_, kChunkHeaderBytes);
            hash_.Update(ByteSpan(buffer_.data() + from, got_ + n - from));
          }
          got_ += n;
        }));
    if (kind != proto::PutFrameKind::kData) {
      return absl::InvalidArgumentError(
          absl::StrCat("Put frame after the header at byte ", got_, " is not a data frame"));
    }
    return bad;  // the frame's size was checked at its first byte, before anything was copied
  }

  // The stream ended after its header: the chunk is whole or the Put fails.
  void Complete() {
    if (got_ != buffer_.size()) {
      Fail(absl::InvalidArgumentError(absl::StrCat("Put stream ended after ", got_, " of ",
                                                   buffer_.size(), " declared bytes")));
      return;
    }
    state_.bytes_in->Inc(got_);
    state_.store->EndWrite(id_);
    writing_ = false;
    if (!own_reservation_) {  // the writer commits (or releases) its reservation itself
      Respond(/*stored=*/true);
      return;
    }
    ChunkKey key;
    // Frees the reservation on error.
    absl::Status st =
        state_.store->CommitHashed(id_, header_.payload_checksum(), hash_.Digest(), &key);
    committed_ = true;
    if (!st.ok()) {
      Fail(st);
      return;
    }
    if (!replica_) state_.Written(key);
    Respond(/*stored=*/true);
  }

  void Respond(bool stored) {
    v1::PutResponse resp;
    resp.set_stored(stored);
    bool own = false;
    if (!grpc::SerializationTraits<v1::PutResponse>::Serialize(resp, response_, &own).ok()) {
      Fail(absl::InternalError("PutResponse does not serialize"));
      return;
    }
    Finish(grpc::Status::OK);
  }

  void Fail(const absl::Status& status) {
    final_ = status;
    Finish(ToGrpcStatus(status));
  }

  ServerState& state_;
  CallScope call_;
  grpc::CallbackServerContext* const ctx_;
  grpc::ByteBuffer* const response_;
  const bool replica_;
  grpc::ByteBuffer frame_;
  v1::PutRequest::Header header_;
  bool have_header_ = false;
  bool own_reservation_ = false;
  ChunkKey key_;
  uint64_t id_ = 0;
  bool writing_ = false;  // between BeginWrite and EndWrite
  bool committed_ = false;
  MutableByteSpan buffer_;
  uint64_t got_ = 0;
  Xxh3_64Stream hash_;
  absl::Status final_;
  std::atomic<bool> cancelled_{false};
};

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
    auto key = CheckedKey(call_, req.key(), "key");
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

// Serves a unary callback call: `work(call, may_block)` (returning absl::Status; `call` the
// admitted call, for its caller's namespace checks) runs on gRPC's thread
// with may_block false when `inline_first`, and again on the blocking pool with may_block true
// when it answers kWouldBlock (it then either left nothing behind or goes on from where it
// stopped); without inline_first it runs on the pool only (work that blocks or takes long: disk
// I/O, a hash over a chunk, UCX).
template <typename Work>
grpc::ServerUnaryReactor* ServeUnary(ServerState& state, Method method,
                                     grpc::CallbackServerContext* ctx, bool inline_first,
                                     Work work) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  auto call = std::make_shared<CallScope>(state, method, ctx);
  if (!call->admitted().ok()) {
    reactor->Finish(call->Finish(call->admitted()));
    return reactor;
  }
  if (inline_first) {
    absl::Status st = work(*call, /*may_block=*/false);
    if (!storage::IsWouldBlock(st)) {
      reactor->Finish(call->Finish(st));
      return reactor;
    }
  }
  state.blocking_pool.Submit([reactor, call, work = std::move(work)]() mutable {
    reactor->Finish(call->Finish(work(*call, /*may_block=*/true)));
  });
  return reactor;
}

}  // namespace

// ---- KvService ----

grpc::ServerUnaryReactor* KvServiceImpl::Lookup(grpc::CallbackServerContext* ctx,
                                                const v1::LookupRequest* req,
                                                v1::LookupResponse* resp) {
  // The local index answers at once; asking the owners of a miss (a cluster) blocks.
  return ServeUnary(state_, Method::kLookup, ctx, /*inline_first=*/!state_.HasPeers(),
                    [this, ctx, req, resp](const CallScope& call, bool) {
                      return DoLookup(state_, call, ctx, *req, resp, /*forward=*/true);
                    });
}

grpc::ServerReadReactor<grpc::ByteBuffer>* KvServiceImpl::Put(grpc::CallbackServerContext* ctx,
                                                              grpc::ByteBuffer* response) {
  return new PutReactor(state_, Method::kPut, ctx, response, /*replica=*/false);
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* KvServiceImpl::Get(grpc::CallbackServerContext* ctx,
                                                               const grpc::ByteBuffer* request) {
  return new GetReactor(state_, Method::kGet, ctx, request);
}

grpc::ServerUnaryReactor* KvServiceImpl::Reserve(grpc::CallbackServerContext* ctx,
                                                 const v1::ReserveRequest* req,
                                                 v1::ReserveResponse* resp) {
  return ServeUnary(
      state_, Method::kReserve, ctx, /*inline_first=*/true,
      [this, ctx, req, resp](const CallScope& call, bool may_block) -> absl::Status {
        KVDN_ASSIGN_OR_RETURN(ChunkKey key, CheckedKey(call, req->key(), "key"));
        storage::ReserveOptions opts;
        opts.may_block = may_block;
        KVDN_ASSIGN_OR_RETURN(storage::Reservation r,
                              state_.store->Reserve(key, req->size(), opts));
        v1::TransferDescriptor* d = resp->mutable_transfer();
        d->set_id(r.id);
        d->set_size(req->size());
        d->set_expires_unix_micros(absl::ToUnixMicros(r.expires));
        if (state_.data_plane != nullptr)
          d->set_worker_address(state_.data_plane->AddressFor(IsLocalPeer(ctx->peer())));
        if (storage::HostTier* host = state_.store->host_tier()) {
          d->set_remote_offset(static_cast<uint64_t>(
              r.buffer.data() - static_cast<uint8_t*>(host->Address(storage::MemoryBlock{}))));
        }
        return absl::OkStatus();
      });
}

grpc::ServerUnaryReactor* KvServiceImpl::Commit(grpc::CallbackServerContext* ctx,
                                                const v1::CommitRequest* req, v1::CommitResponse*) {
  // Commit hashes the whole chunk: off gRPC's thread.
  return ServeUnary(
      state_, Method::kCommit, ctx, /*inline_first=*/false,
      [this, req](const CallScope& call, bool) -> absl::Status {
        if (req->reservation_id() == 0) {
          return absl::InvalidArgumentError("reservation_id: must be nonzero");
        }
        KVDN_RETURN_IF_ERROR(state_.CheckIdNamespace(call.caller(), req->reservation_id(),
                                                     /*reservation=*/true, "reservation_id"));
        ChunkKey key;
        KVDN_RETURN_IF_ERROR(
            state_.store->Commit(req->reservation_id(), req->payload_checksum(), &key));
        state_.Written(key);
        return absl::OkStatus();
      });
}

namespace {

// Release's work: a lease, a reservation, or many leases (all in memory: it never blocks).
absl::Status DoRelease(ServerState& state, const CallScope& call, const v1::ReleaseRequest& req) {
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
    for (int i = 0; i < req.lease_ids_size(); ++i) {
      KVDN_RETURN_IF_ERROR(state.CheckIdNamespace(call.caller(), req.lease_ids(i),
                                                  /*reservation=*/false,
                                                  absl::StrCat("lease_ids[", i, "]")));
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
      KVDN_RETURN_IF_ERROR(
          state.CheckIdNamespace(call.caller(), req.lease_id(), /*reservation=*/false, "lease_id"));
      return state.store->Release(req.lease_id());
    case v1::ReleaseRequest::kReservationId:
      KVDN_RETURN_IF_ERROR(state.CheckIdNamespace(call.caller(), req.reservation_id(),
                                                  /*reservation=*/true, "reservation_id"));
      return state.store->Abort(req.reservation_id());
    default:
      return absl::InvalidArgumentError("Release needs lease_id or reservation_id");
  }
}

}  // namespace

grpc::ServerUnaryReactor* KvServiceImpl::Release(grpc::CallbackServerContext* ctx,
                                                 const v1::ReleaseRequest* req,
                                                 v1::ReleaseResponse*) {
  return ServeUnary(
      state_, Method::kRelease, ctx, /*inline_first=*/true,
      [this, req](const CallScope& call, bool) { return DoRelease(state_, call, *req); });
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
    resp->set_host_arena(host->arena_id());  // 0 unless shared
  }
  resp->set_tier(TierToProto(lease.tier));
  return absl::OkStatus();
}

}  // namespace

grpc::ServerUnaryReactor* KvServiceImpl::GetDescriptor(grpc::CallbackServerContext* ctx,
                                                       const v1::GetDescriptorRequest* req,
                                                       v1::GetDescriptorResponse* resp) {
  return ServeUnary(state_, Method::kGetDescriptor, ctx, /*inline_first=*/true,
                    [this, ctx, req, resp](const CallScope& call, bool may_block) -> absl::Status {
                      KVDN_ASSIGN_OR_RETURN(ChunkKey key, CheckedKey(call, req->key(), "key"));
                      const bool same_host = IsLocalPeer(ctx->peer());
                      KVDN_RETURN_IF_ERROR(
                          CheckLeaseRequest(state_, req->lease_ms(), req->accept_gpu(), same_host));
                      // A token that reaches only some namespaces reads through host memory.
                      return LeaseAndDescribe(
                          state_, key, req->lease_ms(),
                          req->accept_gpu() && call.caller().MayMapEveryNamespace(),
                          /*gpu_only=*/false, same_host, resp, may_block);
                    });
}

namespace {

// GetDescriptors' work, the leases of the run, from the first chunk not yet in `resp` on: with
// may_block false, kWouldBlock where a chunk of the run needs a blocking step, keeping the leases
// taken before it in `resp` for the call with may_block true to go on from (so each chunk is
// leased, and counted as a hit, once).
absl::Status LeaseRun(ServerState& state, const CallScope& call, const grpc::ServerContextBase* ctx,
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
                          CheckedKey(call, req.keys(i), absl::StrCat("keys[", i, "]")));
    keys.push_back(std::move(key));
  }
  for (size_t i = static_cast<size_t>(resp->descriptors_size()); i < keys.size(); ++i) {
    v1::GetDescriptorResponse one;
    absl::Status st = LeaseAndDescribe(state, keys[i], req.lease_ms(),
                                       req.accept_gpu() && call.caller().MayMapEveryNamespace(),
                                       req.gpu_only(), same_host, &one, may_block);
    if (absl::IsNotFound(st)) break;                         // the run ends here
    if (!may_block && storage::IsWouldBlock(st)) return st;  // the pool goes on from keys[i]
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
  // Chunks in memory are leased on gRPC's thread; from a chunk that needs a disk read, a copy off
  // or onto the GPU, or a move in flight on, the run is leased on the pool.
  return ServeUnary(state_, Method::kGetDescriptors, ctx, /*inline_first=*/true,
                    [this, ctx, req, resp](const CallScope& call, bool may_block) {
                      return LeaseRun(state_, call, ctx, *req, resp, may_block);
                    });
}

grpc::ServerUnaryReactor* KvServiceImpl::Delete(grpc::CallbackServerContext* ctx,
                                                const v1::DeleteRequest* req, v1::DeleteResponse*) {
  // Deleting reaches the disk tier.
  return ServeUnary(state_, Method::kDelete, ctx, /*inline_first=*/false,
                    [req, store = state_.store](const CallScope& call, bool) -> absl::Status {
                      KVDN_ASSIGN_OR_RETURN(ChunkKey key, CheckedKey(call, req->key(), "key"));
                      return store->Delete(key);
                    });
}

grpc::ServerUnaryReactor* KvServiceImpl::OpenDataPlane(grpc::CallbackServerContext* ctx,
                                                       const v1::OpenDataPlaneRequest* req,
                                                       v1::OpenDataPlaneResponse* resp) {
  // Opening connects UCX endpoints: off gRPC's thread.
  return ServeUnary(
      state_, Method::kOpenDataPlane, ctx, /*inline_first=*/false,
      [this, ctx, req, resp](const CallScope& call, bool) -> absl::Status {
        if (state_.data_plane == nullptr) {
          return absl::UnavailableError(
              "this kvdnd serves no UCX data plane (data_plane_transports is off); use gRPC");
        }
        KVDN_ASSIGN_OR_RETURN(
            *resp, state_.data_plane->Open(*req, IsLocalPeer(ctx->peer()), call.caller()));
        return absl::OkStatus();
      });
}

grpc::ServerUnaryReactor* KvServiceImpl::CloseDataPlane(grpc::CallbackServerContext* ctx,
                                                        const v1::CloseDataPlaneRequest* req,
                                                        v1::CloseDataPlaneResponse*) {
  return ServeUnary(state_, Method::kCloseDataPlane, ctx, /*inline_first=*/false,
                    [this, req](const CallScope& call, bool) -> absl::Status {
                      if (state_.data_plane == nullptr) {
                        return absl::NotFoundError("this kvdnd serves no UCX data plane");
                      }
                      return state_.data_plane->Close(req->session_id(), call.caller());
                    });
}

grpc::ServerUnaryReactor* KvServiceImpl::MapHostTier(grpc::CallbackServerContext* ctx,
                                                     const v1::MapHostTierRequest* req,
                                                     v1::MapHostTierResponse* resp) {
  return ServeUnary(
      state_, Method::kMapHostTier, ctx, /*inline_first=*/true,
      [this, ctx, req, resp](const CallScope& call, bool) -> absl::Status {
        if (!IsLocalPeer(ctx->peer())) {
          return absl::FailedPreconditionError(
              "MapHostTier: the host tier maps into engines on this node only, through the unix "
              "socket");
        }
        if (!call.caller().MayMapEveryNamespace()) {
          return absl::PermissionDeniedError(
              "MapHostTier: the mapping shows the chunks of every namespace, and this token "
              "reaches only some; read them through GetDescriptors and the data plane");
        }
        const storage::HostTier* host = state_.store->host_tier();
        if (host == nullptr || host->fd() < 0) {
          return absl::FailedPreconditionError(
              "MapHostTier: this kvdnd does not share its host tier (share_host_tier)");
        }
        KVDN_RETURN_IF_ERROR(CheckSamePidNamespace(
            req->pid_namespace(), "the caller",
            "/proc/<kvdnd's pid>/fd/ does not name kvdnd's files there; run both with hostPID"));
        resp->set_pid(static_cast<int32_t>(getpid()));
        resp->set_fd(host->fd());
        resp->set_size(host->capacity_bytes());
        resp->set_arena_id(host->arena_id());
        return absl::OkStatus();
      });
}

// ---- PeerService ----

grpc::ServerUnaryReactor* PeerServiceImpl::Lookup(grpc::CallbackServerContext* ctx,
                                                  const v1::LookupRequest* req,
                                                  v1::LookupResponse* resp) {
  // Local tiers only: never blocks.
  return ServeUnary(state_, Method::kPeerLookup, ctx, /*inline_first=*/true,
                    [this, ctx, req, resp](const CallScope& call, bool) {
                      return DoLookup(state_, call, ctx, *req, resp, /*forward=*/false);
                    });
}

grpc::ServerUnaryReactor* PeerServiceImpl::Probe(grpc::CallbackServerContext* ctx,
                                                 const v1::LookupRequest* req,
                                                 v1::ProbeResponse* resp) {
  return ServeUnary(state_, Method::kPeerProbe, ctx, /*inline_first=*/true,
                    [this, req, resp](const CallScope& call, bool) -> absl::Status {
                      if (req->prefix_hashes_size() == 0) {
                        // A member list's question: how much is stored here.
                        resp->set_chunks(state_.store->ChunkCount());
                        return absl::OkStatus();
                      }
                      KVDN_ASSIGN_OR_RETURN(std::vector<ChunkKey> chain, ChainOf(call, *req));
                      for (const ChunkKey& key : chain) {
                        resp->add_present(state_.store->Where(key).has_value());
                      }
                      return absl::OkStatus();
                    });
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* PeerServiceImpl::Fetch(
    grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* request) {
  return new GetReactor(state_, Method::kPeerFetch, ctx, request);
}

grpc::ServerReadReactor<grpc::ByteBuffer>* PeerServiceImpl::Replicate(
    grpc::CallbackServerContext* ctx, grpc::ByteBuffer* response) {
  return new PutReactor(state_, Method::kPeerReplicate, ctx, response, /*replica=*/true);
}

}  // namespace kvdn::daemon
