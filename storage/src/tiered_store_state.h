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
  // Links in its namespace's own host LRU list (State::host_lru_by_ns), kept while track_ns.
  Entry* ns_prev = nullptr;
  Entry* ns_next = nullptr;
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

  // Host-tier bytes by namespace (linked chunks and reservations), kept while track_ns
  // (TieredStoreOptions::namespace_host_share below 1).
  bool track_ns = false;
  absl::flat_hash_map<std::string, uint64_t> host_bytes_by_ns ABSL_GUARDED_BY(mu);
  // Each namespace's host chunks in LRU order too (head = most recent), so a namespace past its
  // share finds its own least recently used chunk without walking past the others'.
  struct NsList {
    Entry* head = nullptr;
    Entry* tail = nullptr;
  };
  absl::flat_hash_map<std::string, NsList> host_lru_by_ns ABSL_GUARDED_BY(mu);
  // The least recently used host chunk of `ns` (nullptr when none); walk on with ns_prev.
  Entry* HostTailOf(const std::string& ns) const {
    auto it = host_lru_by_ns.find(ns);
    return it == host_lru_by_ns.end() ? nullptr : it->second.tail;
  }
  void CountHost(const std::string& ns, uint64_t bytes, bool add) {
    if (!track_ns) return;
    uint64_t& b = host_bytes_by_ns[ns];
    b = add ? b + bytes : (b > bytes ? b - bytes : 0);
    if (b == 0) host_bytes_by_ns.erase(ns);
  }
  uint64_t HostBytesOf(absl::string_view ns) const {
    auto it = host_bytes_by_ns.find(ns);
    return it == host_bytes_by_ns.end() ? 0 : it->second;
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
    if (t == kHost && track_ns) {
      CountHost(e->key.ns, e->size, true);
      NsList& n = host_lru_by_ns[e->key.ns];
      e->ns_prev = nullptr;
      e->ns_next = n.head;
      if (n.head) n.head->ns_prev = e;
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
    if (t == kHost && track_ns) {
      CountHost(e->key.ns, e->size, false);
      auto it = host_lru_by_ns.find(e->key.ns);
      NsList& n = it->second;
      if (e->ns_prev)
        e->ns_prev->ns_next = e->ns_next;
      else
        n.head = e->ns_next;
      if (e->ns_next)
        e->ns_next->ns_prev = e->ns_prev;
      else
        n.tail = e->ns_prev;
      e->ns_prev = e->ns_next = nullptr;
      if (n.head == nullptr) host_lru_by_ns.erase(it);
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
