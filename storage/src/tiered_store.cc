#include "kvdn/storage/tiered_store.h"

#include <algorithm>
#include <cstring>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kvdn/common/chunk_format.h"
#include "kvdn/common/hash.h"
#include "kvdn/common/logging.h"
#include "src/tiered_store_state.h"

namespace kvdn::storage {

TieredStore::TieredStore(const TieredStoreOptions& options)
    : options_(options),
      clock_(options.clock ? options.clock : Clock::Real()),
      state_(std::make_unique<State>()) {}

TieredStore::~TieredStore() {
  {
    MutexLock lock(&state_->mu);
    state_->stop = true;
  }
  state_->cv.SignalAll();
  if (state_->maintenance.joinable()) state_->maintenance.join();
}

absl::StatusOr<std::unique_ptr<TieredStore>> TieredStore::Open(const TieredStoreOptions& options) {
  if (options.reservation_ttl <= absl::ZeroDuration() ||
      options.max_lease_ttl <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("reservation_ttl and max_lease_ttl must be positive");
  }
  for (const auto& [name, share] :
       {std::pair{"namespace_host_share", options.namespace_host_share},
        std::pair{"namespace_disk_share", options.namespace_disk_share},
        std::pair{"namespace_gpu_share", options.namespace_gpu_share}}) {
    if (!(share > 0 && share <= 1)) {
      return absl::InvalidArgumentError(absl::StrCat(name, " ", share, " is outside (0, 1]"));
    }
  }
  std::unique_ptr<TieredStore> store(new TieredStore(options));
  // Before the disk tier's chunks are linked below: they count from the start.
  store->state_->track_ns[kHost] = options.namespace_host_share < 1;
  store->state_->track_ns[kDisk] = options.disk.has_value() && options.namespace_disk_share < 1;
  store->state_->track_ns[kGpu] = options.gpu.has_value() && options.namespace_gpu_share < 1;
  KVDN_ASSIGN_OR_RETURN(store->host_, HostTier::Create(options.host));
  if (options.gpu) {
    KVDN_ASSIGN_OR_RETURN(store->gpu_, GpuTier::Create(*options.gpu));
  }
  if (options.disk) {
    KVDN_ASSIGN_OR_RETURN(store->disk_, DiskTier::Open(*options.disk));
    // Index what is on disk, oldest first so the newest ends up most recently used.
    std::vector<DiskChunkMeta> metas;
    KVDN_RETURN_IF_ERROR(store->disk_->ForEach([&](const DiskChunkMeta& m) {
      metas.push_back(m);
      return true;
    }));
    std::sort(metas.begin(), metas.end(),
              [](const DiskChunkMeta& a, const DiskChunkMeta& b) { return a.written < b.written; });
    State& s = *store->state_;
    MutexLock lock(&s.mu);
    for (const DiskChunkMeta& m : metas) {
      Entry& e = s.index[m.key];
      e.key = m.key;
      e.size = m.stored_bytes;
      e.on_disk = true;
      s.Link(&e, kDisk);
    }
    if (!metas.empty()) spdlog::info("tiered store: indexed {} chunks from disk", metas.size());
  }
  if (options.maintenance_interval > absl::ZeroDuration()) {
    TieredStore* self = store.get();
    store->state_->maintenance = std::thread([self] {
      State& s = *self->state_;
      absl::Time last_sync = absl::Now();
      for (;;) {
        {
          MutexLock lock(&s.mu);
          if (!s.stop && !s.wake) s.cv.WaitWithTimeout(&s.mu, self->options_.maintenance_interval);
          if (s.stop) return;
          s.wake = false;
          self->MaintenanceLocked();
        }
        // Bound what a power loss can take: make the disk tier durable every disk_sync_interval.
        const absl::Duration every = self->options_.disk_sync_interval;
        if (self->disk_ && every > absl::ZeroDuration() && absl::Now() - last_sync >= every) {
          if (absl::Status st = self->disk_->Sync(); !st.ok()) {
            spdlog::warn("tiered store: disk sync: {}", st.message());
          }
          last_sync = absl::Now();
        }
      }
    });
  }
  return store;
}

// ---- puts ----

absl::StatusOr<Reservation> TieredStore::Reserve(const ChunkKey& key, uint64_t size,
                                                 const ReserveOptions& options) {
  if (absl::Status st = ValidateNamespace(key.ns); !st.ok()) return st;
  if (size < kChunkHeaderBytes || size > kChunkHeaderBytes + kMaxChunkPayloadBytes) {
    return absl::InvalidArgumentError(absl::StrCat("reservation size ", size, " is outside [",
                                                   kChunkHeaderBytes, ", ",
                                                   kChunkHeaderBytes + kMaxChunkPayloadBytes, "]"));
  }
  State& s = *state_;
  MutexLock lock(&s.mu);
  auto check_key = [&]() -> absl::Status {
    if (auto it = s.index.find(key); it != s.index.end()) {
      if (it->second.doomed) {
        return absl::UnavailableError(
            absl::StrCat("chunk ", key.ToString(), " is being deleted; retry"));
      }
      return absl::AlreadyExistsError(absl::StrCat("chunk ", key.ToString(), " is stored"));
    }
    if (auto it = s.reserved_keys.find(key); it != s.reserved_keys.end()) {
      // Not ALREADY_EXISTS: that write may still fail or expire, and a writer told "stored"
      // would skip its own upload and lose the chunk.
      return absl::AbortedError(absl::StrCat("chunk ", key.ToString(),
                                             " is being written by reservation ", it->second,
                                             "; retry once that write ends"));
    }
    return absl::OkStatus();
  };
  KVDN_RETURN_IF_ERROR(check_key());
  KVDN_ASSIGN_OR_RETURN(MemoryBlock block,
                        AllocateLocked(kHost, size, nullptr, options.may_block, key.ns));
  // Allocation may have dropped the lock to evict; another writer may have taken the key.
  if (absl::Status st = check_key(); !st.ok()) {
    (void)host_->Free(block);
    return st;
  }
  const uint64_t id = s.next_id++;
  const absl::Time expires = clock_->Now() + options_.reservation_ttl;
  s.reservations[id] = State::PendingReservation{key, block, expires};
  s.reserved_keys[key] = id;
  s.CountHost(key.ns, block.size, true);
  WakeIfAboveHighLocked(kHost);
  return Reservation{id, host_->Bytes(block), expires};
}

absl::Status TieredStore::Commit(uint64_t reservation_id, uint64_t payload_checksum,
                                 ChunkKey* key) {
  return CommitInternal(reservation_id, payload_checksum, std::nullopt, key);
}

absl::Status TieredStore::CommitHashed(uint64_t reservation_id, uint64_t payload_checksum,
                                       uint64_t payload_hash, ChunkKey* key) {
  return CommitInternal(reservation_id, payload_checksum, payload_hash, key);
}

absl::Status TieredStore::CommitInternal(uint64_t id, uint64_t payload_checksum,
                                         std::optional<uint64_t> payload_hash,
                                         ChunkKey* committed_key) {
  State& s = *state_;
  ChunkKey key;
  MemoryBlock block;
  {
    MutexLock lock(&s.mu);
    auto it = s.reservations.find(id);
    if (it == s.reservations.end()) {
      if (s.expired_reservations.Contains(id)) {
        return absl::AbortedError(absl::StrCat("reservation ", id, " expired; reserve again"));
      }
      return absl::NotFoundError(absl::StrCat("no reservation ", id));
    }
    if (it->second.committing) {
      return absl::FailedPreconditionError(
          absl::StrCat("reservation ", id, " is already being committed"));
    }
    if (it->second.writers > 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("reservation ", id, " is still being written"));
    }
    if (clock_->Now() >= it->second.expires) {
      (void)host_->Free(it->second.block);
      s.CountHost(it->second.key.ns, it->second.block.size, false);
      s.reserved_keys.erase(it->second.key);
      s.reservations.erase(it);
      s.expired_reservations.Add(id);
      ++s.reservations_expired;
      return absl::AbortedError(absl::StrCat("reservation ", id, " expired; reserve again"));
    }
    it->second.committing = true;
    key = it->second.key;
    block = it->second.block;
  }
  // Verify outside the lock: the reservation is ours while `committing` is set.
  absl::Status verdict;
  // The chunk's form first (a wrong size is INVALID_ARGUMENT whoever hashed it), then its bytes.
  auto view = DecodeChunk(host_->Bytes(block), /*verify_payload=*/!payload_hash.has_value());
  if (!view.ok()) {
    verdict = view.status();
  } else if (view->header.payload_checksum != payload_checksum) {
    verdict = absl::DataLossError(
        absl::StrFormat("commit checksum %016x does not match the chunk header's %016x",
                        payload_checksum, view->header.payload_checksum));
  } else if (payload_hash.has_value() && *payload_hash != payload_checksum) {
    verdict = absl::DataLossError(absl::StrFormat(
        "chunk payload hashes to %016x, its header says %016x", *payload_hash, payload_checksum));
  }
  MutexLock lock(&s.mu);
  s.reservations.erase(id);
  s.reserved_keys.erase(key);
  s.CountHost(key.ns, block.size, false);  // counted again below as the chunk's, if stored
  if (!verdict.ok()) {
    (void)host_->Free(block);
    ++s.commit_failures;
    if (absl::IsDataLoss(verdict)) ++s.stats[kHost].checksum_failures;
    return verdict;
  }
  auto [it, inserted] = s.index.try_emplace(key);
  if (!inserted) {  // cannot happen while reserved_keys guards the key; never lose the old chunk
    (void)host_->Free(block);
    return absl::AlreadyExistsError(absl::StrCat("chunk ", key.ToString(), " is stored"));
  }
  Entry& e = it->second;
  e.key = key;
  e.size = block.size;
  e.mem = kHost;
  e.block = block;
  s.Link(&e, kHost);
  ++s.commits;
  if (committed_key != nullptr) *committed_key = key;
  return absl::OkStatus();
}

