// kvdnd as a library: the tiered store behind the gRPC services (KvService, AdminService,
// PeerService, grpc.health.v1, server reflection) on a unix socket and TCP, and the HTTP endpoints
// (/metrics, /healthz, /readyz).
//
// Lifecycle: Start -> serving -> Drain (new data-plane calls get UNAVAILABLE, in-flight calls
// finish or are cancelled after drain_timeout, the disk tier is synced) -> Shutdown (memory-only
// chunks are written to the disk tier unless disabled, the servers stop, the store closes).
// Thread-safe.
#ifndef KVDN_DAEMON_SERVER_H_
#define KVDN_DAEMON_SERVER_H_

#include <memory>
#include <string>

#include "kvdn/common/status.h"
#include "kvdn/v1/config.pb.h"

namespace kvdn::daemon {

class Server {
 public:
  // REQUIRES: ApplyDefaults and ValidateConfig have run on `config`. Errors: the store's (e.g.
  // UNAVAILABLE for a data directory RocksDB cannot open), or UNAVAILABLE when an address cannot
  // be bound.
  static absl::StatusOr<std::unique_ptr<Server>> Start(const v1::DaemonConfig& config);
  ~Server();  // Shutdown() if not done
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  int grpc_port() const;  // 0 without a TCP listener
  int http_port() const;  // 0 without HTTP
  const v1::DaemonConfig& config() const;

  // Idempotent. Returns the data-plane calls in flight when draining began.
  uint32_t Drain();
  // Drain, persist, stop. Idempotent.
  void Shutdown();

 private:
  struct Impl;
  explicit Server(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvdn::daemon

#endif  // KVDN_DAEMON_SERVER_H_
