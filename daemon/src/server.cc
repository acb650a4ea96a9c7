#include "kvdn/daemon/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>
#include <grpcpp/server_posix.h>
#include <sys/stat.h>

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "kvdn/common/logging.h"
#include "kvdn/common/metrics.h"
#include "kvdn/storage/tiered_store.h"
#include "src/admin_service.h"
#include "src/data_plane.h"
#include "src/http_server.h"
#include "src/kv_service.h"
#include "src/peer_router.h"
#include "src/server_state.h"
#include "src/unix_listener.h"

namespace kvdn::daemon {
namespace {

// The TCP listener's credentials: TLS with the config's certificate (files watched, so a rotated
// certificate applies to new connections), requiring and verifying client certificates with
// tls.require_client_cert; plain without tls.cert_file.
std::shared_ptr<grpc::ServerCredentials> ListenerCredentials(const v1::DaemonConfig& config) {
  const v1::TlsConfig& t = config.tls();
  if (t.cert_file().empty()) return grpc::InsecureServerCredentials();
  auto provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      t.key_file(), t.cert_file(), t.ca_file(), t.refresh_seconds());
  grpc::experimental::TlsServerCredentialsOptions o(provider);
  o.watch_identity_key_cert_pairs();
  if (!t.ca_file().empty()) o.watch_root_certs();
  o.set_cert_request_type(t.require_client_cert()
                              ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                              : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  spdlog::info("gRPC on {}: TLS{}", config.grpc_address(),
               t.require_client_cert() ? ", client certificates required" : "");
  return grpc::experimental::TlsServerCredentials(o);
}

const char* TierLabel(int t) {
  switch (static_cast<storage::TierKind>(t)) {
    case storage::TierKind::kGpu:
      return "gpu";
    case storage::TierKind::kHost:
      return "host";
    case storage::TierKind::kDisk:
      return "disk";
  }
  return "unknown";
}

storage::TieredStoreOptions StoreOptions(const v1::DaemonConfig& c) {
  storage::TieredStoreOptions o;
  storage::WatermarkOptions wm{c.high_watermark(), c.low_watermark()};
  o.host.capacity_bytes = c.host_tier_bytes();
  o.host.watermarks = wm;
  o.host.prefault_in_background = true;  // serve at once; a large arena faults in meanwhile
  o.host.shared = c.share_host_tier();
  if (!c.disk_tier_disabled()) {
    storage::DiskTierOptions d;
    d.path = absl::StrCat(c.data_dir(), "/disk");
    d.capacity_bytes = c.disk_tier_bytes();
    d.watermarks = wm;
    o.disk = d;
  }
  if (c.gpu_tier_bytes() != 0) {
    storage::GpuTierOptions g;
    g.device = c.gpu_device();
    g.capacity_bytes = c.gpu_tier_bytes();
    g.watermarks = wm;
    o.gpu = g;
  }
  o.reservation_ttl = absl::Milliseconds(c.reservation_ttl_ms());
  o.max_lease_ttl = absl::Milliseconds(c.max_lease_ttl_ms());
  o.namespace_host_share = c.namespace_host_share();
  o.namespace_disk_share = c.namespace_disk_share();
  o.namespace_gpu_share = c.namespace_gpu_share();
  return o;
}

// Per-tier and store-wide figures, read from the store at scrape time.
void CollectStore(const ServerState& state, MetricsWriter& w) {
  const storage::StoreStats s = state.store->Stats();
  // A namespace's bytes in each tier with a namespace share (the store keeps none otherwise).
  const struct {
    storage::TierKind tier;
    const char* name;
    const char* help;
  } by_ns[] = {
      {storage::TierKind::kHost, "kvdn_namespace_host_bytes",
       "Host-tier bytes (chunks and reservations) of a namespace, kept while "
       "namespace_host_share is below 1."},
      {storage::TierKind::kGpu, "kvdn_namespace_gpu_bytes",
       "GPU-tier bytes of a namespace, kept while namespace_gpu_share is below 1."},
      {storage::TierKind::kDisk, "kvdn_namespace_disk_bytes",
       "Disk-tier bytes of a namespace, kept while namespace_disk_share is below 1."},
  };
  for (const auto& m : by_ns) {
    for (const auto& [ns, bytes] : state.store->NamespaceUsage(m.tier)) {
      w.Gauge(m.name, m.help, {{"namespace", ns}}, static_cast<double>(bytes));
    }
  }
  for (int t = 0; t < storage::kNumTierKinds; ++t) {
    const storage::TierStats& ts = s.tiers[t];
    if (!ts.present) continue;
    const MetricLabels l = {{"tier", TierLabel(t)}};
    w.Gauge("kvdn_tier_chunks", "Chunks held in the tier.", l, ts.chunks);
    w.Gauge("kvdn_tier_bytes", "Committed chunk bytes held in the tier.", l, ts.bytes);
    w.Gauge("kvdn_tier_used_bytes", "Bytes the tier has handed out, reservations included.", l,
            ts.used_bytes);
    w.Gauge("kvdn_tier_capacity_bytes", "Configured capacity of the tier.", l, ts.capacity_bytes);
    w.Gauge("kvdn_tier_prefaulted_bytes",
            "Bytes of the tier's memory backed by pages (below capacity while the host arena is "
            "still being faulted in at start).",
            l, ts.prefaulted_bytes);
    w.Counter("kvdn_tier_hits_total", "Reads served first by this tier.", l, ts.hits);
    w.Counter("kvdn_tier_misses_total", "Reads that looked in this tier and missed.", l, ts.misses);
    w.Counter("kvdn_tier_evictions_total", "Chunks removed from this tier to make room.", l,
              ts.evictions);
    w.Counter("kvdn_tier_demotions_total", "Evicted chunks moved down to the next tier.", l,
              ts.demotions);
    w.Counter("kvdn_tier_promotions_total", "Chunks moved up into this tier on a hit.", l,
              ts.promotions);
    w.Counter("kvdn_checksum_failures_total",
              "Chunks whose checksum failed verification (dropped, never served).", l,
              ts.checksum_failures);
  }
  w.Gauge("kvdn_reservations_active", "Uncommitted reservations.", {}, s.reservations_active);
  w.Counter("kvdn_reservations_expired_total", "Reservations that expired uncommitted.", {},
            s.reservations_expired);
  w.Counter("kvdn_commits_total", "Chunks committed.", {}, s.commits);
  w.Counter("kvdn_commit_failures_total", "Commits refused: invalid chunk or checksum mismatch.",
            {}, s.commit_failures);
  w.Gauge("kvdn_leases_active", "Chunks held by readers now.", {}, s.leases_active);
  w.Counter("kvdn_leases_expired_total", "Leases that expired before release.", {},
            s.leases_expired);
  w.Gauge("kvdn_calls_in_flight", "Data-plane gRPC calls in flight.", {},
          static_cast<double>(state.calls.in_flight()));
  w.Gauge("kvdn_draining", "1 while the daemon drains for shutdown.", {},
          state.calls.draining() ? 1 : 0);
  w.Gauge("kvdn_uptime_seconds", "Seconds since the daemon started.", {},
          absl::ToDoubleSeconds(absl::Now() - state.started));
  w.Gauge("kvdn_build_info", "Constant 1, labelled with the build.",
          {{"version", KVDN_VERSION}, {"node", state.config.node_name()}}, 1);
}

}  // namespace

struct Server::Impl {
  v1::DaemonConfig config;
  MetricsRegistry metrics;
  std::unique_ptr<storage::TieredStore> store;
  std::unique_ptr<ServerState> state;
  std::unique_ptr<DataPlane> data_plane;
  std::unique_ptr<PeerRouter> router;  // with a cluster
  std::unique_ptr<KvServiceImpl> kv;
  std::unique_ptr<PeerServiceImpl> peer;
  std::unique_ptr<AdminServiceImpl> admin;
  std::unique_ptr<grpc::Server> grpc_server;
  // After grpc_server: stopped (destroyed) before it; before http, whose /metrics reads it.
  std::unique_ptr<UnixListener> unix_listener;
  std::unique_ptr<HttpServer> http;
  int grpc_port = 0;
  std::atomic<bool> ready{false};
  // Retries joining the cluster while etcd is unreachable; stopped by LeaveCluster.
  std::thread joiner;
  Mutex join_mu;
  CondVar join_cv;
  bool join_stop ABSL_GUARDED_BY(join_mu) = false;