absl::Status TieredStore::Abort(uint64_t reservation_id) {
  State& s = *state_;
  MutexLock lock(&s.mu);
  auto it = s.reservations.find(reservation_id);
  if (it == s.reservations.end() || it->second.committing) {
    return absl::NotFoundError(absl::StrCat("no reservation ", reservation_id, " to abort"));
  }
  (void)host_->Free(it->second.block);
  s.CountHost(it->second.key.ns, it->second.block.size, false);
  s.reserved_keys.erase(it->second.key);
  s.reservations.erase(it);
  return absl::OkStatus();
}

absl::StatusOr<MutableByteSpan> TieredStore::BeginWrite(uint64_t reservation_id, uint64_t size) {
  State& s = *state_;
  MutexLock lock(&s.mu);
  auto it = s.reservations.find(reservation_id);
  if (it == s.reservations.end()) {
    if (s.expired_reservations.Contains(reservation_id)) {
      return absl::AbortedError(
          absl::StrCat("reservation ", reservation_id, " expired; reserve again"));
    }
    return absl::NotFoundError(absl::StrCat("no reservation ", reservation_id));
  }
  State::PendingReservation& r = it->second;
  if (r.committing) {
    return absl::FailedPreconditionError(
        absl::StrCat("reservation ", reservation_id, " is being committed"));
  }
  if (r.writers == 0 && clock_->Now() >= r.expires) {
    (void)host_->Free(r.block);
    s.CountHost(r.key.ns, r.block.size, false);
    s.reserved_keys.erase(r.key);
    s.reservations.erase(it);
    s.expired_reservations.Add(reservation_id);
    ++s.reservations_expired;
    return absl::AbortedError(
        absl::StrCat("reservation ", reservation_id, " expired; reserve again"));
  }
  if (size != r.block.size) {
    return absl::InvalidArgumentError(absl::StrCat("reservation ", reservation_id, " holds ",
                                                   r.block.size, " bytes, not ", size));
  }
  ++r.writers;
  return host_->Bytes(r.block);
}

