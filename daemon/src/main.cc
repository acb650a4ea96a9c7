// kvdnd: the kvdn daemon. Runs with no arguments on the embedded single-node default; a JSON config
// file and flags override it (flags win). SIGTERM/SIGINT drain and stop it cleanly.
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "kvdn/common/logging.h"
#include "kvdn/common/malloc_tuning.h"
#include "kvdn/daemon/config.h"
#include "kvdn/daemon/server.h"

namespace {

// Writes `text` to `path` atomically (temp file + rename), so a reader never sees half of it.
bool WriteFileAtomically(const std::string& path, const std::string& text) {
  const std::string tmp = absl::StrCat(path, ".tmp");
  {
    std::ofstream out(tmp, std::ios::trunc);
    if (!(out << text)) return false;
  }
  return std::rename(tmp.c_str(), path.c_str()) == 0;
}

}  // namespace

int main(int argc, char** argv) {
#ifdef NDEBUG
  // Debian's Abseil is built with Mutex deadlock detection on: every Lock records an edge in a
  // global lock graph (~1.3% of kvdnd's CPU under a 1 MiB Get load, perf on the 2-core VM). Debug
  // builds and the tests keep it; the release daemon does not pay for it.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
#endif
  CLI::App app{"kvdnd: the kvdn daemon (KV cache delivery for LLM inference engines)"};
  std::string config_path, ready_file;
  bool print_config = false;
  kvdn::v1::DaemonConfig flags;
  std::string data_dir, unix_socket, grpc_address, http_address, node_name, log_level, data_plane;
  uint64_t host_bytes = 0, disk_bytes = 0, gpu_bytes = 0;
  bool no_disk = false, no_persist = false, no_gpu_ipc = false, share_host = false;
  std::vector<std::string> namespaces;
  app.add_option("-c,--config", config_path, "JSON config file (kvdn.v1.DaemonConfig)")
      ->check(CLI::ExistingFile);
  app.add_option("--data-dir", data_dir, "disk tier and daemon state directory");
  app.add_option("--unix-socket", unix_socket, "unix socket path, or \"none\"");
  app.add_option("--grpc-address", grpc_address, "host:port for gRPC (port 0: any), or \"none\"");
  app.add_option("--http-address", http_address,
                 "host:port for /metrics /healthz /readyz (port 0: any), or \"none\"");
  app.add_option("--node-name", node_name, "this node's name");
  app.add_option("--host-tier-bytes", host_bytes, "host tier size, e.g. 8GiB")
      ->transform(CLI::AsSizeValue(false));
  app.add_option("--disk-tier-bytes", disk_bytes, "disk tier size, e.g. 100GiB")
      ->transform(CLI::AsSizeValue(false));
  app.add_option("--gpu-tier-bytes", gpu_bytes, "GPU tier size (0: none)")
      ->transform(CLI::AsSizeValue(false));
  app.add_flag("--no-disk-tier", no_disk, "run without a disk tier");
  app.add_flag("--no-gpu-tier-ipc", no_gpu_ipc,
               "never map the GPU tier into engines (CUDA IPC shows them every namespace in it)");
  app.add_flag("--share-host-tier", share_host,
               "keep the host tier in shared memory that trusted engines on this node map "
               "read-only (the mapping shows them every namespace in it)");
  app.add_flag("--no-persist-on-shutdown", no_persist,
               "do not write memory-only chunks to disk on SIGTERM");
  app.add_option("--namespace", namespaces, "serve only these namespaces (repeatable)");
  app.add_option("--data-plane-transports", data_plane,
                 "UCX data plane: off, auto, or UCX_TLS names for remote clients (e.g. tcp)");
  std::vector<std::string> etcd_endpoints;
  std::string cluster_name, advertise_address;
  uint32_t membership_ttl_ms = 0;
  app.add_option("--etcd", etcd_endpoints,
                 "etcd client address host:port (repeatable): join a cluster; none: single node");
  app.add_option("--cluster", cluster_name, "cluster name (default \"default\")");
  app.add_option("--advertise-address", advertise_address,
                 "host:port other nodes reach this node's gRPC on");
  app.add_option("--membership-ttl-ms", membership_ttl_ms, "etcd lease TTL (default 10000)");
  uint32_t replicas = 0, peer_timeout_ms = 0;
  app.add_option("--replicas", replicas, "copies of each chunk on its owners (default 1)");
  app.add_option("--peer-timeout-ms", peer_timeout_ms,
                 "deadline of each call to a peer (default 1000)");
  uint32_t data_plane_threads = 0;
  app.add_option("--data-plane-threads", data_plane_threads,
                 "UCX workers (progress threads) per data-plane transport kind (default: one per "
                 "core, 2..8)");
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error, off");
  app.add_option("--ready-file", ready_file,
                 "once serving, write {grpc_port, http_port, unix_socket, pid} as JSON here");
  app.add_flag("--print-config", print_config, "print the effective config as JSON and exit");
  CLI11_PARSE(app, argc, argv);

  kvdn::v1::DaemonConfig config;
  if (!config_path.empty()) {
    auto loaded = kvdn::daemon::LoadConfigFile(config_path);
    if (!loaded.ok()) {
      std::fprintf(stderr, "kvdnd: %s\n", std::string(loaded.status().message()).c_str());
      return 2;
    }
    config = *loaded;
  }
  if (!data_dir.empty()) config.set_data_dir(data_dir);
  if (!unix_socket.empty()) config.set_unix_socket(unix_socket);
  if (!grpc_address.empty()) config.set_grpc_address(grpc_address);
  if (!http_address.empty()) config.set_http_address(http_address);
  if (!node_name.empty()) config.set_node_name(node_name);
  if (!log_level.empty()) config.set_log_level(log_level);
  if (!data_plane.empty()) config.set_data_plane_transports(data_plane);
  if (data_plane_threads != 0) config.set_data_plane_threads(data_plane_threads);
  for (const std::string& e : etcd_endpoints) config.add_etcd_endpoints(e);
  if (!cluster_name.empty()) config.set_cluster_name(cluster_name);
  if (!advertise_address.empty()) config.set_advertise_address(advertise_address);
  if (membership_ttl_ms != 0) config.set_membership_ttl_ms(membership_ttl_ms);
  if (replicas != 0) config.set_replicas(replicas);
  if (peer_timeout_ms != 0) config.set_peer_timeout_ms(peer_timeout_ms);
  if (host_bytes) config.set_host_tier_bytes(host_bytes);
  if (disk_bytes) config.set_disk_tier_bytes(disk_bytes);
  if (gpu_bytes) config.set_gpu_tier_bytes(gpu_bytes);
  if (no_disk) config.set_disk_tier_disabled(true);
  if (no_gpu_ipc) config.set_gpu_tier_ipc_disabled(true);
  if (share_host) config.set_share_host_tier(true);
  if (no_persist) config.set_persist_on_shutdown_disabled(true);
  for (const std::string& ns : namespaces) config.add_namespaces(ns);
  kvdn::daemon::ApplyDefaults(&config);
  if (absl::Status st = kvdn::daemon::ValidateConfig(config); !st.ok()) {
    std::fprintf(stderr, "kvdnd: invalid config: %s\n", std::string(st.message()).c_str());
    return 2;
  }
  if (print_config) {
    std::printf("%s\n", kvdn::daemon::ConfigToJson(config).c_str());
    return 0;
  }
  (void)kvdn::InitLogging(config.log_level());
  // gRPC's per-message buffers (1 MiB Put frames read, Get frames written) would otherwise go
  // back to the kernel and be faulted in again for every message: 4 clients putting 1 MiB values
  // on the 2-core VM moved 0.4-0.6 GB/s, 1.0-1.3 with it (bench/results/e2e-2026-12-02.md).
  if (!kvdn::TuneMalloc()) {
    spdlog::warn(
        "malloc thresholds left as they are (GLIBC_TUNABLES sets a glibc.malloc tunable, or "
        "malloc is not glibc's): large gRPC messages may page-fault on every frame");
  }

  // Signals are taken by sigwait below: block them before any thread starts, so every thread
  // inherits the mask.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  signal(SIGPIPE, SIG_IGN);

  auto server = kvdn::daemon::Server::Start(config);
  if (!server.ok()) {
    spdlog::critical("kvdnd cannot start: {}", server.status().ToString());
    return 1;
  }
  spdlog::info(
      "kvdnd {} serving: node {}, unix:{}, grpc port {}, http port {}, host tier {} MiB, "
      "disk tier {}",
      KVDN_VERSION, config.node_name(), config.unix_socket(), (*server)->grpc_port(),
      (*server)->http_port(), config.host_tier_bytes() >> 20,
      config.disk_tier_disabled()
          ? std::string("off")
          : absl::StrCat(config.disk_tier_bytes() >> 20, " MiB in ", config.data_dir(), "/disk"));
  if (!ready_file.empty()) {
    const std::string json = absl::StrCat(
        "{\"grpc_port\": ", (*server)->grpc_port(), ", \"http_port\": ", (*server)->http_port(),
        ", \"unix_socket\": \"", config.unix_socket(), "\", \"pid\": ", getpid(), "}\n");
    if (!WriteFileAtomically(ready_file, json)) {
      spdlog::critical("cannot write --ready-file {}", ready_file);
      return 1;
    }
  }
  int sig = 0;
  sigwait(&signals, &sig);
  spdlog::info("received {}; draining", sig == SIGTERM ? "SIGTERM" : "SIGINT");
  (*server)->Shutdown();
  return 0;
}
