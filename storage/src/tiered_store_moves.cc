// Eviction, demotion, promotion and maintenance of TieredStore. Every function here is called
// with state_->mu held; those that do I/O release it around the I/O with the chunk pinned.
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

MemoryTier* TieredStore::MemTier(int t) const {
  return t == kGpu ? static_cast<MemoryTier*>(gpu_.get()) : static_cast<MemoryTier*>(host_.get());
}

uint64_t TieredStore::TierUsed(int t) const {
  return t == kDisk ? disk_->used_bytes() : MemTier(t)->used_bytes();
}

bool TieredStore::TierPresent(int t) const {
  return t == kHost || (t == kGpu && gpu_) || (t == kDisk && disk_);
}

// ---- removal and reaping ----

void TieredStore::FreeMemoryLocked(Entry* e) {
  State& s = *state_;
  if (e->mem == kNone) return;
  s.Unlink(e, e->mem);
  if (absl::Status st = MemTier(e->mem)->Free(e->block); !st.ok()) {
    spdlog::error("tiered store: freeing {}: {}", e->key.ToString(), st.message());
  }
  e->mem = kNone;
}

void TieredStore::DropDiskCopyLocked(Entry* e) {
  if (!e->on_disk) return;
  state_->Unlink(e, kDisk);
  if (absl::Status st = disk_->Delete(e->key); !st.ok()) {
    spdlog::error("tiered store: deleting {} from disk: {}", e->key.ToString(), st.message());
  }
  e->on_disk = false;
}

void TieredStore::RemoveLocked(Entry* e) {
  FreeMemoryLocked(e);
  DropDiskCopyLocked(e);
  const ChunkKey key = e->key;
  state_->index.erase(key);
}

bool TieredStore::MaybeReapLocked(Entry* e) {
  if (e->pins > 0 || e->moving) return false;
  if (e->doomed || (e->mem == kNone && !e->on_disk)) {
    RemoveLocked(e);
    return true;
  }
  return false;
}

// ---- eviction ----

absl::StatusOr<MemoryBlock> TieredStore::AllocateLocked(int t, uint64_t size, const Entry* keep,
                                                        bool may_block, absl::string_view ns) {
  MemoryTier* tier = MemTier(t);
  State& s = *state_;
  if (s.track_ns[t]) {
    // Past its share, the namespace makes room among its own chunks first.
    const std::string name(ns.empty() && keep != nullptr ? absl::string_view(keep->key.ns) : ns);
    const absl::string_view option = ShareOption(t);
    const double fraction = ShareFraction(t);
    const absl::string_view tier_name = TierKindName(static_cast<TierKind>(t));
    const uint64_t share = ShareBytes(t);
    if (size > share) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "a chunk of ", size, " bytes is larger than namespace \"", name, "\"'s share of the ",
          tier_name, " tier (", option, " ", fraction, " of ", tier->capacity_bytes(), " bytes)"));
    }
    while (s.BytesOf(t, name) + size > share) {
      bool would_block = false;
      if (!EvictOneLocked(t, keep, may_block, &would_block, &name)) {
        if (would_block) return absl::UnavailableError(kWouldBlock);
        return absl::ResourceExhaustedError(
            absl::StrCat("namespace \"", name, "\" holds ", s.BytesOf(t, name), " bytes of the ",
                         tier_name, " tier and its share is ", share, " (", option, " ", fraction,
                         "): every chunk of it there is leased or moving"));
      }
    }
  }
  // Each round either allocates or evicts one chunk; bound the rounds in case others refill.
  for (size_t round = 0; round < state_->index.size() + 8; ++round) {
    auto block = tier->Allocate(size);
    if (block.ok()) return block;
    bool would_block = false;
    if (!EvictOneLocked(t, keep, may_block, &would_block)) {
      if (would_block) return absl::UnavailableError(kWouldBlock);
      break;
    }
  }
  return absl::ResourceExhaustedError(
      absl::StrCat(TierKindName(static_cast<TierKind>(t)), " tier has no room for ", size,
                   " bytes: every chunk in it is leased or in transit (capacity ",
                   tier->capacity_bytes(), ", used ", tier->used_bytes(), ")"));
}