  MembershipOptions MembershipOptionsFor() {
    MembershipOptions o;
    o.etcd.endpoints.assign(config.etcd_endpoints().begin(), config.etcd_endpoints().end());
    if (config.has_etcd_tls()) {
      const v1::EtcdTlsConfig& t = config.etcd_tls();
      o.etcd.tls = {.ca_file = t.ca_file(),
                    .cert_file = t.cert_file(),
                    .key_file = t.key_file(),
                    .server_name = t.server_name(),
                    .refresh_seconds = t.refresh_seconds()};
    }
    o.cluster = config.cluster_name();
    o.self.node = config.node_name();
    o.self.grpc_address =
        !config.advertise_address().empty() ? config.advertise_address() : state->Endpoints().first;
    if (data_plane) o.self.data_plane = data_plane->AddressFor(/*same_host=*/false);
    o.ttl = absl::Milliseconds(config.membership_ttl_ms());
    PeerRouter* r = router.get();
    o.on_change = [r](const std::map<std::string, MemberRecord>& view) { r->SetMembers(view); };
    return o;
  }
  void Joined(std::unique_ptr<Membership> m) {
    router->SetMembers(m->Members());
    MutexLock lock(&state->cluster.mu);
    state->cluster.membership = std::move(m);
    spdlog::info("cluster {}: joined as {} ({} replica(s) per chunk)", config.cluster_name(),
                 config.node_name(), config.replicas());
  }
  // Joins the cluster now; if etcd cannot be reached, serves single-node (degraded) and keeps
  // trying on a thread. Other errors (a bad node name, the name taken) are returned.
  absl::Status JoinCluster() {
    if (config.etcd_endpoints_size() == 0) return absl::OkStatus();
    state->cluster.configured = true;
    auto m = Membership::Join(MembershipOptionsFor());
    if (m.ok()) {
      Joined(std::move(*m));
      return absl::OkStatus();
    }
    if (!absl::IsUnavailable(m.status()) && !absl::IsDeadlineExceeded(m.status())) {
      return m.status();
    }
    spdlog::warn("cluster {}: {}; serving as a single node until etcd answers",
                 config.cluster_name(), m.status().message());
    joiner = std::thread([this] {
      for (int attempt = 1;; ++attempt) {
        {
          MutexLock lock(&join_mu);
          const absl::Time until = absl::Now() + absl::Seconds(2);
          while (!join_stop && absl::Now() < until)
            join_cv.WaitWithTimeout(&join_mu, until - absl::Now());
          if (join_stop) return;
        }
        auto again = Membership::Join(MembershipOptionsFor());
        if (again.ok()) {
          Joined(std::move(*again));
          return;
        }
        if (!absl::IsUnavailable(again.status()) && !absl::IsDeadlineExceeded(again.status())) {
          spdlog::error("cluster {}: cannot join: {}", config.cluster_name(),
                        again.status().message());
          return;
        }
        // Retries every 2 s; says so at the first and then about every 30 s, so a node that
        // cannot reach etcd shows why in its log, not only in /readyz.
        if (attempt % 15 == 1) {
          spdlog::warn("cluster {}: still serving as a single node after {} retries: {}",
                       config.cluster_name(), attempt, again.status().message());
        }
      }
    });
    return absl::OkStatus();
  }
  // Leaves the cluster (the others see this node go at once), stops the joiner.
  void LeaveCluster() {
    {
      MutexLock lock(&join_mu);
      join_stop = true;
      join_cv.SignalAll();
    }
    if (joiner.joinable()) joiner.join();
    std::unique_ptr<Membership> m;
    {
      MutexLock lock(&state->cluster.mu);
      m = std::move(state->cluster.membership);
    }
    m.reset();
  }
  // Reads auth_tokens_file again whenever it changes (a Kubernetes Secret update replaces the
  // file behind its path): the file's identity (device, inode, size, mtime) is looked at every
  // second, a stat() each.
  std::thread token_watcher;
  Mutex watch_mu;
  CondVar watch_cv;
  bool watch_stop ABSL_GUARDED_BY(watch_mu) = false;
  static std::string FileStamp(const std::string& path) {
    struct stat st {};
    if (stat(path.c_str(), &st) != 0) return "missing";
    return absl::StrCat(st.st_dev, ":", st.st_ino, ":", st.st_size, ":", st.st_mtim.tv_sec, ".",
                        st.st_mtim.tv_nsec);
  }
  void WatchTokens() {
    token_watcher = std::thread([this] {
      std::string seen = FileStamp(config.auth_tokens_file());
      MutexLock lock(&watch_mu);
      while (!watch_stop) {
        watch_cv.WaitWithTimeout(&watch_mu, absl::Seconds(1));
        if (watch_stop) return;
        const std::string now = FileStamp(config.auth_tokens_file());
        if (now == seen) continue;
        seen = now;
        watch_mu.Unlock();
        (void)state->ReloadTokens();  // logs and counts a file that does not parse
        watch_mu.Lock();
      }
    });
  }
  void StopWatchingTokens() {
    {
      MutexLock lock(&watch_mu);
      watch_stop = true;
      watch_cv.SignalAll();
    }
    if (token_watcher.joinable()) token_watcher.join();
  }