void TieredStore::EndWrite(uint64_t reservation_id) {
  State& s = *state_;
  MutexLock lock(&s.mu);
  auto it = s.reservations.find(reservation_id);
  if (it == s.reservations.end() || it->second.writers == 0) return;
  // The last writer restarts the TTL: a reservation that was being written all along is not
  // abandoned, and its owner gets a whole TTL to commit bytes that took longer to arrive.
  if (--it->second.writers == 0) {
    it->second.expires = std::max(it->second.expires, clock_->Now() + options_.reservation_ttl);
  }
}

absl::Status TieredStore::Put(const ChunkKey& key, ByteSpan encoded) {
  KVDN_ASSIGN_OR_RETURN(ChunkHeader header, DecodeChunkHeader(encoded));
  KVDN_ASSIGN_OR_RETURN(Reservation r, Reserve(key, encoded.size()));
  // One pass: copy a piece into the arena, then hash it while it is still in cache.
  Xxh3_64Stream hasher;
  uint8_t* dst = r.buffer.data();
  for (size_t off = 0; off < encoded.size(); off += kCopyHashPiece) {
    const size_t n = std::min(kCopyHashPiece, encoded.size() - off);
    std::memcpy(dst + off, encoded.data() + off, n);
    const size_t begin = std::max(off, kChunkHeaderBytes);
    if (off + n > begin) hasher.Update(ByteSpan(dst + begin, off + n - begin));
  }
  return CommitHashed(r.id, header.payload_checksum, hasher.Digest());
}

