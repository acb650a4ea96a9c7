// share_bench: what namespace_host_share (a tenant's share of the host tier) costs a write. The
// host tier holds the cold chunks of `tenants - 1` quiet tenants (about half of it, at the tail of
// the LRU); one busy tenant then writes without pause, past its share, so every Put makes room by
// evicting one of the busy tenant's own chunks. Measured on the same store sizes, same run: the
// busy tenant's TieredStore::Put without a share (eviction takes the global LRU tail: the quiet
// tenants' chunks first, then its own) and with one; beside memcpy of the same bytes.
//   share_bench [--chunk-kib 16] [--host-mib 256] [--tenants 16] [--share 0.5] [--puts 20000]
//               [--reps 3]
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "bench_util.h"
#include "kvdn/storage/tiered_store.h"
#include "kvdn/testing/chunks.h"

namespace kvdn::bench {
namespace {

constexpr uint64_t kMiB = 1 << 20;

struct Run {
  double p50_us = 0, p99_us = 0, gbps = 0;
  uint64_t quiet_left = 0;  // quiet tenants' chunks still in host memory at the end
};

Run Measure(double share, const std::vector<uint8_t>& chunk, uint64_t host_bytes, int tenants,
            int puts) {
  storage::TieredStoreOptions o;
  o.host.capacity_bytes = host_bytes;
  o.host.watermarks = {.high_watermark = 1.0, .low_watermark = 1.0};
  o.maintenance_interval = absl::ZeroDuration();
  o.namespace_host_share = share;
  auto store = storage::TieredStore::Open(o);
  if (!store.ok()) {
    std::fprintf(stderr, "%s\n", store.status().ToString().c_str());
    std::exit(1);
  }
  const uint64_t slot = chunk.size() + 4096;  // what a chunk takes in the arena, at most
  const uint64_t quiet_chunks = host_bytes / 2 / slot;
  uint64_t seed = 1;
  for (uint64_t i = 0; i < quiet_chunks; ++i) {
    const std::string ns = absl::StrCat("quiet-", i % static_cast<uint64_t>(tenants - 1));
    if (!(*store)->Put(testing::KeyFor(seed++, ns), chunk).ok()) std::exit(1);
  }
  // The busy tenant fills its share (or the rest of the tier), then goes on past it; measured
  // from the second half of its writes on, when each Put evicts.
  Latencies l;
  const int warm = puts / 2;
  for (int i = 0; i < puts; ++i) {
    const auto t0 = Clock::now();
    absl::Status st = (*store)->Put(testing::KeyFor(seed++, "busy"), chunk);
    if (i >= warm) l.Add(Seconds(t0, Clock::now()));
    if (!st.ok()) {
      std::fprintf(stderr, "busy put %d: %s\n", i, st.ToString().c_str());
      std::exit(1);
    }
  }
  Run r;
  r.p50_us = l.Percentile(0.5) * 1e6;
  r.p99_us = l.Percentile(0.99) * 1e6;
  r.gbps = double(chunk.size()) * double(l.s.size()) / l.Sum() / 1e9;
  std::vector<uint8_t> dst(chunk.size());
  for (uint64_t i = 1; i <= quiet_chunks; ++i) {
    const std::string ns = absl::StrCat("quiet-", (i - 1) % static_cast<uint64_t>(tenants - 1));
    if ((*store)->Get(testing::KeyFor(i, ns), MutableByteSpan(dst)).ok()) ++r.quiet_left;
  }
  return r;
}

}  // namespace
}  // namespace kvdn::bench

int main(int argc, char** argv) {
  using namespace kvdn::bench;  // NOLINT
  uint64_t chunk_kib = 16, host_mib = 256;
  int tenants = 16, puts = 20000, reps = 3;
  double share = 0.5;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    const char* v = argv[i + 1];
    if (a == "--chunk-kib") {
      chunk_kib = std::strtoull(v, nullptr, 10);
    } else if (a == "--host-mib") {
      host_mib = std::strtoull(v, nullptr, 10);
    } else if (a == "--tenants") {
      tenants = std::atoi(v);
    } else if (a == "--share") {
      share = std::atof(v);
    } else if (a == "--puts") {
      puts = std::atoi(v);
    } else if (a == "--reps") {
      reps = std::atoi(v);
    } else {
      std::fprintf(stderr,
                   "usage: share_bench [--chunk-kib N] [--host-mib N] [--tenants N] "
                   "[--share F] [--puts N] [--reps N]\n");
      return 2;
    }
  }
  if (tenants < 2 || share <= 0 || share >= 1 || puts < 2) {
    std::fprintf(stderr, "need --tenants >= 2, 0 < --share < 1, --puts >= 2\n");
    return 2;
  }
  const kvdn::ChunkInfo info = kvdn::testing::InfoForBytes(chunk_kib << 10, 1);
  const std::vector<uint8_t> chunk = kvdn::testing::RandomChunk(info, 7);
  const uint64_t host = host_mib * kMiB;
  // memcpy of the same bytes: the floor of a Put's copy.
  std::vector<uint8_t> dst(chunk.size());
  Latencies cp;
  for (int i = 0; i < 2000; ++i) {
    const auto t0 = Clock::now();
    std::memcpy(dst.data(), chunk.data(), chunk.size());
    cp.Add(Seconds(t0, Clock::now()));
  }
  std::printf(
      "# share_bench: chunk %zu bytes, host tier %llu MiB (~%llu chunks), %d quiet tenants "
      "holding half of it, busy tenant %d puts (second half timed), %d reps\n# cpu: %s "
      "(%u cores)\n\n",
      chunk.size(), static_cast<unsigned long long>(host_mib),
      static_cast<unsigned long long>(host / (chunk.size() + 4096)), tenants - 1, puts, reps,
      CpuModel().c_str(), std::thread::hardware_concurrency());
  std::printf(
      "| store | busy Put p50 us | p99 us | GB/s | quiet chunks left in host |\n"
      "|---|---|---|---|---|\n");
  for (int r = 0; r < reps; ++r) {
    for (double s : {1.0, share}) {
      const Run run = Measure(s, chunk, host, tenants, puts);
      std::printf("| %s | %.1f | %.1f | %.2f | %llu |\n",
                  s == 1.0 ? "no share" : absl::StrFormat("share %.2f", s).c_str(), run.p50_us,
                  run.p99_us, run.gbps, static_cast<unsigned long long>(run.quiet_left));
      std::fflush(stdout);
    }
  }
  std::printf(
      "\nmemcpy of one chunk (cache-hot, the floor of a Put's copy): p50 %.1f us. A Put "
      "reserves, copies and hashes the chunk, commits it and, here, evicts one chunk; "
      "\"no share\" is the ceiling a share is measured against.\n",
      cp.Percentile(0.5) * 1e6);
  return 0;
}
