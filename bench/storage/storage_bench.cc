// bench/storage: the chunk store's host and disk tiers beside their physical ceilings, same run.
//
//   host put  = TieredStore::Put (reserve, copy + XXH3 verify, commit)   vs memcpy of the same
//   bytes host get  = TieredStore::Get (lease, copy out, release)              vs memcpy of the
//   same bytes disk write= DiskTier::Write, each chunk durable (flushed + fdatasync'd) vs raw
//   sequential write()
//               of one file of the same total size + one fdatasync at the end
//   disk read = DiskTier::Read of every chunk, cold, checksum verified    vs raw sequential read()
//   of
//               that file, cold
// Cold: after the writes are synced, every file is dropped from the page cache with
// posix_fadvise(POSIX_FADV_DONTNEED) and the DB is closed and reopened (empty block cache); the
// residency left in the page cache (mincore) is printed so the reader can check it.
//
// Usage: storage_bench [--sizes-mib 1,4,32] [--host-total-mib 1024] [--disk-total-mib 1024]
//                      [--reps 5] [--dir DIR] [--read-depth 4] [--buffered-reads]
//                      [--sync-each-write]
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <random>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "bench_util.h"
#include "kvdn/common/chunk_format.h"
#include "kvdn/storage/disk_tier.h"
#include "kvdn/storage/tiered_store.h"
#include "kvdn/testing/chunks.h"

