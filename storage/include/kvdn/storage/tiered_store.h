// TieredStore: the node's chunk store over up to three tiers (GPU memory, pinned host memory, local
// disk), with two-phase puts, leases, prefix lookup, watermark eviction with demotion, promotion on
// hit, and per-tier statistics.
//
// Residency. A chunk has at most one copy in memory (in the GPU tier or the host tier) and, in
// addition, possibly one on disk. New chunks land in the host tier. Eviction demotes GPU -> host,
// host -> disk (a chunk already on disk just loses its memory copy), and drops disk chunks past the
// disk watermark. A hit on a disk-only chunk promotes it to the host tier (its disk copy stays); a
// hit from a reader that accepts GPU memory promotes a host chunk to the GPU tier when there is
// room.
//
// Puts are two-phase: Reserve(key, size) returns a writable host buffer; the writer fills it with
// an encoded chunk (chunk_format.h) and calls Commit(id, checksum), which verifies the chunk's
// header and payload checksum before the chunk becomes visible. Reservations not committed within
// reservation_ttl expire and their memory is reused. Keys are content-addressed, so a key is
// written once: Reserve of a present key returns ALREADY_EXISTS and the writer can skip the upload;
// Reserve of a key another reservation is writing returns ABORTED (retry once that one ends: it
// may yet fail, so skipping the upload then could lose the chunk).
//
// Leases. Acquire pins a chunk's memory copy for a reader until Release or the lease's ttl: a
// leased chunk is never evicted, moved, freed or overwritten. Delete of a leased chunk hides it at
// once and frees it when the last lease ends.
//
// Thread-safety: every method may be called concurrently. One mutex guards the index; it is
// released around disk I/O and device copies, during which the chunk being moved is pinned. Lock
// order: TieredStore::mu_ before a tier's internal mutex.
#ifndef KVDN_STORAGE_TIERED_STORE_H_
#define KVDN_STORAGE_TIERED_STORE_H_

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "absl/time/time.h"
#include "kvdn/common/bytes.h"
#include "kvdn/common/chunk_key.h"
#include "kvdn/common/clock.h"
#include "kvdn/common/status.h"
#include "kvdn/storage/disk_tier.h"
#include "kvdn/storage/gpu_tier.h"
#include "kvdn/storage/host_tier.h"
#include "kvdn/storage/tier.h"

