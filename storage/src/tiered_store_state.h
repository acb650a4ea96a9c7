// Internal to storage/: the index entry and the mutable state of TieredStore, shared by
// tiered_store.cc (the public calls) and tiered_store_moves.cc (eviction, demotion, promotion).
#ifndef KVDN_STORAGE_SRC_TIERED_STORE_STATE_H_
#define KVDN_STORAGE_SRC_TIERED_STORE_STATE_H_

#include <algorithm>
#include <cstring>
#include <deque>
#include <thread>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/container/node_hash_map.h"
#include "absl/strings/str_cat.h"
#include "kvdn/common/chunk_format.h"
#include "kvdn/common/hash.h"
#include "kvdn/common/logging.h"
#include "kvdn/common/mutex.h"
#include "kvdn/storage/tiered_store.h"

namespace kvdn::storage {
namespace internal {

inline constexpr int kNone = -1;
inline constexpr int kGpu = static_cast<int>(TierKind::kGpu);
inline constexpr int kHost = static_cast<int>(TierKind::kHost);
inline constexpr int kDisk = static_cast<int>(TierKind::kDisk);
inline constexpr size_t kMaxTombstones = 1 << 16;
// Put copies and hashes in pieces that stay in the CPU's L2 between the two.
inline constexpr size_t kCopyHashPiece = 512 << 10;

// Ids of reservations/leases that expired, so a late Commit/Release learns "expired" (ABORTED)
// rather than "unknown" (NOT_FOUND). Bounded: the oldest are forgotten first.
class Tombstones {
 public:
  void Add(uint64_t id) {
    ids_.insert(id);
    order_.push_back(id);
    if (order_.size() > kMaxTombstones) {
      ids_.erase(order_.front());
      order_.pop_front();
    }
  }
  bool Contains(uint64_t id) const { return ids_.contains(id); }

 private:
  absl::flat_hash_set<uint64_t> ids_;
  std::deque<uint64_t> order_;
};

}  // namespace internal

using namespace internal;  // NOLINT: internal header of this module

struct TieredStore::Entry {
  ChunkKey key;
  uint64_t size = 0;  // encoded chunk bytes
  int mem = kNone;    // kGpu or kHost when a memory copy exists
  MemoryBlock block;  // the memory copy
  bool on_disk = false;
  uint32_t pins = 0;    // leases plus in-flight moves; a pinned memory copy is never freed
  bool moving = false;  // one move at a time per chunk
  bool doomed = false;  // deleted; removed once unpinned
  // Intrusive LRU links, one list per tier (head = most recent).
  Entry* prev[kNumTierKinds] = {};
  Entry* next[kNumTierKinds] = {};
  bool linked[kNumTierKinds] = {};
  // Links in its namespace's own LRU list of each tier (State::lru_by_ns), kept while that tier
  // tracks namespaces (track_ns).
  Entry* ns_prev[kNumTierKinds] = {};
  Entry* ns_next[kNumTierKinds] = {};
};

// All mutable state, guarded by mu.
struct TieredStore::State {
  struct LruList {
    Entry* head = nullptr;
    Entry* tail = nullptr;
    uint64_t count = 0;
    uint64_t bytes = 0;
  };
  struct PendingReservation {
    ChunkKey key;
    MemoryBlock block;
    absl::Time expires;
    bool committing = false;
    uint32_t writers = 0;  // BeginWrite holders; no expiry while > 0
  };
  struct LeaseRecord {
    Entry* entry;
    absl::Time expires;
  };

  Mutex mu;
  // Signalled when a move ends (an entry's `moving` clears) and to wake the maintenance thread.
  CondVar cv;
  absl::node_hash_map<ChunkKey, Entry> index ABSL_GUARDED_BY(mu);
  LruList lru[kNumTierKinds] ABSL_GUARDED_BY(mu);
  absl::flat_hash_map<uint64_t, PendingReservation> reservations ABSL_GUARDED_BY(mu);
  absl::flat_hash_map<ChunkKey, uint64_t> reserved_keys ABSL_GUARDED_BY(mu);
  absl::flat_hash_map<uint64_t, LeaseRecord> leases ABSL_GUARDED_BY(mu);
  Tombstones expired_reservations ABSL_GUARDED_BY(mu);
  Tombstones expired_leases ABSL_GUARDED_BY(mu);
  uint64_t next_id ABSL_GUARDED_BY(mu) = 1;
  std::array<TierStats, kNumTierKinds> stats ABSL_GUARDED_BY(mu);
  uint64_t reservations_expired ABSL_GUARDED_BY(mu) = 0;
  uint64_t commits ABSL_GUARDED_BY(mu) = 0;
  uint64_t commit_failures ABSL_GUARDED_BY(mu) = 0;
  uint64_t leases_expired ABSL_GUARDED_BY(mu) = 0;
  bool wake ABSL_GUARDED_BY(mu) = false;
  bool stop ABSL_GUARDED_BY(mu) = false;
  std::thread maintenance;

