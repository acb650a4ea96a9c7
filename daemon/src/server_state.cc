#include "src/server_state.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kvdn/common/logging.h"
#include "kvdn/proto/grpc_status.h"
#include "kvdn/transfer/ucx_transport.h"
#include "src/peer_router.h"

namespace kvdn::daemon {
namespace {

struct MethodInfo {
  const char* service;
  const char* name;
  bool admin;
};
constexpr MethodInfo kMethods[kNumMethods] = {
    {"KvService", "Lookup", false},
    {"KvService", "Put", false},
    {"KvService", "Get", false},
    {"KvService", "Reserve", false},
    {"KvService", "Commit", false},
    {"KvService", "Release", false},
    {"KvService", "GetDescriptor", false},
    {"KvService", "GetDescriptors", false},
    {"KvService", "Delete", false},
    {"KvService", "OpenDataPlane", false},
    {"KvService", "CloseDataPlane", false},
    {"KvService", "MapHostTier", false},
    {"DataPlane", "UcxGet", false},
    {"DataPlane", "UcxPut", false},
    {"PeerService", "Lookup", false},
    {"PeerService", "Fetch", false},
    {"PeerService", "Replicate", false},
    {"PeerService", "Probe", false},
    {"AdminService", "GetStats", true},
    {"AdminService", "ListChunks", true},
    {"AdminService", "InspectChunk", true},
    {"AdminService", "Evict", true},
    {"AdminService", "GetConfig", true},
    {"AdminService", "ListMembers", true},
    {"AdminService", "Drain", true},
};

constexpr const char* kCodeNames[17] = {
    "OK",        "CANCELLED",      "UNKNOWN",           "INVALID_ARGUMENT",   "DEADLINE_EXCEEDED",
    "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED",   "OUT_OF_RANGE",   "UNIMPLEMENTED",     "INTERNAL",           "UNAVAILABLE",
    "DATA_LOSS", "UNAUTHENTICATED"};

}  // namespace

const char* MethodService(Method m) { return kMethods[static_cast<int>(m)].service; }
const char* MethodName(Method m) { return kMethods[static_cast<int>(m)].name; }
bool IsAdminMethod(Method m) { return kMethods[static_cast<int>(m)].admin; }

absl::Status CheckSamePidNamespace(uint64_t caller, absl::string_view who, absl::string_view why) {
  static const uint64_t own = transfer::NamespaceId("self", "pid");
  if (caller == 0 || own == 0 || caller == own) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat("pid_namespace: ", who,
                                                    " is in another pid namespace (", caller,
                                                    ") than kvdnd (", own, "); ", why));
}

// ---- CallTracker ----

CallTracker::CallTracker(absl::Duration max_call_duration)
    : max_call_duration_(max_call_duration), watchdog_([this] { Watchdog(); }) {}

CallTracker::~CallTracker() {
  {
    MutexLock lock(&mu_);
    stop_ = true;
  }
  cv_.SignalAll();
  watchdog_.join();
}

absl::StatusOr<uint64_t> CallTracker::Begin(grpc::ServerContextBase* ctx, bool admin) {
  if (!admin && draining_.load()) {
    return absl::UnavailableError("kvdnd is draining (shutting down); use another node or retry");
  }
  MutexLock lock(&mu_);
  const uint64_t id = next_id_++;
  calls_[id] = Call{ctx, absl::Now() + max_call_duration_, admin};
  return id;
}

void CallTracker::End(uint64_t id) {
  MutexLock lock(&mu_);
  calls_.erase(id);
  cv_.SignalAll();
}

size_t CallTracker::StartDrain() {
  draining_.store(true);
  return in_flight();
}

size_t CallTracker::in_flight() const {
  MutexLock lock(&mu_);
  size_t n = 0;
  for (const auto& [id, c] : calls_) n += c.admin ? 0 : 1;
  return n;
}