// ---- reads ----

bool IsWouldBlock(const absl::Status& status) {
  return absl::IsUnavailable(status) && status.message() == kWouldBlock;
}

absl::StatusOr<Lease> TieredStore::Acquire(const ChunkKey& key, const AcquireOptions& options) {
  if (options.ttl <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("lease ttl must be positive, got ", absl::FormatDuration(options.ttl)));
  }
  State& s = *state_;
  MutexLock lock(&s.mu);
  bool counted = false;
  bool tried_gpu = false;
  auto count = [&](int found) {
    if (counted) return;
    counted = true;
    for (int t = 0; t < kNumTierKinds; ++t) {
      if (!TierPresent(t)) continue;
      if (t == found) {
        ++s.stats[t].hits;
        break;
      }
      ++s.stats[t].misses;
    }
  };
  for (;;) {
    auto it = s.index.find(key);
    if (it == s.index.end() || it->second.doomed) {
      count(kNone);
      return absl::NotFoundError(absl::StrCat("chunk ", key.ToString(), " is not stored"));
    }
    Entry* e = &it->second;
    // A promotion into the GPU tier (below, for a reader that takes device memory) is a copy
    // too.
    const bool would_promote =
        e->mem == kHost && options.accept_gpu && gpu_ && !tried_gpu && !e->moving && e->pins == 0;
    if (!options.may_block &&
        (e->mem == kNone || (e->mem == kGpu && !options.accept_gpu) || would_promote)) {
      return absl::UnavailableError(kWouldBlock);
    }
    if (e->moving && (e->mem == kNone || (e->mem == kGpu && !options.accept_gpu))) {
      // Wait for the move in flight (every move signals cv when it ends), then look again: the
      // entry may be gone by then.
      s.cv.Wait(&s.mu);
      continue;
    }
    count(e->mem != kNone ? e->mem : kDisk);
    if (e->mem == kGpu && !options.accept_gpu) {
      KVDN_RETURN_IF_ERROR(DemoteGpuToHostLocked(e, /*for_reader=*/true));
      continue;
    }
    if (e->mem == kNone) {
      KVDN_RETURN_IF_ERROR(PromoteFromDiskLocked(e));
      continue;
    }
    if (would_promote) {
      tried_gpu = true;  // opportunistic: on failure the host copy is leased
      PromoteToGpuLocked(e);
      continue;
    }
    const uint64_t id = s.next_id++;
    const absl::Duration ttl = std::min(options.ttl, options_.max_lease_ttl);
    const absl::Time expires = clock_->Now() + ttl;
    s.leases[id] = State::LeaseRecord{e, expires};
    ++e->pins;
    s.Touch(e, e->mem);
    s.Touch(e, kDisk);
    Lease lease{id, static_cast<TierKind>(e->mem), e->size, {}, nullptr, expires};
    if (e->mem == kHost) {
      lease.host_bytes = host_->Bytes(e->block);
    } else {
      lease.device_ptr = gpu_->Address(e->block);
    }
    return lease;
  }
}

