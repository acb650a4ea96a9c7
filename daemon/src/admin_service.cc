#include "src/admin_service.h"

#include <algorithm>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kvdn/common/chunk_format.h"
#include "kvdn/daemon/config.h"
#include "src/data_plane.h"
#include "src/peer_router.h"

namespace kvdn::daemon {
namespace {

constexpr uint32_t kDefaultPageSize = 100;
constexpr uint32_t kMaxPageSize = 10000;

void SummaryToProto(const storage::ChunkRecord& r, v1::ChunkSummary* out) {
  KeyToProto(r.key, out->mutable_key());
  out->set_key_text(r.key.ToString());
  out->set_size(r.size);
  out->set_tier(TierToProto(r.tier));
  out->set_on_disk(r.on_disk);
  out->set_leases(r.leases);
}

// A key given either structured or printable; `what` names the request's fields in errors.
absl::StatusOr<ChunkKey> EitherKey(bool has_key, const v1::ChunkKey& key, const std::string& text) {
  if (has_key && !text.empty()) {
    return absl::InvalidArgumentError("give key or key_text, not both");
  }
  if (has_key) return KeyFromProto(key, "key");
  if (text.empty()) return absl::InvalidArgumentError("key or key_text is required");
  auto k = ChunkKey::Parse(text);
  if (!k.ok()) return absl::InvalidArgumentError(absl::StrCat("key_text: ", k.status().message()));
  return k;
}

}  // namespace

absl::Status AdminServiceImpl::DoGetStats(grpc::ServerContextBase*, const v1::GetStatsRequest*,
                                          v1::GetStatsResponse* resp) {
  const storage::StoreStats s = state_.store->Stats();
  resp->set_node(state_.config.node_name());
  resp->set_version(KVDN_VERSION);
  resp->set_uptime_seconds(absl::ToInt64Seconds(absl::Now() - state_.started));
  for (int t = 0; t < storage::kNumTierKinds; ++t) {
    const storage::TierStats& ts = s.tiers[t];
    v1::TierStats* o = resp->add_tiers();
    o->set_tier(TierToProto(static_cast<storage::TierKind>(t)));
    o->set_present(ts.present);
    o->set_chunks(ts.chunks);
    o->set_bytes(ts.bytes);
    o->set_used_bytes(ts.used_bytes);
    o->set_capacity_bytes(ts.capacity_bytes);
    o->set_prefaulted_bytes(ts.prefaulted_bytes);
    o->set_hits(ts.hits);
    o->set_misses(ts.misses);
    o->set_evictions(ts.evictions);
    o->set_demotions(ts.demotions);
    o->set_promotions(ts.promotions);
    o->set_checksum_failures(ts.checksum_failures);
  }
  resp->set_reservations_active(s.reservations_active);
  resp->set_reservations_expired(s.reservations_expired);
  resp->set_commits(s.commits);
  resp->set_commit_failures(s.commit_failures);
  resp->set_leases_active(s.leases_active);
  resp->set_leases_expired(s.leases_expired);
  resp->set_bytes_in(state_.bytes_in->value());
  resp->set_bytes_out(state_.bytes_out->value());
  resp->add_transports("grpc");
  if (state_.data_plane != nullptr) {
    for (const std::string& d : state_.data_plane->Describe()) resp->add_transports(d);
  }
  resp->set_draining(state_.calls.draining());
  std::vector<std::tuple<std::string, int, uint64_t, uint64_t>> rows;
  for (const storage::TierKind tier :
       {storage::TierKind::kGpu, storage::TierKind::kHost, storage::TierKind::kDisk}) {
    const uint64_t limit = state_.store->NamespaceShareBytes(tier);
    if (limit == 0) continue;  // no share on this tier: no books kept
    for (auto& [ns, bytes] : state_.store->NamespaceUsage(tier)) {
      rows.emplace_back(std::move(ns), static_cast<int>(tier), bytes, limit);
    }
  }
  std::sort(rows.begin(), rows.end());
  for (const auto& [ns, tier, bytes, limit] : rows) {
    v1::NamespaceUsage* u = resp->add_namespaces();
    u->set_namespace_(ns);
    u->set_tier(TierToProto(static_cast<storage::TierKind>(tier)));
    u->set_bytes(bytes);
    u->set_share_bytes(limit);
  }
  return absl::OkStatus();
}

absl::Status AdminServiceImpl::DoListChunks(grpc::ServerContextBase*,
                                            const v1::ListChunksRequest* req,
                                            v1::ListChunksResponse* resp) {
  storage::ListFilter filter;
  if (!req->namespace_().empty()) {
    if (absl::Status st = ValidateNamespace(req->namespace_()); !st.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("namespace: ", st.message()));
    }
    filter.ns = req->namespace_();
  }
  switch (req->tier()) {
    case v1::TIER_UNSPECIFIED:
      break;
    case v1::TIER_GPU:
      filter.tier = storage::TierKind::kGpu;
      break;
    case v1::TIER_HOST:
      filter.tier = storage::TierKind::kHost;
      break;
    case v1::TIER_DISK:
      filter.tier = storage::TierKind::kDisk;
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat("tier: unknown value ", req->tier()));
  }
  if (req->page_size() > kMaxPageSize) {
    return absl::InvalidArgumentError(
        absl::StrCat("page_size ", req->page_size(), " exceeds ", kMaxPageSize));
  }
  const uint32_t page_size = req->page_size() == 0 ? kDefaultPageSize : req->page_size();
  if (!req->page_token().empty()) {
    if (auto k = ChunkKey::Parse(req->page_token()); !k.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("page_token: not a key from a previous page: ", k.status().message()));
    }
  }
  // NOTE: paging sorts every match by its printable key, O(n log n) per page: fine for an admin
  // tool over the ~10^5 chunks a node holds; a sorted index would be the next step.
  std::vector<storage::ChunkRecord> all = state_.store->List(filter);
  std::vector<std::pair<std::string, const storage::ChunkRecord*>> sorted;
  sorted.reserve(all.size());
  for (const auto& r : all) sorted.emplace_back(r.key.ToString(), &r);
  std::sort(sorted.begin(), sorted.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  auto it = sorted.begin();
  if (!req->page_token().empty()) {
    it = std::upper_bound(sorted.begin(), sorted.end(), req->page_token(),
                          [](const std::string& t, const auto& e) { return t < e.first; });
  }
  for (uint32_t n = 0; it != sorted.end() && n < page_size; ++it, ++n) {
    SummaryToProto(*it->second, resp->add_chunks());
  }
  if (it != sorted.end() && resp->chunks_size() > 0) {
    resp->set_next_page_token(resp->chunks(resp->chunks_size() - 1).key_text());
  }
  resp->set_total(sorted.size());
  return absl::OkStatus();
}