bool CallTracker::WaitIdle(absl::Duration timeout) {
  const absl::Time until = absl::Now() + timeout;
  MutexLock lock(&mu_);
  for (;;) {
    size_t n = 0;
    for (const auto& [id, c] : calls_) n += c.admin ? 0 : 1;
    if (n == 0) return true;
    if (absl::Now() >= until) return false;
    cv_.WaitWithTimeout(&mu_, std::min(until - absl::Now(), absl::Milliseconds(50)));
  }
}

void CallTracker::CancelAll() {
  MutexLock lock(&mu_);
  for (auto& [id, c] : calls_) c.ctx->TryCancel();
}

void CallTracker::Watchdog() {
  MutexLock lock(&mu_);
  while (!stop_) {
    const absl::Time now = absl::Now();
    for (auto& [id, c] : calls_) {
      if (now >= c.deadline) {
        c.ctx->TryCancel();
        c.deadline = absl::InfiniteFuture();  // once
      }
    }
    cv_.WaitWithTimeout(&mu_, absl::Milliseconds(200));
  }
}

// ---- ServerState ----

namespace {
absl::flat_hash_set<std::string> NamespaceSet(const v1::DaemonConfig& c) {
  return absl::flat_hash_set<std::string>(c.namespaces().begin(), c.namespaces().end());
}
}  // namespace

ServerState::ServerState(const v1::DaemonConfig& cfg, storage::TieredStore* s, MetricsRegistry* m)
    : config(cfg),
      store(s),
      metrics(m),
      started(absl::Now()),
      namespaces(NamespaceSet(cfg)),
      calls(absl::Milliseconds(cfg.max_call_duration_ms())),
      bytes_in(m->AddCounter("kvdn_payload_bytes_received_total",
                             "Chunk bytes received in Put and Replicate calls.")),
      bytes_out(m->AddCounter("kvdn_payload_bytes_sent_total",
                              "Chunk bytes sent in Get and Fetch calls.")),
      bad_requests(
          m->AddCounter("kvdn_bad_requests_total", "Calls refused with INVALID_ARGUMENT.")),
      auth_unauthenticated(
          m->AddCounter("kvdn_auth_failures_total",
                        "Calls and data-plane requests refused for their token (auth_tokens_file).",
                        {{"reason", "unauthenticated"}})),
      auth_denied(
          m->AddCounter("kvdn_auth_failures_total",
                        "Calls and data-plane requests refused for their token (auth_tokens_file).",
                        {{"reason", "permission_denied"}})),
      auth_reloaded(m->AddCounter("kvdn_auth_reloads_total",
                                  "Times auth_tokens_file was read again after it changed.",
                                  {{"result", "ok"}})),
      auth_reload_failed(m->AddCounter("kvdn_auth_reloads_total",
                                       "Times auth_tokens_file was read again after it changed.",
                                       {{"result", "failed"}})) {
  for (int i = 0; i < kNumMethods; ++i) {
    latency_[i] = m->AddHistogram(
        "kvdn_grpc_request_duration_seconds", "Time from admission to the end of a gRPC call.",
        {{"service", kMethods[i].service}, {"method", kMethods[i].name}}, LatencyBuckets());
    for (auto& c : requests_[i]) c.store(nullptr);
  }
}

absl::Status ServerState::CheckNamespace(const Caller& caller, absl::string_view ns) const {
  if (!namespaces.empty() && !namespaces.contains(ns)) {
    return absl::PermissionDeniedError(
        absl::StrCat("namespace \"", ns, "\" is not served by this daemon (config: namespaces)"));
  }
  absl::Status st = caller.CheckNamespace(ns);
  if (!st.ok()) CountAuthFailure(st);
  return st;
}