bool TieredStore::EvictOneLocked(int t, const Entry* keep, bool may_block, bool* would_block,
                                 const std::string* only_ns) {
  State& s = *state_;
  auto unfit = [&](const Entry* e) {
    return e == keep || e->moving || (t != kDisk && e->pins > 0) ||
           (t == kDisk && e->mem == kNone && e->pins > 0);
  };
  Entry* victim;
  if (only_ns != nullptr && s.track_ns[t]) {
    // The namespace's own list: no walk past other namespaces' chunks.
    victim = s.TailOf(t, *only_ns);
    while (victim && unfit(victim)) victim = victim->ns_prev[t];
  } else {
    victim = s.lru[t].tail;
    while (victim && (unfit(victim) || (only_ns != nullptr && victim->key.ns != *only_ns))) {
      victim = victim->prev[t];
    }
  }
  if (!victim) return false;
  const bool needs_io = t == kGpu || (t == kHost && !victim->on_disk && disk_ &&
                                      victim->size <= disk_->capacity_bytes());
  if (needs_io && !may_block) {
    if (would_block != nullptr) *would_block = true;
    return false;
  }
  TierStats& ts = s.stats[t];
  ++ts.evictions;
  if (t == kDisk) {
    DropDiskCopyLocked(victim);
    MaybeReapLocked(victim);
    return true;
  }
  if (t == kHost) {
    if (victim->on_disk || !disk_ || victim->size > disk_->capacity_bytes()) {
      if (victim->on_disk) ++ts.demotions;
      FreeMemoryLocked(victim);
      MaybeReapLocked(victim);
      return true;
    }
    DemoteToDiskLocked(victim);
    return true;
  }
  (void)DemoteGpuToHostLocked(victim, /*for_reader=*/false);
  return true;
}

absl::Status TieredStore::WriteToDiskLocked(Entry* e) {
  State& s = *state_;
  std::vector<uint8_t> staged;
  ByteSpan bytes;
  if (e->mem == kHost) {
    bytes = host_->Bytes(e->block);
  } else {  // GPU copy: stage it in host memory first
    staged.resize(e->size);
    s.mu.Unlock();
    absl::Status st = gpu_->CopyOut(e->block, 0, MutableByteSpan(staged));
    s.mu.Lock();
    KVDN_RETURN_IF_ERROR(st);
    bytes = ByteSpan(staged);
  }
  // While written the chunk counts in its namespace's disk share (Link counts it after).
  s.Count(kDisk, e->key.ns, e->size, true);
  s.mu.Unlock();
  absl::Status st = disk_->Write(e->key, bytes);
  s.mu.Lock();
  s.Count(kDisk, e->key.ns, e->size, false);
  if (st.ok()) {
    e->on_disk = true;
    s.Link(e, kDisk);
  }
  return st;
}

double TieredStore::ShareFraction(int t) const {
  return t == kGpu    ? options_.namespace_gpu_share
         : t == kHost ? options_.namespace_host_share
                      : options_.namespace_disk_share;
}

absl::string_view TieredStore::ShareOption(int t) {
  return t == kGpu    ? "namespace_gpu_share"
         : t == kHost ? "namespace_host_share"
                      : "namespace_disk_share";
}

uint64_t TieredStore::ShareBytes(int t) const {
  if (!state_->track_ns[t]) return 0;
  const uint64_t capacity = t == kDisk ? disk_->capacity_bytes() : MemTier(t)->capacity_bytes();
  return static_cast<uint64_t>(ShareFraction(t) * static_cast<double>(capacity));
}

bool TieredStore::OverDiskShareLocked(const Entry& e) const {
  const State& s = *state_;
  if (!s.track_ns[kDisk]) return false;
  return s.BytesOf(kDisk, e.key.ns) + e.size > ShareBytes(kDisk);
}

