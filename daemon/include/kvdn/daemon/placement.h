// Placement by rendezvous (highest-random-weight) hashing of the ChunkKey over live members
// (ARCHITECTURE.md "Cluster"): every node computes the same owners from the same member list, and
// when a member joins or leaves only the chunks it owns (or comes to own) move.
//
//   weight(key, node) = mix(XXH3-64(prefix hash, fingerprint) ^ XXH3-64(node name))
//   owners(key)       = members by descending weight (ties: node name); the first is the owner,
//                       the next replicas-1 its replicas.
#ifndef KVDN_DAEMON_PLACEMENT_H_
#define KVDN_DAEMON_PLACEMENT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "kvdn/common/chunk_key.h"

namespace kvdn::daemon {

class Placement {
 public:
  // `members`: node names (duplicates ignored). Immutable; build a new one when membership
  // changes.
  explicit Placement(std::vector<std::string> members);

  // The min(replicas, members) nodes that hold `key`, owner first. Empty when there are no
  // members or replicas is 0.
  std::vector<std::string> Owners(const ChunkKey& key, size_t replicas) const;
  const std::vector<std::string>& members() const { return members_; }

 private:
  std::vector<std::string> members_;  // sorted, unique
  std::vector<uint64_t> node_hash_;   // XXH3-64 of each member's name
};

}  // namespace kvdn::daemon

#endif  // KVDN_DAEMON_PLACEMENT_H_