  Mutex mu;
  bool drained ABSL_GUARDED_BY(mu) = false;
  uint32_t drained_in_flight ABSL_GUARDED_BY(mu) = 0;
  bool shut_down ABSL_GUARDED_BY(mu) = false;

  uint32_t Drain() {
    MutexLock lock(&mu);
    if (drained) return drained_in_flight;
    drained = true;
    ready.store(false);
    LeaveCluster();  // peers stop routing here before the calls drain
    if (grpc_server) {
      grpc_server->GetHealthCheckService()->SetServingStatus(false);
    }
    drained_in_flight = static_cast<uint32_t>(state->calls.StartDrain());
    spdlog::info("draining: {} call(s) in flight", drained_in_flight);
    if (!state->calls.WaitIdle(absl::Milliseconds(config.drain_timeout_ms()))) {
      spdlog::warn("drain: calls still running after {} ms; cancelling them",
                   config.drain_timeout_ms());
      state->calls.CancelAll();
      (void)state->calls.WaitIdle(absl::Seconds(5));
    }
    if (storage::DiskTier* disk = store->disk_tier()) {
      if (absl::Status st = disk->Sync(); !st.ok()) {
        spdlog::error("drain: syncing the disk tier failed: {}", st.message());
      }
    }
    return drained_in_flight;
  }
};

Server::Server(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Server::~Server() { Shutdown(); }

int Server::grpc_port() const { return impl_->grpc_port; }
int Server::http_port() const { return impl_->http ? impl_->http->port() : 0; }
const v1::DaemonConfig& Server::config() const { return impl_->config; }
uint32_t Server::Drain() { return impl_->Drain(); }

absl::StatusOr<std::unique_ptr<Server>> Server::Start(const v1::DaemonConfig& config) {
  auto impl = std::make_unique<Impl>();
  impl->config = config;
  std::error_code ec;
  std::filesystem::create_directories(config.data_dir(), ec);
  if (ec) {
    return absl::UnavailableError(
        absl::StrCat("cannot create data_dir ", config.data_dir(), ": ", ec.message()));
  }
  std::unique_ptr<TokenTable> tokens;
  if (!config.auth_tokens_file().empty()) {
    auto loaded = TokenTable::Load(config.auth_tokens_file());
    if (!loaded.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("config field auth_tokens_file: ", loaded.status().message()));
    }
    tokens = *std::move(loaded);
    if (config.etcd_endpoints_size() > 0 && tokens->peer_token().empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "config field auth_tokens_file: ", config.auth_tokens_file(),
          " has no kvdn:peer token, and a cluster (etcd_endpoints) needs one: each kvdnd "
          "presents it to the others"));
    }
  }
  KVDN_ASSIGN_OR_RETURN(impl->store, storage::TieredStore::Open(StoreOptions(config)));
  impl->state = std::make_unique<ServerState>(config, impl->store.get(), &impl->metrics);
  ServerState* state = impl->state.get();
  state->SetTokens(std::move(tokens));
  impl->metrics.AddCollector([state](MetricsWriter& w) {
    CollectStore(*state, w);
    if (!state->cluster.configured) return;
    size_t members = 0;
    {
      MutexLock lock(&state->cluster.mu);
      if (state->cluster.membership) members = state->cluster.membership->Members().size();
    }
    w.Gauge("kvdn_cluster_members", "Live cluster members this node knows of, itself included.", {},
            static_cast<double>(members));
    w.Gauge("kvdn_cluster_degraded", "1 while etcd is unreachable: membership may be stale.", {},
            state->cluster.Degraded() ? 1 : 0);
  });
  KVDN_ASSIGN_OR_RETURN(impl->data_plane, DataPlane::Start(state));
  state->data_plane = impl->data_plane.get();
  if (config.etcd_endpoints_size() > 0) {
    impl->router = std::make_unique<PeerRouter>(state);
    state->router = impl->router.get();
  }
  impl->kv = std::make_unique<KvServiceImpl>(state);
  impl->peer = std::make_unique<PeerServiceImpl>(state);
  Impl* raw = impl.get();
  impl->admin = std::make_unique<AdminServiceImpl>(state, [raw] { return raw->Drain(); });

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  if (config.grpc_address() != "none") {
    builder.AddListeningPort(config.grpc_address(), ListenerCredentials(config), &impl->grpc_port);
  }
  builder.SetMaxReceiveMessageSize(static_cast<int>(config.max_message_bytes()));
  builder.SetMaxSendMessageSize(static_cast<int>(config.max_message_bytes()));
  builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS,
                             static_cast<int>(config.max_concurrent_streams()));
  // Bulk transfer tuning: large HTTP/2 frames and flow-control windows, so a chunk streams without
  // waiting for window updates (the defaults, 16 KiB frames and a 64 KiB initial window, cost
  // round trips per MiB on loopback).
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_FRAME_SIZE, 4 << 20);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 16 << 20);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_WRITE_BUFFER_SIZE, 8 << 20);
  // NOTE: not with TLS: gRPC 1.51's TLS endpoint over reads this large leaks 576 bytes per
  // connection (LeakSanitizer, tls_test; none without these two or without TLS).
  if (config.tls().cert_file().empty()) {
    builder.AddChannelArgument(GRPC_ARG_TCP_READ_CHUNK_SIZE, 1 << 20);
    builder.AddChannelArgument(GRPC_ARG_TCP_MIN_READ_CHUNK_SIZE, 256 << 10);
  }
  // Detect dead clients on idle connections.
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, 30000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10000);
  grpc::ResourceQuota quota("kvdnd");
  quota.SetMaxThreads(static_cast<int>(config.max_threads()));
  builder.SetResourceQuota(quota);
  builder.RegisterService(impl->kv.get());
  builder.RegisterService(impl->peer.get());
  builder.RegisterService(impl->admin.get());
  impl->grpc_server = builder.BuildAndStart();
  if (!impl->grpc_server) {
    return absl::UnavailableError(absl::StrCat("cannot serve gRPC on ", config.grpc_address(),
                                               " (address in use, or not a local address?)"));
  }
  if (config.grpc_address() != "none" && impl->grpc_port == 0) {
    return absl::UnavailableError(absl::StrCat("cannot bind grpc_address ", config.grpc_address()));
  }
  if (config.unix_socket() != "none") {
    // kvdnd accepts on its unix socket itself, to size each connection's send buffer
    // (unix_listener.h), and gives the connection to the gRPC server.
    grpc::Server* grpc_server = impl->grpc_server.get();
    KVDN_ASSIGN_OR_RETURN(
        impl->unix_listener,
        UnixListener::Start(
            config.unix_socket(), static_cast<int>(config.unix_socket_send_buffer_bytes()),
            [grpc_server](int fd) { grpc::AddInsecureChannelFromFd(grpc_server, fd); }));
    UnixListener* listener = impl->unix_listener.get();
    impl->metrics.AddCollector([listener](MetricsWriter& w) {
      w.Counter("kvdn_unix_connections_total", "Connections accepted on the unix socket.", {},
                static_cast<double>(listener->accepted()));
      w.Gauge("kvdn_unix_socket_send_buffer_bytes",
              "SO_SNDBUF of the latest unix-socket connection as the kernel reports it (twice "
              "the usable bytes; capped by net.core.wmem_max).",
              {}, listener->granted_send_buffer_bytes());
    });
  }
  if (config.http_address() != "none") {
    HttpHandlers h;
    h.metrics = [raw] { return raw->metrics.Render(); };
    h.healthz = [raw] {
      (void)raw->store->Stats();  // the store answers: its lock is not wedged
      return absl::OkStatus();
    };
    h.readyz = [raw]() -> absl::StatusOr<std::string> {
      if (raw->state->calls.draining()) return absl::UnavailableError("draining");
      if (!raw->ready.load()) return absl::UnavailableError("starting");
      // Still ready: it serves its own tiers and the members it last knew.
      if (raw->state->cluster.Degraded()) return std::string("ok (degraded: etcd unreachable)");
      return std::string("ok");
    };
    KVDN_ASSIGN_OR_RETURN(impl->http, HttpServer::Start(config.http_address(), std::move(h)));
  }
  const std::string host = config.grpc_address().substr(0, config.grpc_address().rfind(':'));
  const std::string http_host = config.http_address().substr(0, config.http_address().rfind(':'));
  state->SetEndpoints(
      config.grpc_address() == "none" ? "" : absl::StrCat(host, ":", impl->grpc_port),
      impl->http ? absl::StrCat(http_host, ":", impl->http->port()) : "");
  KVDN_RETURN_IF_ERROR(impl->JoinCluster());
  if (state->auth_enabled()) impl->WatchTokens();
  impl->grpc_server->GetHealthCheckService()->SetServingStatus(true);
  impl->ready.store(true);
  return std::unique_ptr<Server>(new Server(std::move(impl)));
}

