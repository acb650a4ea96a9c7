// Internal to daemon/: tenant authentication. With config auth_tokens_file set, every KvService,
// PeerService and AdminService call must carry a bearer token (gRPC metadata
// `authorization: Bearer <token>`), and the token's grants say what it may touch:
//
//   # auth_tokens_file: one token a line, then its grants, comma-separated; '#' starts a comment
//   9f2c...e1 tenant-a                   # read and write namespace tenant-a
//   77ab...04 tenant-b,tenant-c
//   c3d9...5a kvdn:admin                 # AdminService (kvdnctl)
//   0be1...7f kvdn:peer                  # PeerService: other kvdnd of the cluster
//   5e5e...99 kvdn:all-namespaces        # every namespace (a trusted engine fleet)
//
// A namespace grant is a namespace name ([A-Za-z0-9._-], so it never contains ':'). kvdn:peer
// reaches every namespace (replication and fetches carry any tenant's chunks) and is the token a
// kvdnd presents to its peers (the first kvdn:peer line: one file, mounted from one Secret, on
// every node). Tokens are 16 to 256 printable ASCII characters without spaces; the table keeps
// only their SHA-256 digests, so neither a memory dump nor the timing of a lookup gives one away.
//
// Without auth_tokens_file there is no table and no check: namespaces are then a partition of
// the key space, not a boundary between tenants (anyone who reaches the socket names any
// namespace). The grpc.health.v1 service, server reflection and the HTTP endpoints need no token.
#ifndef KVDN_DAEMON_SRC_AUTH_H_
#define KVDN_DAEMON_SRC_AUTH_H_

#include <grpcpp/server_context.h>

#include <memory>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/string_view.h"
#include "kvdn/common/status.h"

namespace kvdn::daemon {

// What one token may do.
struct Grants {
  std::string id;  // the token's SHA-256: the same token across reloads of the file
  absl::flat_hash_set<std::string> namespaces;
  bool all_namespaces = false;  // kvdn:all-namespaces
  bool admin = false;           // kvdn:admin
  bool peer = false;            // kvdn:peer (every namespace too)
  bool Allows(absl::string_view ns) const {
    return all_namespaces || peer || namespaces.contains(ns);
  }
};

// Where a call's token was checked: the grants it carries. Copyable; `grants` is null when the
// daemon runs without tokens (everything allowed). `table` keeps `grants` alive across a reload.
struct Caller {
  std::shared_ptr<const class TokenTable> table;
  const Grants* grants = nullptr;
  // The token's identity (Grants::id); empty without tokens.
  const std::string& token_id() const;
  // PERMISSION_DENIED naming the namespace when the token does not reach `ns`.
  absl::Status CheckNamespace(absl::string_view ns) const;
  // Whether the caller may map the daemon's GPU tier (CUDA IPC maps all of it, every tenant's
  // chunks): without tokens, or with kvdn:all-namespaces. Others read through host memory.
  bool MayMapEveryNamespace() const { return grants == nullptr || grants->all_namespaces; }
};

// The parsed auth_tokens_file. Immutable; thread-safe.
class TokenTable {
 public:
  // INVALID_ARGUMENT naming `source` and the line for a malformed line, a token too short or too
  // long, an unknown kvdn: grant, a bad namespace, or a token listed twice; INVALID_ARGUMENT for
  // a file with no token.
  static absl::StatusOr<std::unique_ptr<TokenTable>> Parse(absl::string_view text,
                                                           absl::string_view source);
  // NOT_FOUND when the file cannot be read; otherwise as Parse.
  static absl::StatusOr<std::unique_ptr<TokenTable>> Load(const std::string& path);

  // The grants of `token`; UNAUTHENTICATED when it is not in the table.
  absl::StatusOr<const Grants*> Find(absl::string_view token) const;
  // The grants of the token whose identity (Grants::id) is `id`; null when it is not in the table.
  const Grants* FindById(const std::string& id) const;
  // The grants of the call's token (metadata `authorization: Bearer <token>`); UNAUTHENTICATED,
  // saying what was wrong, for no such metadata, another scheme, or an unknown token.
  absl::StatusOr<const Grants*> Authenticate(const grpc::ServerContextBase& ctx) const;
  // The token this daemon presents to its peers: the first kvdn:peer line's; empty when none.
  const std::string& peer_token() const { return peer_token_; }
  size_t size() const { return by_digest_.size(); }

 private:
  TokenTable() = default;
  absl::flat_hash_map<std::string, Grants> by_digest_;  // SHA-256 of the token -> grants
  std::string peer_token_;
};

// The SHA-256 digest (32 bytes) of `data`.
std::string Sha256(absl::string_view data);

// Token length limits, and the metadata key and scheme a token travels in.
inline constexpr size_t kMinTokenLength = 16;
inline constexpr size_t kMaxTokenLength = 256;
inline constexpr char kAuthMetadataKey[] = "authorization";

}  // namespace kvdn::daemon

#endif  // KVDN_DAEMON_SRC_AUTH_H_
