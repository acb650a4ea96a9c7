// Membership: this node's entry in etcd and the live view of every member (ARCHITECTURE.md
// "Cluster"). A node registers `/kvdn/<cluster>/members/<node>` = its MemberRecord on a lease of
// `ttl` (about 10 s) kept alive in the background, and watches the members prefix; a node whose
// lease lapses (crash, partition) disappears from every view within the TTL.
//
// Faults: when etcd cannot be reached the last view is kept (`degraded()` turns true, callers keep
// serving); when the watch breaks the view is re-read and the watch resumed from that revision;
// when the lease is lost (etcd expired it while we could not reach it) the node registers again
// with a new lease.
//
// Thread-safety: thread-safe. `on_change` runs on the membership's own threads.
#ifndef KVDN_DAEMON_MEMBERSHIP_H_
#define KVDN_DAEMON_MEMBERSHIP_H_

#include <functional>
#include <map>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kvdn/daemon/etcd_client.h"

namespace kvdn::daemon {

// What a member publishes about itself (the value of its key, as JSON).
struct MemberRecord {
  std::string node;
  std::string grpc_address;  // host:port other nodes and clients reach it on
  std::string data_plane;    // its UCX worker address for remote peers (binary), may be empty
  absl::Time joined;         // when this registration was made

  std::string ToJson() const;
  // INVALID_ARGUMENT naming what is wrong.
  static absl::StatusOr<MemberRecord> FromJson(absl::string_view json);
};

struct MembershipOptions {
  EtcdOptions etcd;
  std::string cluster = "default";  // [A-Za-z0-9._-]{1,63}
  MemberRecord self;                // node: [A-Za-z0-9._-]{1,253}
  absl::Duration ttl = absl::Seconds(10);
  // Called after every change of the view, with the new view.
  std::function<void(const std::map<std::string, MemberRecord>&)> on_change;
};

class Membership {
 public:
  // Registers this node and starts watching. INVALID_ARGUMENT: bad cluster or node name, a ttl
  // below 2 s. ALREADY_EXISTS: a live member with this node name is registered by someone else.
  // UNAVAILABLE: etcd cannot be reached now (the caller may run single-node and retry).
  static absl::StatusOr<std::unique_ptr<Membership>> Join(MembershipOptions options);
  // Leaves: revokes the lease (the entry disappears at once for the others), stops the threads.
  ~Membership();
  Membership(const Membership&) = delete;
  Membership& operator=(const Membership&) = delete;

  // The current view, this node included, by node name.
  std::map<std::string, MemberRecord> Members() const;
  // True while etcd is unreachable (the view may be stale).
  bool degraded() const;
  // The key prefix of this cluster's members: /kvdn/<cluster>/members/
  const std::string& prefix() const;

 private:
  struct Impl;
  explicit Membership(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvdn::daemon

#endif  // KVDN_DAEMON_MEMBERSHIP_H_