absl::Status AdminServiceImpl::DoInspectChunk(grpc::ServerContextBase*,
                                              const v1::InspectChunkRequest* req,
                                              v1::InspectChunkResponse* resp) {
  auto key = EitherKey(req->has_key(), req->key(), req->key_text());
  if (!key.ok()) return key.status();
  auto record = state_.store->Describe(*key);
  if (!record.ok()) return record.status();
  // Read it under a lease and verify both checksums now. A disk-only chunk is read from disk
  // (which verifies it, and drops it if it fails) and promoted to the host tier as on any hit.
  auto lease = state_.store->Acquire(*key, storage::AcquireOptions{});
  if (!lease.ok()) {
    if (!absl::IsDataLoss(lease.status())) return lease.status();
    SummaryToProto(*record, resp->mutable_chunk());
    resp->set_checksum_ok(false);
    resp->set_checksum_error(std::string(lease.status().message()));
    return absl::OkStatus();
  }
  auto header = DecodeChunkHeader(lease->host_bytes);
  absl::Status verdict = header.ok()
                             ? DecodeChunk(lease->host_bytes, /*verify_payload=*/true).status()
                             : header.status();
  (void)state_.store->Release(lease->id);
  if (auto again = state_.store->Describe(*key); again.ok()) *record = *again;
  SummaryToProto(*record, resp->mutable_chunk());
  if (header.ok()) {
    const ChunkInfo& info = header->info;
    resp->set_dtype(std::string(DtypeName(info.dtype)));
    resp->set_num_layers(info.num_layers);
    resp->set_num_kv_heads(info.num_kv_heads);
    resp->set_head_dim(info.head_dim);
    resp->set_num_tokens(info.num_tokens);
    resp->set_payload_bytes(header->payload_bytes);
    resp->set_payload_checksum(header->payload_checksum);
  }
  resp->set_checksum_ok(verdict.ok());
  if (!verdict.ok()) resp->set_checksum_error(std::string(verdict.message()));
  return absl::OkStatus();
}