absl::StatusOr<Caller> ServerState::Authenticate(Method method,
                                                 const grpc::ServerContextBase& ctx) const {
  if (!auth_enabled()) return Caller{};  // the usual case: no lock taken
  std::shared_ptr<const TokenTable> tokens = Tokens();
  if (tokens == nullptr) return Caller{};
  absl::StatusOr<const Grants*> grants = tokens->Authenticate(ctx);
  absl::Status st = grants.status();
  if (st.ok()) {
    const absl::string_view service = MethodService(method);
    if (service == "AdminService" && !(*grants)->admin) {
      st = absl::PermissionDeniedError(
          absl::StrCat("AdminService.", MethodName(method),
                       " needs a token with the kvdn:admin grant (auth_tokens_file)"));
    } else if (service == "PeerService" && !(*grants)->peer) {
      st = absl::PermissionDeniedError(
          absl::StrCat("PeerService.", MethodName(method),
                       " is for other kvdnd of the cluster: it needs a token with the kvdn:peer "
                       "grant (auth_tokens_file)"));
    }
  }
  if (!st.ok()) {
    CountAuthFailure(st);
    return st;
  }
  return Caller{std::move(tokens), *grants};
}

std::shared_ptr<const TokenTable> ServerState::Tokens() const {
  MutexLock lock(&tokens_mu_);
  return tokens_;
}

void ServerState::SetTokens(std::shared_ptr<const TokenTable> table) {
  MutexLock lock(&tokens_mu_);
  tokens_ = std::move(table);
}

absl::Status ServerState::ReloadTokens() {
  absl::StatusOr<std::unique_ptr<TokenTable>> loaded = TokenTable::Load(config.auth_tokens_file());
  if (!loaded.ok()) {
    auth_reload_failed->Inc();
    spdlog::error("auth_tokens_file changed but cannot be used, keeping the tokens read before: {}",
                  loaded.status().message());
    return loaded.status();
  }
  if (config.etcd_endpoints_size() > 0 && (*loaded)->peer_token().empty()) {
    auth_reload_failed->Inc();
    spdlog::error(
        "auth_tokens_file changed but has no kvdn:peer token, which a cluster needs; keeping the "
        "tokens read before");
    return absl::InvalidArgumentError("auth_tokens_file: no kvdn:peer token");
  }
  const size_t n = (*loaded)->size();
  SetTokens(*std::move(loaded));
  auth_reloaded->Inc();
  spdlog::info("auth_tokens_file read again: {} tokens", n);
  if (router != nullptr) router->OnTokensChanged();  // a rotated peer token: new peer channels
  return absl::OkStatus();
}

absl::StatusOr<Caller> ServerState::CallerFor(const std::string& token_id) const {
  if (!auth_enabled()) return Caller{};
  std::shared_ptr<const TokenTable> tokens = Tokens();
  if (tokens == nullptr) return Caller{};
  const Grants* g = tokens->FindById(token_id);
  if (g == nullptr) {
    auth_unauthenticated->Inc();
    return absl::UnauthenticatedError(
        "the token this data-plane session was opened with is no longer in auth_tokens_file");
  }
  return Caller{std::move(tokens), g};
}

absl::Status ServerState::CheckIdNamespace(const Caller& caller, uint64_t id, bool reservation,
                                           absl::string_view field) const {
  if (caller.grants == nullptr) return absl::OkStatus();
  absl::StatusOr<ChunkKey> key = reservation ? store->KeyOfReservation(id) : store->KeyOfLease(id);
  if (!key.ok()) return absl::OkStatus();
  absl::Status st = CheckNamespace(caller, key->ns);
  if (st.ok()) return st;
  return absl::Status(st.code(), absl::StrCat(field, " ", id, ": ", st.message()));
}

void ServerState::CountAuthFailure(const absl::Status& st) const {
  if (absl::IsUnauthenticated(st)) auth_unauthenticated->Inc();
  if (absl::IsPermissionDenied(st)) auth_denied->Inc();
}

void ServerState::SetEndpoints(std::string grpc, std::string http) {
  MutexLock lock(&endpoints_mu_);
  grpc_endpoint_ = std::move(grpc);
  http_endpoint_ = std::move(http);
}

std::pair<std::string, std::string> ServerState::Endpoints() const {
  MutexLock lock(&endpoints_mu_);
  return {grpc_endpoint_, http_endpoint_};
}