namespace kvdn::storage {

struct TieredStoreOptions {
  HostTierOptions host;
  std::optional<GpuTierOptions> gpu;    // no GPU tier when unset
  std::optional<DiskTierOptions> disk;  // no disk tier when unset
  absl::Duration reservation_ttl = absl::Seconds(30);
  absl::Duration max_lease_ttl = absl::Minutes(5);
  // Period of the background thread that expires reservations and leases and evicts down to the low
  // watermarks. Zero: no thread; the owner calls RunMaintenance().
  absl::Duration maintenance_interval = absl::Milliseconds(100);
  // How often the maintenance thread calls DiskTier::Sync(), bounding what a power loss can take
  // (a process crash loses nothing that was written). Zero: only on close.
  absl::Duration disk_sync_interval = absl::Seconds(5);
  Clock* clock = nullptr;  // nullptr: Clock::Real()
  // The most of the host tier's capacity one namespace (tenant) may hold, chunks and
  // reservations together, in (0, 1]; 1: no limit. A write or promotion that would take a
  // namespace past its share first evicts (demotes) that namespace's own least recently used
  // host chunks, so one tenant filling the cache pushes out its own chunks, never more than the
  // others' share of them. RESOURCE_EXHAUSTED naming the namespace when its own chunks there are
  // all leased or moving, or a chunk is larger than the share.
  double namespace_host_share = 1.0;
  // The same for the disk tier: a chunk demoted (or persisted) to disk for a namespace past its
  // share first evicts that namespace's own least recently used disk chunks. In (0, 1]; 1: no
  // limit.
  double namespace_disk_share = 1.0;
  // The same for the GPU tier: a promotion into it (for an engine reading in place) that would
  // take the namespace past its share first demotes that namespace's own least recently used GPU
  // chunks to host memory; when its GPU chunks are all leased the chunk is leased from host
  // memory instead (promotions are opportunistic). In (0, 1]; 1: no limit.
  double namespace_gpu_share = 1.0;
};

struct TierStats {
  bool present = false;
  uint64_t chunks = 0;
  uint64_t bytes = 0;       // committed chunk bytes held in this tier
  uint64_t used_bytes = 0;  // bytes the tier has handed out (memory tiers add reservations)
  uint64_t capacity_bytes = 0;
  uint64_t prefaulted_bytes = 0;  // memory tiers: MemoryTier::prefaulted_bytes; disk: capacity
  uint64_t hits = 0;              // Acquire found the chunk in this tier first
  uint64_t misses = 0;            // Acquire looked in this tier and did not find it
  uint64_t evictions = 0;         // chunks removed from this tier to make room
  uint64_t demotions = 0;         // of those, chunks moved down into the next tier
  uint64_t promotions = 0;        // chunks moved up into this tier
  uint64_t checksum_failures = 0;
};

struct StoreStats {
  std::array<TierStats, kNumTierKinds> tiers;  // indexed by TierKind
  uint64_t reservations_active = 0;
  uint64_t reservations_expired = 0;
  uint64_t commits = 0;
  uint64_t commit_failures = 0;  // commits refused: bad chunk or checksum mismatch
  uint64_t leases_active = 0;
  uint64_t leases_expired = 0;
  const TierStats& tier(TierKind k) const { return tiers[static_cast<int>(k)]; }
};

struct Reservation {
  uint64_t id = 0;
  MutableByteSpan buffer;  // host memory to fill with the encoded chunk; valid until Commit/expiry
  absl::Time expires;
};

struct Lease {
  uint64_t id = 0;
  TierKind tier = TierKind::kHost;
  uint64_t size = 0;           // encoded chunk bytes
  ByteSpan host_bytes;         // the chunk, when tier == kHost
  void* device_ptr = nullptr;  // the chunk in device memory, when tier == kGpu
  absl::Time expires;
};

struct AcquireOptions {
  absl::Duration ttl = absl::Seconds(30);  // clamped to max_lease_ttl
  bool accept_gpu = false;  // the reader can consume device memory (same-node engine)
  // false: instead of waiting for a move in flight, reading the chunk from disk, copying it off
  // the GPU or (accept_gpu) onto it, Acquire fails with kWouldBlock (so an event-loop caller can
  // retry on a thread that may block). Counts no hit or miss then.
  bool may_block = true;
};

struct ReserveOptions {
  // false: instead of evicting a chunk that must first be written to the disk tier, Reserve fails
  // with kWouldBlock (an event-loop caller then retries on a thread that may block). Evicting
  // chunks that need no I/O (already on disk, or no disk tier) is done either way.
  bool may_block = true;
};

// The message of the UNAVAILABLE status Acquire and Reserve return when `may_block` is false and
// they would have to block. Test with IsWouldBlock.
inline constexpr char kWouldBlock[] = "the call would block";
bool IsWouldBlock(const absl::Status& status);

// One stored chunk as the admin API shows it.
struct ChunkRecord {
  ChunkKey key;
  uint64_t size = 0;                // encoded chunk bytes
  TierKind tier = TierKind::kHost;  // the fastest tier holding it
  bool on_disk = false;             // a disk copy exists (besides a memory copy, if any)
  uint32_t leases = 0;              // readers holding it now
};

struct ListFilter {
  std::optional<std::string> ns;  // only this namespace
  std::optional<TierKind> tier;   // only chunks with a copy in this tier
};

struct LookupResult {
  size_t matched = 0;           // chunks of the chain present, from its start
  std::vector<TierKind> tiers;  // where each matched chunk is (memory tier if any, else disk)
};

class TieredStore {
 public:
  // Creates the tiers. Errors from the tiers' factories (e.g. FAILED_PRECONDITION for a GPU tier
  // without a GPU, UNAVAILABLE for a disk directory RocksDB cannot open). Chunks already on disk
  // are indexed and served.
  static absl::StatusOr<std::unique_ptr<TieredStore>> Open(const TieredStoreOptions& options);
  ~TieredStore();
  TieredStore(const TieredStore&) = delete;
  TieredStore& operator=(const TieredStore&) = delete;

