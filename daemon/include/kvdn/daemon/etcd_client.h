// EtcdClient: the few etcd v3 calls cluster membership needs (ARCHITECTURE.md "Cluster"), over
// etcd's own gRPC API (proto/etcd/rpc.proto, our declaration of its documented subset): keys and
// prefixes, leases with a keep-alive stream, and prefix watches. No etcd C++ client is packaged for
// Debian 12.
//
//   auto etcd = EtcdClient::Connect({.endpoints = {"127.0.0.1:2379"}}).value();
//   int64_t lease = etcd->GrantLease(absl::Seconds(10)).value();
//   etcd->Put("/kvdn/c1/members/node-a", address, lease);
//   auto alive = etcd->KeepAlive(lease, [](absl::Status lost) { ... });
//   auto watch = etcd->WatchPrefix("/kvdn/c1/members/", rev + 1, on_event, on_end);
//
// Over TLS when EtcdOptions::tls names a CA (etcd's --cert-file/--key-file, optionally
// --client-cert-auth with --trusted-ca-file).
//
// Errors: etcd's status passes through with the call and key named (e.g. INVALID_ARGUMENT "etcd
// Put \"\": etcdserver: key is not provided"); UNAVAILABLE / DEADLINE_EXCEEDED naming the endpoints
// when etcd cannot be reached within `deadline`.
//
// Thread-safety: thread-safe. KeepAlive and Watch run one thread each; their callbacks run there.
#ifndef KVDN_DAEMON_ETCD_CLIENT_H_
#define KVDN_DAEMON_ETCD_CLIENT_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "kvdn/client/client.h"

namespace kvdn::daemon {

struct EtcdOptions {
  // "host:port" of etcd members' client URLs; tried in order, the first that answers is used
  // until it fails.
  std::vector<std::string> endpoints;
  // TLS to etcd (its client URLs https): tls.ca_file set verifies etcd's certificate against it
  // (tls.server_name: the name it carries, when not the endpoint's host); tls.cert_file/key_file
  // are presented to an etcd with --client-cert-auth. Empty ca_file: plain. REQUIRES:
  // client::ValidateTlsOptions(tls).ok().
  client::TlsOptions tls;
  // Deadline of each unary call.
  absl::Duration deadline = absl::Seconds(2);
};

struct EtcdKeyValue {
  std::string key;
  std::string value;
  int64_t lease = 0;
  int64_t mod_revision = 0;
};

struct EtcdEvent {
  enum class Type { kPut, kDelete };
  Type type = Type::kPut;
  EtcdKeyValue kv;  // kDelete: key and mod_revision only
};

class EtcdClient {
 public:
  // Opens the channel; does not wait for etcd (the first call does). INVALID_ARGUMENT: no
  // endpoints, or one that is not host:port.
  static absl::StatusOr<std::unique_ptr<EtcdClient>> Connect(const EtcdOptions& options);
  ~EtcdClient();
  EtcdClient(const EtcdClient&) = delete;
  EtcdClient& operator=(const EtcdClient&) = delete;

  // Writes key = value, attached to `lease` (0: none). Returns the store revision after it.
  absl::StatusOr<int64_t> Put(absl::string_view key, absl::string_view value, int64_t lease = 0);
  // The value of `key`, nullopt when absent.
  absl::StatusOr<std::optional<EtcdKeyValue>> Get(absl::string_view key);
  // Every key under `prefix`, in key order, and the store revision they were read at (watch from
  // revision + 1 to miss nothing).
  absl::StatusOr<std::vector<EtcdKeyValue>> GetPrefix(absl::string_view prefix,
                                                      int64_t* revision = nullptr);
  // Deletes `key`; returns how many keys were deleted (0 or 1).
  absl::StatusOr<int64_t> Delete(absl::string_view key);

  // A lease of `ttl` (whole seconds, at least 1 s: INVALID_ARGUMENT otherwise); its id.
  absl::StatusOr<int64_t> GrantLease(absl::Duration ttl);
  // Ends the lease now; its keys are deleted. NOT_FOUND: no such lease.
  absl::Status RevokeLease(int64_t lease);
  // Seconds the lease has left; NOT_FOUND when it expired or never existed.
  absl::StatusOr<int64_t> LeaseTimeToLive(int64_t lease);

  // Background work (a keep-alive or a watch) that stops when this handle is destroyed.
  class Task {
   public:
    virtual ~Task() = default;
  };
  // Refreshes `lease` every `interval` (default a third of its TTL) on one stream, reopened after
  // a broken connection. `on_lost` runs once, on the task's thread, when etcd says the lease is
  // gone (NOT_FOUND) — the keys attached to it are gone then; re-register with a new lease.
  // While etcd is unreachable the task keeps retrying and does not call `on_lost`: the caller
  // learns about the outage from its own calls.
  std::unique_ptr<Task> KeepAlive(int64_t lease, std::function<void(absl::Status)> on_lost,
                                  absl::Duration interval = absl::ZeroDuration());
  // Streams every change under `prefix` from `start_revision` (0: from now) to `on_event`, in
  // revision order, on the task's thread. `on_end` runs once if the watch ends other than by
  // destroying the task: UNAVAILABLE when the stream broke (reconnect with GetPrefix, then a new
  // watch from its revision + 1), OUT_OF_RANGE when start_revision was compacted.
  std::unique_ptr<Task> WatchPrefix(absl::string_view prefix, int64_t start_revision,
                                    std::function<void(const EtcdEvent&)> on_event,
                                    std::function<void(absl::Status)> on_end);

  // The endpoints, comma-separated, for messages.
  const std::string& endpoints() const;

 private:
  struct Impl;
  explicit EtcdClient(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The end of the key range holding every key that starts with `prefix` (etcd's range_end).
std::string PrefixRangeEnd(absl::string_view prefix);

}  // namespace kvdn::daemon

#endif  // KVDN_DAEMON_ETCD_CLIENT_H_