void ServerState::RecordCall(Method m, absl::StatusCode code, absl::Duration elapsed) {
  const int i = static_cast<int>(m);
  const int c = static_cast<int>(code) >= 0 && static_cast<int>(code) < 17
                    ? static_cast<int>(code)
                    : static_cast<int>(absl::StatusCode::kUnknown);
  Counter* counter = requests_[i][c].load(std::memory_order_acquire);
  if (!counter) {
    counter = metrics->AddCounter(
        "kvdn_grpc_requests_total", "gRPC calls served, by method and status code.",
        {{"service", kMethods[i].service}, {"method", kMethods[i].name}, {"code", kCodeNames[c]}});
    requests_[i][c].store(counter, std::memory_order_release);
  }
  counter->Inc();
  latency_[i]->Observe(absl::ToDoubleSeconds(elapsed));
  if (code == absl::StatusCode::kInvalidArgument) bad_requests->Inc();
}

// ---- CallScope ----

CallScope::CallScope(ServerState& state, Method method, grpc::ServerContextBase* ctx)
    : state_(state), method_(method), start_(absl::Now()) {
  absl::StatusOr<Caller> caller = state_.Authenticate(method, *ctx);
  if (!caller.ok()) {
    admitted_ = caller.status();
    return;
  }
  caller_ = *caller;
  auto id = state_.calls.Begin(ctx, IsAdminMethod(method));
  if (id.ok()) {
    id_ = *id;
  } else {
    admitted_ = id.status();
  }
}

CallScope::~CallScope() {
  if (!finished_) (void)Finish(absl::InternalError("call ended without a status"));
}

grpc::Status CallScope::Finish(const absl::Status& status) {
  if (!finished_) {
    finished_ = true;
    if (id_ != 0) state_.calls.End(id_);
    state_.RecordCall(method_, status.code(), absl::Now() - start_);
    if (!status.ok() && status.code() != absl::StatusCode::kNotFound &&
        status.code() != absl::StatusCode::kAlreadyExists) {
      spdlog::debug("{}/{}: {}", MethodService(method_), MethodName(method_), status.ToString());
    }
  }
  return ToGrpcStatus(status);
}

// ---- conversions ----

absl::StatusOr<ChunkKey> KeyFromProto(const v1::ChunkKey& key, absl::string_view field) {
  if (absl::Status st = ValidateNamespace(key.namespace_()); !st.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(field, ".namespace: ", st.message()));
  }
  if (key.prefix_hash().size() != 16) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".prefix_hash: ", key.prefix_hash().size(), " bytes, need 16"));
  }
  ChunkKey out;
  out.ns = key.namespace_();
  out.fingerprint = key.fingerprint();
  out.prefix_hash =
      Hash128::FromCanonical(reinterpret_cast<const uint8_t*>(key.prefix_hash().data()));
  return out;
}

void KeyToProto(const ChunkKey& key, v1::ChunkKey* out) {
  out->set_namespace_(key.ns);
  out->set_fingerprint(key.fingerprint);
  const std::array<uint8_t, 16> canonical = key.prefix_hash.Canonical();
  out->set_prefix_hash(canonical.data(), canonical.size());
}

v1::Tier TierToProto(storage::TierKind t) {
  switch (t) {
    case storage::TierKind::kGpu:
      return v1::TIER_GPU;
    case storage::TierKind::kHost:
      return v1::TIER_HOST;
    case storage::TierKind::kDisk:
      return v1::TIER_DISK;
  }
  return v1::TIER_UNSPECIFIED;
}

bool ServerState::HasPeers() const { return router != nullptr && router->HasPeers(); }

void ServerState::Written(const ChunkKey& key) {
  if (router != nullptr) router->Replicate(key);
}

absl::StatusOr<std::string> ServerState::GpuIpcHandle() {
  storage::GpuTier* gpu = store->gpu_tier();
  if (gpu == nullptr) return absl::FailedPreconditionError("this kvdnd has no GPU tier");
  MutexLock lock(&gpu_ipc_mu);
  if (gpu_ipc_handle.empty()) {
    KVDN_ASSIGN_OR_RETURN(gpu_ipc_handle, gpu->ExportIpcHandle());
  }
  return gpu_ipc_handle;
}

}  // namespace kvdn::daemon
