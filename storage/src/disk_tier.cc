#include "kvdn/storage/disk_tier.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "kvdn/common/logging.h"
#include "rocksdb/db.h"
#include "rocksdb/options.h"
#include "rocksdb/write_batch.h"

namespace kvdn::storage {
namespace {

// Key layout in RocksDB:
//   'm' + ChunkKey (u8 namespace length, namespace, u64 BE fingerprint, 16-byte canonical hash)
//       -> metadata: 64-byte chunk header, u64le write time (us since epoch), u64le sequence
//   'd' + u64 BE sequence -> the encoded chunk (stored in a blob file)
// Chunk bytes are keyed by a per-tier write sequence, not by their hash: a memtable flushes in key
// order, so blob files hold chunks in the order they were written, and a prefix chain written
// together is read back sequentially (kernel readahead) rather than from random offsets.
constexpr char kMetaPrefix = 'm';
constexpr char kDataPrefix = 'd';
constexpr size_t kMetaBytes = kChunkHeaderBytes + 16;

std::string EncodeKey(char prefix, const ChunkKey& key) {
  std::string out;
  out.reserve(1 + 1 + key.ns.size() + 8 + 16);
  out.push_back(prefix);
  out.push_back(static_cast<char>(key.ns.size()));
  out += key.ns;
  for (int i = 7; i >= 0; --i) out.push_back(static_cast<char>(key.fingerprint >> (8 * i)));
  const auto h = key.prefix_hash.Canonical();
  out.append(reinterpret_cast<const char*>(h.data()), h.size());
  return out;
}

std::string DataKey(uint64_t seq) {
  std::string out(1, kDataPrefix);
  for (int i = 7; i >= 0; --i) out.push_back(static_cast<char>(seq >> (8 * i)));
  return out;
}

uint64_t GetU64Le(const char* p) { return LoadLe<uint64_t>(reinterpret_cast<const uint8_t*>(p)); }

absl::StatusOr<ChunkKey> DecodeKey(const rocksdb::Slice& s) {
  if (s.size() < 2) return absl::DataLossError("disk tier: short key in metadata");
  const size_t ns_len = static_cast<uint8_t>(s[1]);
  if (s.size() != 2 + ns_len + 8 + 16) return absl::DataLossError("disk tier: malformed key");
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  ChunkKey key;
  key.ns.assign(s.data() + 2, ns_len);
  p += 2 + ns_len;
  for (int i = 0; i < 8; ++i) key.fingerprint = (key.fingerprint << 8) | p[i];
  p += 8;
  for (int i = 0; i < 8; ++i) key.prefix_hash.high = (key.prefix_hash.high << 8) | p[i];
  for (int i = 8; i < 16; ++i) key.prefix_hash.low = (key.prefix_hash.low << 8) | p[i];
  return key;
}

absl::Status FromRocks(const rocksdb::Status& s, absl::string_view what) {
  if (s.ok()) return absl::OkStatus();
  const std::string msg = absl::StrCat("disk tier: ", what, ": ", s.ToString());
  if (s.IsNotFound()) return absl::NotFoundError(msg);
  if (s.IsCorruption()) return absl::DataLossError(msg);
  if (s.IsIOError() || s.IsBusy() || s.IsTryAgain()) return absl::UnavailableError(msg);
  if (s.IsNoSpace()) return absl::ResourceExhaustedError(msg);
  return absl::InternalError(msg);
}

absl::StatusOr<DiskChunkMeta> DecodeMeta(const rocksdb::Slice& key, const rocksdb::Slice& value) {
  KVDN_ASSIGN_OR_RETURN(ChunkKey k, DecodeKey(key));
  if (value.size() != kMetaBytes) return absl::DataLossError("disk tier: malformed metadata");
  const auto* p = reinterpret_cast<const uint8_t*>(value.data());
  KVDN_ASSIGN_OR_RETURN(ChunkHeader h, DecodeChunkHeader(ByteSpan(p, kChunkHeaderBytes)));
  const auto* c = reinterpret_cast<const char*>(p);
  return DiskChunkMeta{std::move(k), h, kChunkHeaderBytes + h.payload_bytes,
                       absl::FromUnixMicros(static_cast<int64_t>(GetU64Le(c + kChunkHeaderBytes))),
                       GetU64Le(c + kChunkHeaderBytes + 8)};
}

}  // namespace

DiskTier::DiskTier(const DiskTierOptions& options) : options_(options) {}

DiskTier::~DiskTier() {
  if (db_) {
    if (absl::Status s = Sync(); !s.ok()) spdlog::warn("disk tier: sync at close: {}", s.message());
    rocksdb::Status s = db_->Close();
    if (!s.ok()) spdlog::warn("disk tier: close: {}", s.ToString());
  }
}

absl::StatusOr<std::unique_ptr<DiskTier>> DiskTier::Open(const DiskTierOptions& options) {
  if (options.path.empty()) return absl::InvalidArgumentError("disk tier path is empty");
  if (options.capacity_bytes == 0) return absl::InvalidArgumentError("disk tier capacity is 0");
  KVDN_RETURN_IF_ERROR(options.watermarks.Validate());
  std::error_code ec;
  std::filesystem::create_directories(options.path, ec);
  if (ec) {
    return absl::UnavailableError(
        absl::StrCat("disk tier: cannot create ", options.path, ": ", ec.message()));
  }

  rocksdb::Options o;
  o.create_if_missing = true;
  // The LSM tree holds only 80-byte metadata records and the chunk payloads are random-looking
  // floats: compression would cost CPU and save nothing.
  o.compression = rocksdb::kNoCompression;
  o.blob_compression_type = rocksdb::kNoCompression;
  o.enable_blob_files = true;
  o.min_blob_size = 256;  // chunk bytes go to blobs; 72-byte metadata stays in the LSM tree
  o.blob_file_size = 256ull << 20;
  o.enable_blob_garbage_collection = true;
  o.write_buffer_size = options.write_buffer_bytes;
  o.max_write_buffer_number = 4;
  o.use_fsync = false;  // fdatasync
  o.avoid_flush_during_shutdown = false;
  o.max_background_jobs = 2;
  o.IncreaseParallelism(2);
  o.paranoid_checks = true;
  // Chunks of one prefix are written together and read back in order: let the kernel read ahead
  // in blob files instead of RocksDB's default POSIX_FADV_RANDOM.
  o.advise_random_on_open = false;
  // The host tier is the cache: blob reads and flushes bypass the page cache (O_DIRECT), which
  // saves a kernel copy of every chunk byte each way. Measured in bench/storage: with a few reads
  // in flight (ReadMany) direct reads beat buffered ones at every chunk size.
  o.use_direct_reads = options.direct_reads;
  o.use_direct_io_for_flush_and_compaction = options.direct_flush;

  std::unique_ptr<DiskTier> tier(new DiskTier(options));
  rocksdb::DB* db = nullptr;
  KVDN_RETURN_IF_ERROR(FromRocks(rocksdb::DB::Open(o, options.path, &db), "open"));
  tier->db_.reset(db);

  // Rebuild the counters from the metadata records.
  uint64_t used = 0, chunks = 0, max_seq = 0;
  KVDN_RETURN_IF_ERROR(tier->ForEach([&](const DiskChunkMeta& m) {
    used += m.stored_bytes;
    ++chunks;
    max_seq = std::max(max_seq, m.sequence);
    return true;
  }));
  tier->used_ = used;
  tier->chunks_ = chunks;
  tier->next_seq_ = max_seq + 1;
  return tier;
}

absl::Status DiskTier::Write(const ChunkKey& key, ByteSpan encoded) {
  KVDN_ASSIGN_OR_RETURN(ChunkView view, DecodeChunk(encoded, /*verify_payload=*/false));
  MutexLock lock(&write_mu_);
  const uint64_t seq = next_seq_.fetch_add(1);
  std::string meta(kMetaBytes, '\0');
  std::memcpy(meta.data(), encoded.data(), kChunkHeaderBytes);
  const uint64_t now_us = static_cast<uint64_t>(absl::ToUnixMicros(absl::Now()));
  StoreLe(reinterpret_cast<uint8_t*>(meta.data()) + kChunkHeaderBytes, now_us);
  StoreLe(reinterpret_cast<uint8_t*>(meta.data()) + kChunkHeaderBytes + 8, seq);
  const std::string mkey = EncodeKey(kMetaPrefix, key);
  // Replacing a chunk: drop its old bytes in the same batch and fix the counters.
  auto old = Stat(key);
  rocksdb::WriteBatch batch;
  if (old.ok()) batch.Delete(DataKey(old->sequence));
  batch.Put(mkey, meta);
  batch.Put(DataKey(seq),
            rocksdb::Slice(reinterpret_cast<const char*>(encoded.data()), encoded.size()));
  rocksdb::WriteOptions wo;
  wo.disableWAL = options_.sync_each_write;  // then durability comes from the flush below
  KVDN_RETURN_IF_ERROR(FromRocks(db_->Write(wo, &batch), "write"));
  if (options_.sync_each_write) {
    rocksdb::FlushOptions fo;
    fo.wait = true;
    fo.allow_write_stall = true;
    KVDN_RETURN_IF_ERROR(FromRocks(db_->Flush(fo), "flush"));
  }
  if (old.ok()) {
    used_.fetch_sub(old->stored_bytes);
  } else {
    chunks_.fetch_add(1);
  }
  used_.fetch_add(kChunkHeaderBytes + view.header.payload_bytes);
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> DiskTier::Read(const ChunkKey& key, MutableByteSpan dst) {
  // RocksDB's own CRC32C of the blob is skipped: Debian's RocksDB is a portable build whose CRC32C
  // runs in software (~1 GB/s, a quarter of all CPU time in bench/storage), and DecodeChunk below
  // verifies the header and the whole payload with XXH3 anyway, end to end.
  rocksdb::ReadOptions ro;
  ro.verify_checksums = false;
  auto meta = Stat(key);
  if (!meta.ok()) {
    if (absl::IsDataLoss(meta.status())) return DropCorrupt(key, meta.status());
    return meta.status();
  }
  rocksdb::PinnableSlice value;
  rocksdb::Status rs = db_->Get(ro, db_->DefaultColumnFamily(), DataKey(meta->sequence), &value);
  if (rs.IsNotFound()) {
    return DropCorrupt(key, absl::DataLossError("metadata present, chunk bytes missing"));
  }
  if (rs.IsCorruption()) return DropCorrupt(key, FromRocks(rs, "read"));
  KVDN_RETURN_IF_ERROR(FromRocks(rs, "read"));
  const ByteSpan bytes(reinterpret_cast<const uint8_t*>(value.data()), value.size());
  if (auto view = DecodeChunk(bytes, /*verify_payload=*/true); !view.ok()) {
    return DropCorrupt(key, view.status());
  }
  if (dst.size() < bytes.size()) {
    return absl::OutOfRangeError(absl::StrCat("disk tier: chunk is ", bytes.size(),
                                              " bytes, destination holds ", dst.size()));
  }
  std::memcpy(dst.data(), bytes.data(), bytes.size());
  return bytes.size();
}

std::vector<absl::StatusOr<uint64_t>> DiskTier::ReadMany(absl::Span<const ChunkKey> keys,
                                                         absl::Span<const MutableByteSpan> dsts,
                                                         int depth) {
  std::vector<absl::StatusOr<uint64_t>> out(keys.size(), absl::UnknownError("not read"));
  if (keys.size() != dsts.size()) {
    for (auto& r : out) r = absl::InvalidArgumentError("ReadMany: keys and dsts differ in size");
    return out;
  }
  std::atomic<size_t> next{0};
  auto reader = [&] {
    for (size_t i = next.fetch_add(1); i < keys.size(); i = next.fetch_add(1)) {
      out[i] = Read(keys[i], dsts[i]);
    }
  };
  const size_t helpers = std::min<size_t>(std::max(depth, 1) - 1, keys.size());
  std::vector<std::thread> threads;
  threads.reserve(helpers);
  for (size_t t = 0; t < helpers; ++t) threads.emplace_back(reader);
  reader();
  for (auto& t : threads) t.join();
  return out;
}

absl::Status DiskTier::DropCorrupt(const ChunkKey& key, const absl::Status& why) {
  checksum_failures_.fetch_add(1);
  spdlog::error("disk tier: dropping corrupt chunk {}: {}", key.ToString(), why.message());
  (void)Delete(key);
  return absl::DataLossError(absl::StrCat("disk tier: chunk ", key.ToString(),
                                          " failed verification and was dropped: ", why.message()));
}

absl::StatusOr<DiskChunkMeta> DiskTier::Stat(const ChunkKey& key) const {
  const std::string mkey = EncodeKey(kMetaPrefix, key);
  std::string value;
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), mkey, &value);
  if (s.IsNotFound()) {
    return absl::NotFoundError(absl::StrCat("disk tier: no chunk ", key.ToString()));
  }
  KVDN_RETURN_IF_ERROR(FromRocks(s, "stat"));
  return DecodeMeta(mkey, value);
}