absl::Status TieredStore::Release(uint64_t lease_id) {
  State& s = *state_;
  MutexLock lock(&s.mu);
  auto it = s.leases.find(lease_id);
  if (it == s.leases.end()) {
    if (s.expired_leases.Contains(lease_id)) {
      return absl::AbortedError(absl::StrCat(
          "lease ", lease_id, " expired before release; bytes read under it may be stale"));
    }
    return absl::NotFoundError(absl::StrCat("no lease ", lease_id));
  }
  Entry* e = it->second.entry;
  s.leases.erase(it);
  --e->pins;
  MaybeReapLocked(e);
  return absl::OkStatus();
}

absl::StatusOr<ChunkKey> TieredStore::KeyOfReservation(uint64_t reservation_id) const {
  State& s = *state_;
  MutexLock lock(&s.mu);
  auto it = s.reservations.find(reservation_id);
  if (it == s.reservations.end()) {
    return absl::NotFoundError(absl::StrCat("no reservation ", reservation_id));
  }
  return it->second.key;
}

absl::StatusOr<ChunkKey> TieredStore::KeyOfLease(uint64_t lease_id) const {
  State& s = *state_;
  MutexLock lock(&s.mu);
  auto it = s.leases.find(lease_id);
  if (it == s.leases.end()) return absl::NotFoundError(absl::StrCat("no lease ", lease_id));
  return it->second.entry->key;
}

absl::StatusOr<Lease> TieredStore::HoldLease(uint64_t lease_id, absl::Time until) {
  State& s = *state_;
  MutexLock lock(&s.mu);
  auto it = s.leases.find(lease_id);
  if (it == s.leases.end()) {
    if (s.expired_leases.Contains(lease_id)) {
      return absl::AbortedError(absl::StrCat("lease ", lease_id, " expired; take a new one"));
    }
    return absl::NotFoundError(absl::StrCat("no lease ", lease_id));
  }
  State::LeaseRecord& l = it->second;
  l.expires = std::max(l.expires, std::min(until, clock_->Now() + options_.max_lease_ttl));
  Entry* e = l.entry;
  Lease lease{lease_id, static_cast<TierKind>(e->mem), e->size, {}, nullptr, l.expires};
  if (e->mem == kHost) {
    lease.host_bytes = host_->Bytes(e->block);
  } else {
    lease.device_ptr = gpu_->Address(e->block);
  }
  return lease;
}

absl::StatusOr<uint64_t> TieredStore::Get(const ChunkKey& key, MutableByteSpan dst) {
  KVDN_ASSIGN_OR_RETURN(Lease lease, Acquire(key));
  if (dst.size() < lease.size) {
    (void)Release(lease.id);
    return absl::OutOfRangeError(
        absl::StrCat("chunk is ", lease.size, " bytes, destination holds ", dst.size()));
  }
  std::memcpy(dst.data(), lease.host_bytes.data(), lease.size);
  KVDN_RETURN_IF_ERROR(Release(lease.id));
  return lease.size;
}

LookupResult TieredStore::Lookup(absl::Span<const ChunkKey> chain) const {
  State& s = *state_;
  MutexLock lock(&s.mu);
  LookupResult r;
  for (const ChunkKey& key : chain) {
    auto it = s.index.find(key);
    if (it == s.index.end() || it->second.doomed) break;
    const Entry& e = it->second;
    r.tiers.push_back(static_cast<TierKind>(e.mem != kNone ? e.mem : kDisk));
    ++r.matched;
  }
  return r;
}