namespace kvdn::bench {
namespace {

namespace fs = std::filesystem;
constexpr uint64_t kMiB = 1 << 20;
bool sync_each_write = false;
bool direct_reads = true;
int read_depth = 4;

struct Row {
  std::string size, op, ceiling_name;
  double gbps = 0, ceiling_gbps = 0, p50_ms = 0, p99_ms = 0, target = 0;
  std::string note;
};

[[noreturn]] void Die(const std::string& what) {
  fprintf(stderr, "storage_bench: %s\n", what.c_str());
  exit(1);
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Chunks shaped like Llama-3-8B KV (32 layers, 8 kv heads, head_dim 128, bf16: 128 KiB per token).
std::vector<std::vector<uint8_t>> MakeChunks(uint64_t bytes, size_t n) {
  const ChunkInfo info{Dtype::kBFloat16, 32, 8, 128, static_cast<uint32_t>(bytes / (128 * 1024))};
  std::vector<std::vector<uint8_t>> templates;
  for (int t = 0; t < 4; ++t) templates.push_back(testing::RandomChunk(info, 77 + t));
  std::vector<std::vector<uint8_t>> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = templates[i % templates.size()];
  return out;
}

std::vector<std::vector<uint8_t>> Buffers(size_t n, size_t bytes) {
  std::vector<std::vector<uint8_t>> out(n);
  for (auto& b : out) b.assign(bytes, 0x5A);  // touched: no page faults while timing
  return out;
}

void RunHost(uint64_t size, uint64_t total, int reps, std::vector<Row>& rows) {
  const size_t n = std::max<size_t>(4, total / size);
  auto src = MakeChunks(size, n);
  const size_t bytes = src[0].size();
  auto dst = Buffers(n, bytes);

  std::vector<double> cp_gbps, put_gbps, get_gbps;
  Latencies cp_lat, put_lat, get_lat;
  for (int r = 0; r < reps; ++r) {
    Latencies l;
    for (size_t i = 0; i < n; ++i) {
      auto t0 = Clock::now();
      std::memcpy(dst[i].data(), src[i].data(), bytes);
      l.Add(Seconds(t0, Clock::now()));
    }
    cp_gbps.push_back(static_cast<double>(bytes * n) / l.Sum() / 1e9);
    for (double v : l.s) cp_lat.Add(v);
  }

  storage::TieredStoreOptions o;
  o.host.capacity_bytes = (bytes + 4096) * n + 64 * kMiB;
  o.host.watermarks = {.high_watermark = 1.0, .low_watermark = 1.0};
  o.maintenance_interval = absl::ZeroDuration();
  auto store = storage::TieredStore::Open(o);
  if (!store.ok()) Die(store.status().ToString());
  auto key = [](size_t i) { return testing::KeyFor(i, "bench"); };
  for (int r = 0; r < reps; ++r) {
    for (size_t i = 0; i < n && r > 0; ++i) (void)(*store)->Delete(key(i));
    Latencies l;
    for (size_t i = 0; i < n; ++i) {
      auto t0 = Clock::now();
      absl::Status s = (*store)->Put(key(i), src[i]);
      l.Add(Seconds(t0, Clock::now()));
      if (!s.ok()) Die("host put: " + s.ToString());
    }
    put_gbps.push_back(static_cast<double>(bytes * n) / l.Sum() / 1e9);
    for (double v : l.s) put_lat.Add(v);
  }
  for (int r = 0; r < reps; ++r) {
    for (auto& d : dst) d[bytes / 2] ^= 0xFF;  // so a get that writes nothing is caught
    Latencies l;
    for (size_t i = 0; i < n; ++i) {
      auto t0 = Clock::now();
      auto got = (*store)->Get(key(i), MutableByteSpan(dst[i]));
      l.Add(Seconds(t0, Clock::now()));
      if (!got.ok()) Die("host get: " + got.status().ToString());
    }
    get_gbps.push_back(static_cast<double>(bytes * n) / l.Sum() / 1e9);
    for (double v : l.s) get_lat.Add(v);
    for (size_t i = 0; i < n; ++i) {
      if (std::memcmp(dst[i].data(), src[i].data(), bytes) != 0)
        Die("host get returned wrong bytes");
    }
  }
  const std::string sz = absl::StrFormat("%d MiB", size / kMiB);
  const double cp = Median(cp_gbps);
  rows.push_back({sz, "host put", "memcpy", Median(put_gbps), cp, put_lat.Percentile(0.5) * 1e3,
                  put_lat.Percentile(0.99) * 1e3, 0.80,
                  absl::StrFormat("memcpy p50 %.3f ms", cp_lat.Percentile(0.5) * 1e3)});
  rows.push_back({sz, "host get", "memcpy", Median(get_gbps), cp, get_lat.Percentile(0.5) * 1e3,
                  get_lat.Percentile(0.99) * 1e3, 0.80, ""});
}

// Fraction of the file's pages in the page cache.
double Resident(const fs::path& p) {
  const int fd = open(p.c_str(), O_RDONLY);
  if (fd < 0) return 0;
  struct stat st;
  fstat(fd, &st);
  double frac = 0;
  if (st.st_size > 0) {
    void* m = mmap(nullptr, st.st_size, PROT_READ, MAP_SHARED, fd, 0);
    const size_t page = sysconf(_SC_PAGESIZE);
    const size_t pages = (st.st_size + page - 1) / page;
    std::vector<unsigned char> vec(pages);
    if (m != MAP_FAILED && mincore(m, st.st_size, vec.data()) == 0) {
      size_t res = 0;
      for (unsigned char c : vec) res += c & 1;
      frac = static_cast<double>(res) / static_cast<double>(pages);
    }
    if (m != MAP_FAILED) munmap(m, st.st_size);
  }
  close(fd);
  return frac;
}

// Drops every file under `path` from the page cache; returns bytes still resident afterwards.
double DropCache(const fs::path& path, uint64_t* total_bytes) {
  double resident = 0;
  uint64_t total = 0;
  auto drop = [&](const fs::path& f) {
    const int fd = open(f.c_str(), O_RDONLY);
    if (fd < 0) return;
    fdatasync(fd);
    posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    close(fd);
    const uint64_t sz = fs::file_size(f);
    total += sz;
    resident += Resident(f) * static_cast<double>(sz);
  };
  if (fs::is_directory(path)) {
    for (const auto& e : fs::recursive_directory_iterator(path)) {
      if (e.is_regular_file()) drop(e.path());
    }
  } else {
    drop(path);
  }
  *total_bytes = total;
  return total ? resident / static_cast<double>(total) : 0;
}

void RunDisk(uint64_t size, uint64_t total, const fs::path& dir, std::vector<Row>& rows) {
  const size_t n = std::max<size_t>(4, total / size);
  auto src = MakeChunks(size, 8);
  const size_t bytes = src[0].size();
  std::vector<uint8_t> dst(bytes);
  const std::string sz = absl::StrFormat("%d MiB", size / kMiB);
  fs::create_directories(dir);

  // Raw sequential write + one fdatasync, then a cold sequential read, of n * bytes.
  const fs::path raw = dir / "raw.bin";
  Latencies raw_w, raw_r;
  auto t0 = Clock::now();
  int fd = open(raw.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) Die("open raw file");
  for (size_t i = 0; i < n; ++i) {
    auto a = Clock::now();
    if (write(fd, src[i % src.size()].data(), bytes) != static_cast<ssize_t>(bytes)) Die("write");
    raw_w.Add(Seconds(a, Clock::now()));
  }
  fdatasync(fd);
  close(fd);
  const double raw_write_s = Seconds(t0, Clock::now());
  uint64_t file_bytes = 0;
  const double raw_resident = DropCache(raw, &file_bytes);
  t0 = Clock::now();
  fd = open(raw.c_str(), O_RDONLY);
  for (size_t i = 0; i < n; ++i) {
    auto a = Clock::now();
    if (read(fd, dst.data(), bytes) != static_cast<ssize_t>(bytes)) Die("read");
    raw_r.Add(Seconds(a, Clock::now()));
  }
  close(fd);
  const double raw_read_s = Seconds(t0, Clock::now());
  fs::remove(raw);

  // kvdn disk tier: every Write durable on return; then cold reads with checksum verification.
  const fs::path db = dir / "kvdn";
  fs::remove_all(db);
  Latencies kw, kr;
  double kw_sync = 0;
  {
    auto disk = storage::DiskTier::Open(
        {.path = db.string(), .capacity_bytes = 1ull << 40, .sync_each_write = sync_each_write});
    if (!disk.ok()) Die(disk.status().ToString());
    for (size_t i = 0; i < n; ++i) {
      auto a = Clock::now();
      absl::Status s = (*disk)->Write(testing::KeyFor(i, "bench"), src[i % src.size()]);
      kw.Add(Seconds(a, Clock::now()));
      if (!s.ok()) Die("disk write: " + s.ToString());
    }
    // Like the raw file's final fdatasync: everything durable against power loss.
    auto a = Clock::now();
    if (absl::Status s = (*disk)->Sync(); !s.ok()) Die("disk sync: " + s.ToString());
    kw_sync = Seconds(a, Clock::now());
  }
  uint64_t db_bytes = 0;
  const double db_resident = DropCache(db, &db_bytes);
  {
    auto disk = storage::DiskTier::Open(
        {.path = db.string(), .capacity_bytes = 1ull << 40, .direct_reads = direct_reads});
    if (!disk.ok()) Die(disk.status().ToString());
    // A prefix chain is read as a batch: ReadMany keeps read_depth chunk reads in flight.
    std::vector<std::vector<uint8_t>> bufs(read_depth, std::vector<uint8_t>(bytes));
    for (size_t i = 0; i < n; i += read_depth) {
      const size_t m = std::min<size_t>(read_depth, n - i);
      std::vector<ChunkKey> keys;
      std::vector<MutableByteSpan> dsts;
      for (size_t j = 0; j < m; ++j) {
        keys.push_back(testing::KeyFor(i + j, "bench"));
        bufs[j][bytes / 2] ^= 0xFF;  // so a read that writes nothing is caught
        dsts.emplace_back(bufs[j]);
      }
      auto a = Clock::now();
      auto got = (*disk)->ReadMany(keys, dsts, read_depth);
      const double t = Seconds(a, Clock::now());
      for (size_t j = 0; j < m; ++j) {
        kr.Add(t / static_cast<double>(m));
        if (!got[j].ok()) Die("disk read: " + got[j].status().ToString());
        if (std::memcmp(bufs[j].data(), src[(i + j) % src.size()].data(), bytes) != 0) {
          Die("disk read returned wrong bytes");
        }
      }
    }
  }
  fs::remove_all(db);
  const double moved = static_cast<double>(bytes * n);
  rows.push_back({sz, "disk write", "raw seq write+fdatasync", moved / (kw.Sum() + kw_sync) / 1e9,
                  moved / raw_write_s / 1e9, kw.Percentile(0.5) * 1e3, kw.Percentile(0.99) * 1e3,
                  0.60,
                  absl::StrFormat("%d chunks + final Sync %.0f ms; db on disk %.0f MiB", n,
                                  kw_sync * 1e3, db_bytes / 1048576.0)});
  rows.push_back({sz, "disk read (cold)", "raw seq read (cold)", moved / kr.Sum() / 1e9,
                  moved / raw_read_s / 1e9, kr.Percentile(0.5) * 1e3, kr.Percentile(0.99) * 1e3,
                  0.60,
                  absl::StrFormat("page cache before read: kvdn %.1f%%, raw %.1f%%; %d reads "
                                  "in flight, p50/p99 per chunk = batch time / batch size",
                                  db_resident * 100, raw_resident * 100, read_depth)});
}

}  // namespace
}  // namespace kvdn::bench

int main(int argc, char** argv) {
  using namespace kvdn::bench;
  std::vector<uint64_t> sizes = {1, 4, 32};
  uint64_t host_total = 1024, disk_total = 1024;
  int reps = 5;
  std::string dir = std::getenv("TMPDIR") ? std::getenv("TMPDIR") : "/var/tmp";
  dir += "/kvdn-storage-bench";
  std::string cmdline;
  for (int i = 0; i < argc; ++i) cmdline += std::string(i ? " " : "") + argv[i];
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) Die("missing value for " + a);
      return argv[++i];
    };
    if (a == "--sizes-mib") {
      sizes.clear();
      for (auto s : absl::StrSplit(next(), ',')) {
        uint64_t v;
        if (!absl::SimpleAtoi(s, &v) || v == 0) Die("bad --sizes-mib");
        sizes.push_back(v);
      }
    } else if (a == "--host-total-mib") {
      if (!absl::SimpleAtoi(next(), &host_total)) Die("bad --host-total-mib");
    } else if (a == "--disk-total-mib") {
      if (!absl::SimpleAtoi(next(), &disk_total)) Die("bad --disk-total-mib");
    } else if (a == "--reps") {
      if (!absl::SimpleAtoi(next(), &reps) || reps < 1) Die("bad --reps");
    } else if (a == "--sync-each-write") {
      sync_each_write = true;
    } else if (a == "--buffered-reads") {
      direct_reads = false;
    } else if (a == "--read-depth") {
      if (!absl::SimpleAtoi(next(), &read_depth) || read_depth < 1) Die("bad --read-depth");
    } else if (a == "--dir") {
      dir = next();
    } else {
      Die("unknown argument " + a + " (see the header of storage_bench.cc)");
    }
  }
  printf("# kvdn storage benchmark\n\n");
  printf("- date: %s\n", CommandOutput("date -u +%Y-%m-%dT%H:%M:%SZ").c_str());
  printf("- machine: %s, %ld cores, %s RAM\n", CpuModel().c_str(), sysconf(_SC_NPROCESSORS_ONLN),
         CommandOutput("free -g | awk '/Mem:/ {print $2 \" GiB\"}'").c_str());
  printf("- filesystem of %s: %s\n", dir.c_str(),
         CommandOutput(("df -hT " + std::filesystem::path(dir).parent_path().string() +
                        " | tail -1 | awk '{print $2, $1}'")
                           .c_str())
             .c_str());
  printf("- revision: %s\n", CommandOutput("git rev-parse --short HEAD 2>/dev/null").c_str());
  printf("- command: %s\n\n", cmdline.c_str());

  std::vector<Row> rows;
  for (uint64_t s : sizes) RunHost(s * kMiB, host_total * kMiB, reps, rows);
  for (uint64_t s : sizes) RunDisk(s * kMiB, disk_total * kMiB, dir, rows);
  std::filesystem::remove_all(dir);

  printf(
      "| chunk | op | kvdn GB/s | ceiling | ceiling GB/s | ratio | target | p50 ms | p99 ms | "
      "notes |\n|---|---|---|---|---|---|---|---|---|---|\n");
  bool all = true;
  for (const Row& r : rows) {
    const double ratio = r.gbps / r.ceiling_gbps;
    const bool ok = ratio >= r.target;
    all = all && ok;
    printf("| %s | %s | %.2f | %s | %.2f | %.0f%% | >= %.0f%% %s | %.3f | %.3f | %s |\n",
           r.size.c_str(), r.op.c_str(), r.gbps, r.ceiling_name.c_str(), r.ceiling_gbps,
           ratio * 100, r.target * 100, ok ? "met" : "MISSED", r.p50_ms, r.p99_ms, r.note.c_str());
  }
  printf("\nall targets %s\n", all ? "met" : "NOT met");
  return 0;
}