absl::Status AdminServiceImpl::DoEvict(grpc::ServerContextBase*, const v1::EvictRequest* req,
                                       v1::EvictResponse* resp) {
  switch (req->target_case()) {
    case v1::EvictRequest::kKey:
    case v1::EvictRequest::kKeyText: {
      auto key = EitherKey(req->has_key(), req->key(), req->key_text());
      if (!key.ok()) return key.status();
      absl::Status st = state_.store->Delete(*key);
      if (st.ok()) resp->set_evicted(1);
      return st;
    }
    case v1::EvictRequest::kNamespace: {
      if (absl::Status st = ValidateNamespace(req->namespace_()); !st.ok()) {
        return absl::InvalidArgumentError(absl::StrCat("namespace: ", st.message()));
      }
      storage::ListFilter filter;
      filter.ns = req->namespace_();
      uint64_t n = 0;
      for (const storage::ChunkRecord& r : state_.store->List(filter)) {
        if (state_.store->Delete(r.key).ok()) ++n;
      }
      resp->set_evicted(n);
      return absl::OkStatus();
    }
    default:
      return absl::InvalidArgumentError("Evict needs key, key_text or namespace");
  }
}

absl::Status AdminServiceImpl::DoGetConfig(grpc::ServerContextBase*, const v1::GetConfigRequest*,
                                           v1::GetConfigResponse* resp) {
  *resp->mutable_config() = state_.config;
  resp->set_json(ConfigToJson(state_.config));
  return absl::OkStatus();
}

absl::Status AdminServiceImpl::DoListMembers(grpc::ServerContextBase* ctx,
                                             const v1::ListMembersRequest*,
                                             v1::ListMembersResponse* resp) {
  std::map<std::string, MemberRecord> view;
  {
    MutexLock lock(&state_.cluster.mu);
    if (state_.cluster.membership) view = state_.cluster.membership->Members();
  }
  if (state_.cluster.configured) resp->set_cluster(state_.config.cluster_name());
  // Others as etcd lists them, with the chunk counts of those that answer in time (asked in
  // parallel); this node from its own state, also while it has not joined.
  const absl::Time now = absl::Now();
  std::map<std::string, uint64_t> chunks;
  if (state_.router != nullptr) {
    chunks = state_.router->PeerChunks(
        std::min(absl::FromChrono(ctx->deadline()),
                 now + absl::Milliseconds(state_.config.peer_timeout_ms())));
  }
  for (const auto& [node, r] : view) {
    if (node == state_.config.node_name()) continue;
    v1::Member* o = resp->add_members();
    o->set_node(node);
    o->set_grpc_address(r.grpc_address);
    o->set_lease_age_seconds(absl::ToInt64Seconds(now - r.joined));
    if (auto it = chunks.find(node); it != chunks.end()) o->set_chunks(it->second);
  }
  v1::Member* m = resp->add_members();
  m->set_node(state_.config.node_name());
  const auto [grpc_endpoint, http_endpoint] = state_.Endpoints();
  m->set_grpc_address(grpc_endpoint);
  m->set_unix_socket(state_.config.unix_socket());
  m->set_http_address(http_endpoint);
  m->set_lease_age_seconds(absl::ToInt64Seconds(absl::Now() - state_.started));
  m->set_chunks(state_.store->ChunkCount());
  m->set_self(true);
  return absl::OkStatus();
}

