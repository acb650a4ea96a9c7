// Internal to daemon/: the HTTP endpoints on civetweb — /metrics (Prometheus text format),
// /healthz (the process serves) and /readyz (it accepts work: not starting, not draining).
#ifndef KVDN_DAEMON_SRC_HTTP_SERVER_H_
#define KVDN_DAEMON_SRC_HTTP_SERVER_H_

#include <functional>
#include <memory>
#include <string>

#include "kvdn/common/status.h"

struct mg_context;
struct mg_connection;

namespace kvdn::daemon {

struct HttpHandlers {
  std::function<std::string()> metrics;
  // OK: 200 with "ok"; otherwise 503 with the status message.
  std::function<absl::Status()> healthz;
  // OK: 200 with the string as the body (e.g. "ok (degraded: ...)"); an error: 503.
  std::function<absl::StatusOr<std::string>()> readyz;
};

// Thread-safe; handlers run on civetweb's worker threads.
class HttpServer {
 public:
  // Listens on "host:port" (port 0 picks one). UNAVAILABLE when it cannot bind.
  static absl::StatusOr<std::unique_ptr<HttpServer>> Start(const std::string& address,
                                                           HttpHandlers handlers);
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;
  int port() const { return port_; }

 private:
  explicit HttpServer(HttpHandlers handlers) : handlers_(std::move(handlers)) {}
  static int Handle(::mg_connection* conn, void* self);

  const HttpHandlers handlers_;
  mg_context* ctx_ = nullptr;
  int port_ = 0;
};

}  // namespace kvdn::daemon

#endif  // KVDN_DAEMON_SRC_HTTP_SERVER_H_