  // Bytes by namespace in a tier (linked chunks and copies in transit into it, plus on the host
  // tier reservations), and each namespace's chunks of the tier in LRU order (head = most
  // recent), kept for the tiers with a namespace share (TieredStoreOptions::namespace_host_share /
  // namespace_gpu_share / namespace_disk_share below 1), so a namespace past its share finds its
  // own least recently used chunk without walking past the others'.
  bool track_ns[kNumTierKinds] = {};
  struct NsList {
    Entry* head = nullptr;
    Entry* tail = nullptr;
  };
  absl::flat_hash_map<std::string, uint64_t> bytes_by_ns[kNumTierKinds] ABSL_GUARDED_BY(mu);
  absl::flat_hash_map<std::string, NsList> lru_by_ns[kNumTierKinds] ABSL_GUARDED_BY(mu);
  void Count(int t, const std::string& ns, uint64_t bytes, bool add) {
    if (!track_ns[t]) return;
    uint64_t& b = bytes_by_ns[t][ns];
    b = add ? b + bytes : (b > bytes ? b - bytes : 0);
    if (b == 0) bytes_by_ns[t].erase(ns);
  }
  uint64_t BytesOf(int t, absl::string_view ns) const {
    auto it = bytes_by_ns[t].find(ns);
    return it == bytes_by_ns[t].end() ? 0 : it->second;
  }
  void CountHost(const std::string& ns, uint64_t bytes, bool add) { Count(kHost, ns, bytes, add); }
  // The least recently used chunk of `ns` in tier t (nullptr when none); walk on with ns_prev[t].
  Entry* TailOf(int t, const std::string& ns) const {
    auto it = lru_by_ns[t].find(ns);
    return it == lru_by_ns[t].end() ? nullptr : it->second.tail;
  }

  void Link(Entry* e, int t) {
    LruList& l = lru[t];
    e->prev[t] = nullptr;
    e->next[t] = l.head;
    if (l.head) l.head->prev[t] = e;
    l.head = e;
    if (!l.tail) l.tail = e;
    e->linked[t] = true;
    ++l.count;
    l.bytes += e->size;
    if (track_ns[t]) {
      Count(t, e->key.ns, e->size, true);
      NsList& n = lru_by_ns[t][e->key.ns];
      e->ns_prev[t] = nullptr;
      e->ns_next[t] = n.head;
      if (n.head) n.head->ns_prev[t] = e;
      n.head = e;
      if (!n.tail) n.tail = e;
    }
  }
  void Unlink(Entry* e, int t) {
    if (!e->linked[t]) return;
    LruList& l = lru[t];
    if (e->prev[t])
      e->prev[t]->next[t] = e->next[t];
    else
      l.head = e->next[t];
    if (e->next[t])
      e->next[t]->prev[t] = e->prev[t];
    else
      l.tail = e->prev[t];
    e->prev[t] = e->next[t] = nullptr;
    e->linked[t] = false;
    --l.count;
    l.bytes -= e->size;
    if (track_ns[t]) {
      Count(t, e->key.ns, e->size, false);
      auto it = lru_by_ns[t].find(e->key.ns);
      NsList& n = it->second;
      if (e->ns_prev[t])
        e->ns_prev[t]->ns_next[t] = e->ns_next[t];
      else
        n.head = e->ns_next[t];
      if (e->ns_next[t])
        e->ns_next[t]->ns_prev[t] = e->ns_prev[t];
      else
        n.tail = e->ns_prev[t];
      e->ns_prev[t] = e->ns_next[t] = nullptr;
      if (n.head == nullptr) lru_by_ns[t].erase(it);
    }
  }
  void Touch(Entry* e, int t) {
    if (!e->linked[t] || lru[t].head == e) return;
    Unlink(e, t);
    Link(e, t);
  }
};

}  // namespace kvdn::storage

#endif  // KVDN_STORAGE_SRC_TIERED_STORE_STATE_H_