absl::Status AdminServiceImpl::DoDrain(grpc::ServerContextBase*, const v1::DrainRequest*,
                                       v1::DrainResponse* resp) {
  resp->set_in_flight(drain_());
  return absl::OkStatus();
}

// Every admin method runs on the blocking pool: listing, inspecting (a checksum pass over a
// chunk, maybe read from disk), evicting (the disk tier) and draining block, and kvdnctl's calls
// are too rare for the others to need a faster path.
template <typename Body>
grpc::ServerUnaryReactor* AdminServiceImpl::OnPool(grpc::CallbackServerContext* ctx, Method method,
                                                   Body body) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  state_.blocking_pool.Submit([this, reactor, ctx, method, body = std::move(body)] {
    CallScope call(state_, method, ctx);  // the caller's token is checked here
    reactor->Finish(call.Finish(call.admitted().ok() ? body() : call.admitted()));
  });
  return reactor;
}

grpc::ServerUnaryReactor* AdminServiceImpl::GetStats(grpc::CallbackServerContext* ctx,
                                                     const v1::GetStatsRequest* req,
                                                     v1::GetStatsResponse* resp) {
  return OnPool(ctx, Method::kAdminStats,
                [this, ctx, req, resp] { return DoGetStats(ctx, req, resp); });
}

grpc::ServerUnaryReactor* AdminServiceImpl::ListChunks(grpc::CallbackServerContext* ctx,
                                                       const v1::ListChunksRequest* req,
                                                       v1::ListChunksResponse* resp) {
  return OnPool(ctx, Method::kAdminList,
                [this, ctx, req, resp] { return DoListChunks(ctx, req, resp); });
}

grpc::ServerUnaryReactor* AdminServiceImpl::InspectChunk(grpc::CallbackServerContext* ctx,
                                                         const v1::InspectChunkRequest* req,
                                                         v1::InspectChunkResponse* resp) {
  return OnPool(ctx, Method::kAdminInspect,
                [this, ctx, req, resp] { return DoInspectChunk(ctx, req, resp); });
}

grpc::ServerUnaryReactor* AdminServiceImpl::Evict(grpc::CallbackServerContext* ctx,
                                                  const v1::EvictRequest* req,
                                                  v1::EvictResponse* resp) {
  return OnPool(ctx, Method::kAdminEvict,
                [this, ctx, req, resp] { return DoEvict(ctx, req, resp); });
}

grpc::ServerUnaryReactor* AdminServiceImpl::GetConfig(grpc::CallbackServerContext* ctx,
                                                      const v1::GetConfigRequest* req,
                                                      v1::GetConfigResponse* resp) {
  return OnPool(ctx, Method::kAdminConfig,
                [this, ctx, req, resp] { return DoGetConfig(ctx, req, resp); });
}

grpc::ServerUnaryReactor* AdminServiceImpl::ListMembers(grpc::CallbackServerContext* ctx,
                                                        const v1::ListMembersRequest* req,
                                                        v1::ListMembersResponse* resp) {
  return OnPool(ctx, Method::kAdminMembers,
                [this, ctx, req, resp] { return DoListMembers(ctx, req, resp); });
}

grpc::ServerUnaryReactor* AdminServiceImpl::Drain(grpc::CallbackServerContext* ctx,
                                                  const v1::DrainRequest* req,
                                                  v1::DrainResponse* resp) {
  return OnPool(ctx, Method::kAdminDrain,
                [this, ctx, req, resp] { return DoDrain(ctx, req, resp); });
}

}  // namespace kvdn::daemon