void TieredStore::DemoteToDiskLocked(Entry* e) {
  State& s = *state_;
  // Make room on disk first, so the disk tier never exceeds its capacity: past its namespace's
  // share, among that namespace's own disk chunks first.
  e->moving = true;
  ++e->pins;
  const std::string ns = e->key.ns;
  const uint64_t share = ShareBytes(kDisk);
  const bool can_fit_share = !s.track_ns[kDisk] || e->size <= share;
  while (can_fit_share && OverDiskShareLocked(*e)) {
    if (!EvictOneLocked(kDisk, e, /*may_block=*/true, nullptr, &ns)) break;
  }
  while (disk_->used_bytes() + e->size > disk_->capacity_bytes()) {
    if (!EvictOneLocked(kDisk, e)) break;
  }
  absl::Status st;
  if (OverDiskShareLocked(*e)) {
    st = absl::ResourceExhaustedError(
        absl::StrCat("namespace \"", ns, "\" holds ", s.BytesOf(kDisk, ns),
                     " bytes of the disk tier and its share is ", share,
                     " (namespace_disk_share): no room for ", e->size, " more"));
  } else if (disk_->used_bytes() + e->size > disk_->capacity_bytes()) {
    st = absl::ResourceExhaustedError("disk tier full");
  } else {
    st = WriteToDiskLocked(e);
  }
  --e->pins;
  e->moving = false;
  s.cv.SignalAll();
  if (!st.ok()) {
    spdlog::warn("tiered store: demoting {} to disk failed, dropping it: {}", e->key.ToString(),
                 st.message());
  }
  if (e->pins == 0) {
    if (st.ok()) ++s.stats[kHost].demotions;
    FreeMemoryLocked(e);
  }
  MaybeReapLocked(e);
}

absl::Status TieredStore::DemoteGpuToHostLocked(Entry* e, bool for_reader) {
  State& s = *state_;
  e->moving = true;
  ++e->pins;
  auto hb = AllocateLocked(kHost, e->size, e);
  absl::Status st = hb.status();
  // While in transit the new block counts in the namespace's share (Link counts it after).
  if (hb.ok()) s.CountHost(e->key.ns, e->size, true);
  if (hb.ok()) {
    const MemoryBlock gb = e->block;
    const MutableByteSpan dst = host_->Bytes(*hb);
    s.mu.Unlock();
    st = gpu_->CopyOut(gb, 0, dst);
    s.mu.Lock();
  }
  --e->pins;
  e->moving = false;
  s.cv.SignalAll();
  if (hb.ok()) s.CountHost(e->key.ns, e->size, false);
  if (st.ok() && e->pins == 0 && !e->doomed) {
    FreeMemoryLocked(e);
    e->mem = kHost;
    e->block = *hb;
    s.Link(e, kHost);
    ++s.stats[kGpu].demotions;
    return absl::OkStatus();
  }
  if (hb.ok()) (void)host_->Free(*hb);
  if (st.ok() && e->pins > 0) {
    st = absl::UnavailableError(absl::StrCat("chunk ", e->key.ToString(),
                                             " is leased in GPU memory by another reader; retry"));
  } else if (!st.ok() && !for_reader) {
    // Evicting with no room below (or a failed copy): drop the GPU copy; a disk copy stays.
    spdlog::warn("tiered store: demoting {} from GPU failed: {}", e->key.ToString(), st.message());
    if (e->pins == 0) FreeMemoryLocked(e);
  }
  MaybeReapLocked(e);
  return st;
}