namespace {
TierKind FastestTier(int mem) { return static_cast<TierKind>(mem != kNone ? mem : kDisk); }
}  // namespace

std::optional<TierKind> TieredStore::Where(const ChunkKey& key) const {
  State& s = *state_;
  MutexLock lock(&s.mu);
  auto it = s.index.find(key);
  if (it == s.index.end() || it->second.doomed) return std::nullopt;
  return FastestTier(it->second.mem);
}

size_t TieredStore::ChunkCount() const {
  State& s = *state_;
  MutexLock lock(&s.mu);
  size_t n = 0;
  for (const auto& [key, e] : s.index) n += e.doomed ? 0 : 1;
  return n;
}

std::vector<ChunkRecord> TieredStore::List(const ListFilter& filter) const {
  State& s = *state_;
  MutexLock lock(&s.mu);
  std::vector<ChunkRecord> out;
  for (const auto& [key, e] : s.index) {
    if (e.doomed) continue;
    if (filter.ns && key.ns != *filter.ns) continue;
    if (filter.tier) {
      const int t = static_cast<int>(*filter.tier);
      if (!(e.mem == t || (t == kDisk && e.on_disk))) continue;
    }
    out.push_back(ChunkRecord{key, e.size, FastestTier(e.mem), e.on_disk, 0});
  }
  for (const auto& [id, l] : s.leases) {
    (void)id;
    // Few leases at a time: a linear pass is cheaper than an index by key.
    for (ChunkRecord& r : out) {
      if (r.key == l.entry->key) ++r.leases;
    }
  }
  return out;
}

absl::StatusOr<ChunkRecord> TieredStore::Describe(const ChunkKey& key) const {
  State& s = *state_;
  MutexLock lock(&s.mu);
  auto it = s.index.find(key);
  if (it == s.index.end() || it->second.doomed) {
    return absl::NotFoundError(absl::StrCat("chunk ", key.ToString(), " is not stored"));
  }
  const Entry& e = it->second;
  ChunkRecord r{key, e.size, FastestTier(e.mem), e.on_disk, 0};
  for (const auto& [id, l] : s.leases) {
    (void)id;
    if (l.entry == &e) ++r.leases;
  }
  return r;
}

absl::StatusOr<uint64_t> TieredStore::PersistToDisk() {
  if (!disk_) return absl::FailedPreconditionError("no disk tier to persist to");
  State& s = *state_;
  uint64_t written = 0;
  {
    MutexLock lock(&s.mu);
    for (int t : {kGpu, kHost}) {
      // Walk from the most recent; the list may change while the lock is dropped, so restart from
      // the head after each write (entries already on disk are skipped).
      for (;;) {
        Entry* e = s.lru[t].head;
        while (e && (e->on_disk || e->moving || e->doomed || OverDiskShareLocked(*e))) {
          e = e->next[t];
        }
        if (!e) break;
        if (disk_->used_bytes() + e->size > disk_->capacity_bytes()) break;
        e->moving = true;
        ++e->pins;
        const absl::Status st = WriteToDiskLocked(e);
        --e->pins;
        e->moving = false;
        s.cv.SignalAll();
        if (!st.ok()) {
          spdlog::warn("tiered store: persisting {} failed: {}", e->key.ToString(), st.message());
          MaybeReapLocked(e);
          break;
        }
        ++written;
        MaybeReapLocked(e);
      }
    }
  }
  KVDN_RETURN_IF_ERROR(disk_->Sync());
  return written;
}

absl::Status TieredStore::Delete(const ChunkKey& key) {
  State& s = *state_;
  MutexLock lock(&s.mu);
  auto it = s.index.find(key);
  if (it == s.index.end() || it->second.doomed) {
    return absl::NotFoundError(absl::StrCat("chunk ", key.ToString(), " is not stored"));
  }
  it->second.doomed = true;
  MaybeReapLocked(&it->second);
  return absl::OkStatus();
}

