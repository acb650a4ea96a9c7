// DiskTier: chunks on local disk in RocksDB, chunk bytes in blob files and a small metadata record
// per chunk in the LSM tree (ARCHITECTURE.md, "Storage").
//
// Durability, two modes (DiskTierOptions::sync_each_write):
//  - default: Write() returns once the chunk and its metadata are in RocksDB's WAL (written, not
//    fsync'd) and memtable, so it survives a kill of the process; Sync() (called on shutdown and by
//    the owner periodically) makes everything written so far survive a power loss too. Memtables
//    flush into large blob files in the background; WAL files are deleted once flushed, usually
//    before the kernel has written them back, so chunk bytes reach the device about once.
//  - sync_each_write: the memtable is written without a WAL and flushed + fsync'd before Write()
//    returns (one blob file per flush; concurrent writers share a flush): power-loss durable on
//    return, at several fsyncs per chunk.
//
// Integrity: every Read decodes the chunk and verifies its header and payload XXH3-64 checksums. A
// chunk that fails is deleted, counted in checksum_failures(), and reported as DATA_LOSS; its bytes
// are never returned.
//
// Thread-safe: every method may be called concurrently. Writes and deletes are serialised by a
// mutex (RocksDB writes its WAL serially anyway); this keeps the byte and chunk counters exact when
// a key is replaced, and keeps RocksDB from merging batches across threads, which ThreadSanitizer
// cannot follow into the uninstrumented library. Reads run in parallel.
#ifndef KVDN_STORAGE_DISK_TIER_H_
#define KVDN_STORAGE_DISK_TIER_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "kvdn/common/bytes.h"
#include "kvdn/common/chunk_format.h"
#include "kvdn/common/chunk_key.h"
#include "kvdn/common/mutex.h"
#include "kvdn/storage/tier.h"

namespace rocksdb {
class DB;
class ColumnFamilyHandle;
}  // namespace rocksdb

namespace kvdn::storage {

struct DiskTierOptions {
  std::string path;                              // directory; created if missing
  uint64_t capacity_bytes = uint64_t{16} << 30;  // chunk bytes; TieredStore evicts past watermarks
  WatermarkOptions watermarks;
  uint64_t write_buffer_bytes = uint64_t{128} << 20;
  bool sync_each_write = false;  // see "Durability" above
  bool direct_reads = true;      // O_DIRECT blob reads: no page-cache copy, one large I/O per chunk
  bool direct_flush = true;      // O_DIRECT memtable flushes: chunk bytes skip a page-cache copy
};

// What the disk tier knows about one stored chunk without reading its payload.
struct DiskChunkMeta {
  ChunkKey key;
  ChunkHeader header;
  uint64_t stored_bytes = 0;  // encoded size: header + payload
  absl::Time written;
  uint64_t sequence = 0;  // write order within this tier
};

class DiskTier final : public Tier {
 public:
  // INVALID_ARGUMENT for bad options; UNAVAILABLE if RocksDB cannot open the directory (another
  // process holds it, permissions, corruption), with RocksDB's message.
  static absl::StatusOr<std::unique_ptr<DiskTier>> Open(const DiskTierOptions& options);
  ~DiskTier() override;

  TierKind kind() const override { return TierKind::kDisk; }
  TierCaps caps() const override { return {.persistent = true}; }
  uint64_t capacity_bytes() const override { return options_.capacity_bytes; }
  uint64_t used_bytes() const override { return used_.load(std::memory_order_relaxed); }
  const WatermarkOptions& watermarks() const override { return options_.watermarks; }

  // Stores an encoded chunk (header + payload) under `key`, replacing any previous value. Checks
  // the header (INVALID_ARGUMENT/DATA_LOSS as DecodeChunk) but not the payload, which the caller
  // verified. INTERNAL/UNAVAILABLE for I/O errors.
  absl::Status Write(const ChunkKey& key, ByteSpan encoded);
  // Copies the chunk into dst[0, size) and returns its size. NOT_FOUND if absent; OUT_OF_RANGE if
  // dst is smaller than the chunk (nothing written); DATA_LOSS if it failed its checksum (now
  // deleted).
  absl::StatusOr<uint64_t> Read(const ChunkKey& key, MutableByteSpan dst);
  // Reads several chunks (e.g. a prefix chain) into dsts[i], keeping up to `depth` reads in flight
  // so one chunk's device time overlaps another's verification and copy. Result i is what Read
  // would return for keys[i]. REQUIRES: keys.size() == dsts.size().
  std::vector<absl::StatusOr<uint64_t>> ReadMany(absl::Span<const ChunkKey> keys,
                                                 absl::Span<const MutableByteSpan> dsts,
                                                 int depth = 2);
  // Metadata of one chunk; NOT_FOUND if absent.
  absl::StatusOr<DiskChunkMeta> Stat(const ChunkKey& key) const;
  // Makes every Write that returned durable against power loss (WAL fsync + memtable flush).
  absl::Status Sync();
  // Deletes `key`; OK if it was absent.
  absl::Status Delete(const ChunkKey& key);
  // Calls fn for every stored chunk's metadata (no payload is read). Stops early if fn returns
  // false.
  absl::Status ForEach(const std::function<bool(const DiskChunkMeta&)>& fn) const;

  uint64_t chunk_count() const { return chunks_.load(std::memory_order_relaxed); }
  uint64_t checksum_failures() const { return checksum_failures_.load(std::memory_order_relaxed); }
  const std::string& path() const { return options_.path; }

 private:
  explicit DiskTier(const DiskTierOptions& options);
  absl::Status DropCorrupt(const ChunkKey& key, const absl::Status& why);

  // Constant after construction.
  const DiskTierOptions options_;
  std::unique_ptr<rocksdb::DB> db_;

  Mutex write_mu_;  // serialises Write and Delete
  std::atomic<uint64_t> next_seq_{1};
  std::atomic<uint64_t> used_{0};
  std::atomic<uint64_t> chunks_{0};
  std::atomic<uint64_t> checksum_failures_{0};
};

}  // namespace kvdn::storage

#endif  // KVDN_STORAGE_DISK_TIER_H_