void TieredStore::MaintenanceLocked() {
  State& s = *state_;
  const absl::Time now = clock_->Now();
  std::vector<uint64_t> expired;
  for (const auto& [id, r] : s.reservations) {
    if (!r.committing && r.writers == 0 && r.expires <= now) expired.push_back(id);
  }
  for (uint64_t id : expired) {
    auto it = s.reservations.find(id);
    (void)host_->Free(it->second.block);
    s.CountHost(it->second.key.ns, it->second.block.size, false);
    s.reserved_keys.erase(it->second.key);
    s.reservations.erase(it);
    s.expired_reservations.Add(id);
    ++s.reservations_expired;
  }
  expired.clear();
  for (const auto& [id, l] : s.leases) {
    if (l.expires <= now) expired.push_back(id);
  }
  for (uint64_t id : expired) {
    auto it = s.leases.find(id);
    Entry* e = it->second.entry;
    s.leases.erase(it);
    s.expired_leases.Add(id);
    ++s.leases_expired;
    --e->pins;
    MaybeReapLocked(e);
  }
  for (int t = 0; t < kNumTierKinds; ++t) {
    if (!TierPresent(t)) continue;
    const Tier* tier = t == kDisk ? static_cast<const Tier*>(disk_.get()) : MemTier(t);
    if (TierUsed(t) <= tier->high_watermark_bytes()) continue;
    while (TierUsed(t) > tier->low_watermark_bytes()) {
      if (!EvictOneLocked(t, nullptr)) break;
    }
  }
}

void TieredStore::RunMaintenance() {
  MutexLock lock(&state_->mu);
  MaintenanceLocked();
}

void TieredStore::WakeIfAboveHighLocked(int t) {
  if (options_.maintenance_interval <= absl::ZeroDuration()) return;
  if (MemTier(t)->used_bytes() > MemTier(t)->high_watermark_bytes()) {
    state_->wake = true;
    state_->cv.SignalAll();
  }
}

absl::Status TieredStore::PromoteFromDiskLocked(Entry* e) {
  State& s = *state_;
  e->moving = true;
  ++e->pins;
  auto hb = AllocateLocked(kHost, e->size, e);
  absl::Status st = hb.status();
  // While in transit the new block counts in the namespace's share (Link counts it after).
  if (hb.ok()) s.CountHost(e->key.ns, e->size, true);
  if (hb.ok()) {
    const MutableByteSpan dst = host_->Bytes(*hb);
    const ChunkKey key = e->key;
    s.mu.Unlock();
    auto n = disk_->Read(key, dst);
    s.mu.Lock();
    st = n.status();
  }
  --e->pins;
  e->moving = false;
  s.cv.SignalAll();
  if (hb.ok()) s.CountHost(e->key.ns, e->size, false);
  if (!st.ok()) {
    if (hb.ok()) (void)host_->Free(*hb);
    if (absl::IsDataLoss(st)) {
      // The disk tier counted it and deleted it; forget the disk copy.
      s.Unlink(e, kDisk);
      e->on_disk = false;
    }
    MaybeReapLocked(e);
    return st;
  }
  if (e->doomed) {
    (void)host_->Free(*hb);
    MaybeReapLocked(e);
    return absl::OkStatus();  // the caller looks again and finds it gone
  }
  e->mem = kHost;
  e->block = *hb;
  s.Link(e, kHost);
  ++s.stats[kHost].promotions;
  return absl::OkStatus();
}

void TieredStore::PromoteToGpuLocked(Entry* e) {
  State& s = *state_;
  e->moving = true;
  ++e->pins;
  auto gb = AllocateLocked(kGpu, e->size, e);
  absl::Status st = gb.status();
  if (gb.ok()) {
    // While in transit the new block counts in the namespace's share (Link counts it after).
    s.Count(kGpu, e->key.ns, e->size, true);
    const ByteSpan src = host_->Bytes(e->block);
    s.mu.Unlock();
    st = gpu_->CopyIn(*gb, 0, src);
    s.mu.Lock();
    s.Count(kGpu, e->key.ns, e->size, false);
  }
  --e->pins;
  e->moving = false;
  s.cv.SignalAll();
  if (st.ok() && e->pins == 0 && !e->doomed) {
    FreeMemoryLocked(e);
    e->mem = kGpu;
    e->block = *gb;
    s.Link(e, kGpu);
    ++s.stats[kGpu].promotions;
    return;
  }
  if (gb.ok()) (void)gpu_->Free(*gb);
  MaybeReapLocked(e);
}

}  // namespace kvdn::storage
