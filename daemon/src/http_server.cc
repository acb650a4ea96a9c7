#include "src/http_server.h"

#include <civetweb.h>

#include <cstring>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "kvdn/common/logging.h"

namespace kvdn::daemon {
namespace {

void Reply(::mg_connection* conn, int code, const char* reason, const char* content_type,
           const std::string& body) {
  mg_printf(conn,
            "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\n\r\n",
            code, reason, content_type, body.size());
  mg_write(conn, body.data(), body.size());
}

}  // namespace

absl::StatusOr<std::unique_ptr<HttpServer>> HttpServer::Start(const std::string& address,
                                                              HttpHandlers handlers) {
  static std::once_flag init;
  std::call_once(init, [] { mg_init_library(0); });
  std::unique_ptr<HttpServer> server(new HttpServer(std::move(handlers)));
  const char* options[] = {
      "listening_ports", address.c_str(),     "num_threads", "4",    "request_timeout_ms",
      "10000",           "enable_keep_alive", "no",          nullptr};
  mg_callbacks callbacks;
  std::memset(&callbacks, 0, sizeof(callbacks));
  callbacks.log_message = [](const ::mg_connection*, const char* message) {
    spdlog::warn("http: {}", message);
    return 1;
  };
  server->ctx_ = mg_start(&callbacks, nullptr, options);
  if (!server->ctx_) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve HTTP on ", address, " (in use, or not a local address?)"));
  }
  mg_server_port ports[4];
  const int n = mg_get_server_ports(server->ctx_, 4, ports);
  if (n < 1) return absl::InternalError("civetweb reports no listening port");
  server->port_ = ports[0].port;
  for (const char* path : {"/metrics", "/healthz", "/readyz"}) {
    mg_set_request_handler(server->ctx_, path, &HttpServer::Handle, server.get());
  }
  return server;
}

HttpServer::~HttpServer() {
  if (ctx_) mg_stop(ctx_);
}

int HttpServer::Handle(::mg_connection* conn, void* self_ptr) {
  auto* self = static_cast<HttpServer*>(self_ptr);
  const mg_request_info* info = mg_get_request_info(conn);
  if (std::strcmp(info->request_method, "GET") != 0 &&
      std::strcmp(info->request_method, "HEAD") != 0) {
    Reply(conn, 405, "Method Not Allowed", "text/plain", "only GET\n");
    return 405;
  }
  const std::string uri = info->local_uri ? info->local_uri : "";
  if (uri == "/metrics") {
    Reply(conn, 200, "OK", "text/plain; version=0.0.4; charset=utf-8", self->handlers_.metrics());
    return 200;
  }
  absl::StatusOr<std::string> st = std::string("ok");
  if (uri == "/healthz") {
    if (absl::Status h = self->handlers_.healthz(); !h.ok()) st = h;
  } else {
    st = self->handlers_.readyz();
  }
  if (st.ok()) {
    Reply(conn, 200, "OK", "text/plain", absl::StrCat(*st, "\n"));
    return 200;
  }
  Reply(conn, 503, "Service Unavailable", "text/plain", absl::StrCat(st.status().message(), "\n"));
  return 503;
}

}  // namespace kvdn::daemon