  // Phase one of a put: room for `size` bytes of encoded chunk in the host tier.
  // INVALID_ARGUMENT: bad namespace, or size outside [header, header + max payload].
  // ALREADY_EXISTS: the key is stored. ABORTED: another reservation is writing it; retry.
  // UNAVAILABLE: the key is being deleted; retry. RESOURCE_EXHAUSTED: no room even after eviction.
  // kWouldBlock (UNAVAILABLE, IsWouldBlock): options.may_block is false and room needs disk I/O.
  absl::StatusOr<Reservation> Reserve(const ChunkKey& key, uint64_t size,
                                      const ReserveOptions& options = {});
  // Phase two: verifies the reserved bytes are one encoded chunk of exactly the reserved size whose
  // header checksum is `payload_checksum` and whose payload hashes to it; then publishes it.
  // NOT_FOUND: unknown id. ABORTED: the reservation expired (Reserve again). INVALID_ARGUMENT: the
  // bytes are not a valid chunk of that size. DATA_LOSS: checksum mismatch. On any error the
  // reservation is gone and its memory freed. `key`, when given, is set to the reservation's key
  // (on success).
  absl::Status Commit(uint64_t reservation_id, uint64_t payload_checksum, ChunkKey* key = nullptr);
  // Commit for a writer that hashed the payload itself as it wrote it (XXH3-64 of the reserved
  // bytes past the header, after they were written, e.g. part by part as a transport landed them):
  // `payload_hash` stands in for Commit's pass over the bytes. DATA_LOSS when it differs from
  // `payload_checksum` (the reservation is then gone, as on any error); otherwise as Commit (the
  // chunk's form, e.g. its size, is checked first: INVALID_ARGUMENT before DATA_LOSS).
  absl::Status CommitHashed(uint64_t reservation_id, uint64_t payload_checksum,
                            uint64_t payload_hash, ChunkKey* key = nullptr);
  // Drops a reservation. NOT_FOUND if unknown or already expired.
  absl::Status Abort(uint64_t reservation_id);
  // Lets a second party (a streamed Put, a transport) write a reservation's buffer: returns the
  // buffer and holds the reservation so it cannot expire until EndWrite. NOT_FOUND: unknown id.
  // ABORTED: it expired. FAILED_PRECONDITION: it is being committed. INVALID_ARGUMENT: its size is
  // not `size`. Commit of a reservation being written is FAILED_PRECONDITION.
  absl::StatusOr<MutableByteSpan> BeginWrite(uint64_t reservation_id, uint64_t size);
  // Ends a BeginWrite. When the last writer ends, the reservation's TTL starts again from now
  // (if that is later than its expiry): a write that outlasted the TTL can still be committed.
  void EndWrite(uint64_t reservation_id);
  // Reserve + copy + Commit of an encoded chunk, hashing while copying (one pass over the bytes).
  // Errors as Reserve's and Commit's: ALREADY_EXISTS when stored, ABORTED while another write
  // holds the key.
  absl::Status Put(const ChunkKey& key, ByteSpan encoded);

  // Pins the chunk in memory for a reader. INVALID_ARGUMENT: ttl <= 0. NOT_FOUND: not stored.
  // UNAVAILABLE: a host reader asked for a chunk a GPU reader holds; retry. DATA_LOSS: its disk
  // copy failed verification and was dropped. RESOURCE_EXHAUSTED: it is on disk and the host tier
  // has no room.
  absl::StatusOr<Lease> Acquire(const ChunkKey& key, const AcquireOptions& options = {});
  // Ends a lease. NOT_FOUND: unknown id. ABORTED: it had expired, so bytes read under it may have
  // been reused: discard them.
  absl::Status Release(uint64_t lease_id);
  // A live lease (for a transport that reads under a lease another call took), extended to end no
  // sooner than `until` (at most max_lease_ttl from now), so it cannot expire mid-transfer.
  // NOT_FOUND: unknown id. ABORTED: it expired.
  absl::StatusOr<Lease> HoldLease(uint64_t lease_id, absl::Time until);
  // The key a reservation or a lease is for (kvdnd checks the caller may use its namespace before
  // it acts on the id): NOT_FOUND for an id that is neither (or no longer either).
  absl::StatusOr<ChunkKey> KeyOfReservation(uint64_t reservation_id) const;
  absl::StatusOr<ChunkKey> KeyOfLease(uint64_t lease_id) const;
  // Acquire + copy into dst + Release. OUT_OF_RANGE if dst is too small. Returns the chunk size.
  absl::StatusOr<uint64_t> Get(const ChunkKey& key, MutableByteSpan dst);

  // The longest prefix of `chain` that is stored (stops at the first absent key).
  LookupResult Lookup(absl::Span<const ChunkKey> chain) const;
  // Stored chunks matching `filter`, in no particular order.
  std::vector<ChunkRecord> List(const ListFilter& filter) const;
  // One chunk's record; NOT_FOUND if absent.
  absl::StatusOr<ChunkRecord> Describe(const ChunkKey& key) const;
  // The fastest tier holding `key`, nullopt if it is not stored. Unlike Describe it counts no
  // leases: cheap enough for per-chunk checks on a request path.
  std::optional<TierKind> Where(const ChunkKey& key) const;
  // Chunks stored (each once, whatever tiers hold it).
  size_t ChunkCount() const;
  // Writes memory-only chunks to the disk tier while it has room (without evicting disk chunks),
  // most recently used first, then syncs it; for a graceful shutdown, so a restart finds them.
  // Returns how many were written. FAILED_PRECONDITION without a disk tier.
  absl::StatusOr<uint64_t> PersistToDisk();
  // Removes the chunk from every tier. NOT_FOUND if absent. A leased chunk disappears from lookups
  // at once and is freed when its leases end.
  absl::Status Delete(const ChunkKey& key);