uint64_t TieredStore::NamespaceBytes(TierKind tier, absl::string_view ns) const {
  State& s = *state_;
  MutexLock lock(&s.mu);
  return s.BytesOf(static_cast<int>(tier), ns);
}

uint64_t TieredStore::NamespaceShareBytes(TierKind tier) const {
  const int t = static_cast<int>(tier);
  return TierPresent(t) ? ShareBytes(t) : 0;
}

std::vector<std::pair<std::string, uint64_t>> TieredStore::NamespaceUsage(TierKind tier) const {
  State& s = *state_;
  MutexLock lock(&s.mu);
  const auto& by_ns = s.bytes_by_ns[static_cast<int>(tier)];
  return {by_ns.begin(), by_ns.end()};
}

absl::Status TieredStore::CheckNamespaceListsForTest() const {
  State& s = *state_;
  MutexLock lock(&s.mu);
  for (int t = 0; t < kNumTierKinds; ++t) {
    const std::string tier(TierKindName(static_cast<TierKind>(t)));
    if (!s.track_ns[t]) {
      if (!s.lru_by_ns[t].empty() || !s.bytes_by_ns[t].empty()) {
        return absl::InternalError(absl::StrCat(tier, ": namespace lists kept without a share"));
      }
      continue;
    }
    // Walk the tier's list from the most recent; each namespace's list must be met in its order.
    absl::flat_hash_map<std::string, const Entry*> cursor;
    for (const auto& [ns, list] : s.lru_by_ns[t]) {
      if (list.head == nullptr || list.tail == nullptr || list.head->ns_prev[t] != nullptr ||
          list.tail->ns_next[t] != nullptr) {
        return absl::InternalError(absl::StrCat(tier, ": namespace ", ns, ": list ends broken"));
      }
      cursor[ns] = list.head;
    }
    uint64_t n = 0;
    for (const Entry* e = s.lru[t].head; e != nullptr; e = e->next[t], ++n) {
      auto it = cursor.find(e->key.ns);
      if (it == cursor.end() || it->second != e) {
        return absl::InternalError(absl::StrCat(tier, " chunk ", n, " (", e->key.ToString(),
                                                ") is not next in its namespace's list"));
      }
      it->second = e->ns_next[t];
    }
    for (const auto& [ns, rest] : cursor) {
      if (rest != nullptr) {
        return absl::InternalError(
            absl::StrCat(tier, ": namespace ", ns, "'s list holds a chunk not in the tier's"));
      }
    }
    if (n != s.lru[t].count) {
      return absl::InternalError(absl::StrCat(tier, " list walked ", n, " of ", s.lru[t].count));
    }
  }
  return absl::OkStatus();
}

StoreStats TieredStore::Stats() const {
  State& s = *state_;
  MutexLock lock(&s.mu);
  StoreStats out;
  out.tiers = s.stats;
  for (int t = 0; t < kNumTierKinds; ++t) {
    TierStats& ts = out.tiers[t];
    ts.present = TierPresent(t);
    if (!ts.present) continue;
    ts.chunks = s.lru[t].count;
    ts.bytes = s.lru[t].bytes;
    ts.used_bytes = TierUsed(t);
    ts.capacity_bytes = t == kDisk ? disk_->capacity_bytes() : MemTier(t)->capacity_bytes();
    ts.prefaulted_bytes = t == kDisk ? ts.capacity_bytes : MemTier(t)->prefaulted_bytes();
  }
  if (disk_) out.tiers[kDisk].checksum_failures = disk_->checksum_failures();
  out.reservations_active = s.reservations.size();
  out.reservations_expired = s.reservations_expired;
  out.commits = s.commits;
  out.commit_failures = s.commit_failures;
  out.leases_active = s.leases.size();
  out.leases_expired = s.leases_expired;
  return out;
}

}  // namespace kvdn::storage