absl::Status DiskTier::Sync() {
  KVDN_RETURN_IF_ERROR(FromRocks(db_->FlushWAL(/*sync=*/true), "sync WAL"));
  rocksdb::FlushOptions fo;
  fo.wait = true;
  fo.allow_write_stall = true;
  return FromRocks(db_->Flush(fo), "flush");
}

absl::Status DiskTier::Delete(const ChunkKey& key) {
  MutexLock lock(&write_mu_);
  const std::string mkey = EncodeKey(kMetaPrefix, key);
  std::string value;
  rocksdb::Status gs = db_->Get(rocksdb::ReadOptions(), mkey, &value);
  if (gs.IsNotFound()) return absl::OkStatus();
  KVDN_RETURN_IF_ERROR(FromRocks(gs, "delete"));
  rocksdb::WriteBatch batch;
  batch.Delete(mkey);
  auto meta = DecodeMeta(mkey, value);
  if (meta.ok()) batch.Delete(DataKey(meta->sequence));
  KVDN_RETURN_IF_ERROR(FromRocks(db_->Write(rocksdb::WriteOptions(), &batch), "delete"));
  chunks_.fetch_sub(1);
  if (meta.ok()) used_.fetch_sub(meta->stored_bytes);
  return absl::OkStatus();
}

absl::Status DiskTier::ForEach(const std::function<bool(const DiskChunkMeta&)>& fn) const {
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
  const std::string prefix(1, kMetaPrefix);
  for (it->Seek(prefix); it->Valid() && it->key().starts_with(prefix); it->Next()) {
    auto meta = DecodeMeta(it->key(), it->value());
    if (!meta.ok()) {
      spdlog::error("disk tier: skipping unreadable metadata record: {}", meta.status().message());
      continue;
    }
    if (!fn(*meta)) break;
  }
  return FromRocks(it->status(), "scan");
}

}  // namespace kvdn::storage