  // Expires reservations and leases, then evicts each tier above its high watermark down to its low
  // watermark. Called by the background thread; callable directly (e.g. in tests).
  void RunMaintenance();
  StoreStats Stats() const;
  // Bytes of namespace `ns` in `tier` (host: chunks and reservations; all tiers: copies in
  // transit into it), kept only for the tiers whose namespace share (namespace_host_share,
  // namespace_gpu_share, namespace_disk_share) is below 1; 0 otherwise.
  uint64_t NamespaceBytes(TierKind tier, absl::string_view ns) const;
  // Every namespace's bytes in `tier` (the same figures; empty when not kept).
  std::vector<std::pair<std::string, uint64_t>> NamespaceUsage(TierKind tier) const;
  // The most one namespace may hold in `tier`: its share times the tier's capacity; 0 when the
  // tier has no namespace share (or is absent).
  uint64_t NamespaceShareBytes(TierKind tier) const;
  // For tests: INTERNAL naming the first broken invariant of the namespace LRU lists — in each
  // tier with a namespace share, each namespace's list holds exactly that namespace's chunks of
  // the tier, in the order the tier's list has them; none are kept for the other tiers.
  absl::Status CheckNamespaceListsForTest() const;

  // The tiers, for registering memory with a transport. Null when absent.
  HostTier* host_tier() const { return host_.get(); }
  GpuTier* gpu_tier() const { return gpu_.get(); }
  DiskTier* disk_tier() const { return disk_.get(); }

 private:
  struct Entry;
  struct State;
  explicit TieredStore(const TieredStoreOptions& options);

  // Tier index t is a TierKind value. Every *Locked function REQUIRES state_->mu held; those that
  // move bytes release it around the copy while the entry is pinned (entry->moving set).
  MemoryTier* MemTier(int t) const;
  uint64_t TierUsed(int t) const;
  bool TierPresent(int t) const;
  // payload_hash: the writer's XXH3 of the payload (CommitHashed); none: Commit hashes it here.
  absl::Status CommitInternal(uint64_t id, uint64_t payload_checksum,
                              std::optional<uint64_t> payload_hash,
                              ChunkKey* committed_key = nullptr);
  void FreeMemoryLocked(Entry* e);
  void DropDiskCopyLocked(Entry* e);
  void RemoveLocked(Entry* e);
  // Removes a doomed or copy-less entry once unpinned; true if `e` was erased (it dangles now).
  bool MaybeReapLocked(Entry* e);
  // A block in memory tier t, evicting unpinned chunks (never `keep`) until one fits. With
  // may_block false, kWouldBlock where the next eviction would write to disk.
  // `ns` (default: keep's) is the namespace the block is for: past its share of the tier
  // (namespace_host_share, namespace_gpu_share), its own chunks are evicted first.
  absl::StatusOr<MemoryBlock> AllocateLocked(int t, uint64_t size, const Entry* keep,
                                             bool may_block = true, absl::string_view ns = {});
  // Evicts the least recently used evictable chunk of tier t (of namespace `*only_ns` when given);
  // false if there is none, or (with may_block false, *would_block set) if evicting it needs disk
  // I/O.
  bool EvictOneLocked(int t, const Entry* keep, bool may_block = true, bool* would_block = nullptr,
                      const std::string* only_ns = nullptr);
  // Writes e's memory copy (host, or GPU staged through host) to the disk tier with the lock
  // dropped around the I/O; on success marks it on disk. REQUIRES: e pinned and moving.
  absl::Status WriteToDiskLocked(Entry* e);
  void DemoteToDiskLocked(Entry* e);
  // TieredStoreOptions' namespace share of tier t and its option name; the share in bytes.
  double ShareFraction(int t) const;
  static absl::string_view ShareOption(int t);
  uint64_t ShareBytes(int t) const;
  // Whether writing e to disk would take its namespace past namespace_disk_share.
  bool OverDiskShareLocked(const Entry& e) const;
  // UNAVAILABLE if another reader holds the GPU copy; for_reader keeps the GPU copy on failure.
  absl::Status DemoteGpuToHostLocked(Entry* e, bool for_reader);
  absl::Status PromoteFromDiskLocked(Entry* e);
  void PromoteToGpuLocked(Entry* e);
  void MaintenanceLocked();
  void WakeIfAboveHighLocked(int t);

  // Constant after construction.
  const TieredStoreOptions options_;
  Clock* const clock_;
  std::unique_ptr<GpuTier> gpu_;
  std::unique_ptr<HostTier> host_;
  std::unique_ptr<DiskTier> disk_;

  // The index, reservations, leases and the background thread; guarded by its own mutex.
  std::unique_ptr<State> state_;
};

}  // namespace kvdn::storage

#endif  // KVDN_STORAGE_TIERED_STORE_H_