void Server::Shutdown() {
  if (!impl_) return;
  {
    MutexLock lock(&impl_->mu);
    if (impl_->shut_down) return;
  }
  impl_->Drain();
  impl_->StopWatchingTokens();
  MutexLock lock(&impl_->mu);
  impl_->shut_down = true;
  if (!impl_->config.persist_on_shutdown_disabled() && impl_->store->disk_tier()) {
    auto n = impl_->store->PersistToDisk();
    if (n.ok()) {
      spdlog::info("shutdown: wrote {} memory-only chunk(s) to the disk tier", *n);
    } else {
      spdlog::error("shutdown: persisting to disk failed: {}", n.status().message());
    }
  }
  impl_->http.reset();
  if (impl_->unix_listener) impl_->unix_listener->Stop();  // no new connections; unlinks the path
  impl_->grpc_server->Shutdown(absl::ToChronoTime(absl::Now() + absl::Milliseconds(500)));
  impl_->grpc_server->Wait();
  impl_->grpc_server.reset();
  // Ends the data plane's transfers in flight (their leases and reservations are released).
  impl_->data_plane.reset();
  impl_->state->data_plane = nullptr;
  // Replication and peer sessions end before the arena they send from and receive into.
  if (impl_->router) impl_->router->Stop();
  // Get frames are slices over leased arena bytes; gRPC drops the last of them as its transports
  // close. The store (and the arena) must outlive them.
  const absl::Time until = absl::Now() + absl::Seconds(5);
  while (impl_->state->leases_in_transport.load() > 0 && absl::Now() < until) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  if (const int64_t n = impl_->state->leases_in_transport.load(); n > 0) {
    spdlog::error("shutdown: gRPC still holds frames of {} lease(s); leaving the store open", n);
    (void)impl_->store.release();  // leaked on purpose: the process is exiting
    return;
  }
  impl_->store.reset();
  spdlog::info("shutdown complete");
}

}  // namespace kvdn::daemon
